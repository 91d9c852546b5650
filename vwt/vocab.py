"""Visual-word vocabularies: learn (k-means over patches), save, load, normalise.

On disk a vocabulary is ``vocab.pt`` (the raw centres, a float32 (V, D) tensor, as the paper's authors
published theirs) plus a JSON sidecar ``vocab.json`` (patch size, image size, normalisation, space, data,
patches seen, inertia). A bare ``vocab.pt`` without a sidecar loads as the published ones are: pixel
space, patch size from D = 3·P·P (16 for D = 768), CLIP normalisation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .backends import family_of
from .backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .encoder import pixel_patches
from .errors import first_line

SPACES = ("pixel", "embed")

# The nearest-word search's tuning (parameters of Vocabulary.nearest; these are the defaults).
FAST_MIN_WORDS = 4096  # below this, one exhaustive matmul is cheaper than the bound-and-refine search
SKETCH_RANK = 95  # principal axes of the words in the bound (+ 1 residual column: a 96-wide matmul)
# Slack on the bound per 768 dimensions, covering float32 rounding: the bound's own matmul (<= 98 u,
# u = 2^-24, as |[x, |f_perp|]| = |f| = 1 and likewise for the words) plus twice gamma_768 =
# 768 u / (1 - 768 u) ~ 4.6e-5, the worst-case error of a float32 768-term dot product of unit
# vectors in any summation order (c0's, and the exhaustive search's), with room: 1.5e-4 < 2e-4.
SLACK = 2e-4
DENSE_ROW = 1024  # a patch with more candidate words than this gets its whole exact row instead
# float32_ties: words whose float64 cosines lie within this (per 768 dimensions) of a patch's best can
# swap places in a float32 matmul (twice gamma_768 ~ 9.2e-5, as above), so their float32 cosines decide.
TIE_WINDOW = 1e-4
GEMM_MIN = 64  # a float32 matmul padded to this many rows and columns rounds each element as a large one
PAIR_CHUNK = 2048  # candidate (patch, word) dot products per gather, to stay in cache
CHUNK_FLOATS = 1 << 21  # bounds computed per row chunk: (rows, V) floats, kept near the cache size
# The fast k-means (Vocabulary.learn, process.py --kmeans fast): FAISS on a bottom-k sample.
MAX_POINTS_PER_CENTROID = 256  # the sample: this many patches per word (FAISS's own default cap)
NITER = 4  # Lloyd iterations: lower inertia than vwt's former k-means, 1.9x faster (benchmarks/bench_kmeans.py)
INITS = ("afk-mc2", "random")  # first centres: FAISS's AFK-MC2 seeding, or k random rows (FAISS's default)
INIT = "afk-mc2"
INERTIA_SAMPLE = 4096  # patches per batch on which the paper recipe's scikit-learn path measures inertia
AFK_CHAIN = 10  # AFK-MC2's Markov chain per centre: 5x cheaper than FAISS's 50 at the same inertia (1000 words)


def _pixel_patch_size(dim: int) -> Optional[int]:
    p = math.isqrt(dim // 3) if dim % 3 == 0 else 0
    return p if p > 0 and 3 * p * p == dim else None


class Vocabulary:
    """A (V, D) set of visual words and what they were learned on.

    space: "pixel" (3·P·P normalised pixel values per patch) or "embed" (patch-projection outputs).
    patch_size: P for pixel space (None where unknown for embed space).
    meta: image_size, mean, std, data, patches_seen, inertia, seed, model ... (free-form, saved as JSON).
    """

    def __init__(self, words: Tensor, space: str = "pixel", patch_size: Optional[int] = None, **meta):
        if not isinstance(words, Tensor) or words.dim() != 2 or not words.is_floating_point() or words.shape[0] < 1:
            shape = tuple(words.shape) if isinstance(words, Tensor) else type(words).__name__
            raise ValueError(f"a vocabulary is a (V, D) float tensor of visual words; got {shape}")
        if space not in SPACES:
            raise ValueError(f"vocabulary space must be one of {SPACES}; got {space!r}")
        words = words.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(words).all():
            raise ValueError("the vocabulary holds non-finite values (inf or nan): relearn it")
        zero = torch.nonzero(words.abs().sum(1) == 0).flatten()
        if len(zero):
            raise ValueError(f"the vocabulary holds {len(zero)} all-zero word(s) (first: word {int(zero[0])}), which "
                             "have no direction to match a patch by cosine: relearn it")
        if space == "pixel":
            inferred = _pixel_patch_size(words.shape[1])
            if patch_size is None:
                patch_size = inferred
            if patch_size is None or 3 * patch_size * patch_size != words.shape[1]:
                raise ValueError(f"a pixel-space vocabulary has D = 3·P·P; got {tuple(words.shape)} "
                                 f"with patch size {patch_size}")
        self.words, self.space, self.patch_size = words, space, patch_size
        self.meta = dict(meta)
        self.path: Optional[Path] = None  # the file it was loaded from (:meth:`load`), for messages
        self._unit: dict = {}

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.words.shape[0]

    @property
    def dim(self) -> int:
        return self.words.shape[1]

    def __repr__(self) -> str:
        p = f", patch_size={self.patch_size}" if self.patch_size else ""
        data = f", data={self.meta['data']!r}" if self.meta.get("data") else ""
        return f"Vocabulary({len(self)} words x {self.dim}, space={self.space!r}{p}{data})"

    @classmethod
    def from_tensor(cls, words: Tensor) -> "Vocabulary":
        """A bare (V, D) tensor as the paper published them: pixel space, P from D, CLIP normalisation."""
        if isinstance(words, Tensor) and words.dim() == 2 and _pixel_patch_size(words.shape[1]) is None:
            raise ValueError(f"a bare vocabulary tensor must be pixel-space (V, 3·P·P); got {tuple(words.shape)}")
        return cls(words, space="pixel", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

    def unit(self, device=None) -> Tensor:
        """(V, D) float32 L2-normalised words on ``device``, computed once per device."""
        device = torch.device(device or "cpu")
        key = str(device)
        if key not in self._unit:
            self._unit[key] = torch.nn.functional.normalize(self.words, dim=1).to(device).contiguous()
        return self._unit[key]

    def sketch(self, rank: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
        """A low-rank view of the unit words for bounding cosines cheaply, computed once per (rank, device):
        ``basis`` (D, r) float64, the top ``r = min(rank, D)`` principal axes of the unit words
        (uncentred, orthonormal to float64 precision); ``bound`` (V, r + 1) float32, each word's
        coordinates in that basis followed by the norm of its residual outside it; and the unit words
        in float64 (V, D), for exact cosines of a few candidates. For a unit patch f with coordinates
        x = basis^T f and residual norm |f_perp|, cos(f, w) = x.w_r + f_perp.w_perp
        <= [x, |f_perp|] . bound[w] (Cauchy-Schwarz)."""
        device = torch.device(device or "cpu")
        key = ("sketch", rank, str(device))
        if key not in self._unit:
            u = torch.nn.functional.normalize(self.words.double(), dim=1)
            r = min(rank, self.dim)
            axes = torch.linalg.eigh(u.T @ u).eigenvectors.flip(1)[:, :r].contiguous()
            coords = u @ axes
            resid = (u - coords @ axes.T).norm(dim=1, keepdim=True)
            bound = torch.cat([coords, resid], 1).float().contiguous()
            self._unit[key] = (axes.to(device), bound.to(device), self.unit().double().to(device))
        return self._unit[key]

    def nearest(self, unit_feats: Tensor, max_dist: Optional[float] = None, *, float32_ties: bool = False,
                fast_min_words: int = FAST_MIN_WORDS, sketch_rank: int = SKETCH_RANK,
                dense_row: int = DENSE_ROW) -> tuple[Tensor, Tensor]:
        """Nearest word (cosine) of each L2-normalised row of ``unit_feats`` (n, D) float32, and the
        cosine: the whole nearest-word search.

        Without ``max_dist`` (or with max_dist >= 0.5, or fewer than ``fast_min_words`` words): one
        exhaustive matmul against the cached normalised words, one max. Otherwise the bound-and-refine
        search (:func:`nearest_within`, ``sketch_rank`` axes in the bound, whole exact rows for patches
        with more than ``dense_row`` candidates): the same word and cosine (to float32 rounding)
        wherever 1 - cos <= max_dist; a patch it reports beyond max_dist is beyond it, but its word is
        a near one, not necessarily the nearest, and the cosine that word's exact one. ``float32_ties``:
        near ties go to the float32 matmul's pick (see :func:`nearest_within`)."""
        if max_dist is None or max_dist >= 0.5 or len(self) < fast_min_words:
            cos, word = (unit_feats @ self.unit(unit_feats.device).T).max(1)
            return word, cos
        return nearest_within(self, unit_feats, max_dist, sketch_rank=sketch_rank, dense_row=dense_row,
                              float32_ties=float32_ties)

    def check(self, feature_shape, patch_size: Optional[int] = None) -> None:
        """Refuse a model whose patch features (B, N, D) do not fit: the message says both shapes."""
        d = feature_shape[-1]
        fits = d == self.dim and (patch_size is None or self.patch_size is None or patch_size == self.patch_size)
        if not fits:
            what = "pixel patches" if self.space == "pixel" else "patch embeddings"
            mine = f"patch {self.patch_size}, " if self.patch_size else ""
            theirs = f" (patch {patch_size})" if patch_size is not None else ""
            raise ValueError(f"vocabulary of shape {tuple(self.words.shape)} ({mine}{self.space} space) does not "
                             f"fit the model: its {what} have shape {tuple(feature_shape)}{theirs}")

    # ---------------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write ``vocab.pt`` (raw centres) and ``vocab.json`` into ``directory`` as a pair through the
        one writer (vwt.results.write_files): both go to temporary files first, then the sidecar and the
        tensor are renamed into place, and the sidecar records the tensor's digest, so a crash at any
        point leaves either the old pair, or a pair that :meth:`load` refuses, never a silent mismatch.
        A full disk saves the pair in the temporary-files folder (one-line UserError). Returns the .pt
        path written."""
        from . import results

        directory = Path(directory)
        path = directory / "vocab.pt"
        words = self.words.clone()
        info = {"size": len(self), "dim": self.dim, "space": self.space, "patch_size": self.patch_size,
                **self.meta, "words_sha256": _digest(words)}
        written = results.write_files({
            path.with_suffix(".json"): lambda f: f.write(json.dumps(info, indent=2, default=_jsonable).encode()),
            path: lambda f: torch.save(words, f)})
        return written[1]

    @classmethod
    def load(cls, path) -> "Vocabulary":
        """Load ``vocab.pt`` (or a folder holding one) with its JSON sidecar when there is one; a sidecar
        that is not a JSON object, or that describes other words than the tensor's, is refused."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.pt"
        try:
            words = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path} is not a vocabulary file (torch.load failed: {first_line(e, 200)})") from None
        if not isinstance(words, Tensor):
            raise ValueError(f"{path} holds a {type(words).__name__}, not a (V, D) tensor of visual words")
        if words.dim() != 2:
            raise ValueError(f"{path} holds a tensor of shape {tuple(words.shape)}, not a (V, D) tensor of visual words")
        sidecar = path.with_suffix(".json")
        if not sidecar.exists():
            vocab = cls.from_tensor(words)
            vocab.path = path
            return vocab
        info = _read_sidecar(sidecar)
        _check_recorded(info, sidecar)
        if info.get("size", len(words)) != len(words) or info.get("dim", words.shape[-1]) != words.shape[-1]:
            raise ValueError(f"{sidecar} describes ({info.get('size')}, {info.get('dim')}) words but {path} holds "
                             f"{tuple(words.shape)}; they are not a pair: relearn the vocabulary, or move {sidecar.name} "
                             "aside to load the bare tensor")
        digest = info.pop("words_sha256", None)
        if digest is not None and words.dim() == 2 and digest != _digest(words.detach().to("cpu", torch.float32)):
            raise ValueError(f"{sidecar} was written for other words than {path} holds (a run stopped between "
                             f"the two files, or one was replaced): relearn the vocabulary, or move {sidecar.name} "
                             "aside to load the bare tensor")
        for k in ("size", "dim", "words"):
            info.pop(k, None)
        space, patch_size = info.pop("space", "pixel"), info.pop("patch_size", None)
        if patch_size is not None and (not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1):
            raise ValueError(f"{sidecar}: patch_size must be a positive integer; got {patch_size!r}")
        vocab = cls(words, space=space, patch_size=patch_size, **info)
        vocab.path = path
        return vocab

    def check_normalisation(self, mean, std, tol: float = 1e-3) -> None:
        """Refuse a model whose preprocessing normalises pixels otherwise than the vocabulary's words were
        (its recorded ``mean`` and ``std``; a bare published tensor: CLIP's): pixel-space words would
        then be compared with patches of other colours. The one check of this every script makes
        (``vwt.runtime.check_input_reducers``); a vocabulary that records none is not checked."""
        mine, theirs = (self.meta.get("mean"), self.meta.get("std")), (mean, std)
        if self.space != "pixel" or mine[0] is None or mine[1] is None or mean is None or std is None:
            return
        if all(abs(float(a) - float(b)) <= tol for m, t in zip(mine, theirs) for a, b in zip(m, t)):
            return

        def show(values):
            return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"

        where = f"{self.path} was" if self.path is not None else "the vocabulary's words were"
        raise ValueError(f"{where} learned on pixels normalised with mean {show(mine[0])} and std {show(mine[1])}, "
                         f"but this model's preprocessing uses mean {show(mean)} and std {show(std)}: its words "
                         "would be matched against patches of other colours; learn one with this model "
                         "(`python process.py --model MODEL ...`) and pass that")

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def learn(cls, batches: Iterable, size: int = 1000, space: str = "pixel", patch_size: Optional[int] = 16,
              embed: Optional[Callable[[Tensor], Tensor]] = None, niter: int = NITER,
              max_points_per_centroid: int = MAX_POINTS_PER_CENTROID, seed: int = 0, gpu: Optional[bool] = None,
              init: str = INIT, progress: Optional[Callable] = None, starts: Optional[Iterable[int]] = None,
              **meta) -> Optional["Vocabulary"]:
        """Learn ``size`` words by FAISS k-means on a seeded, uniformly random sample of the patches
        (process.py --kmeans fast).

        batches: an iterable of normalised pixels (B, 3, H, W), or of (pixels, anything) pairs as data
                 loaders give, read once; only one batch and the sample are in memory.
        space:   "pixel" (patches of ``patch_size``) or "embed" (``embed(pixels) -> (B, N, C)``, e.g.
                 :func:`patch_embedder` of a model whose patch size is ``patch_size``).
        max_points_per_centroid: the sample holds at most ``size`` times this many patches
                 (:func:`bottom_k_sample`; 256 as FAISS's own default); niter, init: Lloyd iterations
                 and first centres (:func:`faiss_kmeans`); gpu: None uses the GPUs when FAISS has GPU
                 support and sees any.
        starts:  the position of each batch's first image in the whole read (None: the batches are the
                 whole read, in order). Under torchrun each process passes its share and its positions;
                 only the samples travel, the main process fits and returns the words (the others None),
                 the words of one process.
        progress: an object with ``update(1)`` (e.g. ``tqdm(total=batches)``), told after each batch.
        ``meta`` is saved in the sidecar.
        Euclidean k-means on the raw rows, as the paper's recipe (words are matched by cosine later).
        The recorded inertia is that of the sample at the last iteration's assignment (:func:`faiss_kmeans`).
        """
        from . import distributed

        _check_space(space, embed)
        if size < 1 or niter < 1 or max_points_per_centroid < 1:
            raise ValueError(f"k-means needs size, niter and max_points_per_centroid of at least 1; got {size}, "
                             f"{niter}, {max_points_per_centroid}")
        codec = PixelCodec(meta.get("mean", OPENAI_CLIP_MEAN), meta.get("std", OPENAI_CLIP_STD), patch_size) \
            if space == "pixel" else None
        sample, keys, seen = bottom_k_sample(_numbered(batches, space, patch_size, embed, starts, progress),
                                             size * max_points_per_centroid, seed, codec)
        if distributed.world() > 1:  # only the samples travel; the main process merges and fits
            parts = distributed.gather((sample, keys, seen))
            if not distributed.is_main():
                return None
            sample, keys = merge_samples([p[:2] for p in parts], size * max_points_per_centroid, codec)
            seen = sum(p[2] for p in parts)
        stored = str(sample.dtype).replace("torch.", "")
        if sample.shape[0] < size:
            raise ValueError(f"k-means with {size} centres needs at least {size} patches; got {sample.shape[0]}")
        centres, run = faiss_kmeans(sample, size, niter=niter, seed=seed, gpu=gpu, init=init, codec=codec)
        info = {"kmeans": "fast", **meta}
        info.update(patches_seen=seen, sample=sample.shape[0], max_points_per_centroid=max_points_per_centroid,
                    niter=niter, seed=seed, inertia_patches=sample.shape[0], faiss=_faiss().__version__,
                    sampling="bottom-k of a seeded hash of each patch's global index", sample_stored=stored, **run)
        return cls(centres, space=space, patch_size=patch_size, **info)

    @classmethod
    def learn_paper(cls, batches: Iterable, size: int = 1000, space: str = "pixel", patch_size: Optional[int] = 16,
                    embed: Optional[Callable[[Tensor], Tensor]] = None, batch_size: int = 1024, seed: int = 0,
                    progress=None, engine: str = "sklearn", device=None, **meta) -> "Vocabulary":
        """Learn ``size`` words with the VWT paper's recipe (its ``process.py`` + ``learn_words``):
        scikit-learn's ``MiniBatchKMeans(size, n_init="auto", batch_size=batch_size)`` with NumPy's
        generator seeded ``seed`` (the paper: ``set_seed(0)`` just before), one ``partial_fit`` per
        batch of ``batches`` (the paper: data-loader batches of 1024 images, loader order), one pass.

        batches: an iterable of normalised pixels (B, 3, H, W) or (pixels, anything) pairs, read once.
        Memory holds one batch's patches at a time: each batch is dropped before the next is read.
        progress: an object with ``update(1)`` (e.g. ``tqdm(total=batches)``), told after each batch
        (it never holds one). scikit-learn runs with ``compute_labels=False`` (:func:`paper_kmeans`):
        the same centres, without a second assignment of every batch. The recorded inertia is that of
        a seeded sample of at most ``INERTIA_SAMPLE`` patches of each batch, after that batch's update
        (``inertia_patches`` counts them; the sidecar's ``inertia_on`` says so).
        engine "torch": the same step in torch on ``device`` (:mod:`vwt.kmeans`; equal within float32
        rounding; under torchrun each process passes its part of each batch, None for an empty one).
        """
        _check_space(space, embed)
        if engine == "torch":
            return cls._learn_paper_torch(batches, size, space, patch_size, embed, batch_size, seed, progress,
                                          device, meta)
        km = paper_kmeans(size, batch_size, seed)
        seen, total, measured = 0, 0.0, 0
        gen = torch.Generator().manual_seed(seed)
        for batch in batches:
            feats = batch_features(batch, space, patch_size, embed)
            batch = None  # noqa: F841  (drop the pixels before k-means runs)
            x, feats = feats.detach().to("cpu", torch.float32).numpy(), None
            if seen == 0 and x.shape[0] < size:
                raise ValueError(f"the first batch gives {x.shape[0]} patches, fewer than the {size} words: "
                                 "scikit-learn initialises k-means on the first batch; use bigger batches or fewer words")
            km.partial_fit(x)
            rows = torch.randperm(x.shape[0], generator=gen)[:INERTIA_SAMPLE]
            total += inertia(torch.from_numpy(x)[rows], torch.from_numpy(km.cluster_centers_))
            seen, measured, x = seen + x.shape[0], measured + len(rows), None
            if progress is not None:
                progress.update(1)
        if seen == 0:
            raise ValueError("k-means got no data")
        import sklearn

        info = dict(meta)
        info.update(patches_seen=seen, kmeans="paper", kmeans_seed=seed, kmeans_batch_size=batch_size,
                    inertia=total, inertia_patches=measured, sklearn=sklearn.__version__, engine="sklearn",
                    inertia_on=f"a seeded sample of at most {INERTIA_SAMPLE} patches per batch, after its update")
        return cls(torch.from_numpy(km.cluster_centers_), space=space, patch_size=patch_size, **info)


    @classmethod
    def _learn_paper_torch(cls, batches, size, space, patch_size, embed, batch_size, seed, progress, device,
                           meta) -> "Vocabulary":
        """:meth:`learn_paper` with engine "torch" (:class:`vwt.kmeans.MiniBatchKMeans`)."""
        from . import distributed
        from .kmeans import MiniBatchKMeans

        km = MiniBatchKMeans(size, batch_size, seed, device=device)
        seen, total, dim = 0, 0.0, None
        for batch in batches:
            if batch is None:  # this process's part of the batch is empty (torchrun)
                x = torch.zeros(0, dim, device=km.device)
            else:
                x, batch = batch_features(batch, space, patch_size, embed), None
                dim = x.shape[1]
            total += km.partial_fit(x)
            seen, x = seen + x.shape[0], None
            if progress is not None:
                progress.update(1)
        seen = int(distributed.all_sum(torch.tensor([float(seen)], dtype=torch.float64))[0])
        if seen == 0:
            raise ValueError("k-means got no data")
        info = dict(meta)
        info.update(patches_seen=seen, kmeans="paper", kmeans_seed=seed, kmeans_batch_size=batch_size,
                    inertia=total, inertia_patches=seen, engine="torch", kmeans_on=str(km.device),
                    processes=distributed.world(), reassigned=km.reassigned,
                    inertia_on="every patch, at its batch's assignment before the update")
        return cls(km.centres.cpu(), space=space, patch_size=patch_size, **info)


