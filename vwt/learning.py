"""process.py's experiment as a library call: learn a VWT visual-word vocabulary by k-means over the
patches of a data set's train split, once per data seed, into the paper's folder layout.

    from vwt import learning
    from vwt.spec import RunSpec
    learning.run(RunSpec(data="samples", batch=None, out=None, options=learning.Options(vocab=100)))

The protocol decides the defaults (:func:`settle`): ``kmeans`` (the paper's scikit-learn recipe, or
FAISS on a seeded sample), the seeds (one vocabulary per seed on the re-split data sets under paper),
the preprocessing and COCO's records. ``batch`` None and ``out`` None are the script's defaults
(1024 or 32 images; ``tokenizers/<data>/v<SIZE>``). An existing vocabulary is kept unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import datasets, distributed, models, results, runtime
from .errors import UserError
from .models import DEFAULT_BLIP, DEFAULT_CLIP, Loaded
from .results import slug
from .spec import RunSpec
from .tokenizer import tokenize
from .vocab import INIT, MAX_POINTS_PER_CENTROID, NITER, Vocabulary, patch_embedder
from .vocab_files import read_vocabulary, tokenizer_dir


PREFETCH = 1  # batches each loader worker reads ahead: the k-means is slower than the reading anyway


@dataclass(frozen=True)
class Options:
    """process.py's own settings, named as its flags: ``vocab`` words to learn, in ``space`` (pixel:
    normalised pixel patches, the paper; embed: the model's patch projections), by ``kmeans`` ("paper"
    or "fast"; None: the protocol's) with the fast k-means' ``niter``, ``init`` and
    ``max_points_per_centroid`` (None: FAISS's defaults, see vwt.vocab), on at most ``max_images``
    images; ``overwrite`` learns again where the vocabulary exists; ``engine`` runs the paper recipe in
    "sklearn" (bit-exact) or "torch" (on the device, shared under torchrun; None: :func:`kmeans_engine`)."""

    vocab: int = 1000
    space: str = "pixel"
    kmeans: Optional[str] = None
    niter: Optional[int] = None
    init: Optional[str] = None
    max_points_per_centroid: Optional[int] = None
    max_images: Optional[int] = None
    overwrite: bool = False
    engine: Optional[str] = None


def settle(spec: RunSpec) -> RunSpec:
    """The spec with the defaults that depend on the protocol, the k-means and the data filled in
    (k-means, its settings, batch, seeds, model); bad values refused. Settling a settled spec changes nothing."""
    spec = spec.with_options(Options)
    o = spec.options
    kmeans = o.kmeans or spec.protocol.kmeans
    fast = kmeans == "fast"
    for flag in ("niter", "init", "max_points_per_centroid"):
        if getattr(o, flag) is not None and not fast:
            raise UserError(f"--{flag.replace('_', '-')} belongs to --kmeans fast; the paper's recipe is one "
                            "scikit-learn pass")
    if o.engine is not None and fast:
        raise UserError("--engine belongs to --kmeans paper; --kmeans fast is FAISS")
    if fast:  # the paper's runs record neither
        o = dataclasses.replace(o, niter=NITER if o.niter is None else o.niter, init=o.init or INIT,
                                max_points_per_centroid=MAX_POINTS_PER_CENTROID if o.max_points_per_centroid is None
                                else o.max_points_per_centroid)
    seeds = spec.seeds
    if seeds is None:
        per_seed = spec.protocol.vocab_per_seed and datasets.row(spec.data).resplit
        seeds = spec.protocol.seeds_for(True) if per_seed else [0]
    spec = spec.replace(options=dataclasses.replace(o, kmeans=kmeans), batch=spec.batch or (32 if fast else 1024),
                        seeds=tuple(seeds), model=spec.model or (DEFAULT_BLIP if spec.data == "coco" else DEFAULT_CLIP))
    sizes = {"vocab": o.vocab, "batch": spec.batch, "niter": o.niter, "max_points_per_centroid": o.max_points_per_centroid}
    for flag in ("vocab", "batch") + (("niter", "max_points_per_centroid") if fast else ()):
        if sizes[flag] < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1; got {sizes[flag]}")
    if fast and importlib.util.find_spec("faiss") is None:
        raise UserError("--kmeans fast needs FAISS: pip install faiss-cpu (faiss-gpu on a CUDA machine), "
                        "or use --kmeans paper")
    if o.max_images is not None and o.max_images < 1:
        raise UserError(f"--max-images must be at least 1; got {o.max_images}")
    if min(spec.seeds) < 0:
        raise UserError(f"--seeds must be 0 or more; got {' '.join(map(str, spec.seeds))}")
    return spec


def out_dir(spec: RunSpec, seed: int, family: str) -> Path:
    """The paper's layout: <base>/[seed_<N>/][<model>/] with <base> = ``out`` or tokenizers/<data>/v<SIZE>."""
    out = Path(spec.out) if spec.out is not None else tokenizer_dir(spec.data, spec.options.vocab)
    if seed:
        out = out / f"seed_{seed}"
    if spec.options.space == "embed":
        out = out / {"hf_clip": "clip", "hf_blip": "blip"}.get(family, slug(spec.model))
    return out


def per_caption(data):
    """COCO under the paper: one entry per caption (its train file lists each image once per caption)."""
    records = getattr(data, "records", None)
    if not records or "captions" not in records[0]:
        return data
    data.records = [r for r in records for _ in range(max(1, len(r["captions"])))]
    return data


def run(spec: RunSpec, loaded: Optional[Loaded] = None) -> dict:
    """Learn (or keep) one vocabulary per seed, save each as it is learned and print one line each;
    returns {seed: Vocabulary}. ``loaded`` replaces ``spec.model`` with a loaded model."""
    spec = settle(spec)
    device, dtype = runtime.resolve_device(spec.device), runtime.resolve_dtype(spec.dtype)
    results.writable_dir(out_dir(spec, 0, ""))  # an unwritable folder fails now, not after the k-means
    split = None if spec.data == "samples" else (spec.split or "train")
    sets = {s: datasets.load(spec.data, spec.root, None, split=split, seed=s, protocol=spec.protocol)
            for s in spec.seeds}  # a missing data set fails before the model loads
    if loaded is None:  # pixel-space words do not depend on the weights
        loaded = models.load_model(spec.model, device, dtype, fallback_random=spec.options.space == "pixel",
                                   needs="vision")
    own = datasets.preprocess_for(loaded.model)
    pre = datasets.transform_for(spec.data, image_size=read_size(spec, own.size)) \
        if spec.protocol.process_data_preprocessing else own
    blank = torch.zeros(1, 3, own.size, own.size, device=device, dtype=dtype)
    patch_size = tokenize(loaded.vision, None, blank)[1].patch_size
    plan = to_learn(spec, sets, loaded.family, pre)
    wanted = dict(patch_size=patch_size, image_size=getattr(pre, "size", own.size), model=loaded.name,
                  mean=list(getattr(pre, "mean", datasets.OPENAI_CLIP_MEAN)),
                  std=list(getattr(pre, "std", datasets.OPENAI_CLIP_STD)))  # as learn() records them
    vocabs = {seed: kept(spec, seed, out_dir(spec, seed, loaded.family) / "vocab.pt", wanted)  # before any k-means
              for seed, data in plan.items() if data is None}
    for seed, data in plan.items():
        path = out_dir(spec, seed, loaded.family) / "vocab.pt"
        if data is None:
            continue
        with torch.inference_mode():
            vocabs[seed] = learn(spec, seed, data, split, loaded, pre, patch_size, device, dtype)
        if not distributed.is_main():  # under torchrun the main process learns and writes; the others load
            continue
        vocab = vocabs[seed]
        path = save(vocab, path.parent)
        per_patch = vocab.meta["inertia"] / max(vocab.meta["inertia_patches"], 1)
        sampled = f"a sample of {vocab.meta['sample']} of " if "sample" in vocab.meta else ""
        print(f"seed {seed}: {len(vocab)} {spec.options.space}-space words of {vocab.dim} values from {sampled}"
              f"{vocab.meta['patches_seen']} patches ({vocab.meta['images']} images, --kmeans {spec.options.kmeans}); "
              f"inertia {per_patch:.4g} per patch; written: {path}")
    return vocabs


def to_learn(spec: RunSpec, sets: dict, family: str, pre) -> dict:
    """{seed: the data its k-means reads (``pre`` its transform; COCO per caption where the protocol
    says so), or None where its vocabulary exists and is kept}. The header of every image the k-means
    will read is checked first, so a bad image never ends the run after a seed's k-means."""
    plan = {}
    for seed in spec.seeds:
        if (out_dir(spec, seed, family) / "vocab.pt").exists() and not spec.options.overwrite:
            plan[seed] = None
            continue
        data = sets[seed]
        data.transform = pre
        if spec.protocol.process_coco_per_caption and datasets.row(spec.data).task == "captions":
            data = per_caption(data)
        plan[seed] = data
    datasets.check_images(*(torch.utils.data.Subset(data, read_order(spec, seed, len(data)))
                            for seed, data in plan.items() if data is not None))
    return plan


def read_order(spec: RunSpec, seed: int, n: int) -> list:
    """Which of a seed's ``n`` images the k-means reads, in its order: all in loader order (the paper's
    recipe) or a permutation seeded by ``seed`` (fast); the first --max-images of them."""
    paper = spec.options.kmeans == "paper"
    order = torch.arange(n) if paper else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: spec.options.max_images].tolist() if spec.options.max_images is not None else order.tolist()


