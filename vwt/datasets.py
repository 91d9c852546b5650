"""Data sets, each yielding (pixel tensor, record) with the model's own preprocessing.

``samples`` needs no download: real public-domain photographs shipped inside scikit-image. The other
data sets (Waterbirds, CelebA, MetaShift, OpenImages, COCO, NoCaps, ImageNet) read the public
releases' layouts under the data root; ``data/README.md`` gives each layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "camera", "coins", "brick", "grass", "moon")


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised (3, size, size) float tensor, as the model's own processor does it."""

    size: int
    mean: tuple
    std: tuple
    crop: bool = True  # resize the short side then centre-crop; False: resize to size x size (BLIP)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        from torchvision.transforms import InterpolationMode

        image = image.convert("RGB")
        if self.crop:
            image = TF.center_crop(TF.resize(image, self.size, InterpolationMode.BICUBIC), self.size)
        else:
            image = TF.resize(image, [self.size, self.size], InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def denormalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (..., 3, H, W) back to [0, 1] RGB."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return (pixels * std + mean).clamp(0, 1)


def preprocess_for(model: nn.Module) -> Preprocess:
    """The preprocessing a model was trained with, read from the model itself (works offline)."""
    name = type(model).__name__
    module = type(model).__module__
    hf = module.startswith("transformers")
    if hf and name.startswith("CLIP"):
        cfg = getattr(model.config, "vision_config", model.config)
        return Preprocess(cfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if hf and name.startswith("Blip"):
        cfg = getattr(model.config, "vision_config", model.config)
        return Preprocess(cfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop=False)
    visual = getattr(model, "visual", model)
    if type(visual).__module__.startswith("open_clip"):
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
        return Preprocess(int(size), tuple(mean), tuple(std))
    if module.startswith("timm"):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = model.patch_embed.img_size[0]
        return Preprocess(int(size), tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5))))
    raise TypeError(f"no preprocessing known for {module}.{name}")


def sample_images() -> list[tuple[str, Image.Image]]:
    """The real photographs of the ``samples`` data set, as (name, RGB PIL image)."""
    import skimage.data

    out = []
    for name in SAMPLE_NAMES:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append((name, Image.fromarray(arr[..., :3].astype(np.uint8))))
    return out


class Samples(torch.utils.data.Dataset):
    """``samples``: the scikit-image photographs; records carry the image name."""

    def __init__(self, transform: Callable, limit: Optional[int] = None):
        self.items = sample_images()[:limit]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, image = self.items[i]
        return self.transform(image), {"name": name, "index": i}


def collate(batch):
    """Stack pixels; keep records as a list of dicts."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