def _numbered(batches: Iterable, space: str, patch_size, embed, starts, progress):
    """(rows, global index of the first row) of each batch: an image's patches are numbered from its
    position in the whole read times the patches per image. Holds no batch once its rows are handed on."""
    starts = iter(starts) if starts is not None else None
    image = 0
    for batch in batches:
        if batch is None:  # this process's part of the batch is empty (torchrun)
            continue
        pixels = batch[0] if isinstance(batch, (tuple, list)) else batch
        n, first = pixels.shape[0], next(starts) if starts is not None else image
        rows, batch, pixels = batch_features(batch, space, patch_size, embed), None, None
        yield rows, first * (rows.shape[0] // max(n, 1))
        image, rows = first + n, None
        if progress is not None:
            progress.update(1)


def paper_kmeans(size: int, batch_size: int = 1024, seed: int = 0):
    """scikit-learn's ``MiniBatchKMeans`` as the paper's ``learn_words`` builds it: ``n_clusters``,
    ``n_init="auto"`` and ``batch_size`` set, everything else default but ``compute_labels=False``:
    the default assigns every batch a second time after its update only to report ``inertia_``
    (half of each step's time), and changes neither the centres nor the draws. The paper leaves
    ``random_state`` None after ``np.random.seed(0)``, which draws the same numbers as a fresh
    ``RandomState(0)``; the fresh one leaves NumPy's global generator alone."""
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans as SKMiniBatchKMeans

    return SKMiniBatchKMeans(n_clusters=size, n_init="auto", batch_size=batch_size, compute_labels=False,
                             random_state=np.random.RandomState(seed))


def batch_features(batch, space: str, patch_size: Optional[int], embed=None) -> Tensor:
    """One batch (pixels (B, 3, H, W) or a (pixels, ...) pair) as (B·N, D) rows: pixel patches
    (3·P·P values each, channel-major, as the paper's ``pretokenize``) or ``embed(pixels)``."""
    pixels = batch[0] if isinstance(batch, (tuple, list)) else batch
    feats = embed(pixels) if space == "embed" else pixel_patches(pixels, patch_size)
    return feats.reshape(-1, feats.shape[-1])


def _check_space(space: str, embed) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}; got {space!r}")
    if space == "embed" and embed is None:
        raise ValueError("space='embed' needs embed(pixels) -> (B, N, C), e.g. vwt.vocab.patch_embedder(model)")


