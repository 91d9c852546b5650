"""The one ViT block loop every method runs in.

A backend turns a model family into a :class:`Tower` (embedding, pre-norm, blocks, finish); this module
runs it. The loop carries a :class:`TokenState`: the tokens, how many input patches each stands for
(``size``; 0 marks a pad), and which token holds each input patch (``labels``). Attention goes through
``scaled_dot_product_attention`` with an additive bias derived from the state: none while every size is
1 (so the fastest kernel runs), ``-inf`` on pad keys, and ``log(size)`` where a reducer asks for
proportional attention. Reducers act at two points: on the embedded input (``reduce_input``) and after
a block's attention residual (``after_attn``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------------
# Token state
# --------------------------------------------------------------------------------------------------
@dataclass
class TokenState:
    """Tokens flowing through the blocks.

    x:      (B, N, C) tokens; the first ``prefix`` are class/register tokens that are never reduced.
    size:   (B, N) float32 patch counts, or None while every token is one patch and nothing is padded.
            Prefix tokens have size 1; pad tokens have size 0.
    labels: (B, P) long, for each of the P input patches the index of the token now holding it, or -1
            where the patch was dropped. Reducers keep it current so ``vwt.stats`` and the figures
            can show what was merged.
    grid:   (rows, cols) of the input patch grid.
    prop_attn: add ``log(size)`` to the attention logits (proportional attention).
    pool_by_size: an average pool weighs each token by its size (else each real token once: official
            ToMe's, which sets it through ``vwt.ToMe(pool=...)``).
    """

    x: Tensor
    size: Optional[Tensor]
    labels: Tensor
    grid: tuple[int, int]
    prefix: int = 1
    prop_attn: bool = False
    pool_by_size: bool = True
    # (B, recorded) real-token counts so far (see :meth:`record`): a tensor that grows, not a list, so that
    # torch.compile's code resumed after a graph break in a block (ToMe's) does not compile again for
    # every block (a list's length is guarded; a tensor's width becomes a dynamic size)
    tokens_per_layer: Optional[Tensor] = None
    execution: str = "dense"  # how the blocks ran: dense (nothing padded), padded or packed

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> Tensor:
        """(B, N) float32 sizes, materialised (ones) when implicit."""
        if self.size is None:
            return torch.ones(self.x.shape[:2], dtype=torch.float32, device=self.x.device)
        return self.size

    def real_mask(self) -> Optional[Tensor]:
        """(B, N) bool, False on pad tokens; None when nothing is padded."""
        if self.size is None:
            return None
        return self.size > 0

    def real_counts(self) -> Tensor:
        """(B,) number of real (non-pad) tokens per image, prefix tokens included."""
        if self.size is None:
            return torch.full((self.batch,), self.num_tokens, dtype=torch.long, device=self.x.device)
        return (self.size > 0).sum(1)

    def attn_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive attention bias (B, 1, 1, N) from the state, or None when no bias is needed."""
        if self.size is None:
            return None
        if self.prop_attn:
            bias = self.size.log()  # log(0) = -inf masks pads by the same rule
        else:
            bias = torch.zeros_like(self.size).masked_fill_(self.size == 0, -math.inf)
        return bias.to(dtype)[:, None, None, :]

    def record(self) -> None:
        """Append the real-token counts now (entering the first block, then after each block)."""
        counts = self.real_counts()[:, None]
        before = counts[:, :0] if self.tokens_per_layer is None else self.tokens_per_layer
        self.tokens_per_layer = torch.cat([before, counts], 1)

    def layer_counts(self) -> Tensor:
        """(B, recorded) the real-token counts recorded so far: entering the first block, then after
        each block (what ``vwt.token_stats`` reads)."""
        if self.tokens_per_layer is None:
            raise ValueError("no token counts recorded yet")
        return self.tokens_per_layer

    def relabel(self, new_index: Tensor) -> Tensor:
        """The labels after a reduction in which old token j becomes token ``new_index[:, j]`` (B, N_old)
        (-1: gone); a patch already dropped stays -1. Every reducer keeps ``labels`` current with it."""
        out = new_index.gather(1, self.labels.clamp_min(0))
        return torch.where(self.labels >= 0, out, torch.full_like(out, -1))


def initial_state(x: Tensor, grid: tuple[int, int], prefix: int) -> TokenState:
    """State for freshly embedded tokens: all size 1, patch p held by token prefix + p."""
    num_patches = grid[0] * grid[1]
    labels = torch.arange(prefix, prefix + num_patches, device=x.device).expand(x.shape[0], -1)
    none = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)  # no count yet: never None, one compiled case
    return TokenState(x=x, size=None, labels=labels, grid=grid, prefix=prefix, tokens_per_layer=none)


