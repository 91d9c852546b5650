"""``vwt.patch`` / ``vwt.unpatch`` / ``vwt.stats``: route a model's vision tower through the block loop.

Patching replaces ``forward`` on the vision-tower instance (never the class), keeps what it replaced,
and records the reducers and the last forward's token state on the model. It is idempotent (patching
again replaces the reducers) and reversible (``unpatch`` restores the original forward exactly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .encoder import PACKING, Reducer, TokenState

_ATTR = "_vwt_patch"


@dataclass
class Patch:
    """What patching changed on a model, and what its last forward did."""

    backend: str
    reducers: tuple
    packing: str = "auto"
    restore: list = field(default_factory=list)  # callables that undo the patch
    last: Optional[TokenState] = None


def _backends():
    from .backends import hf_blip, hf_clip, open_clip, timm

    return (hf_clip, hf_blip, open_clip, timm)


def supported() -> str:
    return ("Hugging Face CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection, "
            "BlipForConditionalGeneration / BlipVisionModel, open_clip CLIP / VisionTransformer, "
            "timm VisionTransformer")


def _check_reducers(reducers) -> tuple:
    for r in reducers:
        if not isinstance(r, Reducer):
            raise TypeError(f"vwt.patch takes reducers such as vwt.ToMe(r=8); got {type(r).__name__}")
    if sum(r.kind == "input" for r in reducers) > 1:
        raise ValueError("use at most one input reducer (IntraImage or InterImage) at a time")
    if sum(r.kind != "input" for r in reducers) > 1:
        raise ValueError("use at most one in-network reducer (ToMe, EViT or LGTM) at a time")
    return tuple(reducers)


def patch(model: nn.Module, *reducers: Reducer, packing: str = "auto") -> nn.Module:
    """Run ``model``'s vision tower through the vwt block loop with ``reducers``; returns the model.

    With no reducer the outputs equal the unpatched model's. Patching a patched model replaces its
    reducers. ``packing`` (auto, on, off): whether a batch that an input reducer left padded runs its
    blocks on the real tokens only (see :func:`vwt.encoder.packs`); outputs are the same either way."""
    reducers = _check_reducers(reducers)
    if packing not in PACKING:
        raise ValueError(f"vwt.patch: packing must be one of {PACKING}, got {packing!r}")
    if isinstance(getattr(model, _ATTR, None), Patch):
        unpatch(model)
    for backend in _backends():
        if backend.matches(model):
            info = Patch(backend=backend.__name__.rsplit(".", 1)[-1], reducers=reducers, packing=packing)
            backend.patch(model, info)
            setattr(model, _ATTR, info)
            return model
    raise TypeError(f"vwt.patch does not support {type(model).__module__}.{type(model).__name__}; "
                    f"supported: {supported()}")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``; a no-op on a model that is not patched."""
    info = getattr(model, _ATTR, None)
    if isinstance(info, Patch):
        for undo in reversed(info.restore):
            undo()
        delattr(model, _ATTR)
    return model


def patch_info(model: nn.Module) -> Optional[Patch]:
    return getattr(model, _ATTR, None)


def replace_forward(module: nn.Module, forward: Callable, info: Patch, name: str = "forward") -> None:
    """Give ``module`` an instance-level method ``name`` (default ``forward``), undone by ``unpatch``."""
    had_own = name in module.__dict__
    old = module.__dict__.get(name)
    setattr(module, name, forward)

    def undo():
        if had_own:
            setattr(module, name, old)
        else:
            delattr(module, name)

    info.restore.append(undo)


def stats(model: nn.Module) -> dict[str, Any]:
    """What the last forward of a patched model did.

    tokens_per_layer: (B, depth + 1) real tokens per image (prefix included) entering the first
                      block, then after each block.
    labels:           (B, P) for each input patch the index of the token that finally holds it
                      (-1: dropped).
    size:             (B, N) patches per final token (0 for pads).
    grid:             the patch grid (rows, cols).
    execution:        how the blocks ran: "dense" (nothing padded), "padded" or "packed".
    """
    info = patch_info(model)
    if info is None:
        raise ValueError("vwt.stats needs a model patched with vwt.patch")
    if info.last is None:
        raise ValueError("vwt.stats: run a forward pass of the patched model first")
    s = info.last
    return {
        "tokens_per_layer": torch.stack(s.tokens_per_layer, 1),
        "labels": s.labels,
        "size": s.sizes(),
        "grid": s.grid,
        "execution": s.execution,
        "reducers": info.reducers,
    }