def _digest(words: Tensor) -> str:
    """sha256 of the words' float32 bytes: what ties a sidecar to its tensor."""
    import hashlib

    return hashlib.sha256(words.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _read_sidecar(sidecar: Path) -> dict:
    """A vocabulary's JSON sidecar as a dict; anything else is a ValueError naming the file."""
    try:
        info = json.loads(sidecar.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{sidecar} is not valid JSON ({first_line(e, 120)}); relearn the vocabulary, or move "
                         f"{sidecar.name} aside to load the bare tensor") from None
    if not isinstance(info, dict):
        raise ValueError(f"{sidecar} holds a JSON {type(info).__name__}, not the object a vocabulary sidecar is; "
                         f"relearn the vocabulary, or move {sidecar.name} aside to load the bare tensor")
    return info


def _check_recorded(info: dict, sidecar: Path) -> None:
    """The preprocessing a sidecar records, where it records it: ``mean`` and ``std`` three finite numbers
    (std above 0), ``image_size`` a positive integer; anything else is a ValueError naming the file."""
    def bad(key, rule):
        return ValueError(f"{sidecar}: {key} must be {rule}; got {info[key]!r}; relearn the vocabulary, or move "
                          f"{sidecar.name} aside to load the bare tensor")

    for key in ("mean", "std"):
        v = info.get(key)
        if v is None:
            continue
        numbers = isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not numbers or (key == "std" and min(v) <= 0):
            raise bad(key, "three finite numbers, one per RGB channel" + (", each above 0" if key == "std" else ""))
    size = info.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise bad("image_size", "a positive integer (pixels)")


def _jsonable(o):
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    return repr(o)


# --------------------------------------------------------------------------------------------------
# The fast path: a seeded bottom-k sample of the stream, FAISS k-means on it
# --------------------------------------------------------------------------------------------------
def patch_keys(index: Tensor, seed: int) -> Tensor:
    """int64 sort keys of global patch indices (< 2^32): a seeded 31-bit hash of the index (MurmurHash3's
    finaliser) in the high bits, the index itself in the low 32 (so no two patches tie)."""
    if index.numel() and int(index.max()) >= 1 << 32:
        raise ValueError("the fast k-means numbers patches below 2^32; use --max-images to read fewer")
    h = (index * 0x9E3779B1 + (seed * 0x85EBCA77 + 0x165667B1)) & 0xFFFFFFFF
    for mult, shift in ((0x85EBCA6B, 16), (0xC2B2AE35, 13), (None, 16)):
        h = h ^ (h >> shift)
        h = (h * mult) & 0xFFFFFFFF if mult else h
    return ((h >> 1) << 32) | index


class PixelCodec:
    """Normalised pixel patches (channel-major rows of 3·P·P values, normalised by ``mean`` and ``std``
    from 8-bit images, as ``to_tensor`` then ``normalize`` make them) kept as the 8-bit values they came
    from: a quarter of float32's memory, decoded to the very same float32 values."""

    def __init__(self, mean, std, patch_size: int):
        per = patch_size * patch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).repeat_interleave(per)
        self.std = torch.tensor(std, dtype=torch.float32).repeat_interleave(per)

    def encode(self, x: Tensor) -> Tensor:
        """uint8 rows where every value of ``x`` decodes back bit for bit, else ``x`` as it is."""
        if x.dtype != torch.float32 or x.shape[-1] != self.mean.shape[0]:
            return x
        k = ((x * self.std + self.mean) * 255).round_()
        if x.numel() and (float(k.min()) < 0 or float(k.max()) > 255):
            return x
        k = k.to(torch.uint8)
        return k if torch.equal(self.decode(k), x) else x

    def decode(self, rows: Tensor) -> Tensor:
        """float32 rows: uint8 ones as ``to_tensor`` (/ 255) and ``normalize`` ((x - mean) / std) make them."""
        if rows.dtype != torch.uint8:
            return rows
        return rows.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def faiss_codec(self):
        """A FAISS index whose ``sa_decode`` is :meth:`decode`, bit for bit: a product quantizer with one
        8-bit sub-quantizer per value whose table holds :meth:`decode` of the 256 codes (decoding copies
        table entries, no arithmetic). FAISS fits from the uint8 rows through it (:func:`faiss_kmeans`)."""
        import numpy as np

        faiss = _faiss()
        d = self.mean.shape[0]
        table = self.decode(torch.arange(256, dtype=torch.uint8)[:, None].expand(256, d).contiguous())
        pq = faiss.IndexPQ(d, d, 8)
        faiss.copy_array_to_vector(np.ascontiguousarray(table.T.numpy()).ravel(), pq.pq.centroids)
        pq.is_trained = True
        return pq


