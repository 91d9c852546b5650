"""Length bucketing: batch images of similar token counts together, so a padded batch wastes little
and a packed one runs images of similar length side by side. Results stay keyed by image."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def buckets(counts: Union[Tensor, Sequence[int]], batch: int) -> list[Tensor]:
    """Index batches of at most ``batch`` images, neighbours in token count: the images sorted by
    ``counts`` (ties keep data-set order), cut into consecutive runs. Every index appears once."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    order = torch.sort(torch.as_tensor(counts), stable=True).indices  # (N,) shortest first
    return list(order.split(batch))
