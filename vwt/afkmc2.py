"""FAISS's AFK-MC2 seeding (faiss/impl/ClusteringInitialization.cpp, ``init_afkmc2``) replayed on encoded
rows, so that the fast k-means can seed from its uint8 sample without the float32 copy of the whole
sample that FAISS's ``Clustering.train_encoded`` decodes for any seeding but random.

The replay makes FAISS's random draws (``std::mt19937_64`` with libstdc++'s ``uniform_int_distribution``
and ``generate_canonical``), its double-precision arithmetic and its distances (FAISS's own
``fvec_L2sqr`` kernel, through ``faiss.fvec_L2sqr_by_idx``) in the same order, on rows decoded a
block at a time: the centres are FAISS's, bit for bit. :func:`matches_faiss` checks that on this FAISS
build (a build with another C++ library draws otherwise) and the caller falls back where it does not.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

M64 = (1 << 64) - 1
BLOCK = 32768  # rows decoded at a time for the pass over every row (FAISS's decode_block_size)
PARALLEL_PAIRS = 1 << 16  # chain distances: FAISS's threads only above this many (row, centre) pairs


class MT19937_64:
    """``std::mt19937_64`` (the C++ standard's 64-bit Mersenne Twister), with the two draws of
    libstdc++ that ``init_afkmc2`` makes."""

    def __init__(self, seed: int):
        mt = [seed & M64]
        for i in range(1, 312):
            mt.append((6364136223846793005 * (mt[-1] ^ (mt[-1] >> 62)) + i) & M64)
        self.mt, self.i = mt, 312

    def __call__(self) -> int:
        if self.i >= 312:
            mt = self.mt
            for i in range(312):
                x = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % 312] & 0x7FFFFFFF)
                mt[i] = mt[(i + 156) % 312] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        return (y ^ (y >> 43)) & M64

    def canonical(self) -> float:
        """``generate_canonical<double, 53>``: one draw over 2^64, below 1."""
        r = float(self()) / 18446744073709551616.0
        return r if r < 1.0 else float(np.nextafter(1.0, 0.0))

    def below(self, n: int) -> int:
        """``uniform_int_distribution<size_t>(0, n - 1)``: libstdc++'s 128-bit multiply (Lemire)."""
        prod = self() * n
        if prod & M64 < n:
            threshold = ((1 << 64) - n) % n
            while prod & M64 < threshold:
                prod = self() * n
        return prod >> 64


def _l2(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """FAISS's float32 squared distances ``|x[j] - y[ids[j, i]]|^2``, (nx, ny): its fvec_L2sqr, with the
    arguments in the order init_afkmc2 passes them (the row, then the centre)."""
    import faiss

    ids = np.ascontiguousarray(ids, np.int64)
    dis = np.empty(ids.shape, np.float32)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(dis), faiss.swig_ptr(x), faiss.swig_ptr(y), faiss.swig_ptr(ids),
                            x.shape[1], ids.shape[0], ids.shape[1])
    return dis


def seed_centres(n: int, rows: Callable[[np.ndarray], np.ndarray], k: int, seed: int, chain: int) -> np.ndarray:
    """FAISS's AFK-MC2 seeding of ``k`` centres among ``n`` rows, as ``ClusteringInitialization`` with
    ``seed`` and ``afkmc2_chain_length`` ``chain`` gives it (``Clustering`` passes its seed + 1).
    ``rows(index)`` returns the float32 rows at those indices (decoded as the fit decodes them); the
    pass over every row asks for blocks of ``BLOCK``. Returns the (k, D) float32 centres."""
    rng = MT19937_64(seed)
    first = rng.below(n)
    c0 = np.ascontiguousarray(rows(np.array([first])), np.float32)
    centres = np.empty((k, c0.shape[1]), np.float32)
    centres[0] = c0[0]
    dist = np.empty(n, np.float64)
    for s in range(0, n, BLOCK):
        block = np.ascontiguousarray(rows(np.arange(s, min(s + BLOCK, n))), np.float32)
        dist[s:s + len(block)] = _l2(block, c0, np.zeros((len(block), 1), np.int64))[:, 0]
    total = np.cumsum(dist)[-1]  # FAISS sums in order, in double
    q = (0.5 * dist / total if total > 0 else np.zeros(n)) + 0.5 / n
    dist = None
    return _chain(rng, np.cumsum(q), q, rows, centres, {first}, chain)


def _chain(rng: MT19937_64, cumsum: np.ndarray, q: np.ndarray, rows, centres: np.ndarray, chosen: set,
           chain: int) -> np.ndarray:
    """The Markov chains of :func:`seed_centres`, one per centre after the first: the draws in FAISS's
    order (a proposal already chosen costs one draw and no acceptance draw), then the distances of the
    chain's rows to the centres so far in one call, then the Metropolis-Hastings walk."""
    import faiss

    n, total = len(cumsum), cumsum[-1]

    def draw():
        return min(int(np.searchsorted(cumsum, rng.canonical() * total, "left")), n - 1)

    threads = faiss.omp_get_max_threads()
    try:
        for c in range(1, len(centres)):
            current = draw()
            while current in chosen:
                current = draw()
            proposals = []
            for _ in range(chain):
                p = draw()
                if p not in chosen:
                    proposals.append((p, rng.canonical()))
            cand = np.array([current] + [p for p, _ in proposals], np.int64)
            faiss.omp_set_num_threads(threads if len(cand) * c >= PARALLEL_PAIRS else 1)
            d = _l2(np.ascontiguousarray(rows(cand), np.float32), centres,
                    np.broadcast_to(np.arange(c), (len(cand), c))).min(1).astype(np.float64)
            cur_d, cur_q = d[0], q[current]
            for (p, u), p_d in zip(proposals, d[1:]):
                accept = 0.0 if cur_d <= 0 or q[p] <= 0 else min(1.0, (p_d * cur_q) / (cur_d * q[p]))
                if u < accept:
                    current, cur_d, cur_q = p, p_d, q[p]
            chosen.add(current)
            centres[c] = rows(np.array([current]))[0]
    finally:
        faiss.omp_set_num_threads(threads)
    return centres


@lru_cache(maxsize=None)
def matches_faiss() -> bool:
    """Whether :func:`seed_centres` gives this FAISS's own AFK-MC2 centres (a small check, once per process)."""
    import faiss

    x = np.random.default_rng(0).integers(0, 5, (300, 6)).astype(np.float32)
    x[:40] += 10
    init = faiss.ClusteringInitialization(6, 25)
    init.method, init.seed, init.afkmc2_chain_length = faiss.ClusteringInitMethod_AFK_MC2, 7, 10
    theirs = np.empty((25, 6), np.float32)
    init.init_centroids(300, faiss.swig_ptr(x), faiss.swig_ptr(theirs))
    return bool(np.array_equal(theirs, seed_centres(300, lambda i: x[i], 25, 7, 10)))
