"""``torch.compile`` for measured and evaluated models, with what the compiler did made visible.

A model compiles with torch.compile's default mode (inductor, not max-autotune: its kernel search
takes minutes per shape on a CPU and was not measured faster here) and, where the token count varies
per image (an input reducer: intra- and inter-image keep a different number of tokens per image),
``dynamic=True``, so a new token count is not a new compilation. Every compiled call is its own
compiled region (``isolate_recompiles`` where torch has it), so configurations that share code (every
patched tower runs the same block loop) neither count against nor reuse each other's compilations.

:func:`compiled_module` compiles a model's patched vision tower in place for one evaluation (clip.py
and blip.py ``--compile``: everything else, text encoding and BLIP's ``generate``, stays eager), its
:class:`Watch` counting the same figures over the whole run with the first batch's seconds.
:func:`first_calls` runs a compiled callable's first calls and says what they cost and did: seconds
(the compilation, kept out of any timing), graphs compiled by the first call, graph breaks, and
recompilations after it (a recompile per shape shows up there). Nothing falls back silently: a
compilation that fails is an error the caller records, and each time torch hits its recompile limit
(after which it runs that code eagerly: with static shapes, code resumed after a reducer's
data-dependent graph break meets a new token count in every block) is counted and said in
:attr:`CompileReport.note`.
"""
from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .batching import input_reducer
from .errors import UserError, first_line

MODE = "default"


def dynamic_for(reducers: Sequence) -> bool:
    """Dynamic shapes for a model patched with ``reducers``: where an input reducer is among them
    (intra- and inter-image keep a different number of tokens per image), so a new token count is not
    a new compilation."""
    return input_reducer(reducers) is not None


def compiled(fn: Callable, dynamic: bool) -> Callable:
    """``fn`` (a module or function) under torch.compile's default mode; ``dynamic`` True where the
    token count varies per image, else None (torch's default: static shapes first)."""
    options: dict[str, Any] = dict(mode=None if MODE == "default" else MODE, dynamic=True if dynamic else None)
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return torch.compile(fn, **options)


def _counters() -> tuple[int, int, dict]:
    """(graphs compiled, graph breaks, break reasons) so far, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    reasons = dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"], sum(reasons.values()), reasons


def traced(fn: Callable) -> bool:
    """Whether torch._dynamo holds compiled code for the Python function ``fn`` (traced now or before;
    True where this torch cannot say)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return True
    return bool(_debug_get_cache_entry_list(fn.__code__))


def recompile_limit() -> int:
    """torch's limit of compilations of one code object per region (then it runs eagerly)."""
    import torch._dynamo.config as config

    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


@dataclass
class CompileReport:
    """What a compiled callable's first calls cost and did."""

    seconds: float = 0.0
    graphs: int = 0  # graphs the first call compiled (more than one: it broke into pieces)
    graph_breaks: int = 0
    recompiles: int = 0  # graphs compiled after the first call
    reasons: list = field(default_factory=list)  # the graph breaks' reasons, first line of each
    limit_hits: int = 0  # times torch hit its recompile limit: that code then runs eagerly

    @property
    def note(self) -> str:
        """One line on what stops it from compiling whole (empty: one graph, no recompilation)."""
        parts = []
        if self.graph_breaks:
            parts.append(f"{self.graph_breaks} graph break{'s' * (self.graph_breaks != 1)}"
                         + (f" ({self.reasons[0]})" if self.reasons else ""))
        if self.recompiles:
            parts.append(f"{self.recompiles} recompilation{'s' * (self.recompiles != 1)} after the first call")
        if self.limit_hits:
            parts.append(f"hit torch's recompile limit ({recompile_limit()} per function) {self.limit_hits} "
                         "time(s): that code runs eagerly from then on")
        return "compiled: " + "; ".join(parts) if parts else ""


