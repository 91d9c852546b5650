"""The Visual Word Tokenizer (VWT): input reducers that shorten the sequence before the first block.

``IntraImage`` drops each image's most uniform pixel patches (lowest variance). ``InterImage`` matches
every patch to its nearest visual word of a :class:`vwt.Vocabulary` (cosine distance) and merges the
patches of an image that match the same word into one token. Both are vectorised over the batch (one
matmul, a sort and a scatter; no per-image Python loop) and keep ``state.labels`` current.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import family_of
from .encoder import InputContext, Reducer, TokenState, embed_input, pixel_patches
from .vocab import Vocabulary

__all__ = ["IntraImage", "InterImage", "merge_by_key", "tokenize", "pixel_patches"]


def _relabel(state: TokenState, patch_to_token: Tensor) -> Tensor:
    """Labels after an input reduction given where each patch token (index - prefix) goes (-1: dropped);
    the prefix tokens stay where they are."""
    b, pre = patch_to_token.shape[0], state.prefix
    keep_prefix = torch.arange(pre, device=patch_to_token.device).expand(b, -1)
    return state.relabel(torch.cat([keep_prefix, patch_to_token], 1))


def _check_input_state(state: TokenState, num_patches: int, who: str) -> None:
    if state.num_tokens != state.prefix + num_patches:
        raise ValueError(f"{who} expects the freshly embedded {state.prefix} + {num_patches} tokens, got "
                         f"{state.num_tokens}: use it as the only input reducer")


class IntraImage(Reducer):
    """VWT intra-image: keep the ``int(N * (1 - drop))`` patches of highest pixel variance, in their
    original order, class token(s) first. ``random=True`` keeps a uniformly random subset of the same
    size per image (the paper's ablation). Every image keeps the same length, so nothing is padded."""

    kind = "input"

    def __init__(self, drop: float = 0.5, random: bool = False):
        if not 0 <= drop < 1:
            raise ValueError(f"IntraImage: drop is the fraction of patches to drop, in [0, 1); got {drop}")
        self.drop = float(drop)
        self.random = bool(random)

    def scores(self, pixel_values: Tensor, patch_size: int) -> Tensor:
        """(B, N) the variance of each pixel patch's 3·P·P values (what is ranked)."""
        return pixel_patches(pixel_values, patch_size).float().var(-1)

    def keep_indices(self, pixel_values: Tensor, patch_size: int) -> Tensor:
        """(B, k) the indices of the kept patches, ascending."""
        b = pixel_values.shape[0]
        n = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        k = int(n * (1 - self.drop))
        if k < 1:
            raise ValueError(f"IntraImage: drop={self.drop:g} keeps int({n} x {1 - self.drop:.4g}) = 0 of the {n} patches "
                             f"(only the class token would remain); use a drop of at most {1 - 1 / n:.4g} for this model")
        if self.random:
            scores = torch.rand(b, n, device=pixel_values.device)
        else:
            scores = self.scores(pixel_values, patch_size)
        # Stable sort: among equal scores the earlier patch wins, alone or in any batch.
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return order.sort(dim=1).values

    def reduce_input(self, state: TokenState, ctx: InputContext) -> TokenState:
        n = state.grid[0] * state.grid[1]
        _check_input_state(state, n, "IntraImage")
        keep = self.keep_indices(ctx.pixel_values, ctx.patch_size)
        b, k = keep.shape
        if k == n:
            return state
        pre = state.prefix
        x = torch.cat([state.x[:, :pre], state.x[:, pre:].gather(1, keep[..., None].expand(-1, -1, state.x.shape[-1]))], 1)
        size = None
        if state.size is not None:
            size = torch.cat([state.size[:, :pre], state.size[:, pre:].gather(1, keep)], 1)
        to_token = torch.full((b, n), -1, dtype=torch.long, device=keep.device)
        to_token.scatter_(1, keep, torch.arange(pre, pre + k, device=keep.device).expand(b, -1))
        state.x, state.size = x, size
        state.labels = _relabel(state, to_token)
        return state


THRESH = 0.1  # the paper's cosine-distance threshold: InterImage's default and every script's --thresh


class InterImage(Reducer):
    """VWT inter-image: merge the patches of an image that match the same visual word.

    A patch's nearest word (cosine distance ``1 - cos`` to the L2-normalised words) matches when the
    distance is at most ``thresh``. All patches of an image matching one word become one token, the
    mean of their embeddings (position embeddings included), size = their count; unmatched patches stay.
    Token order: class token(s), matched words by word index, unmatched patches in patch order. Images
    of a batch are padded to the longest with zero tokens of size 0 (masked in attention).

    The vocabulary's ``space`` says what is matched: "pixel" patches (3·P·P values of the normalised
    pixels) or "embed" (the patch-projection outputs, before position embeddings).
    ``random=True`` is the paper's ablation: every distance to every word is replaced by a uniform draw
    in [0, 2]; drawn here in closed form (the minimum of V uniform draws and a uniform word index),
    which has the same distribution without materialising the (patches, V) draws.
    ``prop_attn=True`` adds log(size) to the attention logits (not used in the paper).
    ``float32_ties=True`` (the paper's protocol) resolves near ties among a large vocabulary's words as
    the exhaustive float32 matmul's argmax does (:func:`vwt.vocab.nearest_within`); off: the
    float64-nearest word.
    """

    kind = "input"

    def __init__(self, vocab, thresh: float = THRESH, random: bool = False, prop_attn: bool = False,
                 float32_ties: bool = False):
        if isinstance(vocab, Tensor):
            vocab = Vocabulary.from_tensor(vocab)
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"InterImage takes a vwt.Vocabulary (or a (V, D) tensor); got {type(vocab).__name__}")
        thresh = float(thresh)
        if not 0 <= thresh <= 2:  # also refuses nan: a cosine distance lies in [0, 2]
            raise ValueError(f"InterImage: thresh is a cosine distance, in [0, 2] (0: identical directions only, "
                             f"2: everything matches); got {thresh}")
        self.vocab = vocab
        self.thresh = thresh
        self.random = bool(random)
        self.prop_attn = bool(prop_attn)
        self.float32_ties = bool(float32_ties)

    def __repr__(self) -> str:
        return (f"InterImage(vocab={self.vocab!r}, thresh={self.thresh:g}, random={self.random}, "
                f"prop_attn={self.prop_attn}" + (", float32_ties=True)" if self.float32_ties else ")"))

    def features(self, ctx: InputContext) -> Tensor:
        """(B, N, D) what is matched against the words, checked against the vocabulary's shape."""
        if self.vocab.space == "embed":
            feats = ctx.patch_embeds
        else:
            feats = pixel_patches(ctx.pixel_values, ctx.patch_size)
        self.vocab.check(feats.shape, ctx.patch_size)
        return feats

    def match(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest word and its cosine distance for every patch: (B, N) long, (B, N) float32, from
        :meth:`vwt.Vocabulary.nearest` with ``max_dist=thresh`` (exact wherever dist <= thresh; beyond
        it, large vocabularies may report a near word instead of the nearest, still beyond thresh)."""
        b, n, d = feats.shape
        v = len(self.vocab)
        if self.random:
            word = torch.randint(v, (b, n), device=feats.device)
            dist = 2 * (1 - torch.rand(b, n, device=feats.device).pow(1.0 / v))
            return word, dist
        f = torch.nn.functional.normalize(feats.reshape(b * n, d).float(), dim=1)  # a zero patch: cos 0
        word, cos = self.vocab.nearest(f, max_dist=self.thresh, float32_ties=self.float32_ties)
        return word.view(b, n), (1 - cos).view(b, n)

    def reduce_input(self, state: TokenState, ctx: InputContext) -> TokenState:
        feats = self.features(ctx)
        b, n, _ = feats.shape
        _check_input_state(state, n, "InterImage")
        word, dist = self.match(feats)
        matched = dist <= self.thresh
        if not bool(matched.any()):
            return state
        return merge_by_key(state, torch.where(matched, word, len(self.vocab) + torch.arange(n, device=word.device)))


def merge_by_key(state: TokenState, key: Tensor) -> TokenState:
    """Merge, per image, the patch tokens that share a key (B, N) into their mean, ordered by key;
    pad to the longest image with zero tokens of size 0. Vectorised over the batch."""
    b, n = key.shape
    pre = state.prefix
    dev = key.device
    sorted_key, order = key.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    slot_sorted = first.cumsum(1) - 1
    slot = torch.empty_like(slot_sorted).scatter_(1, order, slot_sorted)  # token slot of every patch
    counts_per_image = slot_sorted[:, -1] + 1
    m = int(counts_per_image.max())

    x = state.x
    c = x.shape[-1]
    flat = (slot + torch.arange(b, device=dev)[:, None] * m).reshape(-1)
    patches = x[:, pre:].reshape(b * n, c)
    acc = patches if patches.dtype == torch.float32 else patches.float()
    if state.size is None:
        counts = torch.bincount(flat, minlength=b * m).float()
    else:  # tokens that already stand for several patches: size-weighted mean
        w = state.size[:, pre:].reshape(-1)
        counts = torch.zeros(b * m, dtype=torch.float32, device=dev).index_add_(0, flat, w)
        acc = acc * w[:, None]
    sums = torch.zeros(b * m, c, dtype=torch.float32, device=dev).index_add_(0, flat, acc)
    tokens = (sums / counts.clamp_min(1e-12)[:, None]).to(x.dtype).view(b, m, c)

    state.x = torch.cat([x[:, :pre], tokens], 1)
    merged_nothing = m == n and bool((counts_per_image == n).all()) and state.size is None
    if merged_nothing:
        state.size = None  # every token one patch, nothing padded: keep the fast unbiased attention
    else:
        prefix_size = torch.ones(b, pre, dtype=torch.float32, device=dev) if state.size is None else state.size[:, :pre]
        state.size = torch.cat([prefix_size, counts.view(b, m)], 1)
    state.labels = _relabel(state, slot + pre)
    return state


# --------------------------------------------------------------------------------------------------
# Running only the embedding and the input reducer
# --------------------------------------------------------------------------------------------------
def tokenize(vision: torch.nn.Module, reducer: Optional[Reducer], pixel_values: Tensor) -> tuple[TokenState, InputContext]:
    """Embed ``pixel_values`` with a vision tower and apply the input ``reducer`` (None: nothing) without
    running any block: the state entering the first block (tokens, sizes, labels) and the input
    context (pixel values, patch projections). ``vision`` is any model ``vwt.patch`` takes (its
    backend's embedding runs directly, so a patched model stays as it is). The state's
    ``tokens_per_layer`` holds one count per image (the tokens entering the first block), so
    ``vwt.token_stats`` reads it as it reads a patched forward's."""
    if reducer is not None and reducer.kind != "input":
        raise ValueError(f"tokenize runs an input reducer (IntraImage, InterImage, Resize); got {type(reducer).__name__}")
    tower = family_of(vision, "vwt.tokenize").tower(vision)
    with torch.no_grad():
        state, ctx = embed_input(tower, pixel_values, [reducer] if reducer is not None else [])
    state.record()
    return state, ctx
