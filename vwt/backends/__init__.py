"""One small adapter per model family. Each exposes ``matches(model)`` and ``patch(model, info)``; the
adapter only translates the family's modules into a :class:`vwt.encoder.Tower` and its output type."""
from __future__ import annotations

from torch import Tensor

from .. import encoder
from ..encoder import TokenState, Tower
from ..patch import Patch


def run_tower(info: Patch, tower: Tower, pixel_values: Tensor) -> TokenState:
    """Run the block loop with the patch's reducers and keep a light copy of the state for stats."""
    state = encoder.run(tower, pixel_values, info.reducers, info.packing)
    info.last = TokenState(x=None, size=state.sizes(), labels=state.labels, grid=state.grid,
                           prefix=state.prefix, prop_attn=state.prop_attn,
                           tokens_per_layer=state.tokens_per_layer, execution=state.execution)
    return state


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def grid_of(pixel_values: Tensor, patch: int) -> tuple[int, int]:
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


def unsupported(what: str, model) -> ValueError:
    return ValueError(f"vwt.patch: {type(model).__name__} {what} is not supported")
