"""Work across processes started by ``torchrun``: each process takes a share of the batches, the
per-batch records come back in one-process order, and only the main process (rank 0) writes and prints.

    torchrun --nproc-per-node 2 clip.py --data waterbirds --vocab 1000

Started without torchrun (no ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment), nothing here
starts a process group and every helper is the identity: one process behaves exactly as before.

Two ways to share the work, both keeping every batch exactly as one process would build it (so each
image meets the same batch, padding and kernels, and its record is the same):

- **whole batches** (:func:`shard`, :func:`unshard`, :func:`lockstep`): the one-process list of index
  batches, dealt round-robin (batch ``b`` to rank ``b % world``, so with ``--bucket`` every rank gets
  batches of every length); the per-batch records are gathered and put back in the one-process order.
  clip.py, blip.py, len.py and the token counts of ``--bucket``.
- **parts of each batch** (:class:`BatchStream`): each batch of consecutive images is cut into
  ``world`` contiguous parts, each process loads (and embeds) its part, and rank 0 gets the batch
  whole, in order, one at a time. process.py --engine sklearn: its k-means runs on rank 0 and sees
  the very batches of one process, in the same order, holding one batch at a time as one process does.
- **shared statistics** (:func:`parts`, :func:`all_sum`): process.py's other k-means read only their
  parts; the paper recipe in torch all-reduces per-word sums and counts each step (vwt.kmeans), the
  fast recipe gathers each process's bottom-k sample (vwt.vocab.bottom_k_sample).

Records travel as pickled CPU objects over gloo (``cpu:gloo,cuda:nccl`` where CUDA is there, every
process on ``cuda:LOCAL_RANK``, so ``--device cuda`` means the process's own GPU).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SENT = [0]  # bytes this process has handed to collectives (all_sum, gather): process.py reports them


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world)."""
    return all(k in os.environ for k in ENV)


def active() -> bool:
    """Whether a process group is up (inside :func:`session` under torchrun)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    """How many processes share the work; 1 without a process group."""
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes the results (rank 0, or the only process)."""
    return rank() == 0


def tag() -> str:
    """'rank N: ' on the other processes started by torchrun (for their messages, also once the group
    is down), '' on the main one and alone."""
    r = int(os.environ.get("RANK", 0)) if launched() else 0
    return f"rank {r}: " if r else ""


@contextmanager
def session():
    """Under torchrun: start the process group for the block (gloo; ``cpu:gloo,cuda:nccl`` with a GPU per
    process, this process on ``cuda:LOCAL_RANK``) and take it down after, error or not. Otherwise nothing."""
    if not launched() or active():
        yield
        return
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():  # every process on its own GPU where there are enough, else shared round-robin
        gpus = torch.cuda.device_count()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % gpus)
        if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) <= gpus:  # the same choice on every process
            backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # torchrun ends the other processes
        raise
    # all together: a process that takes its group down while another still talks to it can abort
    # ("terminate called without an active exception", seen once in CI on len.py's rank 1)
    dist.barrier()
    dist.destroy_process_group()


def seed(value: int) -> int:
    """The seed this process draws from for a run seeded ``value``: ``value`` itself on rank 0 (and
    alone), another fixed one per rank elsewhere, so processes never repeat each other's draws."""
    return value if rank() == 0 else value + 1_000_003 * rank()


# --------------------------------------------------------------------------------------------------
# Whole batches dealt round-robin
# --------------------------------------------------------------------------------------------------
def shard(items: Sequence) -> list:
    """This process's share of ``items`` (the one-process batches): ``items[rank::world]``."""
    return list(items[rank()::world()])