def kept(spec: RunSpec, seed: int, path: Path, model: dict) -> Vocabulary:
    """The vocabulary already at ``path``, where it is the one this run would learn (else a one-line
    error naming what differs: never learned over silently, never used in place of other words).
    ``model``: what the model gives the words (patch_size, image_size, mean, std, model)."""
    vocab = read_vocabulary(path)
    if (len(vocab), vocab.space) != (spec.options.vocab, spec.options.space):
        raise UserError(f"{path} holds {len(vocab)} {vocab.space}-space words, not the {spec.options.vocab} "
                        f"{spec.options.space}-space words asked for: pass --overwrite, or another --out")
    differ = differences(recorded_recipe(vocab), recipe(spec, seed, model))
    if differ:
        raise UserError(f"{path} was learned otherwise than this run asks: {'; '.join(differ)}; pass --overwrite to "
                        "learn it again, or another --out to keep both")
    print(f"seed {seed}: {path} exists; kept (--overwrite learns it again)")
    return vocab


def recipe(spec: RunSpec, seed: int, model: dict) -> dict:
    """What defines the vocabulary a run learns for ``seed``, by the names its sidecar records them under:
    the data (set, split, data seed, protocol, --max-images), the pixels (the model's patch size, image
    size and normalisation; the model itself for embed-space words) and the k-means with its settings."""
    o = spec.options
    split = None if spec.data == "samples" else (spec.split or "train")
    out = dict(data=spec.data, split=split, data_seed=seed, protocol=spec.protocol.name, max_images=o.max_images,
               patch_size=model["patch_size"], image_size=model["image_size"], mean=model["mean"], std=model["std"],
               kmeans=o.kmeans)
    if o.space == "embed":
        out["model"] = model["model"]
    if o.kmeans == "fast":
        out.update(niter=o.niter, init=o.init, max_points_per_centroid=o.max_points_per_centroid, seed=seed)
    else:
        out.update(kmeans_batch_size=spec.batch)
    return out