# --------------------------------------------------------------------------------------------------
# Reducers
# --------------------------------------------------------------------------------------------------
class Reducer:
    """Base class of every method. Input reducers override ``reduce_input``; in-network reducers
    override ``after_attn``. Both return the (possibly new) state. ``prop_attn`` turns on
    proportional attention from the point the reducer first acts."""

    kind: str = "block"  # "input" or "block"
    prop_attn: bool = False

    def reduce_input(self, state: TokenState, ctx: "InputContext") -> TokenState:
        return state

    def after_attn(self, state: TokenState, ctx: "BlockContext") -> TokenState:
        return state

    def resize_pixels(self, pixel_values: Tensor, tower: "Tower") -> Optional[Tensor]:
        """An input reducer that changes the image size returns the new pixels here (the tower then
        embeds them with interpolated position embeddings, ``Tower.embed_any``); None: unchanged."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_rule(chosen: Sequence[tuple[str, str]], choices: dict[str, str]) -> None:
    """The one check of the rule "at most one input reducer plus one in-network reducer" (int8 aside).
    ``chosen``: (name, kind) of every method asked for, kind "input" or "block"; ``choices``: for each
    kind, how the caller names the alternatives in the ValueError (classes for ``vwt.patch``, flags
    for the scripts)."""
    for kind, what in (("input", "input reducer"), ("block", "in-network reducer")):
        names = [name for name, k in chosen if (k == "input") == (kind == "input")]
        if len(names) > 1:
            raise ValueError(f"choose one {what}: {choices[kind]}; got {' and '.join(names)}")


@dataclass
class InputContext:
    """What an input reducer may look at besides the state.

    pixel_values: (B, 3, H, W) the normalised pixels the model received.
    patch_size:   P, so patch (i, j) is pixel_values[:, :, iP:(i+1)P, jP:(j+1)P].
    patch_embeds: (B, P_count, C) patch-projection outputs before position embeddings.
    """

    pixel_values: Tensor
    patch_size: int
    patch_embeds: Tensor


class BlockContext:
    """What an in-network reducer may look at after a block's attention: the queries and keys of that
    attention (B, H, N, d), the bias it used, and the block index. The class-token attention row and
    the head-averaged keys are computed on demand, never the full attention matrix."""

    def __init__(self, index: int, depth: int, q: Tensor, k: Tensor, scale: float,
                 bias: Optional[Tensor]):
        self.index, self.depth = index, depth
        self.q, self.k, self.scale, self.bias = q, k, scale, bias

    @property
    def metric(self) -> Tensor:
        """(B, N, d) keys averaged over heads: ToMe's similarity metric."""
        return self.k.mean(1)

    def cls_attention(self) -> Tensor:
        """(B, N) the class token's attention to every token, averaged over heads."""
        logits = (self.q[:, :, :1] @ self.k.transpose(-2, -1)) * self.scale  # (B, H, 1, N)
        if self.bias is not None:
            logits = logits + self.bias
        return logits.float().softmax(-1).mean(1)[:, 0]


# --------------------------------------------------------------------------------------------------
# The tower a backend exposes
# --------------------------------------------------------------------------------------------------
def identity(t: Tensor) -> Tensor:
    """A step a family does not have (layer scale, pre-norm): a plain function rather than an
    ``nn.Identity`` made per forward, which torch.compile cannot trace (no source: a graph break in
    every block)."""
    return t