def steps(total: int) -> int:
    """Rounds needed for ``total`` items dealt by :func:`shard`: every process runs this many."""
    return -(-total // world())


def unshard(mine: list) -> list:
    """Every process's :func:`shard` results, back in one-process order, on every process (each item
    is pickled; keep them small: per-image numbers on the CPU). One process: ``mine`` itself."""
    if world() == 1:
        return list(mine)
    import torch.distributed as dist

    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


def lockstep(items: Iterable, total: int) -> Iterator:
    """``items`` (this process's share of ``total`` dealt by :func:`shard`), then None until every
    process has run :func:`steps` rounds: a per-round collective (:func:`gather`) never waits forever."""
    n = 0
    for item in items:
        n += 1
        yield item
    for _ in range(steps(total) - n):
        yield None


def gather(obj) -> Optional[list]:
    """One object from every process, in rank order, on the main process (None elsewhere)."""
    if world() == 1:
        return [obj]
    import torch.distributed as dist

    import pickle

    out = [None] * world() if is_main() else None
    _SENT[0] += 0 if is_main() else len(pickle.dumps(obj))
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj=None):
    """The main process's ``obj`` on every process."""
    if world() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], Any]):
    """``fn()`` run on the main process only (it reads or writes shared files), its result on every
    process; an exception there is raised on every process (a UserError keeps its one line)."""
    if world() == 1:
        return fn()
    from .errors import UserError

    if not is_main():
        result, error = broadcast()
        if error is not None:
            raise error
        return result
    try:
        result = fn()
    except Exception as e:  # told to the others (as a one-line UserError or a RuntimeError), raised here as it is
        told = e if isinstance(e, UserError) else RuntimeError(f"on rank 0: {type(e).__name__}: {e}")
        broadcast((None, told))
        raise
    broadcast((result, None))
    return result


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process, on every process (in place; over the tensor's own device's
    group). One process: ``t`` itself."""
    if world() > 1:
        import torch.distributed as dist

        _SENT[0] += t.numel() * t.element_size()
        dist.all_reduce(t)
    return t


def sent_bytes() -> int:
    """Bytes this process has passed to :func:`all_sum` and :func:`gather` so far (pickled for gather)."""
    return _SENT[0]


def barrier() -> None:
    """Wait until every process gets here (over the CPU group, whatever the device)."""
    if world() > 1:
        broadcast(None)


# --------------------------------------------------------------------------------------------------
# Parts of each batch, put back together on rank 0
# --------------------------------------------------------------------------------------------------
def parts(n: int, batch: int) -> list[list[int]]:
    """This process's contiguous part of each consecutive ``batch`` of ``range(n)`` (the first parts are
    one longer where a batch does not divide; a part may be empty)."""
    return [p.tolist() for b in torch.arange(n).split(batch) for p in [torch.tensor_split(b, world())[rank()]]]


class BatchStream:
    """The batches of consecutive images one process would read, each loaded in parts across the
    processes (:func:`parts`) and whole again on the main process.

    load(order): (pixels, records) for each index batch of ``order`` (e.g. ``vwt.datasets.batches``).
    fn(pixels): what travels (the pixels, or their patch embeddings), computed where the part loads.
    The main process iterates it, as often as it likes (each iteration is one pass, yielding the whole
    batches in order, on ``device``); the others call :meth:`serve` until the main one calls
    :meth:`close`."""

    def __init__(self, n: int, batch: int, load: Callable[[list], Iterable], fn: Callable, device=None):
        self.parts, self.load, self.fn, self.device = parts(n, batch), load, fn, device

    def __iter__(self):
        broadcast("pass")
        for pieces in self._pass():
            yield torch.cat([p for p in pieces if p is not None]).to(self.device)

    def serve(self) -> None:
        """Other processes: load and send this process's parts for every pass the main one asks for."""
        while broadcast() == "pass":
            for _ in self._pass():
                pass

    def close(self) -> None:
        """Main process: no more passes; the others' :meth:`serve` returns."""
        if is_main():
            broadcast("stop")

    def _pass(self) -> Iterator[Optional[list]]:
        loaded = iter(self.load([p for p in self.parts if p]))
        for part in self.parts:
            mine = self.fn(next(loaded)[0]).cpu() if part else None
            pieces = gather(mine)
            if is_main():
                yield pieces
            else:
                yield None
