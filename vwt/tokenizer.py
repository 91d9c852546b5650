"""The Visual Word Tokenizer (VWT): input reducers that shorten the sequence before the first block.

``IntraImage`` drops each image's most uniform pixel patches (lowest variance). ``InterImage`` matches
every patch to its nearest visual word of a :class:`vwt.Vocabulary` (cosine distance) and merges the
patches of an image that match the same word into one token. Both are vectorised over the batch (one
matmul, a sort and a scatter; no per-image Python loop) and keep ``state.labels`` current.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .encoder import InputContext, Reducer, TokenState


def pixel_patches(pixel_values: Tensor, patch_size: int) -> Tensor:
    """(B, 3, H, W) -> (B, rows * cols, 3 * P * P): patch (i, j) is ``pixel_values[:, :, iP:(i+1)P,
    jP:(j+1)P]`` flattened in (channel, row, column) order, patches row-major (the patch-projection
    order, and the layout of the published vocabularies). Pixels beyond the last full patch are ignored,
    as the patch projection ignores them."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    rows, cols = h // p, w // p
    x = pixel_values[:, :, : rows * p, : cols * p].reshape(b, c, rows, p, cols, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c * p * p)


def _relabel(state: TokenState, patch_to_token: Tensor) -> Tensor:
    """Labels after an input reduction given where each patch token (index - prefix) goes (-1: dropped);
    the prefix tokens stay where they are."""
    b, pre = patch_to_token.shape[0], state.prefix
    keep_prefix = torch.arange(pre, device=patch_to_token.device).expand(b, -1)
    return state.relabel(torch.cat([keep_prefix, patch_to_token], 1))


def _check_input_state(state: TokenState, num_patches: int, who: str) -> None:
    if state.num_tokens != state.prefix + num_patches:
        raise ValueError(f"{who} expects the freshly embedded {state.prefix} + {num_patches} tokens, got "
                         f"{state.num_tokens}: use it as the only input reducer")


class IntraImage(Reducer):
    """VWT intra-image: keep the ``int(N * (1 - drop))`` patches of highest pixel variance, in their
    original order, class token(s) first. ``random=True`` keeps a uniformly random subset of the same
    size per image (the paper's ablation). Every image keeps the same length, so nothing is padded."""

    kind = "input"

    def __init__(self, drop: float = 0.5, random: bool = False):
        if not 0 <= drop < 1:
            raise ValueError(f"IntraImage: drop is the fraction of patches to drop, in [0, 1); got {drop}")
        self.drop = float(drop)
        self.random = bool(random)

    def scores(self, pixel_values: Tensor, patch_size: int) -> Tensor:
        """(B, N) the variance of each pixel patch's 3·P·P values (what is ranked)."""
        return pixel_patches(pixel_values, patch_size).float().var(-1)

    def keep_indices(self, pixel_values: Tensor, patch_size: int) -> Tensor:
        """(B, k) the indices of the kept patches, ascending."""
        b = pixel_values.shape[0]
        n = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        k = int(n * (1 - self.drop))
        if k < 1:
            raise ValueError(f"IntraImage: drop={self.drop:g} keeps int({n} x {1 - self.drop:.4g}) = 0 of the {n} patches "
                             f"(only the class token would remain); use a drop of at most {1 - 1 / n:.4g} for this model")
        if self.random:
            scores = torch.rand(b, n, device=pixel_values.device)
        else:
            scores = self.scores(pixel_values, patch_size)
        # Stable sort: among equal scores the earlier patch wins, alone or in any batch.
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return order.sort(dim=1).values

    def reduce_input(self, state: TokenState, ctx: InputContext) -> TokenState:
        n = state.grid[0] * state.grid[1]
        _check_input_state(state, n, "IntraImage")
        keep = self.keep_indices(ctx.pixel_values, ctx.patch_size)
        b, k = keep.shape
        if k == n:
            return state
        pre = state.prefix
        x = torch.cat([state.x[:, :pre], state.x[:, pre:].gather(1, keep[..., None].expand(-1, -1, state.x.shape[-1]))], 1)
        size = None
        if state.size is not None:
            size = torch.cat([state.size[:, :pre], state.size[:, pre:].gather(1, keep)], 1)
        to_token = torch.full((b, n), -1, dtype=torch.long, device=keep.device)
        to_token.scatter_(1, keep, torch.arange(pre, pre + k, device=keep.device).expand(b, -1))
        state.x, state.size = x, size
        state.labels = _relabel(state, to_token)
        return state


