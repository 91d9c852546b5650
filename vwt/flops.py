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

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from .backends import find, supported
from .encoder import TowerDims
from .patch import stats

__all__ = ["TowerDims", "tower_flops", "dense_flops", "dims_of", "flops_of_last_forward"]

Counts = Union[Sequence[int], Tensor]


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
    backend = find(model)
    if backend is None:
        raise TypeError(f"vwt.flops: unsupported model {type(model).__name__}; supported: {supported()}")
    return backend.dims(model)


def flops_of_last_forward(model: nn.Module) -> Tensor:
    """(B,) FLOPs per image of the last forward of a patched model, from ``vwt.stats(model)``."""
    s = stats(model)
    rows, cols = s["grid"]
    return tower_flops(dims_of(model), s["tokens_per_layer"].cpu(), num_patches=rows * cols)