def bottom_k_sample(blocks: Iterable[tuple[Tensor, int]], capacity: int, seed: int = 0,
                    codec: Optional[PixelCodec] = None) -> tuple[Tensor, Tensor, int]:
    """The ``capacity`` rows of a stream whose seeded hash keys (:func:`patch_keys` of each row's global
    index) are lowest: a uniformly random sample without replacement (all rows where there are fewer),
    sorted by key, with its keys and the number of rows seen (uint8 where ``codec`` keeps every row
    exactly, see :class:`PixelCodec`; decode with it). ``blocks``: (rows (n, D), global index of
    the first row). It depends only on which rows come, not on their order or on how they are split:
    the bottom-k of the union of samples is the bottom-k of the union of the streams (:func:`merge_samples`),
    so processes that each read a share of the images sample what one process samples. Memory: the
    sample, rows waiting for a merge (an eighth of it) and one block (:class:`_Sample`)."""
    sample, seen = _Sample(capacity, codec), 0
    for x, start in blocks:
        x = x.detach().reshape(-1, x.shape[-1])
        seen += x.shape[0]
        sample.add(x, patch_keys(torch.arange(start, start + x.shape[0]), seed))
        x = None
    rows, keys = sample.result()
    return rows, keys, seen


def merge_samples(samples: list, capacity: int, codec: Optional[PixelCodec] = None) -> tuple[Tensor, Tensor]:
    """The lowest-keyed ``capacity`` rows of several (rows, keys) samples, sorted by key (uint8 while
    every part is; else all decoded to float32 by ``codec``): the parts go through the same merge as
    :func:`bottom_k_sample`'s blocks, so memory holds the parts and one sample."""
    sample = _Sample(capacity, codec)
    for rows, keys in samples:
        sample.add(rows, keys)
    return sample.result()


