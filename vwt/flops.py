"""Analytic FLOPs of a vision tower for given per-block token counts (1 multiply-add = 2 FLOPs).

Per block with width C, MLP hidden M, N_in tokens entering the block and N_out tokens after its
reduction (in-network reducers act after the attention residual, before the MLP):

    qkv 2*3*N_in*C^2 + attention 2*2*N_in^2*C + out proj 2*N_in*C^2 + MLP 2*2*N_out*C*M

plus the patch embedding once (2 * patches * 3*P^2 * C). Norms, softmax, biases, merging and the head
are left out. Counts are real tokens: pads in a padded batch are not counted.

    dims = vwt.flops.dims_of(model)
    vwt.flops.tower_flops(dims, [197] * 13)        # the dense tower
    vwt.flops.flops_of_last_forward(model)         # (B,) per image, from vwt.stats(model)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor, nn

Counts = Union[Sequence[int], Tensor]


@dataclass(frozen=True)
class TowerDims:
    """What the FLOPs depend on: width C, MLP hidden M, depth, heads, patch size P, input patches,
    prefix (class/register) tokens and input channels."""

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


def tower_flops(dims: TowerDims, tokens_per_layer: Counts, num_patches: int = None) -> Union[float, Tensor]:
    """FLOPs of the tower for ``tokens_per_layer``: depth + 1 counts (tokens entering the first block,
    then after each block), as a list or a (B, depth + 1) tensor (then (B,) FLOPs, one per image).
    ``num_patches`` overrides the patch count of the embedding (another image size)."""
    t = torch.as_tensor(tokens_per_layer, dtype=torch.float64)
    if t.shape[-1] != dims.depth + 1:
        raise ValueError(f"tower_flops: expected {dims.depth + 1} token counts (depth + 1), got {t.shape[-1]}")
    c, m = dims.width, dims.mlp
    n_in, n_out = t[..., :-1], t[..., 1:]
    blocks = 2 * 3 * n_in * c * c + 2 * 2 * n_in ** 2 * c + 2 * n_in * c * c + 2 * 2 * n_out * c * m
    patches = dims.num_patches if num_patches is None else num_patches
    total = blocks.sum(-1) + 2 * patches * dims.channels * dims.patch_size ** 2 * c
    return float(total) if total.dim() == 0 else total


def dense_flops(dims: TowerDims) -> float:
    """FLOPs of the unreduced tower at its own image size."""
    return tower_flops(dims, [dims.tokens] * (dims.depth + 1))


def dims_of(model: nn.Module) -> TowerDims:
    """Read the tower dimensions of any model ``vwt.patch`` supports (at its configured image size)."""
    from .backends import hf_blip, hf_clip, open_clip, timm

    if hf_clip.matches(model) or hf_blip.matches(model):
        vt = hf_clip._vision_transformer(model) if hf_clip.matches(model) else hf_blip._vision_model(model)
        emb, layer = vt.embeddings, vt.encoder.layers[0]
        return TowerDims(width=emb.embed_dim, mlp=layer.mlp.fc1.out_features, depth=len(vt.encoder.layers),
                         heads=layer.self_attn.num_heads, patch_size=emb.patch_size, num_patches=emb.num_patches)
    if open_clip.matches(model):
        v = open_clip._visual(model)
        blk = v.transformer.resblocks[0]
        return TowerDims(width=v.conv1.out_channels, mlp=blk.mlp.c_fc.out_features,
                         depth=len(v.transformer.resblocks), heads=blk.attn.num_heads,
                         patch_size=v.conv1.kernel_size[0], num_patches=v.grid_size[0] * v.grid_size[1])
    if timm.matches(model):
        blk = model.blocks[0]
        return TowerDims(width=model.embed_dim, mlp=blk.mlp.fc1.out_features, depth=len(model.blocks),
                         heads=blk.attn.num_heads, patch_size=model.patch_embed.patch_size[0],
                         num_patches=model.patch_embed.num_patches, prefix=model.num_prefix_tokens)
    from .patch import supported

    raise TypeError(f"vwt.flops: unsupported model {type(model).__name__}; supported: {supported()}")


def flops_of_last_forward(model: nn.Module) -> Tensor:
    """(B,) FLOPs per image of the last forward of a patched model, from ``vwt.stats(model)``."""
    from .patch import stats

    s = stats(model)
    rows, cols = s["grid"]
    return tower_flops(dims_of(model), s["tokens_per_layer"].cpu(), num_patches=rows * cols)
