"""``vwt.patch`` / ``vwt.unpatch`` / ``vwt.stats``: route a model's vision tower through the block loop.

Patching replaces ``forward`` on the vision-tower instance (never the class), keeps what it replaced,
and records the reducers and the last forward's token state on the model. It is idempotent (patching
again replaces the reducers) and reversible (``unpatch`` restores the original forward exactly). The
family-specific part is the registered backend's (``vwt.backends``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backends import by_name, family_of
from .backends.base import PATCH_ATTR, Patch, patch_info  # noqa: F401  (patch_info: re-exported)
from .encoder import PACKING, Reducer, check_rule


def _check_reducers(reducers) -> tuple:
    for r in reducers:
        if not isinstance(r, Reducer):
            raise TypeError(f"vwt.patch takes reducers such as vwt.ToMe(r=8); got {type(r).__name__}")
    check_rule([(type(r).__name__, r.kind) for r in reducers],
               {"input": "IntraImage, InterImage or Resize", "block": "ToMe, EViT or LGTM"})
    return tuple(reducers)


def patch(model: nn.Module, *reducers: Reducer, packing: str = "auto") -> nn.Module:
    """Run ``model``'s vision tower through the vwt block loop with ``reducers``; returns the model.

    With no reducer the outputs equal the unpatched model's. Patching a patched model replaces its
    reducers. ``packing`` (auto, on, off): whether a batch that an input reducer left padded runs its
    blocks on the real tokens only (see :func:`vwt.encoder.packs`); outputs are the same either way.
    In ``train()`` mode the blocks apply the model's own dropout and drop-path. Copies and pickles of
    the patched model are patched models of their own weights."""
    reducers = _check_reducers(reducers)
    if packing not in PACKING:
        raise ValueError(f"vwt.patch: packing must be one of {PACKING}, got {packing!r}")
    if patch_info(model) is not None:
        unpatch(model)
    backend = family_of(model, "vwt.patch")
    info = Patch(backend=backend.name, reducers=reducers, packing=packing)
    backend.patch(model, info)
    setattr(model, PATCH_ATTR, info)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``; a no-op on a model that is not patched."""
    info = patch_info(model)
    if info is not None:
        by_name(info.backend).unpatch(model, info)
        delattr(model, PATCH_ATTR)
    return model


def token_stats(tokens_per_layer: Tensor) -> dict[str, Tensor]:
    """The per-image token statistics, defined once for every script and results file, from the
    (B, depth + 1) real-token counts (prefix tokens included; pads never count):

    tokens_first_block: (B,) tokens entering the first block (after any input reducer).
    tokens_last_block:  (B,) tokens after the last block.
    tokens_mean:        (B,) the mean over the blocks of the tokens *entering* each block: the sequence
                        length each block's attention and projections run on, so the average cost of a
                        block (in-network reducers act after a block's attention, so the tokens after
                        a block are those entering the next). With no block run (``tokenize``), the
                        tokens entering the first block.
    """
    t = tokens_per_layer.float()
    entering = t[:, :-1] if t.shape[1] > 1 else t
    return {"tokens_first_block": t[:, 0], "tokens_last_block": t[:, -1], "tokens_mean": entering.mean(1)}


def stats(model: nn.Module) -> dict[str, Any]:
    """What the last forward of a patched model did.

    tokens_per_layer: (B, depth + 1) real tokens per image (prefix included) entering the first
                      block, then after each block.
    tokens_first_block, tokens_last_block, tokens_mean: (B,) per image, see :func:`token_stats`.
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
    counts = s.layer_counts()
    return {
        "tokens_per_layer": counts,
        **token_stats(counts),
        "labels": s.labels,
        "size": s.sizes(),
        "grid": s.grid,
        "execution": s.execution,
        "reducers": info.reducers,
    }


def token_summary(per_image: list) -> dict[str, float]:
    """The token statistics of a run: the mean over images of each per-image statistic of
    :func:`token_stats`, from the ``vwt.stats`` (or ``token_stats``) dicts of its batches."""
    keys = ("tokens_first_block", "tokens_last_block", "tokens_mean")
    return {k: float(torch.cat([s[k].reshape(-1).float().cpu() for s in per_image]).mean()) for k in keys}


def describe_tokens(first_block: float, mean: float) -> str:
    """The scripts' one-line reading of the token statistics (``vwt.token_stats``)."""
    return f"tokens entering block 1: {first_block:.1f}, mean over blocks: {mean:.1f}"