def recorded_recipe(vocab: Vocabulary) -> dict:
    """What an existing vocabulary records of its :func:`recipe` (a key it does not record is absent:
    a bare or older vocabulary is compared on what it says)."""
    meta = vocab.meta
    out = {k: meta[k] for k in ("data", "split", "data_seed", "protocol", "image_size", "mean", "std", "kmeans",
                                "model", "niter", "max_points_per_centroid", "seed", "kmeans_batch_size")
           if k in meta}
    asked = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    out.update({k: asked[k] for k in ("max_images", "init") if k in asked})  # as asked (FAISS may lack AFK-MC2)
    if vocab.patch_size is not None:
        out["patch_size"] = vocab.patch_size
    return out


def differences(there: dict, now: dict) -> list[str]:
    """'key X there, Y now' for every key both record and that differ (numbers to 1e-6)."""
    def same(a, b):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
        return a == b

    return [f"{k.replace('_', ' ')} {there[k]!r} there, {now[k]!r} now" for k in now
            if k in there and not same(there[k], now[k])]


def read_size(spec: RunSpec, model_size: int) -> int:
    """The size process.py reads images at with the data set's own preprocessing: the model's, or where
    the protocol says so the paper's fixed one for pixel-space words (ImageNet: 224 px whatever the model;
    embed-space words need the model's own size)."""
    row = datasets.DATASETS.get(spec.data)
    fixed = row.paper_process_size if row is not None else None
    if fixed and spec.protocol.process_paper_size and spec.options.space == "pixel":
        return fixed
    return model_size