@dataclass
class Block:
    """One pre-norm block, as callables over the model's own modules.

    qkv(h) returns q, k, v each (B, heads, N, head_dim); out_proj maps (B, N, C) back to the residual
    (with the model's own output dropout, where it has one); ls1/ls2 are layer scales (identity when
    the family has none); drop1/drop2 the model's own drop-path modules after them, given only in
    ``train()`` mode (None: nothing to call, so inference pays nothing for them).
    attn_drop: the dropout probability on the attention weights, the model's own in ``train()`` mode
    (0 in ``eval()``), so fine-tuning through ``vwt.patch`` keeps the model's regularisation.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    out_proj: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: Optional[float] = None
    ls1: Callable[[Tensor], Tensor] = identity
    ls2: Callable[[Tensor], Tensor] = identity
    drop1: Optional[Callable[[Tensor], Tensor]] = None
    drop2: Optional[Callable[[Tensor], Tensor]] = None
    attn_drop: float = 0.0


@dataclass
class Tower:
    """A backend's view of one vision tower.

    embed(pixel_values) -> (tokens (B, N, C) with prefix tokens and position embeddings,
                            patch projections (B, P, C) before position embeddings, grid)
    pre_norm: applied after input reduction, before the first block.
    training: the tower is in ``train()`` mode: its blocks run padded, never packed (drop-path draws
              one mask per image of the batch).
    """

    embed: Callable[[Tensor], tuple[Tensor, Tensor, tuple[int, int]]]
    pre_norm: Callable[[Tensor], Tensor]
    blocks: Sequence[Block]
    patch_size: int
    prefix: int = 1
    training: bool = False
    embed_any: Optional[Callable[[Tensor], tuple[Tensor, Tensor, tuple[int, int]]]] = None  # any image size:
    # the position embeddings interpolated as the family does (what ``vwt.Resize`` runs)
    interpolation: str = "bicubic"  # how the family's preprocessing resizes images


@dataclass(frozen=True)
class TowerDims:
    """What a tower's FLOPs depend on: width C, MLP hidden M, depth, heads, patch size P, input
    patches, prefix (class/register) tokens and input channels (``vwt.flops``)."""

    width: int
    mlp: int
    depth: int
    heads: int
    patch_size: int
    num_patches: int
    prefix: int = 1
    channels: int = 3

    @property
    def tokens(self) -> int:
        """Tokens entering the first block of the dense model."""
        return self.num_patches + self.prefix


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


def resample_pos_grid(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], antialias: bool = True) -> Tensor:
    """(1, old_h * old_w, C) grid position embeddings -> (1, new_h * new_w, C): bicubic, corners not
    aligned, in float32, as timm's ``resample_abs_pos_embed`` and open_clip's ``resize_pos_embed`` (both
    antialiased by default; transformers' ``interpolate_pos_encoding`` is not)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    c = pos.shape[-1]
    grid = pos.float().reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, c).to(pos.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: Optional[float],
              dropout: float = 0.0) -> Tensor:
    """Multi-head attention through the fused kernel (``dropout`` on its weights, as the models'
    own attention in ``train()`` mode); returns (B, N, heads * head_dim)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def embed_input(tower: Tower, pixel_values: Tensor, inputs: Sequence[Reducer] = ()) -> tuple[TokenState, InputContext]:
    """Embed ``pixel_values`` and apply the input reducers: the state before the pre-norm and the first
    block (what ``vwt.tokenizer.tokenize`` returns), and the context the reducers saw."""
    embed = tower.embed
    for r in inputs:
        resized = r.resize_pixels(pixel_values, tower)
        if resized is not None:
            pixel_values, embed = resized, tower.embed_any
    x, patch_embeds, grid = embed(pixel_values)
    state = initial_state(x, grid, tower.prefix)
    ctx = InputContext(pixel_values=pixel_values, patch_size=tower.patch_size, patch_embeds=patch_embeds)
    for r in inputs:
        state = r.reduce_input(state, ctx)
        state.prop_attn = state.prop_attn or r.prop_attn
    return state, ctx


PACKING = ("auto", "on", "off")


def packs(state: TokenState, in_network: Sequence[Reducer], packing: str = "auto", training: bool = False) -> bool:
    """Whether the blocks run packed (:func:`run_blocks_packed`) rather than padded.

    Only a padded batch can pack, and only while no in-network reducer follows (they work on the
    padded layout). ``auto`` packs on the CPU, where the padded batch spends its time on pads and
    per-image attention calls cost nothing extra (``benchmarks/bench_packed.py``). On CUDA it stays
    padded until ``benchmarks/gpu_check.sh`` has measured packed (one variable-length kernel call per
    block in 16-bit, :func:`packed_attention`) against padded there; ``packing="on"`` packs on CUDA
    too. A tower in ``training``
    mode never packs: drop-path draws one mask per image, and a packed batch is one sequence."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    mask = state.real_mask()
    if packing == "off" or training or in_network or mask is None or bool(mask.all()):
        return False
    return packing == "on" or state.x.device.type == "cpu"


def run(tower: Tower, pixel_values: Tensor, reducers: Sequence[Reducer] = (), packing: str = "auto") -> TokenState:
    """Embed, reduce and run every block; returns the final state (tokens before the final norm)."""
    state, _ = embed_input(tower, pixel_values, [r for r in reducers if r.kind == "input"])
    in_network = [r for r in reducers if r.kind != "input"]
    state.x = tower.pre_norm(state.x)
    state.record()
    if packs(state, in_network, packing, tower.training):
        return run_blocks_packed(tower, state)
    state.execution = "dense" if state.size is None else "padded"

    depth = len(tower.blocks)
    for i, blk in enumerate(tower.blocks):
        x = state.x
        q, k, v = blk.qkv(blk.norm1(x))
        bias = state.attn_bias(q.dtype)
        h = blk.ls1(blk.out_proj(attention(q, k, v, bias, blk.scale, blk.attn_drop)))
        x = x + (h if blk.drop1 is None else blk.drop1(h))
        state.x = x
        if in_network:
            ctx = BlockContext(i, depth, q, k, blk.scale if blk.scale is not None else q.shape[-1] ** -0.5, bias)
            for r in in_network:
                state = r.after_attn(state, ctx)
                state.prop_attn = state.prop_attn or r.prop_attn
        x = state.x
        h = blk.ls2(blk.mlp(blk.norm2(x)))
        state.x = x + (h if blk.drop2 is None else blk.drop2(h))
        state.record()
    return state