class InterImage(Reducer):
    """VWT inter-image: merge the patches of an image that match the same visual word.

    A patch's nearest word (cosine distance ``1 - cos`` to the L2-normalised words) matches when the
    distance is at most ``thresh``. All patches of an image matching one word become one token, the
    mean of their embeddings (position embeddings included), size = their count; unmatched patches stay.
    Token order: class token(s), matched words by word index, unmatched patches in patch order. Images
    of a batch are padded to the longest with zero tokens of size 0 (masked in attention).

    The vocabulary's ``space`` says what is matched: "pixel" patches (3·P·P values of the normalised
    pixels) or "embed" (the patch-projection outputs, before position embeddings).
    ``random=True`` is the paper's ablation: every distance to every word is replaced by a uniform draw
    in [0, 2]; drawn here in closed form (the minimum of V uniform draws and a uniform word index),
    which has the same distribution without materialising the (patches, V) draws.
    ``prop_attn=True`` adds log(size) to the attention logits (not used in the paper).
    """

    kind = "input"

    def __init__(self, vocab, thresh: float = 0.1, random: bool = False, prop_attn: bool = False):
        from .vocab import Vocabulary

        if isinstance(vocab, Tensor):
            vocab = Vocabulary.from_tensor(vocab)
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"InterImage takes a vwt.Vocabulary (or a (V, D) tensor); got {type(vocab).__name__}")
        thresh = float(thresh)
        if not 0 <= thresh <= 2:  # also refuses nan: a cosine distance lies in [0, 2]
            raise ValueError(f"InterImage: thresh is a cosine distance, in [0, 2] (0: identical directions only, "
                             f"2: everything matches); got {thresh}")
        self.vocab = vocab
        self.thresh = thresh
        self.random = bool(random)
        self.prop_attn = bool(prop_attn)

    def __repr__(self) -> str:
        return (f"InterImage(vocab={self.vocab!r}, thresh={self.thresh:g}, random={self.random}, "
                f"prop_attn={self.prop_attn})")

    def features(self, ctx: InputContext) -> Tensor:
        """(B, N, D) what is matched against the words, checked against the vocabulary's shape."""
        if self.vocab.space == "embed":
            feats = ctx.patch_embeds
        else:
            feats = pixel_patches(ctx.pixel_values, ctx.patch_size)
        self.vocab.check(feats.shape, ctx.patch_size)
        return feats

    def match(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest word and its cosine distance for every patch: (B, N) long, (B, N) float32.

        With at least ``FAST_MIN_WORDS`` words (and thresh < 0.5) the search is
        :func:`nearest_within`: the same matched decisions, and where dist <= thresh the same word and
        dist (to float32 rounding); a patch it reports beyond thresh is beyond it, but its word is
        a near one, not necessarily the nearest, and dist that word's exact distance."""
        b, n, d = feats.shape
        v = len(self.vocab)
        if self.random:
            word = torch.randint(v, (b, n), device=feats.device)
            dist = 2 * (1 - torch.rand(b, n, device=feats.device).pow(1.0 / v))
            return word, dist
        f = torch.nn.functional.normalize(feats.reshape(b * n, d).float(), dim=1)  # a zero patch: cos 0
        if v >= FAST_MIN_WORDS and self.thresh < 0.5:
            word, cos = nearest_within(self.vocab, f, self.thresh)
        else:
            word, cos = self.vocab.nearest(f)
        return word.view(b, n), (1 - cos).view(b, n)

    def reduce_input(self, state: TokenState, ctx: InputContext) -> TokenState:
        feats = self.features(ctx)
        b, n, _ = feats.shape
        _check_input_state(state, n, "InterImage")
        word, dist = self.match(feats)
        matched = dist <= self.thresh
        if not bool(matched.any()):
            return state
        return merge_by_key(state, torch.where(matched, word, len(self.vocab) + torch.arange(n, device=word.device)))


FAST_MIN_WORDS = 4096  # below this, one exhaustive matmul is cheaper than the bound-and-refine search
_SKETCH_RANK = 95  # principal axes of the words in the bound (+ 1 residual column: a 96-wide matmul)
# Slack on the bound per 768 dimensions, covering float32 rounding: the bound's own matmul (<= 98 u,
# u = 2^-24, as |[x, |f_perp|]| = |f| = 1 and likewise for the words) plus twice gamma_768 =
# 768 u / (1 - 768 u) ~ 4.6e-5, the worst-case error of a float32 768-term dot product of unit
# vectors in any summation order (c0's, and the exhaustive search's), with room: 1.5e-4 < 2e-4.
_SLACK = 2e-4
_DENSE_ROW = 1024  # a patch with more candidate words than this gets its whole exact row instead
_PAIR_CHUNK = 2048  # candidate (patch, word) dot products per gather, to stay in cache
_CHUNK_FLOATS = 1 << 21  # bounds computed per row chunk: (rows, V) floats, kept near the cache size


def nearest_within(vocab, unit_feats: Tensor, max_dist: float) -> tuple[Tensor, Tensor]:
    """Nearest word and cosine of each L2-normalised row of ``unit_feats`` (n, D) float32, exact
    wherever 1 - cos <= ``max_dist`` (< 0.5), at a fraction of the exhaustive matmul's cost.

    1. An upper bound U(f, w) >= cos(f, w) for all pairs, from one (n, 96) x (96, V) float32 matmul
       in the words' principal axes (:meth:`vwt.Vocabulary.sketch`; the patch side projected in
       float64, so its rounding is negligible), less a slack for float32 rounding (``_SLACK``).
    2. Per patch, the float32 cosine c0 of the word with the largest bound. A patch with
       max U < 1 - max_dist - slack cannot match: it keeps that word and c0 (< 1 - max_dist).
    3. Otherwise the candidates are the words with U >= max(c0, 1 - max_dist) - slack: the nearest
       word is one of them, and so is every word that could match. Their cosines in float64
       (gathered dot products) pick the nearest, ties to the lowest index as ``max`` does. A patch
       with more than ``_DENSE_ROW`` candidates gets its whole row instead (one float64 matmul).
    The matched words are the exactly nearest ones for the float32 inputs. The exhaustive float32
    matmul agrees except between words whose cosines differ by less than its own rounding (~1e-6,
    seen among near-identical flat patches): there it may return either, this one the nearer.
    Vectorised over patches; row chunks only bound the memory of U.
    """
    n, d = unit_feats.shape
    dev = unit_feats.device
    unit = vocab.unit(dev)
    v = unit.shape[0]
    axes, bound, unit64 = vocab.sketch(_SKETCH_RANK, dev)
    fd = unit_feats.double()
    x = fd @ axes
    resid = (torch.linalg.vecdot(fd, fd) - torch.linalg.vecdot(x, x)).clamp_min_(0).sqrt_()
    xb = torch.cat([x, resid[:, None]], 1).float()
    cmin = 1.0 - max_dist - 1e-5  # below every cosine whose float32 distance 1 - cos can be <= max_dist
    slack = _SLACK * max(1.0, d / 768)

    word = torch.empty(n, dtype=torch.long, device=dev)
    cos = torch.empty(n, dtype=torch.float32, device=dev)
    pair_rows, pair_cols, dense = [], [], []
    step = max(64, _CHUNK_FLOATS // v)
    for s in range(0, n, step):
        f = unit_feats[s:s + step]
        u_chunk = xb[s:s + step] @ bound.T
        umax, uarg = u_chunk.max(1)
        c0 = (unit.index_select(0, uarg) * f).sum(1)
        word[s:s + step], cos[s:s + step] = uarg, c0
        live = umax >= cmin - slack
        if not bool(live.any()):
            continue
        cut = torch.where(live, c0.clamp_min(cmin) - slack, torch.inf)
        r, c = (u_chunk >= cut[:, None]).nonzero(as_tuple=True)  # row-major: words ascending per patch
        many = torch.bincount(r, minlength=f.shape[0]) > _DENSE_ROW
        if bool(many.any()):
            dense.append(many.nonzero()[:, 0] + s)
            keep = ~many[r]
            r, c = r[keep], c[keep]
        pair_rows.append(r + s)
        pair_cols.append(c)

    if pair_rows:
        rows, cols = torch.cat(pair_rows), torch.cat(pair_cols)
        vals = torch.empty(rows.shape[0], dtype=torch.float64, device=dev)
        for s in range(0, rows.shape[0], _PAIR_CHUNK):
            r, c = rows[s:s + _PAIR_CHUNK], cols[s:s + _PAIR_CHUNK]
            vals[s:s + _PAIR_CHUNK] = unit64.index_select(0, c).mul_(fd.index_select(0, r)).sum(1)
        best = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev).scatter_reduce_(0, rows, vals, "amax")
        top = vals == best[rows]
        first = torch.full((n,), v, dtype=torch.long, device=dev).scatter_reduce_(0, rows[top], cols[top], "amin")
        has = first < v
        word = torch.where(has, first, word)
        cos = torch.where(has, best.float(), cos)
    if dense:
        rows = torch.cat(dense)
        c, w = (fd.index_select(0, rows) @ unit64.T).max(1)
        word[rows], cos[rows] = w, c.float()
    return word, cos


def merge_by_key(state: TokenState, key: Tensor) -> TokenState:
    """Merge, per image, the patch tokens that share a key (B, N) into their mean, ordered by key;
    pad to the longest image with zero tokens of size 0. Vectorised over the batch."""
    b, n = key.shape
    pre = state.prefix
    dev = key.device
    sorted_key, order = key.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    slot_sorted = first.cumsum(1) - 1
    slot = torch.empty_like(slot_sorted).scatter_(1, order, slot_sorted)  # token slot of every patch
    counts_per_image = slot_sorted[:, -1] + 1
    m = int(counts_per_image.max())

    x = state.x
    c = x.shape[-1]
    flat = (slot + torch.arange(b, device=dev)[:, None] * m).reshape(-1)
    patches = x[:, pre:].reshape(b * n, c)
    acc = patches if patches.dtype == torch.float32 else patches.float()
    if state.size is None:
        counts = torch.bincount(flat, minlength=b * m).float()
    else:  # tokens that already stand for several patches: size-weighted mean
        w = state.size[:, pre:].reshape(-1)
        counts = torch.zeros(b * m, dtype=torch.float32, device=dev).index_add_(0, flat, w)
        acc = acc * w[:, None]
    sums = torch.zeros(b * m, c, dtype=torch.float32, device=dev).index_add_(0, flat, acc)
    tokens = (sums / counts.clamp_min(1e-12)[:, None]).to(x.dtype).view(b, m, c)

    state.x = torch.cat([x[:, :pre], tokens], 1)
    merged_nothing = m == n and bool((counts_per_image == n).all()) and state.size is None
    if merged_nothing:
        state.size = None  # every token one patch, nothing padded: keep the fast unbiased attention
    else:
        prefix_size = torch.ones(b, pre, dtype=torch.float32, device=dev) if state.size is None else state.size[:, :pre]
        state.size = torch.cat([prefix_size, counts.view(b, m)], 1)
    state.labels = _relabel(state, slot + pre)
    return state


# --------------------------------------------------------------------------------------------------
# Running only the embedding and the input reducer
# --------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class _StopAfter(Reducer):
    """Input reducer that applies ``inner`` (if any), records the state and context, and stops the
    forward before the first block."""

    kind = "input"

    def __init__(self, inner: Optional[Reducer]):
        self.inner, self.state, self.ctx = inner, None, None

    def reduce_input(self, state: TokenState, ctx: InputContext) -> TokenState:
        if self.inner is not None:
            state = self.inner.reduce_input(state, ctx)
        self.state, self.ctx = state, ctx
        raise _Stop


def tokenize(vision: torch.nn.Module, reducer: Optional[Reducer], pixel_values: Tensor) -> tuple[TokenState, InputContext]:
    """Embed ``pixel_values`` with a vision tower and apply the input ``reducer`` (None: nothing) without
    running any block: the state entering the first block (tokens, sizes, labels) and the input
    context (pixel values, patch projections). ``vision`` is the module one calls with pixels (HF
    CLIPVisionModel / BlipVisionModel or a full model's vision tower, open_clip ``visual``, a timm ViT).
    A patched tower keeps its own patch afterwards."""
    from .patch import patch, patch_info, unpatch

    if reducer is not None and reducer.kind != "input":
        raise ValueError(f"tokenize runs an input reducer (IntraImage, InterImage); got {type(reducer).__name__}")
    previous = patch_info(vision)
    stop = _StopAfter(reducer)
    patch(vision, stop)
    try:
        with torch.no_grad():
            vision(pixel_values)
    except _Stop:
        pass
    finally:
        unpatch(vision)
        if previous is not None:
            patch(vision, *previous.reducers)
    if stop.state is None:
        raise RuntimeError(f"{type(vision).__name__} did not run the vwt block loop")
    return stop.state, stop.ctx