class _Sample:
    """The bottom-k state of :func:`bottom_k_sample` and :func:`merge_samples`, in two NumPy buffers
    grown by half as rows come (in place: large buffers are mapped pages): the sample (at most
    ``capacity`` rows, in no order, with their keys) and the rows waiting for a merge (at most an eighth
    of ``capacity`` and one block, once the sample is full). A merge finds the capacity-th lowest key
    and writes the waiting rows below it over the rows they evict, in place; :meth:`result` sorts the
    sample by key in place. Memory holds the sample once, and no block outlives its copy into the
    waiting buffer (so the allocator's heap does not keep an eighth of the sample in small blocks)."""

    def __init__(self, capacity: int, codec: Optional[PixelCodec] = None):
        import numpy as np

        self.capacity, self.codec, self.count, self.waiting, self.cut = capacity, codec, 0, 0, None
        self.rows = self.wait = None
        self.keys, self.wait_keys = np.empty(0, np.int64), np.empty(0, np.int64)

    def add(self, rows: Tensor, keys: Tensor) -> None:
        """Offer rows with their keys; those at or above the lowest key a full sample evicts are dropped."""
        if self.cut is not None:
            low = keys < self.cut
            keys, rows = keys[low], rows[low]
        if len(keys) == 0:
            return
        rows = rows.cpu() if self.codec is None else self.codec.encode(rows.cpu())
        if self.wait is not None and torch.from_numpy(self.wait[:0]).dtype != rows.dtype:
            self._to_float()
            rows = self.codec.decode(rows)
        end = self.waiting + len(keys)
        self.wait, self.wait_keys = _grown(self.wait, end, None, rows), _grown(self.wait_keys, end, None)
        self.wait[self.waiting:end], self.wait_keys[self.waiting:end] = rows.numpy(), keys.numpy()
        self.waiting = end
        if self.count + self.waiting <= self.capacity or self.waiting >= max(self.capacity // 8, 1):
            self._merge()

    def _merge(self) -> None:
        import numpy as np

        new, self.waiting = self.waiting, 0
        if new == 0:
            return
        keys = self.wait_keys[:new]
        if self.count + new <= self.capacity:  # still filling: append
            free, keep, n = np.arange(self.count, self.count + new), np.arange(new), self.count + new
        else:
            everyone = np.concatenate([self.keys[:self.count], keys])
            cut, everyone = int(np.partition(everyone, self.capacity - 1)[self.capacity - 1]), None
            free = np.concatenate([np.flatnonzero(self.keys[:self.count] > cut), np.arange(self.count, self.capacity)])
            keep, n, self.cut = np.flatnonzero(keys <= cut), self.capacity, cut
        self.rows, self.keys = _grown(self.rows, n, self.capacity, self.wait), _grown(self.keys, n, self.capacity)
        for s in range(0, len(keep), 1 << 14):  # a few MB at a time: no copy of the survivors
            self.rows[free[s:s + (1 << 14)]] = self.wait[keep[s:s + (1 << 14)]]
        self.keys[free] = keys[keep]
        self.count = n

    def _to_float(self) -> None:
        """Where uint8 and float32 rows meet: both buffers decoded to float32, a block at a time."""
        import numpy as np

        for name in ("rows", "wait"):
            old = getattr(self, name)
            if old is None or old.dtype != np.uint8:
                continue
            new = np.empty(old.shape, np.float32)
            for s in range(0, len(old), 1 << 16):
                new[s:s + (1 << 16)] = self.codec.decode(torch.from_numpy(old[s:s + (1 << 16)])).numpy()
            setattr(self, name, new)

    def result(self) -> tuple[Tensor, Tensor]:
        """The sample's rows and keys, sorted by key (the rows in place)."""
        import numpy as np

        self._merge()
        self.wait = self.wait_keys = None
        if self.count == 0:
            raise ValueError("k-means got no data")
        order = np.argsort(self.keys[:self.count])
        _permute_rows(self.rows, order)
        keys = self.keys[:self.count][order]
        if len(self.rows) > self.count:
            self.rows.resize((self.count, self.rows.shape[1]), refcheck=False)
        return torch.from_numpy(self.rows), torch.from_numpy(keys)


def _grown(a, n: int, most: Optional[int], like=None):
    """``a`` (a NumPy buffer, or None: made like the rows ``like``, a tensor or an array) with room for
    ``n`` rows: grown by at least half, to at most ``most`` (None: no limit), in place where it can."""
    import numpy as np

    if a is not None and len(a) >= n:
        return a
    size = max(n, len(a) * 3 // 2 if a is not None else n)
    size = min(size, most) if most is not None else size
    if a is None:
        dtype = like[:0].numpy().dtype if isinstance(like, Tensor) else like.dtype
        return np.empty((size, like.shape[1]), dtype) if like is not None else np.empty(size, np.int64)
    a.resize((size,) + a.shape[1:], refcheck=False)
    return a


def _permute_rows(a, order) -> None:
    """``a[:len(order)] = a[order]`` in place, one row at a time along the permutation's cycles: no
    second copy of the rows (a few seconds for millions of rows)."""
    import numpy as np

    width = a.shape[1] * a.itemsize
    buf, order, done = memoryview(a.reshape(-1).view(np.uint8)), order.tolist(), bytearray(len(order))
    for start, target in enumerate(order):
        if done[start] or target == start:
            continue
        first, i = bytes(buf[start * width:(start + 1) * width]), start
        while True:
            j, done[i] = order[i], 1
            if j == start:
                buf[i * width:(i + 1) * width] = first
                break
            buf[i * width:(i + 1) * width] = buf[j * width:(j + 1) * width]
            i = j


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("--kmeans fast needs FAISS: pip install faiss-cpu (or faiss-gpu on a CUDA machine; "
                          "see the README)") from None
    return faiss


def faiss_kmeans(x: Tensor, k: int, niter: int = NITER, seed: int = 0, gpu: Optional[bool] = None,
                 init: str = INIT, codec: Optional[PixelCodec] = None) -> tuple[Tensor, dict]:
    """FAISS k-means (``faiss.Clustering``, Euclidean, as ``faiss.Kmeans`` runs it) over all the rows of
    ``x`` (n, D), n >= k: FAISS's own subsampling is off, the caller samples. ``x``: float rows, or uint8
    rows with the ``codec`` that decodes them (:class:`PixelCodec`): FAISS then fits from the uint8 rows
    (``Clustering.train_encoded``, decoding a block of rows at a time, :func:`_fit_codes`), with no float32
    copy of the sample, and gives the centres of the decoded rows bit for bit. First centres (seeded
    with ``seed``): "afk-mc2" (Bachem et al. 2016, an MCMC approximation of k-means++ seeding, chains of
    ``AFK_CHAIN``: lower inertia after a few iterations, benchmarks/bench_kmeans.py; random where this
    FAISS lacks it) or "random" (k rows, FAISS's default); then ``niter`` Lloyd iterations. ``gpu``:
    None uses every GPU FAISS sees when it was built with GPU support, True insists on them, False
    stays on the CPU. Returns the (k, D) float32 centres and {"inertia": the sum of squared distances
    of the rows to their centre at the last iteration's assignment, before its update (free; an upper
    bound on the final one, which costs one more pass), "kmeans_on": "cpu" or "N gpu", "init": the
    seeding used, "fit_from": "uint8 rows" or "float32 rows"}."""
    import numpy as np

    faiss = _faiss()
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}; got {init!r}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu and not gpus:
        raise ValueError("FAISS k-means on the GPU needs a FAISS built with GPU support and a visible GPU; "
                         "this one sees none (install faiss-gpu, or let it run on the CPU)")
    use = gpus if (gpu is None or gpu) and gpus else 0
    method = getattr(faiss, "ClusteringInitMethod_AFK_MC2", None) if init == "afk-mc2" else None
    n, d = x.shape
    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.verbose = niter, seed, False
    cp.max_points_per_centroid, cp.min_points_per_centroid = -(-n // k), 1  # no subsampling: the caller sampled
    if method is not None:
        cp.init_method, cp.afkmc2_chain_length = method, AFK_CHAIN
    clus, index = faiss.Clustering(d, k, cp), faiss.IndexFlatL2(d)
    if use:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=use)
    codes = x.dtype == torch.uint8 and codec is not None
    if codes:
        _fit_codes(faiss, clus, index, np.ascontiguousarray(x.detach().cpu().numpy()), codec, method is not None, seed)
    else:
        clus.train(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()), index)
    centres = torch.from_numpy(faiss.vector_float_to_array(clus.centroids).astype(np.float32).reshape(k, d))
    stats = clus.iteration_stats
    return centres, {"inertia": float(stats.at(stats.size() - 1).obj), "kmeans_on": f"{use} gpu" if use else "cpu",
                     "init": "afk-mc2" if method is not None else "random",
                     "fit_from": "uint8 rows" if codes else "float32 rows"}


