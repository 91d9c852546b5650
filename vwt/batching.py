"""Length bucketing: batch images of similar token counts together, so a padded batch wastes little
and a packed one runs images of similar length side by side. Results stay keyed by image."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import datasets, distributed
from .backends.base import patch_info
from .encoder import Reducer
from .tokenizer import tokenize


def buckets(counts: Union[Tensor, Sequence[int]], batch: int) -> list[Tensor]:
    """Index batches of at most ``batch`` images, neighbours in token count: the images sorted by
    ``counts`` (ties keep data-set order), cut into consecutive runs. Every index appears once."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    order = torch.sort(torch.as_tensor(counts), stable=True).indices  # (N,) shortest first
    return list(order.split(batch))


def token_counts(vision: nn.Module, reducer: Reducer, pixel_batches: Iterable[Tensor]) -> Tensor:
    """(N,) tokens each image enters the first block with, from the input ``reducer`` alone (one embedding
    per image, no block: about 1% of a forward), over ``pixel_batches`` in order."""
    counts = [tokenize(vision, reducer, pixels)[0].real_counts().cpu() for pixels in pixel_batches]
    return torch.cat(counts)


def input_reducer(reducers: Sequence[Reducer]) -> Optional[Reducer]:
    """The input reducer (VWT intra- or inter-image) among ``reducers``, or None."""
    return next((r for r in reducers if r.kind == "input"), None)


def bucketing(flag: Optional[bool], reducer: Optional[Reducer], batch: int) -> bool:
    """Whether ``--bucket`` (``flag``; None: not given) applies: by default with an input reducer at
    batch > 1; never without an input reducer (no token counts to sort by)."""
    return reducer is not None and (flag if flag is not None else batch > 1)


def batch_order(spec, loaded, dataset, device, dtype) -> list:
    """The index batches a run (``spec``: a ``vwt.spec.RunSpec``, its batch, bucket and workers) reads
    ``dataset`` in: bucketing (default: on with an input reducer and batch > 1) sorts the images by the
    tokens the patched model's input reducer leaves them and batches neighbours; otherwise data-set
    order. ``loaded``: a ``vwt.models.Loaded``."""
    info = patch_info(loaded.model)
    reducer = input_reducer(info.reducers) if info is not None else None
    plain = list(torch.arange(len(dataset)).split(spec.batch))
    if not bucketing(spec.bucket, reducer, spec.batch):
        return plain
    mine = distributed.shard(plain)  # under torchrun each process counts its share of the batches
    counts = [token_counts(loaded.vision, reducer, [x.to(device, dtype)])
              for x, _ in datasets.batches(dataset, spec.batch, spec.workers, mine)]
    return buckets(torch.cat(distributed.unshard(counts)), spec.batch)
