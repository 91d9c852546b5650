"""In-network token reducers: ToMe, training-free EViT, and DFE + LGTM (Delayed Spatial Merging).

All three act after a block's attention residual (``Reducer.after_attn``) and keep the
:class:`~vwt.encoder.TokenState` consistent: ``size`` (patches per token, 0 for pads), ``labels``
(which token holds each input patch) and the pad layout (pads at the end of each image's sequence).

Padded batches (from ``vwt.InterImage``) follow one rule: a pad is never merged, never a merge
partner, never kept ahead of a real token, never fused, and never uses one of an image's merges; the
number of merges is capped per image by its real tokens. So an image gives the same output alone and
inside a padded batch. Shapes stay common to the batch; an image that removes fewer tokens than the
longest keeps extra pads.

Each reduction is two steps: a matching step that only computes indices (a ``_Plan``: which token
each output slot takes, which tokens fold into which slot) and one apply step, ``_apply``, that
moves the tokens, sizes and labels by that plan. Everything is vectorised over the batch (sort,
gather, scatter_add): no loop over images and no full attention matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .encoder import BlockContext, Reducer, TokenState

_NEG = -math.inf


# --------------------------------------------------------------------------------------------------
# Shared machinery: a matching step makes a plan (indices only), one apply step carries it out
# --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Where every token goes in one reduction; B images, N tokens in, L slots out, M folds.

    take:      (B, L) the old token each output slot starts from (any index where ``real`` is False)
    real:      (B, L) the slot starts from its ``take`` token (False: a pad, or a slot made only of folds)
    src:       (B, M) old tokens folded into a slot
    dst:       (B, M) the slot each of them folds into
    valid:     (B, M) the fold happens (False: filler where an image folds fewer than M tokens)
    new_index: (B, N) the slot each old token ends in, -1 where it is dropped (for the labels)
    weight:    None: size-weighted means (ToMe); (B, M): the folds' weighted sum makes slot dst[:, 0], one
               slot per image that starts empty (EViT's fused token)

    A plan with no fold target (M = 0), or an image none of whose folds is valid, folds nothing: every
    slot keeps its ``take`` token and size, whichever way the folds would combine.
    """

    take: Tensor
    real: Tensor
    src: Tensor
    dst: Tensor
    valid: Tensor
    new_index: Tensor
    weight: Optional[Tensor] = None


