"""The backend registry: one :class:`~vwt.backends.base.Backend` per model family, asked everything
that depends on the family (which module is the vision tower, its dimensions, its preprocessing, how
to patch it). A new family is one module here and one line in ``REGISTRY``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import hf_blip, hf_clip, open_clip, timm
from .base import Backend

REGISTRY: tuple[Backend, ...] = (hf_clip.BACKEND, hf_blip.BACKEND, open_clip.BACKEND, timm.BACKEND)


def supported() -> str:
    """The model classes ``vwt.patch`` takes, for error messages."""
    return ", ".join(b.describes for b in REGISTRY)


def find(model: nn.Module) -> Optional[Backend]:
    """The backend that handles ``model``, or None."""
    return next((b for b in REGISTRY if b.handles(model)), None)


def family_of(model: nn.Module, who: str = "vwt") -> Backend:
    """The backend that handles ``model``; a TypeError naming the supported models otherwise."""
    backend = find(model)
    if backend is None:
        raise TypeError(f"{who} does not support {type(model).__name__} ({type(model).__module__}); "
                        f"supported: {supported()}")
    return backend


def family_for_config(config) -> Optional[Backend]:
    """The backend whose Hugging Face checkpoints have this configuration (a transformers config or
    config.json's dict): by its ``model_type``, else (no model_type) by the class in its
    ``architectures``; None where no registered family loads it."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    model_type = get("model_type")
    if model_type:
        return next((b for b in REGISTRY if model_type in b.model_types), None)
    architectures = get("architectures") or ()
    return next((b for b in REGISTRY if b.hf_class and b.hf_class in architectures), None)


def hf_supported() -> str:
    """The Hugging Face model types vwt loads and the class each is loaded as, for error messages."""
    return ", ".join(f"{t} ({b.hf_class})" for b in REGISTRY for t in b.model_types)


def by_name(name: str) -> Backend:
    """The registered backend called ``name`` (hf_clip, hf_blip, open_clip, timm)."""
    for b in REGISTRY:
        if b.name == name:
            return b
    raise KeyError(f"no vwt backend {name!r}; registered: {', '.join(b.name for b in REGISTRY)}")


__all__ = ["REGISTRY", "Backend", "supported", "find", "family_of", "family_for_config", "hf_supported", "by_name"]