def learn(spec: RunSpec, seed: int, data, split, loaded: Loaded, pre, patch_size: int, device, dtype) -> Vocabulary:
    """One vocabulary: the paper's recipe in loader order, or FAISS on a seeded sample (read in a seeded
    order). Under torchrun each process reads only its part of every batch (:func:`distributed.parts`)."""
    from tqdm import tqdm

    o, batch = spec.options, spec.batch
    paper = o.kmeans == "paper"
    engine = kmeans_engine(o.engine, device) if paper else None
    data = torch.utils.data.Subset(data, read_order(spec, seed, len(data)))
    size = getattr(pre, "size", None) or data[0][0].shape[-1]
    per_image = (size // patch_size) ** 2
    first = min(batch, len(data)) if paper else len(data)
    if first * per_image < o.vocab:
        what = "the first batch" if paper and first < len(data) else "the images"
        raise UserError(f"{what} ({first} images) give {first * per_image} patches, fewer than --vocab {o.vocab} "
                        "words" + ("; use a bigger --batch or fewer words" if what == "the first batch" else ""))
    embed = patch_embedder(loaded.vision) if o.space == "embed" else None
    meta = dict(data=spec.data, split=split, data_seed=seed, protocol=spec.protocol.name, images=len(data),
                image_size=size, mean=list(getattr(pre, "mean", datasets.OPENAI_CLIP_MEAN)),
                std=list(getattr(pre, "std", datasets.OPENAI_CLIP_STD)), model=loaded.name,
                pretrained=loaded.pretrained, config=results.config_of(spec),
                environment=runtime.environment(device))
    if paper and engine == "sklearn" and distributed.world() > 1:
        return learn_on_main(spec, seed, data, loaded, patch_size, device, dtype, embed, meta)
    started, sent = time.time(), distributed.sent_bytes()
    pixels, starts = my_parts(data, batch, spec.workers, device, dtype)
    with tqdm(total=-(-len(data) // batch), desc=f"k-means {spec.data} v{o.vocab} seed {seed}", unit="batch",
              disable=not distributed.is_main()) as bar:
        if paper:
            vocab = Vocabulary.learn_paper(pixels, size=o.vocab, space=o.space, patch_size=patch_size, embed=embed,
                                           batch_size=batch, seed=0, progress=bar, engine=engine, device=device, **meta)
        else:
            vocab = Vocabulary.learn(
                pixels, size=o.vocab, space=o.space, patch_size=patch_size, embed=embed, niter=o.niter,
                max_points_per_centroid=o.max_points_per_centroid, seed=seed, init=o.init, starts=starts,
                gpu=False if device.type == "cpu" else None, progress=bar, **meta)
    if not distributed.is_main():
        print(f"{distributed.tag()}sent {distributed.sent_bytes() - sent} bytes for the k-means "
              f"({sum(len(p) for p in distributed.parts(len(data), batch))} images read)", flush=True)
        return vocab
    vocab.meta["seconds"] = round(time.time() - started, 1)
    return vocab


def kmeans_engine(engine: Optional[str], device) -> str:
    """The paper recipe's engine: the one asked for, else torch on a GPU or under torchrun (the
    distance work on the device, the fit shared), scikit-learn (bit-exact, as fast) on one CPU process."""
    return engine or ("torch" if device.type != "cpu" or distributed.world() > 1 else "sklearn")


def my_parts(data, batch: int, workers: int, device, dtype):
    """This process's part of every batch (the whole batch alone; None where its part is empty), on
    ``device``, and the position of each non-empty part's first image in the read."""
    parts = distributed.parts(len(data), batch)
    mine = [p for p in parts if p]
    loaded = datasets.batches(data, batch, workers, mine if distributed.world() > 1 else None, prefetch=PREFETCH)

    def pixels():  # streamed, one batch at a time (keeps no reference to a batch once it is handed on)
        it = iter(loaded)
        for p in parts:
            yield next(it)[0].to(device, dtype) if p else None

    return pixels(), [p[0] for p in mine]


def learn_on_main(spec: RunSpec, seed: int, data, loaded: Loaded, patch_size: int, device, dtype, embed, meta):
    """The paper recipe in scikit-learn under torchrun: every process loads (and embeds) its part of each
    batch, the main one fits the whole batches alone (the others return None)."""
    o, batch = spec.options, spec.batch

    def part(x, embed=embed):  # what a process sends of its part of a batch, pixels or embeddings
        x = x.to(device, dtype)
        return x if embed is None else embed(x)

    stream = distributed.BatchStream(len(data), batch,
                                     lambda order: datasets.batches(data, batch, spec.workers, order), part, device)
    if not distributed.is_main():
        return stream.serve()
    started = time.time()
    vocab = Vocabulary.learn_paper(stream, size=o.vocab, space=o.space, patch_size=patch_size,
                                   embed=None if embed is None else (lambda e: e),  # embedded where loaded
                                   batch_size=batch, seed=0, engine="sklearn", **meta)
    stream.close()
    vocab.meta["seconds"] = round(time.time() - started, 1)
    return vocab


def save(vocab: Vocabulary, folder: Path) -> Path:
    """Save the learned words; where the folder refuses them now (it was checked at the start: a full
    disk, a folder gone), they go to the temporary-files folder instead and a one-line error says where
    (vwt.results.write_files, the one writer): the k-means is never lost. Returns where they went."""
    return vocab.save(folder)