def _largest(t: Tensor, empty: int = 0) -> int:
    """``int(t.max())``, or ``empty`` for a batch of no image (max() of nothing is an error)."""
    return int(t.max()) if t.numel() else empty


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for (B, N, C) tokens and a (B, L) index: whole-row copies (on a CPU several
    times faster than gather or advanced indexing)."""
    b, n, c = x.shape
    flat = index + torch.arange(b, device=x.device)[:, None] * n         # (B, L) rows of (B*N, C)
    return x.reshape(b * n, c).index_select(0, flat.reshape(-1)).view(b, index.shape[1], c)  # (B, L, C)


def _apply(state: TokenState, plan: _Plan, sizes: Optional[Tensor] = None) -> TokenState:
    """Tokens, sizes and labels after ``plan``; ``sizes`` (B, N) replaces the state's sizes as the
    weights (the paper's per-block ToMe starts each block from size 1). Each slot copies its token, then
    the folds add in: as size-weighted means, x_d + sum_i s_i (x_i - x_d) / S_d (only folded rows
    change, as official ToMe's sum(x * size) / sum(size)), or with ``plan.weight`` as one weighted sum
    that replaces slot dst[:, 0] only in the images that fold something (a slot is never overwritten by
    an empty fold)."""
    x = state.x                                                          # (B, N, C)
    size = state.sizes() if sizes is None else sizes                     # (B, N)
    c = x.shape[-1]
    out_x = _rows(x, plan.take)                                          # (B, L, C) each slot's own token
    out_size = size.gather(1, plan.take) * plan.real                     # (B, L) pads and empty slots: 0
    w = size.gather(1, plan.src) * plan.valid                            # (B, M) patches each fold brings
    out_size = out_size.scatter_add(1, plan.dst, w)                      # (B, L) sizes add
    xs = _rows(x, plan.src)                                              # (B, M, C) the folded tokens
    if plan.weight is None:
        xd = _rows(out_x, plan.dst)                                      # (B, M, C) their slots, before folding
        coef = w / out_size.gather(1, plan.dst).clamp_min(1e-12)         # (B, M) s_i / S_d (0 if not valid)
        delta = (xs - xd) * coef.to(x.dtype)[..., None]                  # (B, M, C)
        out_x.scatter_add_(1, plan.dst[..., None].expand(-1, -1, c), delta)  # (B, L, C); index_add_ is far slower
    else:
        folded = (plan.weight * plan.valid).to(x.dtype)[:, None, :] @ xs  # (B, 1, C) weighted sum
        slot = plan.dst[:, :1, None].expand(-1, -1, c)                   # (B, 1, C); (B, 0, C) if M = 0
        folds = plan.valid.any(1)[:, None, None]                         # (B, 1, 1) the image folds something
        out_x.scatter_(1, slot, torch.where(folds, folded, out_x.gather(1, slot)))  # (B, L, C) slot dst[:, 0]
    return replace(state, x=out_x, size=out_size, labels=state.relabel(plan.new_index))


def _compact(flags: Tensor, out_len: Optional[int]):
    """Where each token goes when the tokens flagged (B, K) are kept, in order, at the front of a
    sequence of ``out_len`` slots (default: the largest kept count) and the rest of each row is pads.
    Returns for each slot the index of the token it takes (B, L) (0 in pad slots), whether the slot is
    real (B, L), and the new index of each old token (B, K) (-1 where not kept)."""
    b, k = flags.shape
    pos = flags.long().cumsum(1) - 1                                     # (B, K) slot if kept
    count = pos[:, -1] + 1                                               # (B,) kept per image
    length = _largest(count) if out_len is None else out_len
    target = torch.where(flags, pos, torch.full_like(pos, length))       # (B, K) unkept -> a spare column
    src = torch.zeros(b, length + 1, dtype=torch.long, device=flags.device)  # (B, L + 1)
    src.scatter_(1, target, torch.arange(k, device=flags.device).expand(b, -1))
    real = torch.arange(length, device=flags.device) < count[:, None]    # (B, L)
    return src[:, :length], real, torch.where(flags, pos, torch.full_like(pos, -1))


def _best_partners(state: TokenState, metric: Tensor, groups: Optional[Tensor]):
    """Bipartite scores over the whole sequence: A = positions 0, 2, 4, ..., B = 1, 3, 5, ... Returns
    each A token's best cosine similarity to a B token (B, nA), -inf where it may not merge (prefix
    tokens and pads, on either side, and other groups), its partner (B, nA), and which tokens may merge
    at all (B, N)."""
    p, n = state.prefix, state.num_tokens
    pos = torch.arange(n, device=metric.device)                          # (N,)
    ok = (pos >= p) & (pos < state.real_counts()[:, None])               # (B, N) not prefix, not pad
    m = metric.float()                                                   # (B, N, d) keys, heads averaged
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)                # (B, N, d) unit vectors
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)                      # (B, nA, nB) cosine A x B
    bad = ~ok[:, None, 1::2]                                             # (B, 1, nB) B never chosen
    if groups is not None:
        bad = bad | (groups[:, ::2, None] != groups[:, None, 1::2])     # (B, nA, nB) other window
    best, partner = scores.masked_fill_(bad, _NEG).max(-1)              # (B, nA), (B, nA)
    return best.masked_fill_(~ok[:, ::2], _NEG), partner, ok


def _select(best: Tensor, budget: Tensor, max_merges: int, groups_a: Optional[Tensor]):
    """Which A tokens merge: per image (and group) the ``budget`` (B, G) with the highest best score.
    Returns merge (B, nA), the A tokens by descending score (B, nA), and the merged ones first (B, M)."""
    b, na = best.shape
    candidate = best > _NEG                                              # (B, nA)
    g = None if groups_a is None else groups_a.clamp_min(0)              # (B, nA) window of each A token
    key = best if g is None else best - 4.0 * g                          # (B, nA) cosine in [-1, 1]: groups apart
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # (B, nA)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(na, device=best.device).expand(b, -1))  # (B, nA)
    if g is None:
        merge = candidate & (rank < budget[:, :1])                       # (B, nA)
        return merge, order, order[:, :max_merges]
    counts = torch.zeros_like(budget).scatter_add_(1, g, candidate.long())  # (B, G) candidates per group
    start = counts.cumsum(1) - counts                                    # (B, G) rank of each group's first
    merge = candidate & (rank - start.gather(1, g) < budget.gather(1, g))  # (B, nA)
    first = torch.sort(merge.to(torch.uint8), dim=1, descending=True, stable=True).indices  # (B, nA)
    return merge, order, first[:, :max_merges]


def _bipartite_match(state: TokenState, metric: Tensor, budget: Tensor, max_merges: int,
                     groups: Optional[Tensor] = None, out_len: Optional[int] = None) -> _Plan:
    """Official ToMe's bipartite soft matching (``tome.merge.bipartite_soft_matching``), pad-safe,
    optionally restricted to groups (LGTM's windows, (B, N), -1 for prefix tokens and pads).

    The whole sequence alternates into A (positions 0, 2, ...) and B (1, 3, ...); prefix tokens and pads
    neither merge nor are chosen. Each A token's partner is its most cosine-similar B token; in each
    image (and group) the ``budget`` (B, G) A tokens with the most similar partners merge into them.
    New layout: [prefix, unmerged A, B, pads], the unmerged A tokens in their original order, or, with
    no prefix token and no groups, in descending score order (official ToMe sorts them back only when
    there is a class token). ``max_merges`` bounds any image's merges; ``out_len`` the output length."""
    p, n = state.prefix, state.num_tokens
    b, dev = state.batch, metric.device
    best, partner, ok = _best_partners(state, metric, groups)            # (B, nA), (B, nA), (B, N)
    merge, order, src = _select(best, budget, max_merges, None if groups is None else groups[:, ::2])
    na, a0, b0 = best.shape[1], (p + 1) // 2, p // 2                     # A and B tokens inside the prefix
    if p == 0 and groups is None:
        a_idx = order                                                    # (B, nA) descending score
    else:
        a_idx = torch.arange(a0, na, device=dev).expand(b, -1)           # (B, nA - a0) original order
    b_pos = torch.arange(2 * b0 + 1, n, 2, device=dev).expand(b, -1)     # (B, nB - b0)
    cat_pos = torch.cat([torch.arange(p, device=dev).expand(b, -1), 2 * a_idx, b_pos], 1)  # (B, N) a permutation
    keep_a = (ok[:, ::2] & ~merge).gather(1, a_idx)                      # (B, nA - a0) unmerged real A
    flags = torch.cat([torch.ones(b, p, dtype=torch.bool, device=dev), keep_a, ok[:, 2 * b0 + 1::2]], 1)  # (B, N)
    take, real, new_cat = _compact(flags, out_len)                       # (B, L), (B, L), (B, N)
    take = cat_pos.gather(1, take)                                       # (B, L) old position of each slot
    new_index = torch.empty_like(new_cat).scatter_(1, cat_pos, new_cat)  # (B, N) old position -> slot
    still = budget.sum(1, keepdim=True) == 0                             # (B, 1) as official ToMe at r = 0:
    same = torch.arange(n, device=dev)                                   # (N,) an image that merges nothing
    take = torch.where(still, same[:take.shape[1]], take)                # (B, L) keeps its order
    new_index = torch.where(still, same.masked_fill(same >= take.shape[1], -1), new_index)  # (B, N)
    new_a = torch.where(merge, new_index[:, 1::2].gather(1, partner), new_index[:, ::2])  # (B, nA)
    new_index[:, ::2] = new_a                                            # merged A -> their partner's slot
    valid = merge.gather(1, src)                                         # (B, M)
    dst = new_index[:, 1::2].gather(1, partner.gather(1, src)).clamp_min(0)  # (B, M) partner slots
    return _Plan(take=take, real=real, src=2 * src, dst=dst, valid=valid, new_index=new_index)


def _per_layer(r: Union[int, Sequence[int]], index: int, depth: int, name: str) -> int:
    if isinstance(r, int):
        return r
    if len(r) != depth:
        raise ValueError(f"{name}: r has {len(r)} entries but the model has {depth} blocks")
    return int(r[index])


def _check_r(r, name: str):
    values = list(r) if isinstance(r, (list, tuple)) else [r]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name}: r must be a non-negative int or a list of them, got {r!r}")
    return tuple(values) if isinstance(r, (list, tuple)) else r


def _global_merge(state: TokenState, ctx: BlockContext, r: int, per_block: bool = False) -> TokenState:
    """ToMe step: merge up to r tokens per image, capped at half its real non-prefix tokens (official
    ToMe's cap). ``per_block``: the VWT paper's layer logic (see :class:`ToMe`)."""
    p, n = state.prefix, state.num_tokens
    if r <= 0:
        return state
    real = state.real_counts()                                           # (B,) prefix included
    budget = ((real - p) // 2).clamp(max=r)[:, None]                     # (B, 1)
    if not per_block:
        if n - p < 2:
            return state
        cap = min(r, (n - p) // 2)
        return _apply(state, _bipartite_match(state, ctx.metric, budget, cap, out_len=n - cap))
    attempt = real >= r                                                  # (B,) the paper skips a block with < r tokens
    if not bool(attempt.any()):
        return state
    fresh = state.sizes() if state.size is None else (state.size > 0).float()  # (B, N) 1 per real token
    sizes = torch.where(attempt[:, None], fresh, state.sizes())          # (B, N) a merging block starts from 1
    if n - p < 2:  # nothing to match, yet the paper's do-nothing merge still resets the sizes
        return replace(state, size=sizes)
    plan = _bipartite_match(state, ctx.metric, budget * attempt[:, None], min(r, (n - p) // 2))
    return _apply(state, plan, sizes)


# --------------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------------
SIZES = ("cumulative", "per-block")
POOLS = ("unweighted", "size-weighted")


class ToMe(Reducer):
    """Token Merging (Bolya et al., ICLR 2023); by default exactly official ToMe off the shelf.

    In every block, after the attention residual, up to ``r`` tokens per image merge by bipartite soft
    matching: keys averaged over heads as the metric; the whole sequence alternates into A (positions
    0, 2, 4, ...) and B (1, 3, 5, ...); the prefix tokens (class, and timm's distillation token) never
    merge; the r A tokens with the most similar B partners merge into them by size-weighted mean,
    sizes add. Output: [prefix, unmerged A in their original order (in descending score order when
    there is no class token, as official ToMe leaves them), B]. ``r`` is an int (every block) or a list
    with one entry per block, capped at half the non-prefix tokens. ``prop_attn`` adds log(size) to
    the attention logits, as ToMe does off the shelf.

    ``sizes="per-block"`` is ToMe as the VWT paper's CLIP and BLIP code ran it (its
    ``utils/modeling_clip.py`` / ``modeling_blip.py``): each block's weighted mean starts from size 1
    (sizes are not carried from block to block), so proportional attention (CLIP: ``prop_attn=True``;
    BLIP: ``prop_attn=False``) sees only the previous merge's counts, and ``size`` in ``vwt.stats``
    counts the last merge only; a block merges nothing when an image has fewer than ``r`` tokens
    (class token included), and then keeps the sizes it was given.

    ``pool``: how an average-pooled model (timm ``global_pool="avg"``, open_clip ``pool_type="avg"``)
    pools the merged tokens. "unweighted" (default): their plain mean, as official ToMe on timm leaves
    timm's own pooling; "size-weighted": each token weighed by the patches it holds, the unreduced
    model's mean (official ToMe's MAE patch pools so). Class-token models are not affected.
    """

    def __init__(self, r: Union[int, Sequence[int]] = 8, prop_attn: bool = True, sizes: str = "cumulative",
                 pool: str = "unweighted"):
        if sizes not in SIZES:
            raise ValueError(f"ToMe: sizes must be one of {SIZES}, got {sizes!r}")
        if pool not in POOLS:
            raise ValueError(f"ToMe: pool must be one of {POOLS}, got {pool!r}")
        self.r = _check_r(r, "ToMe")
        self.prop_attn = bool(prop_attn)
        self.sizes = sizes
        self.pool = pool

    def after_attn(self, state: TokenState, ctx: BlockContext) -> TokenState:
        r = _per_layer(self.r, ctx.index, ctx.depth, "ToMe")
        state = _global_merge(state, ctx, r, per_block=self.sizes == "per-block")
        state.pool_by_size = self.pool == "size-weighted"
        return state


# --------------------------------------------------------------------------------------------------
# EViT
# --------------------------------------------------------------------------------------------------
class EViT(Reducer):
    """EViT (Liang et al., ICLR 2022), training-free: keep the attentive tokens, fuse the rest.

    At ``layers`` (default: the 4th, 7th and 10th of 12 blocks, scaled with depth), after the attention
    residual, the class token's attention to each token (heads averaged, computed beside the fused
    kernel) ranks the non-prefix tokens; the ``ceil(keep * (N - prefix))`` highest stay, in attention
    order. With ``fuse``, one token = the sum of the dropped tokens weighted by their (not
    renormalised) attention is appended; its size is the sum of theirs. Without ``fuse`` the dropped
    patches get label -1.
    """

    def __init__(self, keep: float = 0.7, layers: Optional[Sequence[int]] = None, fuse: bool = True):
        if not 0 < keep <= 1:
            raise ValueError(f"EViT: keep must be in (0, 1], got {keep!r}")
        self.keep = float(keep)
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        self.fuse = bool(fuse)

    def layers_for(self, depth: int) -> tuple:
        """Blocks after which tokens are dropped: ``layers``, or (3, 6, 9) scaled to ``depth``."""
        if self.layers is None:
            return tuple(sorted({round(i * depth / 12) for i in (3, 6, 9)}))
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"EViT: layers {bad} out of range for a model with {depth} blocks")
        return self.layers

    def after_attn(self, state: TokenState, ctx: BlockContext) -> TokenState:
        if ctx.index not in self.layers_for(ctx.depth):
            return state
        n = state.num_tokens - state.prefix
        k = math.ceil(self.keep * n)
        return state if k >= n else _apply(state, self._plan(state, ctx, k))

    def _plan(self, state: TokenState, ctx: BlockContext, k: int) -> _Plan:
        """Keep each image's top ``ceil(keep * real)`` tokens in attention order (k slots for the
        longest), then with ``fuse`` one slot right after them that the dropped tokens fold into;
        without it the plan has no fold at all (no slot to fold into)."""
        p, n, b, dev = state.prefix, state.num_tokens - state.prefix, state.batch, state.x.device
        real = state.real_counts() - p                                   # (B,) real non-prefix tokens
        k_img = torch.ceil(real.double() * self.keep).long()             # (B,) same arithmetic as math.ceil
        is_real = torch.arange(n, device=dev)[None] < real[:, None]      # (B, n)
        attn = ctx.cls_attention()[:, p:]                                # (B, n) float32
        order = torch.sort(attn.masked_fill(~is_real, _NEG), dim=1, descending=True, stable=True).indices  # (B, n)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, -1))  # (B, n)
        kept = is_real & (rank < k_img[:, None])                         # (B, n)
        prefix = torch.arange(p, device=dev).expand(b, -1)               # (B, p)
        extra = 1 if self.fuse else 0
        take = torch.cat([prefix, p + order[:, :k], torch.zeros(b, extra, dtype=torch.long, device=dev)], 1)  # (B, L)
        real_slot = torch.arange(p + k + extra, device=dev)[None] < (p + k_img)[:, None]  # (B, L)
        new_tok = torch.where(kept, p + rank, torch.full_like(rank, -1))  # (B, n) kept -> slot, else dropped
        dropped = is_real & ~kept if self.fuse else torch.zeros_like(kept)  # (B, n) folded into one token
        slot = (p + k_img)[:, None]                                      # (B, 1) right after the kept tokens
        new_tok = torch.where(dropped, slot, new_tok)                    # (B, n)
        lo = k if state.size is None or not b else int(k_img.min())               # every dropped token ranks >= lo
        tail = order[:, lo:] if self.fuse else order[:, :0]              # (B, M) the candidates to fold; M = 0 unfused
        return _Plan(take=take, real=real_slot, src=p + tail, dst=slot.expand_as(tail),  # slot <= p + k: in range
                     valid=dropped.gather(1, tail), new_index=torch.cat([prefix, new_tok], 1),
                     weight=attn.gather(1, tail))


# --------------------------------------------------------------------------------------------------
# DFE + LGTM (Delayed Spatial Merging)
# --------------------------------------------------------------------------------------------------
def _windows(state: TokenState) -> Tensor:
    """(B, N) the 2x2 window (0..3) of each token's patches, -1 for tokens holding none (prefix, pads).
    A token holding patches of several windows (an inter-image visual word) takes the lowest."""
    rows, cols = state.grid
    dev = state.labels.device
    i = torch.arange(rows, device=dev)[:, None]                          # (rows, 1)
    j = torch.arange(cols, device=dev)[None, :]                          # (1, cols)
    win = ((2 * i) // rows * 2 + (2 * j) // cols).flatten()              # (P,) row-major, like the labels
    labels = state.labels                                                # (B, P)
    n = state.num_tokens
    idx = torch.where(labels >= 0, labels, torch.full_like(labels, n))   # (B, P) dropped -> spare column
    out = torch.full((labels.shape[0], n + 1), 4, dtype=torch.long, device=dev)  # (B, N + 1)
    out.scatter_reduce_(1, idx, win.expand(labels.shape[0], -1), reduce="amin")
    out = out[:, :n]                                                     # (B, N)
    return out.masked_fill_(out == 4, -1)


def _window_plan(state: TokenState, metric: Tensor, per_window: int) -> _Plan:
    """LGTM's local merging as the paper draws it (Window Partitioning -> Stack -> Local Merging ->
    Concat): the non-prefix tokens of each image are cut into its four windows (:func:`_windows`), each
    window, in token order, is its own sequence for ToMe's bipartite matching (A = its tokens 0, 2, 4,
    ..., B = 1, 3, 5, ...; each A token's most cosine-similar B token of the window; the
    ``min(per_window, n_w // 2)`` best-matched A tokens merge), and the windows are concatenated behind
    the prefix tokens in window order, each as [unmerged A in order, B]. Vectorised: the windows of the
    batch are stacked as B x 4 sequences."""
    p, n, b, dev = state.prefix, state.num_tokens, state.batch, metric.device
    win = _windows(state)                                                # (B, N) -1: prefix or pad
    pos = torch.arange(n, device=dev)                                    # (N,)
    key = torch.where(win >= 0, win * n + pos, 4 * n + pos)              # (B, N) window, then position
    order = key.argsort(dim=1, stable=True)                              # (B, N) tokens grouped by window
    count = torch.zeros(b, 4, dtype=torch.long, device=dev).scatter_add_(1, win.clamp_min(0), (win >= 0).long())
    lw = max(2, _largest(count))                                        # the longest window (2: a pair at least)
    j = torch.arange(lw, device=dev)                                     # (Lw,)
    inside = (j < count[..., None]).view(b * 4, lw)                      # (S, Lw) S = B x 4 stacked windows
    at = ((count.cumsum(1) - count)[..., None] + j).clamp(max=n - 1)     # (B, 4, Lw) place in ``order``
    idx = order.gather(1, at.view(b, 4 * lw)).view(b * 4, lw)                # (S, Lw) old token of each cell
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)                # (B, N, d) unit keys
    ms = m.gather(1, idx.view(b, 4 * lw, 1).expand(-1, -1, m.shape[-1])).view(b * 4, lw, m.shape[-1])  # (S, Lw, d)
    scores = ms[:, ::2] @ ms[:, 1::2].transpose(1, 2)                    # (S, nA, nB) cosine A x B
    best, partner = scores.masked_fill_(~inside[:, None, 1::2], _NEG).max(-1)  # (S, nA)
    ok_a = inside[:, ::2]
    best = best.masked_fill_(~ok_a, _NEG)
    budget = (count // 2).clamp(max=per_window).view(4 * b, 1)              # (S, 1)
    ranked = best.argsort(dim=1, descending=True, stable=True)           # (S, nA)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=dev).expand_as(ranked))
    merge = ok_a & (rank < budget)                                       # (S, nA)
    return _concat_windows(state, idx, inside, merge, partner)


def _by_image(t: Tensor) -> Tensor:
    """(B x 4, K) stacked windows as (B, 4 K) rows of their images (a batch of no image too)."""
    return t.reshape(t.shape[0] // 4, 4 * t.shape[1])


def _concat_windows(state: TokenState, idx: Tensor, inside: Tensor, merge: Tensor, partner: Tensor) -> _Plan:
    """The plan of :func:`_window_plan`'s stacked matching: each window kept as [unmerged A, B] behind
    the prefix and the windows before it; merged A tokens fold into their partners' slots."""
    p, n, b, dev = state.prefix, state.num_tokens, state.batch, idx.device
    na = merge.shape[1]
    kept = torch.cat([inside[:, ::2] & ~merge, inside[:, 1::2]], 1)      # (S, nA + nB) [A, B] cells kept
    old = torch.cat([idx[:, ::2], idx[:, 1::2]], 1)                      # (S, nA + nB) their old tokens
    per = kept.sum(1).view(b, 4)                                         # (B, 4) tokens each window keeps
    slot = (p + per.cumsum(1) - per).view(4 * b, 1) + kept.long().cumsum(1) - 1  # (S, nA + nB) slot if kept
    to = torch.cat([torch.where(kept[:, :na], slot[:, :na], slot[:, na:].gather(1, partner)), slot[:, na:]], 1)
    #                                                                      (S, nA + nB) merged A: partner's slot
    moved = kept | torch.cat([merge, torch.zeros_like(inside[:, 1::2])], 1)  # (S, nA + nB) placed somewhere
    length = p + _largest(per.sum(1))                                    # L slots out
    new_index = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # (B, N + 1), column N: spare
    new_index[:, :p] = torch.arange(p, device=dev)
    new_index.scatter_(1, _by_image(torch.where(moved, old, n)), _by_image(to))
    take = torch.zeros(b, length + 1, dtype=torch.long, device=dev)      # (B, L + 1), column L: spare
    take[:, :p] = torch.arange(p, device=dev)
    take.scatter_(1, _by_image(torch.where(kept, slot, length)), _by_image(old))
    real = torch.arange(length, device=dev) < (p + per.sum(1))[:, None]  # (B, L)
    merged = _by_image(merge)                                            # (B, 4 nA) merged A cells
    first = torch.sort(merged.to(torch.uint8), dim=1, descending=True, stable=True).indices
    first = first[:, :max(1, _largest(merged.sum(1)))]                   # (B, M) merged cells first
    src = _by_image(idx[:, ::2]).gather(1, first)                        # (B, M) old tokens that fold
    dst = _by_image(to[:, :na]).gather(1, first).clamp(0, length - 1)   # (B, M) their partners' slots
    return _Plan(take=take[:, :length], real=real, src=src, dst=dst, valid=merged.gather(1, first),
                 new_index=new_index[:, :n])


class LGTM(Reducer):
    """DFE + LGTM of Heo et al., arXiv 2303.02331 v1 (its description of delayed first merging and
    local-global token merging; later versions of the paper retitled and reworked it as "Delayed
    Spatial Merging"). No code was published with the paper: this is a reimplementation from the v1
    text and its pipeline figure (Window Partitioning -> Stack -> Local Merging -> Concat -> Global
    Merging).

    Schedule over the blocks (after each block's attention residual):

    * ``dense`` first blocks: no reduction (delayed first merging: attention has not converged yet);
    * ``local`` next blocks: the patch grid is cut into four windows (its halves in each direction), the
      windows are stacked as four sequences, ToMe's bipartite matching runs inside each (A and B
      alternate within the window; the class token belongs to no window) and merges
      ``min(ceil(r / 4), n_w // 2)`` tokens of each, and the windows are concatenated behind the prefix
      tokens in window order (see :func:`_window_plan`). A token's window is that of its patches (a
      token holding patches of several windows, an inter-image visual word, takes the lowest), so a
      later local block matches within the same windows. A grid with an odd side cannot be halved:
      the first window of that side takes the middle row (column), e.g. the 7x7 grid of /32 models at
      224 px gives windows of 16, 12, 12 and 9 patches;
    * the remaining blocks: global merging of ``r`` tokens, exactly as :class:`ToMe` (official ToMe).

    Defaults for 12 blocks: ``dense=2, local=2`` (blocks 0-1 dense, 2-3 local, 4-11 global); for other
    depths ``round(depth / 6)`` each. ``r=19`` by default: the paper's headline ViT-S point (about -1%
    top-1 at 2.66 GMACs, read from its Pareto figure; the paper states no single r). Proportional
    attention is on, as in ToMe.
    """

    def __init__(self, r: int = 19, dense: Optional[int] = None, local: Optional[int] = None,
                 prop_attn: bool = True):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"LGTM: r must be a non-negative int, got {r!r}")
        for name, v in (("dense", dense), ("local", local)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"LGTM: {name} must be a non-negative int, got {v!r}")
        self.r, self.dense, self.local = r, dense, local
        self.prop_attn = bool(prop_attn)

    def schedule(self, depth: int) -> tuple[int, int]:
        """(dense, local) block counts for a model with ``depth`` blocks."""
        default = round(depth / 6)
        return (default if self.dense is None else self.dense, default if self.local is None else self.local)

    def after_attn(self, state: TokenState, ctx: BlockContext) -> TokenState:
        dense, local = self.schedule(ctx.depth)
        if ctx.index < dense or self.r == 0:
            return state
        if ctx.index >= dense + local:
            return _global_merge(state, ctx, self.r)
        if state.num_tokens - state.prefix < 2:
            return state
        return _apply(state, _window_plan(state, ctx.metric, math.ceil(self.r / 4)))