def _fit_codes(faiss, clus, index, codes, codec: PixelCodec, afk: bool, seed: int) -> None:
    """``clus.train_encoded`` on uint8 ``codes`` through ``codec.faiss_codec()``. FAISS decodes every
    row at once for any seeding but random, so AFK-MC2 is seeded here instead, by its replay on rows
    decoded a block at a time (:mod:`vwt.afkmc2`; FAISS's own where the replay would draw otherwise),
    and handed to FAISS as its starting centres. Search blocks are decoded ``decode_block_size`` rows at
    a time: a multiple of FAISS's query block, and never leaving a last block so short that FAISS
    would search it without BLAS (other rounding than the float path's)."""
    from . import afkmc2

    n, d = codes.shape
    bs, small = faiss.cvar.distance_compute_blas_query_bs, -(-faiss.cvar.distance_compute_blas_threshold // d)
    block = max(bs, afkmc2.BLOCK // bs * bs)
    while n > block and 0 < n % block < small:
        block += bs
    clus.decode_block_size = block
    if afk and n > clus.k and afkmc2.matches_faiss():
        def rows(i):
            return codec.decode(torch.from_numpy(codes[i])).numpy()

        centres = afkmc2.seed_centres(n, rows, clus.k, clus.seed + 1, clus.afkmc2_chain_length)
        faiss.copy_array_to_vector(centres.ravel(), clus.centroids)
    clus.train_encoded(codes, codec.faiss_codec(), index)


# --------------------------------------------------------------------------------------------------
# Inertia (tests and benchmarks measure every k-means with it)
# --------------------------------------------------------------------------------------------------
def _chunk_rows(k: int) -> int:
    return max(256, (1 << 24) // max(k, 1))  # keep the (rows, k) distance block near 64 MB


def assign(x: Tensor, centres: Tensor, centre_sq: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centre of each row of ``x`` and the squared distance to it, in chunks of rows."""
    if centre_sq is None:
        centre_sq = centres.pow(2).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _chunk_rows(centres.shape[0])
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step]
        d = torch.addmm(centre_sq, xs, centres.T, beta=1, alpha=-2)  # |c|^2 - 2 x.c
        best, labels[s:s + step] = d.min(1)
        dist[s:s + step] = (best + xs.pow(2).sum(1)).clamp_min_(0)
    return labels, dist


def inertia(x: Tensor, centres: Tensor) -> float:
    """Sum of squared distances of the rows of ``x`` to their nearest centre (float64 total)."""
    return float(assign(x, centres)[1].double().sum())


# --------------------------------------------------------------------------------------------------
# The bound-and-refine nearest-word search for large vocabularies
# --------------------------------------------------------------------------------------------------
def nearest_within(vocab: Vocabulary, unit_feats: Tensor, max_dist: float, sketch_rank: int = SKETCH_RANK,
                   dense_row: int = DENSE_ROW, float32_ties: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest word and cosine of each L2-normalised row of ``unit_feats`` (n, D) float32, exact
    wherever 1 - cos <= ``max_dist`` (< 0.5), at a fraction of the exhaustive matmul's cost.

    1. An upper bound U(f, w) >= cos(f, w) for all pairs, from one (n, r + 1) x (r + 1, V) float32
       matmul in the words' ``sketch_rank`` principal axes (:meth:`Vocabulary.sketch`; the patch side
       projected in float64, so its rounding is negligible), less a slack for float32 rounding (``SLACK``).
    2. Per patch, the float32 cosine c0 of the word with the largest bound. A patch with
       max U < 1 - max_dist - slack cannot match: it keeps that word and c0 (< 1 - max_dist).
    3. Otherwise the candidates are the words with U >= max(c0, 1 - max_dist) - slack: the nearest
       word is one of them, and so is every word that could match. Their cosines in float64
       (gathered dot products) pick the nearest, ties to the lowest index as ``max`` does. A patch
       with more than ``dense_row`` candidates gets its whole row instead (one float64 matmul).
    The matched words are the exactly nearest ones for the float32 inputs. The exhaustive float32
    matmul agrees except between words whose cosines differ by less than its own rounding (~1e-6,
    seen among near-identical flat patches): there it may return either, this one the nearer.
    ``float32_ties`` (the paper's protocol): where a patch's best candidates lie within ``TIE_WINDOW``
    of each other in float64, their float32 cosines from a float32 matmul decide (the highest, the
    lowest index among equals), as the exhaustive float32 matmul's argmax would on this device: a BLAS
    matmul at least ``GEMM_MIN`` rows and columns rounds each element as the (n, V) one does.
    Vectorised over patches; row chunks only bound the memory of U.
    """
    fd = unit_feats.double()
    word, cos, pairs, dense = _bound(vocab, unit_feats, fd, max_dist, sketch_rank, dense_row)
    unit64 = vocab.sketch(sketch_rank, unit_feats.device)[2]
    window = TIE_WINDOW * max(1.0, unit_feats.shape[1] / 768) if float32_ties else None
    ties = []
    if pairs is not None:
        word, cos, near = _refine_pairs(unit64, fd, pairs, word, cos, window)
        ties.append(near)
    if dense is not None:
        rows = fd.index_select(0, dense) @ unit64.T
        c, w = rows.max(1)
        word[dense], cos[dense] = w, c.float()
        if window is not None:
            r, col = (rows >= c[:, None] - window).nonzero(as_tuple=True)
            ties.append((dense[r], col))
    ties = [t for t in ties if t is not None]
    if ties:
        word, cos = _float32_pick(vocab.unit(unit_feats.device), unit_feats, ties, word, cos)
    return word, cos


def _bound(vocab: Vocabulary, unit_feats: Tensor, fd: Tensor, max_dist: float, sketch_rank: int, dense_row: int):
    """Steps 1 and 2 of :func:`nearest_within`: per patch the word of the largest bound and its float32
    cosine, the candidate (patch, word) pairs to refine (None: none) and the patches to refine whole."""
    n, d = unit_feats.shape
    dev = unit_feats.device
    unit = vocab.unit(dev)
    v = unit.shape[0]
    axes, bound, _ = vocab.sketch(sketch_rank, dev)
    x = fd @ axes
    resid = (torch.linalg.vecdot(fd, fd) - torch.linalg.vecdot(x, x)).clamp_min_(0).sqrt_()
    xb = torch.cat([x, resid[:, None]], 1).float()
    cmin = 1.0 - max_dist - 1e-5  # below every cosine whose float32 distance 1 - cos can be <= max_dist
    slack = SLACK * max(1.0, d / 768)

    word = torch.empty(n, dtype=torch.long, device=dev)
    cos = torch.empty(n, dtype=torch.float32, device=dev)
    pair_rows, pair_cols, dense = [], [], []
    step = max(64, CHUNK_FLOATS // v)
    for s in range(0, n, step):
        f = unit_feats[s:s + step]
        u_chunk = xb[s:s + step] @ bound.T
        umax, uarg = u_chunk.max(1)
        c0 = (unit.index_select(0, uarg) * f).sum(1)
        word[s:s + step], cos[s:s + step] = uarg, c0
        live = umax >= cmin - slack
        if not bool(live.any()):
            continue
        cut = torch.where(live, c0.clamp_min(cmin) - slack, torch.inf)
        r, c = (u_chunk >= cut[:, None]).nonzero(as_tuple=True)  # row-major: words ascending per patch
        many = torch.bincount(r, minlength=f.shape[0]) > dense_row
        if bool(many.any()):
            dense.append(many.nonzero()[:, 0] + s)
            keep = ~many[r]
            r, c = r[keep], c[keep]
        pair_rows.append(r + s)
        pair_cols.append(c)
    pairs = (torch.cat(pair_rows), torch.cat(pair_cols)) if pair_rows else None
    return word, cos, pairs, (torch.cat(dense) if dense else None)


def _refine_pairs(unit64: Tensor, fd: Tensor, pairs: tuple[Tensor, Tensor], word: Tensor, cos: Tensor,
                  window: Optional[float] = None):
    """Step 3 of :func:`nearest_within` for the candidate pairs: float64 cosines, the nearest candidate
    per patch (ties to the lowest word index). Also the (rows, words) pairs within ``window`` of their
    patch's best (None without a window)."""
    rows, cols = pairs
    n, v, dev = word.shape[0], unit64.shape[0], word.device
    vals = torch.empty(rows.shape[0], dtype=torch.float64, device=dev)
    for s in range(0, rows.shape[0], PAIR_CHUNK):
        r, c = rows[s:s + PAIR_CHUNK], cols[s:s + PAIR_CHUNK]
        vals[s:s + PAIR_CHUNK] = unit64.index_select(0, c).mul_(fd.index_select(0, r)).sum(1)
    best = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev).scatter_reduce_(0, rows, vals, "amax")
    top = vals == best[rows]
    first = torch.full((n,), v, dtype=torch.long, device=dev).scatter_reduce_(0, rows[top], cols[top], "amin")
    has = first < v
    near = None if window is None else (lambda m: (rows[m], cols[m]))(vals >= best[rows] - window)
    return torch.where(has, first, word), torch.where(has, best.float(), cos), near


def _float32_pick(unit: Tensor, unit_feats: Tensor, ties: list, word: Tensor, cos: Tensor):
    """``float32_ties`` of :func:`nearest_within`: for each patch with two or more words in ``ties``
    (lists of (rows, words) pairs), the word of the highest float32 matmul cosine among them, the lowest
    index among equals, and that cosine."""
    rows, cols = (torch.cat(t) for t in zip(*ties))
    many = torch.bincount(rows, minlength=word.shape[0])[rows] > 1
    rows, cols = rows[many], cols[many]
    if rows.numel() == 0:
        return word, cos
    urows, ri = rows.unique(return_inverse=True)
    ucols, ci = cols.unique(return_inverse=True)
    a = unit_feats.new_zeros(max(len(urows), GEMM_MIN), unit.shape[1])
    b = unit.new_zeros(max(len(ucols), GEMM_MIN), unit.shape[1])
    a[:len(urows)], b[:len(ucols)] = unit_feats.index_select(0, urows), unit.index_select(0, ucols)
    vals = (a @ b.T)[ri, ci]  # each element rounded as in the exhaustive (n, V) float32 matmul
    best = torch.full_like(cos, -torch.inf).scatter_reduce_(0, rows, vals, "amax")
    top = vals == best[rows]
    first = torch.full_like(word, unit.shape[0]).scatter_reduce_(0, rows[top], cols[top], "amin")
    return word.index_copy(0, urows, first[urows]), cos.index_copy(0, urows, best[urows])


# --------------------------------------------------------------------------------------------------
# Embed-space features
# --------------------------------------------------------------------------------------------------
def patch_embedder(vision: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """``embed(pixels) -> (B, N, C)``: a vision tower's patch projections (before position embeddings),
    for learning "embed"-space vocabularies; no block runs. ``vision``: any model ``vwt.patch`` takes."""
    tower = family_of(vision, "vwt.vocab.patch_embedder").tower(vision)

    def embed(pixels: Tensor) -> Tensor:
        with torch.no_grad():
            return tower.embed(pixels)[1]

    return embed
