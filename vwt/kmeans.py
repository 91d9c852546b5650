"""The paper recipe's k-means step in torch, on any device and shared by torchrun's processes.

:class:`MiniBatchKMeans` applies, batch after batch, the update that scikit-learn's
``MiniBatchKMeans(n_clusters, batch_size, n_init="auto").partial_fit`` applies (scikit-learn 1.9,
``sklearn/cluster/_kmeans.py`` and ``_k_means_minibatch.pyx``):

- seeding on the first batch: ``init_size`` rows (3 x batch_size, or 3 x n_clusters where that is
  smaller than n_clusters; at most the batch) drawn by ``randint``, then greedy k-means++ with
  2 + log(k) local trials. The squared distances are computed on the device in float64 and rounded to
  float32 as scikit-learn's upcast does; the draws, cumulative sums and potentials are scikit-learn's
  own NumPy operations on the same float32 values, with the same seeded ``RandomState``;
- each step: nearest centre of every row (float32, in row chunks, never the whole N x V matrix), per
  centre the sum of its rows (float64) and their count; centre c with count n_c > 0 becomes
  (c x w_c + sum) / (w_c + n_c), where w_c, the running count, is float32 as scikit-learn keeps it;
- random reassignment, decided before the step as scikit-learn does (any empty centre, or 10 x k rows
  by its batch size since the last one), of the centres whose running count is below 1% of the
  largest (at most half the batch), to rows drawn by ``choice(n, replace=False)`` from the same
  generator; their counts become the smallest count of the others.

The centres equal scikit-learn's within float32 rounding (its update sums in float32 in row order,
this one in float64), measured in tests/test_kmeans.py and benchmarks/bench_process.py. A row that is
almost equidistant from two centres may go to either, which can move a centre by more than rounding;
scikit-learn (``vwt.vocab.Vocabulary.learn_paper``) stays the bit-exact path.

Under torchrun every process passes its own part of each batch (parts in rank order make the batch):
one all-reduce of the per-centre sums and counts per batch feeds the same update on every process;
the rows that seeding or a reassignment draws are summed from the process that holds them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import distributed

REASSIGNMENT_RATIO = 0.01  # scikit-learn's default
# The centres' largest difference from scikit-learn's, relative to their largest magnitude, that the
# tests accept (float32's unit roundoff is 6e-8; measured: benchmarks/bench_process.py --tolerance).
TOLERANCE = 1e-5
CHUNK = {"cpu": 1 << 24, "cuda": 1 << 28}  # floats in one (rows, V) distance block: 64 MB, 1 GB


class MiniBatchKMeans:
    """``partial_fit(x)`` as scikit-learn's, with ``x`` this process's (n, D) float32 part of a batch on
    ``device``; ``centres`` (V, D) float32 after the first call. ``seed`` seeds a fresh NumPy
    ``RandomState`` as :func:`vwt.vocab.paper_kmeans` does."""

    def __init__(self, n_clusters: int, batch_size: int = 1024, seed: int = 0, device=None,
                 reassignment_ratio: float = REASSIGNMENT_RATIO):
        self.k, self.batch_size, self.ratio = n_clusters, batch_size, reassignment_ratio
        self.random_state = np.random.RandomState(seed)
        self.device = torch.device(device or "cpu")
        self.centres: Optional[Tensor] = None
        self.counts: Optional[np.ndarray] = None  # float32, as scikit-learn's _counts
        self.steps = self.reassigned = 0

    def partial_fit(self, x: Tensor) -> float:
        """One batch (this process's part of it); returns the batch's inertia at its assignment,
        before the update, over every process's part (what the step computes anyway)."""
        x = x.to(self.device, torch.float32)
        offset, n = part_offset(x.shape[0])
        if self.centres is None:
            if n < self.k:
                raise ValueError(f"the first batch gives {n} patches, fewer than the {self.k} words: k-means "
                                 "initialises on the first batch; use bigger batches or fewer words")
            self._batch = min(self.batch_size, n)
            self._since = 0
            self.centres = self._seed(x, offset, n)
            self.counts = np.zeros(self.k, dtype=np.float32)
        self._since += self._batch
        reassign = bool((self.counts == 0).any()) or self._since >= 10 * self.k
        if reassign:
            self._since = 0
        labels, dist = nearest(x, self.centres)
        sums = torch.zeros(self.k, x.shape[1] + 2, dtype=torch.float64, device=self.device)
        step = 1 << 14  # rows per float64 copy
        for s in range(0, x.shape[0], step):
            sums[:, :-2].index_add_(0, labels[s:s + step], x[s:s + step].double())
        sums[:, -2].index_add_(0, labels, torch.ones_like(dist, dtype=torch.float64))
        sums[0, -1] = dist.double().sum()
        sums = distributed.all_sum(sums)  # the one exchange of the step: V x (D + 2) float64
        inertia, hit = float(sums[0, -1]), sums[:, -2].cpu().numpy().astype(np.float32)
        self._update(sums[:, :-2], hit)
        if reassign and self.ratio > 0:
            self._reassign(x, offset, n)
        self.steps += 1
        return inertia

    def _update(self, sums: Tensor, hit: np.ndarray) -> None:
        """Centres with rows this step: (c x w + sum) / (w + n), w and w + n float32 as scikit-learn's."""
        new = self.counts + hit  # float32 running counts, as scikit-learn's weight_sums += wsum
        alpha = (np.float32(1) / np.where(hit > 0, new, np.float32(1))).astype(np.float32)
        w, a = (torch.from_numpy(v).to(self.device, torch.float64) for v in (self.counts, alpha))
        upd = (self.centres.double() * w[:, None] + sums) * a[:, None]
        keep = torch.from_numpy(hit > 0).to(self.device)
        self.centres = torch.where(keep[:, None], upd.float(), self.centres)
        self.counts = np.where(hit > 0, new, self.counts).astype(np.float32)

    def _reassign(self, x: Tensor, offset: int, n: int) -> None:
        """scikit-learn's random reassignment of the centres with low running counts."""
        counts = self.counts
        to_reassign = counts < self.ratio * counts.max()
        if to_reassign.sum() > 0.5 * n:
            to_reassign[np.argsort(counts)[int(0.5 * n):]] = False
        n_reassigns = to_reassign.sum()
        if not n_reassigns:
            return
        picked = self.random_state.choice(n, replace=False, size=n_reassigns)
        where = torch.from_numpy(np.where(to_reassign)[0]).to(self.device)
        self.centres[where] = gather_rows(x, picked, offset)
        counts[to_reassign] = np.min(counts[~to_reassign])
        self.reassigned += int(n_reassigns)

    def _seed(self, x: Tensor, offset: int, n: int) -> Tensor:
        """scikit-learn's k-means++ on ``init_size`` rows of the first batch (see the module's docstring)."""
        init_size = 3 * self._batch
        if init_size < self.k:
            init_size = 3 * self.k
        init_size = min(init_size, n)
        rows = np.arange(n)
        if init_size < n:
            rows = self.random_state.randint(0, n, init_size)
        return kmeans_plusplus(gather_rows(x, rows, offset), self.k, self.random_state)


def kmeans_plusplus(x: Tensor, k: int, random_state: np.random.RandomState) -> Tensor:
    """scikit-learn's ``_kmeans_plusplus`` (unit weights, 2 + log(k) local trials) on the rows of
    ``x`` (m, D) float32: distances on ``x``'s device, the draws and sums in NumPy as it makes them."""
    m = x.shape[0]
    x64 = x.double()
    sq = torch.linalg.vecdot(x64, x64)
    weight = np.ones(m, dtype=np.float32)
    trials = 2 + int(np.log(k))

    if x.device.type == "cpu":  # NumPy: small products without torch's per-call thread start-up
        x64, sq = x64.numpy(), sq.numpy()

    def dist(ids) -> np.ndarray:  # scikit-learn's float32 _euclidean_distances_upcast, squared
        c = x64[np.asarray(ids)] if isinstance(x64, np.ndarray) else x64[torch.as_tensor(np.asarray(ids), device=x.device)]
        d = -2 * (c @ x64.T)
        d += (c * c).sum(1)[:, None]
        d += sq[None, :]
        d = d.astype(np.float32) if isinstance(d, np.ndarray) else d.float().cpu().numpy()
        return np.maximum(d, 0, out=d)

    first = random_state.choice(m, p=weight / weight.sum())
    ids = [first]
    closest = dist([first])
    pot = closest @ weight
    for _ in range(1, k):
        rand = random_state.uniform(size=trials) * pot
        cand = np.searchsorted(np.cumsum(weight * closest), rand)
        np.clip(cand, None, closest.size - 1, out=cand)
        to_cand = dist(cand)
        np.minimum(closest, to_cand, out=to_cand)
        cand_pot = to_cand @ weight.reshape(-1, 1)
        best = np.argmin(cand_pot)
        pot, closest = cand_pot[best], to_cand[best]
        ids.append(cand[best])
    return x[torch.as_tensor(np.asarray(ids), device=x.device)].clone()


def nearest(x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre of each row and the squared distance to it, float32, in row chunks that keep the
    (rows, V) block within ``CHUNK`` floats (as scikit-learn's |c|^2 - 2 x.c, then + |x|^2)."""
    csq = torch.linalg.vecdot(centres, centres)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = max(256, CHUNK.get(x.device.type, CHUNK["cpu"]) // centres.shape[0])
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        best, labels[s:s + step] = torch.addmm(csq, xs, centres.T, alpha=-2).min(1)
        dist[s:s + step] = (best + torch.linalg.vecdot(xs, xs)).clamp_min_(0)
    return labels, dist


def part_offset(n: int) -> tuple[int, int]:
    """Where this process's ``n`` rows start in the batch (parts in rank order) and the batch's rows."""
    sizes = torch.zeros(distributed.world(), dtype=torch.float64)
    sizes[distributed.rank()] = n
    sizes = distributed.all_sum(sizes).long().tolist()
    return sum(sizes[:distributed.rank()]), sum(sizes)


def gather_rows(x: Tensor, rows: np.ndarray, offset: int) -> Tensor:
    """Rows ``rows`` (indices in the whole batch) on every process, each sent by the process that holds
    it (float32 sums with zeros, so exact)."""
    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64) - offset, device=x.device)
    mine = (idx >= 0) & (idx < x.shape[0])
    out = torch.zeros(len(idx), x.shape[1], dtype=x.dtype, device=x.device)
    out[mine] = x[idx[mine]]
    return distributed.all_sum(out)