def run_blocks_packed(tower: Tower, state: TokenState) -> TokenState:
    """Run every block on the real tokens of a padded batch only, then pad the result again.

    The real tokens of all images are packed into one (1, T, C) sequence: norms, q/k/v, the output
    projection and the MLP act on each token alone, so they run on all T at once; attention keeps each
    image to itself (:func:`packed_attention`: no pads, so no mask; ``log(size)`` where proportional
    attention is on). Pads come back as exact zeros. Sizes and labels do not change (no in-network
    reducer)."""
    mask = state.real_mask()                                   # (B, N) bool, pads at the end of each row
    lengths = state.real_counts()                              # B real-token counts
    x = state.x[mask].unsqueeze(0)                             # (1, T, C) real tokens, image after image
    offsets = F.pad(lengths.cumsum(0), (1, 0))                 # image i is packed tokens offsets[i]:offsets[i+1]
    log_size = state.size[mask].log()[None] if state.prop_attn else None  # (1, T) proportional-attention bias
    for blk in tower.blocks:
        q, k, v = blk.qkv(blk.norm1(x))                        # each (1, H, T, d)
        bias = None if log_size is None else log_size.to(q.dtype)
        x = x + blk.ls1(blk.out_proj(packed_attention(q, k, v, offsets, bias, blk.scale)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        state.record()
    state.x = state.x.new_zeros(state.x.shape).masked_scatter_(mask.unsqueeze(-1), x)  # (B, N, C), pads 0
    state.execution = "packed"
    return state


def varlen_kernel() -> Optional[Callable]:
    """torch's variable-length attention (``torch.nn.attention.varlen.varlen_attn``: FlashAttention
    over sequences given by cumulative offsets, PyTorch 2.10 and later), or None where this torch
    lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def uses_varlen(q: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether :func:`packed_attention` runs the variable-length kernel: on CUDA, in float16 or bfloat16
    (FlashAttention's types), without an attention bias (it takes none), where torch has it."""
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and bias is None
            and varlen_kernel() is not None)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, bias: Optional[Tensor],
                     scale: Optional[float]) -> Tensor:
    """Attention within each image of a packed sequence: q, k, v (1, H, T, d), image i at tokens
    ``offsets[i]:offsets[i + 1]``; ``bias`` (1, T) is added to every logit of a key. Returns
    (1, T, H * d). One variable-length kernel call over the whole sequence where :func:`uses_varlen`,
    else one fused call per image on views of q, k, v."""
    _, h, t, d = q.shape
    if uses_varlen(q, bias):
        kernel = varlen_kernel()
        cu = offsets.to(device=q.device, dtype=torch.int32)
        longest = int((offsets[1:] - offsets[:-1]).max())
        extra = {}
        if scale is not None and "scale" in inspect.signature(kernel).parameters:
            extra["scale"] = scale
        elif scale is not None:                                # PyTorch 2.10's kernel scales by d ** -0.5
            q = q * (scale * d ** 0.5)
        o = kernel(*(z[0].transpose(0, 1) for z in (q, k, v)), cu, cu, longest, longest, **extra)  # (T, H, d)
        return o.reshape(1, t, h * d)
    bounds = offsets.tolist()
    heads = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                            attn_mask=None if bias is None else bias[:, s:e], scale=scale)
             for s, e in zip(bounds[:-1], bounds[1:])]        # B x (1, H, L_i, d)
    return torch.cat(heads, 2).transpose(1, 2).reshape(1, t, h * d)


def zero_pads(state: TokenState, x: Tensor) -> Tensor:
    """Set the pad tokens of ``x`` (B, N, C) to exactly zero so downstream consumers (and BLIP's
    decoder hook) can tell them apart; a no-op when nothing is padded."""
    mask = state.real_mask()
    if mask is None or bool(mask.all()):
        return x
    return x * mask.unsqueeze(-1).to(x.dtype)


def pooled_mean(state: TokenState, x: Tensor) -> Tensor:
    """The average pool over the non-prefix tokens of ``x``, pads left out: size-weighted (the average
    pool of the unreduced model when tokens are merged, padded or dropped), or, where
    ``state.pool_by_size`` is off, each real token once (timm's mean over the merged tokens, as
    official ToMe leaves it)."""
    tokens = x[:, state.prefix:]
    if state.size is None:
        return tokens.mean(1)
    w = state.size[:, state.prefix:]
    w = (w if state.pool_by_size else (w > 0).float()).to(x.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1e-6)
