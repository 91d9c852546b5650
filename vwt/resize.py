"""The downsampling baseline: run the vision tower on a smaller (or larger) image.

``Resize(size)`` is an input reducer: it resizes the pixels the model received to ``size`` x ``size``
with the family's own interpolation (bicubic for CLIP, BLIP and open_clip; a timm model's
``pretrained_cfg``), antialiased as PIL and torchvision resize images, and the tower embeds them with
its position embeddings interpolated as the family does (``Tower.embed_any``: transformers'
``interpolate_pos_encoding``, timm's ``resample_abs_pos_embed``, open_clip's ``resize_pos_embed``). An
image then has ``(size / P)^2`` patch tokens plus the prefix: the trivial reducer every other method
must beat at equal FLOPs.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .encoder import Reducer, Tower

__all__ = ["Resize", "REFERENCE", "side_for"]

# eff.py's default --resize: on CLIP ViT-B/16 at 224 pixels, inter-image (v1000, t0.1) costs 20.3 GFLOPs
# an image on the committed samples run (results/benchmarks.md); the multiples of 16 nearest are 160
# (101 tokens, 17.7 GFLOPs) and 176 (122 tokens, 21.4 GFLOPs, vwt.flops): 176 is the nearer.
REFERENCE = (176, 224)  # (the resize side, the model's image side) it was chosen at


def side_for(image_size: int, patch_size: int, reference: tuple = REFERENCE) -> int:
    """The resize side for another model: the reference's fraction of the side (176 / 224), rounded to
    a multiple of the patch size (at least one patch); 176 for ViT-B/16 at 224, 24 for 32 at P = 8."""
    side, of = reference
    return max(patch_size, round(image_size * side / of / patch_size) * patch_size)


class Resize(Reducer):
    """Run the tower at ``size`` pixels (a multiple of the patch size); see the module docstring."""

    kind = "input"

    def __init__(self, size: int):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"Resize: size is the image side in pixels, a positive integer; got {size}")
        self.size = int(size)

    def resize_pixels(self, pixel_values: Tensor, tower: Tower) -> Optional[Tensor]:
        p = tower.patch_size
        if self.size % p:
            raise ValueError(f"Resize: {self.size} pixels is not a multiple of the patch size {p}; "
                             f"use e.g. {max(p, self.size // p * p)} or {(self.size // p + 1) * p}")
        if tower.embed_any is None:
            raise ValueError("Resize: this model's embedding cannot interpolate its position embeddings")
        if tuple(pixel_values.shape[-2:]) == (self.size, self.size):
            return pixel_values
        out = F.interpolate(pixel_values.float(), size=(self.size, self.size), mode=tower.interpolation,
                            align_corners=False, antialias=tower.interpolation in ("bilinear", "bicubic"))
        return out.to(pixel_values.dtype)