class _LimitHits(logging.Handler):
    """Counts torch._dynamo's warnings that a function hit the recompile limit (it then runs eagerly)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "hit config." in str(record.msg)


class Watch:
    """Counts what torch's compiler does while open (``with Watch(fn) as w``): graphs, graph breaks,
    recompilations and hits of the recompile limit, into :attr:`report`. Calling it calls ``fn`` and
    times the first call (the compilation, in :attr:`CompileReport.seconds`); graphs compiled after
    the first call are recompilations."""

    def __init__(self, fn: Optional[Callable] = None):
        self.fn, self.report, self._first = fn, CompileReport(), None
        self._hits, self._logger = _LimitHits(), logging.getLogger("torch._dynamo.convert_frame")

    def __enter__(self) -> "Watch":
        self._logger.addHandler(self._hits)
        self._start = _counters()
        return self

    def __call__(self, *args, **kwargs):
        if self._first is not None:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.report.seconds = time.perf_counter() - start
        self._first = _counters()[0]
        return out

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self._hits)
        (graphs0, breaks0, reasons0), (graphs2, breaks2, reasons2) = self._start, _counters()
        first = graphs2 if self._first is None else self._first
        new = [k for k, v in reasons2.items() if v > reasons0.get(k, 0)]
        r = self.report
        r.graphs, r.graph_breaks, r.recompiles = first - graphs0, breaks2 - breaks0, graphs2 - first
        r.reasons, r.limit_hits = list(dict.fromkeys(str(k).strip().splitlines()[0] for k in new)), self._hits.count


def first_calls(call: Callable[[Any], Any], batches: Sequence, passes: int = 2) -> CompileReport:
    """Run ``call`` on every batch ``passes`` times (the first call compiles; later shapes may
    recompile; the second pass shows whether any shape compiles again), counting graphs, graph breaks,
    recompilations and hits of torch's recompile limit (:class:`Watch`), and the seconds it all took.
    Exceptions (a failed compilation) propagate."""
    start = time.perf_counter()
    with Watch(call) as watch:
        watch(batches[0])
        for _ in range(passes):
            for x in batches:
                watch(x)
    watch.report.seconds = time.perf_counter() - start
    return watch.report


@contextmanager
def compiled_module(module: torch.nn.Module, dynamic: bool) -> Iterator[Watch]:
    """``module`` compiled in place (as ``Module.compile`` does) while the ``with`` block runs: whoever
    calls it (CLIP's ``get_image_features``, BLIP's ``generate``) runs it compiled, the rest of the model
    eagerly. Yields the :class:`Watch` of its calls (the first call's seconds: the compilation). A fresh
    compiled region each time, so a module patched again compiles again rather than count as a
    recompilation; afterwards the module is as it was."""
    from torch._dynamo.exc import TorchDynamoException

    before, impl = module._compiled_call_impl, module._call_impl

    def call(*args, **kwargs):  # torch 2.13 traces no frame of _call_impl compiled itself (nor Module.compile)
        return impl(*args, **kwargs)

    with Watch(compiled(call, dynamic)) as watch:
        module._compiled_call_impl = watch
        try:
            yield watch
            if watch.report.seconds and not traced(call):  # called, but never compiled: an eager run
                raise UserError(f"torch.compile compiled nothing of the {type(module).__name__} (torch "
                                f"{torch.__version__} ran it eagerly); run without --compile")
        except TorchDynamoException as e:  # never run eagerly instead: the run asked for a compiled model
            cause = getattr(e, "inner_exception", None)  # a compiler backend's own error, under its wrapper
            said = f"{type(e).__name__}: " + (f"{type(cause).__name__}: " if cause is not None else "")
            raise UserError(f"torch.compile could not compile the {type(module).__name__} ({said}"
                            f"{first_line(cause if cause is not None else e, 200)}); run without --compile") from None
        finally:
            module._compiled_call_impl = before


@contextmanager
def compiled_pass(module: torch.nn.Module, reducers: Sequence, what: str) -> Iterator[dict]:
    """One evaluation pass (clip.py's seed, blip.py's captioning) with ``module`` compiled in place
    (:func:`compiled_module`, shapes by :func:`dynamic_for`); the dict it yields is filled on leaving
    with the record of what the compiler did (:func:`summary`, ``what`` naming the module)."""
    dynamic, record = dynamic_for(reducers), {}
    with compiled_module(module, dynamic) as watch:
        yield record
    record.update(summary(watch.report, dynamic, what))


def summary(report: CompileReport, dynamic: bool, what: str) -> dict:
    """What a results file records of a compiled run: the mode, dynamic shapes, what was compiled, and
    ``report``'s figures (``compile_s``: the first call, the compilation) and note."""
    return dict(compiled=what, mode=MODE, dynamic=dynamic, compile_s=report.seconds, graphs=report.graphs,
                graph_breaks=report.graph_breaks, recompiles=report.recompiles,
                recompile_limit_hits=report.limit_hits, reasons=report.reasons, note=report.note)


def combined(records: list) -> dict:
    """One record of several compiled evaluations (:func:`summary`'s; clip.py's seeds, each compiled
    anew): the first's seconds and graphs (its first batch: the compilation), the graph breaks,
    recompilations and recompile-limit hits of all of them added up, and their note."""
    out = dict(records[0], compilations=len(records))
    for key in ("graph_breaks", "recompiles", "recompile_limit_hits"):
        out[key] = sum(r[key] for r in records)
    out["reasons"] = list(dict.fromkeys(x for r in records for x in r["reasons"]))
    out["note"] = CompileReport(graph_breaks=out["graph_breaks"], recompiles=out["recompiles"],
                                reasons=out["reasons"], limit_hits=out["recompile_limit_hits"]).note
    return out


def describe(record: dict) -> list:
    """A compiled run's lines in a script's report: what was compiled and how, the first batch's
    seconds, and a note where it did not compile whole (graph breaks, the recompile limit) or compiled
    again after the first call."""
    shapes = "dynamic" if record["dynamic"] else "static"
    lines = [f"torch.compile ({record['mode']} mode, {shapes} shapes) of the {record['compiled']}: first batch "
             f"{record['compile_s']:.1f} s (compiling)"]
    if record["note"]:
        whole = record["graph_breaks"] or record["recompile_limit_hits"]
        rest = record["note"].split(": ", 1)[1]
        lines.append(f"note: the {record['compiled']} did not compile whole: {rest}" if whole else f"note: {rest}")
    return lines
