"""In-network token reducers: ToMe, training-free EViT, and DFE + LGTM (Delayed Spatial Merging).

All three act after a block's attention residual (``Reducer.after_attn``) and keep the
:class:`~vwt.encoder.TokenState` consistent: ``size`` (patches per token, 0 for pads), ``labels``
(which token holds each input patch) and the pad layout (pads at the end of each image's sequence).

Padded batches (from ``vwt.InterImage``) follow one rule: a pad is never merged, never a merge
partner, never kept ahead of a real token, never fused, and never uses one of an image's merges; the
number of merges is capped per image by its real tokens. So an image gives the same output alone and
inside a padded batch. Shapes stay common to the batch; an image that removes fewer tokens than the
longest keeps extra pads.

Everything is vectorised over the batch (sort, gather, scatter_add): no loop over images and no full
attention matrix.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .encoder import BlockContext, Reducer, TokenState

_NEG = -math.inf


# --------------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------------
def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for (B, N, C) tokens and a (B, L) index: whole-row copies (faster than gather)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def _compact(flags: Tensor, out_len: Optional[int]):
    """Where each token goes when the tokens flagged (B, N) are kept, in order, at the front of a
    sequence of ``out_len`` slots (default: the largest kept count) and the rest of each row is pads.
    Returns for each slot the index of the token it takes (B, L) (0 in pad slots), whether the slot is
    real (B, L), and the new index of each old token (B, N) (-1 where not kept)."""
    b, n = flags.shape
    pos = flags.long().cumsum(1) - 1
    count = pos[:, -1] + 1
    length = int(count.max()) if out_len is None else out_len
    target = torch.where(flags, pos, torch.full_like(pos, length))  # unkept -> a spare column
    src = torch.zeros(b, length + 1, dtype=torch.long, device=flags.device)
    src.scatter_(1, target, torch.arange(n, device=flags.device).expand(b, -1))
    real = torch.arange(length, device=flags.device) < count[:, None]
    return src[:, :length], real, torch.where(flags, pos, torch.full_like(pos, -1))


def _bipartite_merge(state: TokenState, metric: Tensor, budget: Tensor, max_merges: int,
                     groups: Optional[Tensor] = None, out_len: Optional[int] = None) -> TokenState:
    """ToMe's bipartite soft matching, optionally restricted to groups (LGTM's windows).

    The non-prefix tokens alternate into A (even) and B (odd). Each A token's partner is its most
    cosine-similar B token (same group, real); in each image and group the ``budget`` (B, G) A tokens
    with the most similar partners merge into them by size-weighted mean; sizes add. Pads are masked
    out of both sides. ``max_merges`` bounds the merges of any image. The result is [prefix, unmerged A,
    B], real tokens first. Costs one gather of the tokens plus work on the merged rows only.
    """
    x, p = state.x, state.prefix
    bsz, n_tok, c = x.shape
    if n_tok - p < 2 or max_merges < 1:
        return state
    size = state.sizes()
    real = state.real_counts() - p  # (B,) real non-prefix tokens; pads come after them

    m = metric[:, p:].float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ma, mb = m[:, ::2], m[:, 1::2]
    na, nb = ma.shape[1], mb.shape[1]
    dev = x.device
    pos_a = torch.arange(na, device=dev) * 2
    pos_b = torch.arange(nb, device=dev) * 2 + 1
    real_a, real_b = pos_a[None] < real[:, None], pos_b[None] < real[:, None]

    scores = ma @ mb.transpose(1, 2)  # (B, na, nb)
    invalid = ~real_b[:, None, :]
    if groups is not None:
        ga, gb = groups[:, ::2], groups[:, 1::2]
        invalid = invalid | (ga[:, :, None] != gb[:, None, :])
    scores = scores.masked_fill_(invalid, _NEG)
    best, partner = scores.max(-1)  # (B, na)
    candidate = real_a & (best > _NEG)

    # rank of each candidate among the candidates of its group, best match first
    if groups is None:
        key, g = best, None
    else:
        g = ga.clamp_min(0)
        key = best - 4.0 * g  # cosine in [-1, 1]: groups sort apart, group 0 first
    key = key.masked_fill(~candidate, _NEG)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(na, device=dev).expand(bsz, -1))
    if g is None:
        merge = candidate & (rank < budget[:, :1])
        src = order[:, :max_merges]  # the merged A tokens come first
    else:
        counts = torch.zeros(bsz, budget.shape[1], dtype=torch.long, device=dev)
        counts.scatter_add_(1, g, candidate.long())
        start = counts.cumsum(1) - counts
        merge = candidate & (rank - start.gather(1, g) < budget.gather(1, g))
        src = torch.sort(merge.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :max_merges]

    # sizes of the merged B tokens
    sa, sb = size[:, p::2], size[:, p + 1::2]
    valid = merge.gather(1, src)
    dst = partner.gather(1, src)
    w = sa.gather(1, src) * valid
    new_sb = sb.scatter_add(1, dst, w)

    # new layout [prefix, unmerged real A, real B, pads]: one gather of the tokens
    flags = torch.cat([torch.ones(bsz, p, dtype=torch.bool, device=dev), real_a & ~merge, real_b], 1)
    slot, slot_real, new_cat = _compact(flags, out_len)
    origin = torch.cat([torch.arange(p, device=dev), p + pos_a, p + pos_b])  # cat order -> index in x
    out_x = _rows(x, origin[slot])
    out_size = torch.cat([size[:, :p], sa, new_sb], 1).gather(1, slot) * slot_real

    # size-weighted means, as x_b + sum_i w_i (x_i - x_b) / size: only the merged rows change
    new_a, new_b = new_cat[:, p:p + na], new_cat[:, p + na:]
    coef = (w / new_sb.gather(1, dst).clamp_min(1e-12)).to(x.dtype)
    xs = _rows(x, p + 2 * src)
    xd = _rows(x, p + 1 + 2 * dst)
    at = new_b.gather(1, dst).clamp_min(0)  # unused (zero-weight) entries add 0 to slot 0
    flat = (at + torch.arange(bsz, device=dev)[:, None] * out_x.shape[1]).reshape(-1)
    delta = torch.where(valid[..., None], (xs - xd) * coef[..., None], torch.zeros((), dtype=x.dtype, device=dev))
    out_x.view(-1, c).index_add_(0, flat, delta.reshape(-1, c))

    new_a = torch.where(merge, new_b.gather(1, partner), new_a)
    new_index = torch.empty(bsz, n_tok, dtype=torch.long, device=dev)
    new_index[:, :p] = new_cat[:, :p]
    new_index[:, p::2] = new_a
    new_index[:, p + 1::2] = new_b
    return replace(state, x=out_x, size=out_size, labels=state.relabel(new_index))


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


def _global_merge(state: TokenState, ctx: BlockContext, r: int) -> TokenState:
    """ToMe step: merge r tokens per image, capped at half its real non-prefix tokens."""
    n = state.num_tokens - state.prefix
    r = min(r, n // 2)
    if r <= 0:
        return state
    budget = ((state.real_counts() - state.prefix) // 2).clamp(max=r)[:, None]
    return _bipartite_merge(state, ctx.metric, budget, r, out_len=state.num_tokens - r)


# --------------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------------
class ToMe(Reducer):
    """Token Merging (Bolya et al., ICLR 2023), off the shelf.

    In every block, after the attention residual, ``r`` tokens per image merge into their most similar
    partners by bipartite soft matching: keys averaged over heads as the metric, tokens alternating
    into two sets, the class (prefix) tokens never merged, size-weighted averages. ``r`` is an int (every
    block) or a list with one entry per block; it is capped at half the tokens. ``prop_attn`` adds
    log(size) to the attention logits, as ToMe does off the shelf.
    """

    def __init__(self, r: Union[int, Sequence[int]] = 8, prop_attn: bool = True):
        self.r = _check_r(r, "ToMe")
        self.prop_attn = bool(prop_attn)

    def after_attn(self, state: TokenState, ctx: BlockContext) -> TokenState:
        return _global_merge(state, ctx, _per_layer(self.r, ctx.index, ctx.depth, "ToMe"))


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
        x, p = state.x, state.prefix
        bsz, n_tok, c = x.shape
        n = n_tok - p
        k = math.ceil(self.keep * n)
        if k >= n:
            return state
        dev = x.device
        real = state.real_counts() - p
        k_img = torch.ceil(real.double() * self.keep).long()  # same float arithmetic as math.ceil
        is_real = torch.arange(n, device=dev)[None] < real[:, None]

        attn = ctx.cls_attention()[:, p:]  # (B, n) float32
        order = torch.sort(attn.masked_fill(~is_real, _NEG), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(bsz, -1))
        kept = is_real & (rank < k_img[:, None])

        size = state.sizes()
        tokens, tsize = x[:, p:], size[:, p:]
        # one gather: [prefix, the top-k in attention order, (+ a slot for the fused token)]
        extra = 1 if self.fuse else 0
        take = torch.cat([torch.arange(p, device=dev).expand(bsz, -1), p + order[:, :k],
                          torch.zeros(bsz, extra, dtype=torch.long, device=dev)], 1)
        out_x = _rows(x, take)
        slot_real = torch.arange(p + k + extra, device=dev)[None] < (p + k_img)[:, None]
        out_size = size.gather(1, take) * slot_real
        new_tok = torch.where(kept, p + rank, torch.full_like(rank, -1))
        if self.fuse:
            dropped = is_real & ~kept
            weights = (attn * dropped).to(x.dtype)
            fused = weights[:, None, :] @ tokens  # (B, 1, C): attention-weighted sum, no renormalisation
            slot = p + k_img  # right after the image's kept tokens; an empty fuse (size 0) is a pad
            out_x.scatter_(1, slot[:, None, None].expand(-1, 1, c), fused)
            out_size.scatter_(1, slot[:, None], (tsize * dropped).sum(1, keepdim=True))
            new_tok = torch.where(dropped, slot[:, None].expand(-1, n), new_tok)
        new_index = torch.cat([torch.arange(p, device=dev).expand(bsz, -1), new_tok], 1)
        return replace(state, x=out_x, size=out_size, labels=state.relabel(new_index))


# --------------------------------------------------------------------------------------------------
# DFE + LGTM (Delayed Spatial Merging)
# --------------------------------------------------------------------------------------------------
def _windows(state: TokenState) -> Tensor:
    """(B, N) the 2x2 window (0..3) of each token's patches, -1 for tokens holding none (prefix, pads).
    A token holding patches of several windows (an inter-image visual word) takes the lowest."""
    rows, cols = state.grid
    dev = state.labels.device
    i = torch.arange(rows, device=dev)[:, None]
    j = torch.arange(cols, device=dev)[None, :]
    win = ((2 * i) // rows * 2 + (2 * j) // cols).flatten()  # row-major patches, like the labels
    labels = state.labels
    n = state.num_tokens
    idx = torch.where(labels >= 0, labels, torch.full_like(labels, n))
    out = torch.full((labels.shape[0], n + 1), 4, dtype=torch.long, device=dev)
    out.scatter_reduce_(1, idx, win.expand(labels.shape[0], -1), reduce="amin")
    out = out[:, :n]
    return out.masked_fill_(out == 4, -1)


class LGTM(Reducer):
    """DFE + LGTM, from "Training-Free Acceleration of ViTs with Delayed Spatial Merging" (Heo et al.,
    arXiv 2303.02331). No code was published with the paper: this is a reimplementation from its
    description.

    Schedule over the blocks (after each block's attention residual):

    * ``dense`` first blocks: no reduction (delayed first merging: attention has not converged yet);
    * ``local`` next blocks: the patch grid is split into four equal windows (2x2) and ``ceil(r / 4)``
      tokens merge inside each window by ToMe's matching restricted to same-window pairs (capped at
      half of a window's tokens);
    * the remaining blocks: global ToMe merging of ``r`` tokens.

    Defaults for 12 blocks: ``dense=2, local=2`` (blocks 0-1 dense, 2-3 local, 4-11 global); for other
    depths ``round(depth / 6)`` each. Proportional attention is on, as in ToMe.
    """

    def __init__(self, r: int = 8, dense: Optional[int] = None, local: Optional[int] = None,
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
        p = state.prefix
        groups = _windows(state)[:, p:]
        real_per_window = torch.zeros(state.batch, 4, dtype=torch.long, device=groups.device)
        real_per_window.scatter_add_(1, groups.clamp_min(0), (groups >= 0).long())
        per_window = math.ceil(self.r / 4)
        budget = (real_per_window // 2).clamp(max=per_window)
        max_merges = min(4 * per_window, (state.num_tokens - p + 1) // 2)
        return _bipartite_merge(state, ctx.metric, budget, max_merges, groups)
