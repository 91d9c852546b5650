"""Learn a VWT visual-word vocabulary by k-means over the patches of a data set's train split.

    python process.py --data imgnet --vocab 1000         # tokenizers/imgnet/v1000/vocab.pt
    python process.py --data waterbirds --vocab 100      # tokenizers/waterbirds/v100/seed_{1,2,3}/vocab.pt
    python process.py --data coco --vocab 1000           # BLIP's 384 px preprocessing, one entry per caption
    python process.py --data samples --vocab 100 --kmeans fast

--protocol paper (default) learns as the paper's process.py: scikit-learn's MiniBatchKMeans(V,
batch_size=1024, n_init="auto") seeded 0, one partial_fit per batch of 1024 images in loader order, one
pass, on the data set's train split with its own preprocessing; Waterbirds, CelebA and MetaShift once per
seed 1-3 (each on that seed's re-split train data, into seed_<N>/), COCO and ImageNet once. Only one
batch's patches are held at a time. --kmeans fast is FAISS k-means (faiss.Kmeans, AFK-MC2 seeding,
--niter iterations, on the GPUs when FAISS has GPU support) on a seeded uniformly random sample of
--max-points-per-centroid patches per word, reservoir-sampled while the images stream (memory: the
sample); the README compares the two. --protocol standard uses it by default, with the model's own
preprocessing and images (not captions) once.

Writes ``vocab.pt`` (raw centres, the published format) and ``vocab.json`` (patch size, image size,
normalisation, space, data, seed, k-means, patches seen, inertia, configuration, versions, machine); an
existing vocabulary is kept unless --overwrite. Pixel-space words need no weights: without the model
(offline, no cache) its architecture is built with random weights. clip.py, blip.py, len.py and eff.py
read these folders with ``--vocab SIZE`` (in-domain by default, ``--imgnet``) or ``--vocab-path``.
Under torchrun each process loads (and embeds) part of every batch; rank 0 fits: one process's words.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

import vwt
from vwt import cli, datasets, distributed, protocol, results
from vwt.cli import UserError
from vwt.results import slug
from vwt.tokenizer import tokenize
from vwt.vocab import INIT, INITS, MAX_POINTS_PER_CENTROID, NITER, patch_embedder



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imgnet", choices=datasets.names(learnable=True), help="data set to learn the words on (default imgnet)")
    p.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    p.add_argument("--split", default=None,
                   help="split to read (default train; samples has none; COCO train needs Karpathy's dataset_coco.json)")
    p.add_argument("--vocab", default=1000, type=int, metavar="SIZE", help="number of visual words (default 1000)")
    p.add_argument("--space", default="pixel", choices=("pixel", "embed"),
                   help="pixel: normalised pixel patches (the paper); embed: the model's patch projections")
    cli.add_model_args(p, default=None)
    for action in p._actions:
        if action.dest == "model":
            action.help = action.help.replace("(default None)", f"(default {cli.DEFAULT_BLIP} for coco, else {cli.DEFAULT_CLIP})")
    cli.add_protocol_arg(p)
    p.add_argument("--kmeans", default=None, choices=("paper", "fast"),
                   help="paper: scikit-learn's MiniBatchKMeans as the paper ran it (default under --protocol paper); "
                        "fast: FAISS k-means on a seeded random sample of the patches (default under standard)")
    p.add_argument("--seeds", default=None, type=int, nargs="+",
                   help="data seeds, one vocabulary each (default under paper: 1 2 3 for waterbirds, celeba, meta, "
                        "else 0; under standard 0). Seeds other than 0 re-split the data as the paper's code and, "
                        "for --kmeans fast, also seed its sample and k-means")
    p.add_argument("--batch", default=None, type=int,
                   help="images per batch: per k-means update for --kmeans paper (default 1024, as the paper); "
                        "per read while sampling for fast (default 32)")
    p.add_argument("--max-images", default=None, type=int,
                   help="use at most this many images (paper: the first in loader order; fast: a seeded random subset)")
    p.add_argument("--niter", default=None, type=int,
                   help=f"--kmeans fast: FAISS k-means iterations (default {NITER}; FAISS's own default, 25, "
                        "gives better words in more time)")
    p.add_argument("--init", default=None, choices=INITS,
                   help=f"--kmeans fast: first centres, FAISS's AFK-MC2 seeding or k random patches (default {INIT})")
    p.add_argument("--max-points-per-centroid", default=None, type=int, metavar="N",
                   help=f"--kmeans fast: sample at most N patches per word (default {MAX_POINTS_PER_CENTROID}, "
                        "as FAISS; a pass over the data either way)")
    p.add_argument("--workers", default=4, type=int, help="data-loading worker processes (default 4; 0 = none)")
    p.add_argument("--overwrite", action="store_true", help="learn again where the vocabulary already exists")
    p.add_argument("--out", default=None, type=Path,
                   help="output folder in place of tokenizers/<data>/v<SIZE> (seed_<N>/ and, for --space embed, "
                        "<model>/ are made below it as the paper's code does)")
    return p.parse_args(argv)


def settle(args) -> None:
    """Fill the defaults that depend on the protocol, the k-means and the data; refuse bad values."""
    rules = protocol.get(args.protocol)
    args.kmeans = args.kmeans or rules.kmeans
    fast = args.kmeans == "fast"
    for flag in ("niter", "init", "max_points_per_centroid"):
        if getattr(args, flag) is not None and not fast:
            raise UserError(f"--{flag.replace('_', '-')} belongs to --kmeans fast; the paper's recipe is one "
                            "scikit-learn pass")
    if fast:  # the paper's runs record neither
        args.niter = NITER if args.niter is None else args.niter
        args.init = args.init or INIT
        if args.max_points_per_centroid is None:
            args.max_points_per_centroid = MAX_POINTS_PER_CENTROID
    args.batch = args.batch or (32 if fast else 1024)
    if args.seeds is None:
        args.seeds = rules.seeds_for(True) if rules.vocab_per_seed and datasets.row(args.data).resplit else [0]
    args.model = args.model or (cli.DEFAULT_BLIP if args.data == "coco" else cli.DEFAULT_CLIP)
    for flag in ("vocab", "batch") + (("niter", "max_points_per_centroid") if fast else ()):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    if fast and importlib.util.find_spec("faiss") is None:
        raise UserError("--kmeans fast needs FAISS: pip install faiss-cpu (faiss-gpu on a CUDA machine), "
                        "or use --kmeans paper")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be at least 1; got {args.max_images}")
    if min(args.seeds) < 0:
        raise UserError(f"--seeds must be 0 or more; got {' '.join(map(str, args.seeds))}")


def out_dir(args, seed: int, family: str) -> Path:
    """The paper's layout: <base>/[seed_<N>/][<model>/] with <base> = --out or tokenizers/<data>/v<SIZE>."""
    out = Path(args.out) if args.out is not None else cli.tokenizer_dir(args.data, args.vocab)
    if seed:
        out = out / f"seed_{seed}"
    if args.space == "embed":
        out = out / {"hf_clip": "clip", "hf_blip": "blip"}.get(family, slug(args.model))
    return out


def per_caption(data):
    """COCO under the paper: one entry per caption (its train file lists each image once per caption)."""
    records = getattr(data, "records", None)
    if not records or "captions" not in records[0]:
        return data
    data.records = [r for r in records for _ in range(max(1, len(r["captions"])))]
    return data


def main(argv=None, loaded: cli.Loaded | None = None) -> dict:
    """Run process.py; returns {seed: Vocabulary}. ``loaded`` (tests only) replaces --model."""
    args = parse_args(argv)
    settle(args)
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(out_dir(args, 0, ""))  # an unwritable folder fails now, not after the k-means
    split = None if args.data == "samples" else (args.split or "train")
    sets = {s: datasets.load(args.data, args.data_root, None, split=split, seed=s, protocol=args.protocol)
            for s in args.seeds}  # a missing data set fails before the model loads
    if loaded is None:  # pixel-space words do not depend on the weights
        loaded = cli.load_model(args.model, device, dtype, fallback_random=args.space == "pixel")
    own = datasets.preprocess_for(loaded.model)
    rules = protocol.get(args.protocol)
    pre = datasets.transform_for(args.data, image_size=own.size) if rules.process_data_preprocessing else own
    blank = torch.zeros(1, 3, own.size, own.size, device=device, dtype=dtype)
    patch_size = tokenize(loaded.vision, None, blank)[1].patch_size
    vocabs = {}
    for seed in args.seeds:
        path = out_dir(args, seed, loaded.family) / "vocab.pt"
        if path.exists() and not args.overwrite:
            kept = cli.read_vocabulary(path)
            if (len(kept), kept.space) != (args.vocab, args.space):
                raise UserError(f"{path} holds {len(kept)} {kept.space}-space words, not the {args.vocab} "
                                f"{args.space}-space words asked for: pass --overwrite, or another --out")
            print(f"seed {seed}: {path} exists; kept (--overwrite learns it again)")
            vocabs[seed] = kept
            continue
        data = sets[seed]
        data.transform = pre
        if rules.process_coco_per_caption and datasets.row(args.data).task == "captions":
            data = per_caption(data)
        with torch.inference_mode():
            vocabs[seed] = learn(args, seed, data, split, loaded, pre, patch_size, device, dtype)
        if not distributed.is_main():  # under torchrun the main process learns and writes; the others load
            continue
        vocab = vocabs[seed]
        save(vocab, path.parent)
        per_patch = vocab.meta["inertia"] / max(vocab.meta["inertia_patches"], 1)
        sampled = f"a sample of {vocab.meta['sample']} of " if "sample" in vocab.meta else ""
        print(f"seed {seed}: {len(vocab)} {args.space}-space words of {vocab.dim} values from {sampled}"
              f"{vocab.meta['patches_seen']} patches ({vocab.meta['images']} images, --kmeans {args.kmeans}); "
              f"inertia {per_patch:.4g} per patch; written: {path}")
    return vocabs


def learn(args, seed, data, split, loaded, pre, patch_size, device, dtype) -> vwt.Vocabulary:
    """One vocabulary: the paper's recipe in loader order, or FAISS on a seeded sample (read in a seeded order)."""
    from tqdm import tqdm

    paper = args.kmeans == "paper"
    order = torch.arange(len(data)) if paper else torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    if args.max_images is not None:
        order = order[: args.max_images]
    data = torch.utils.data.Subset(data, order.tolist())
    size = getattr(pre, "size", None) or data[0][0].shape[-1]
    per_image = (size // patch_size) ** 2
    first = min(args.batch, len(data)) if paper else len(data)
    if first * per_image < args.vocab:
        what = "the first batch" if paper and first < len(data) else "the images"
        raise UserError(f"{what} ({first} images) give {first * per_image} patches, fewer than --vocab {args.vocab} "
                        "words" + ("; use a bigger --batch or fewer words" if what == "the first batch" else ""))
    embed = patch_embedder(loaded.vision) if args.space == "embed" else None
    steps = -(-len(data) // args.batch)
    desc = f"k-means {args.data} v{args.vocab} seed {seed}"

    def pixels():  # streamed, one batch at a time (map keeps no reference to a batch once it is handed on)
        return map(lambda b: b[0].to(device, dtype), datasets.batches(data, args.batch, args.workers))

    def part(x, embed=embed):  # torchrun: what a process sends of its part of a batch, pixels or embeddings
        x = x.to(device, dtype)
        return x if embed is None else embed(x)

    if distributed.world() > 1:  # each batch loaded in parts across the processes, whole again on rank 0
        stream = distributed.BatchStream(len(data), args.batch,
                                         lambda order: datasets.batches(data, args.batch, args.workers, order),
                                         part, device)
        if not distributed.is_main():
            return stream.serve()
        pixels, embed = stream.__iter__, (None if embed is None else (lambda e: e))  # embedded where loaded

    meta = dict(data=args.data, split=split, data_seed=seed, protocol=args.protocol, images=len(data),
                image_size=size, mean=list(getattr(pre, "mean", datasets.OPENAI_CLIP_MEAN)),
                std=list(getattr(pre, "std", datasets.OPENAI_CLIP_STD)), model=loaded.name,
                pretrained=loaded.pretrained, config=results.config_of(args),
                environment=cli.environment(device))
    started = time.time()
    with tqdm(total=steps, desc=desc, unit="batch") as bar:
        if paper:
            vocab = vwt.Vocabulary.learn_paper(pixels(), size=args.vocab, space=args.space, patch_size=patch_size,
                                               embed=embed, batch_size=args.batch, seed=0, progress=bar, **meta)
        else:
            vocab = vwt.Vocabulary.learn(
                pixels(), size=args.vocab, space=args.space, patch_size=patch_size, embed=embed, niter=args.niter,
                max_points_per_centroid=args.max_points_per_centroid, seed=seed, init=args.init,
                gpu=False if device.type == "cpu" else None, kmeans="fast", progress=bar, **meta)
    if distributed.world() > 1:
        stream.close()
    vocab.meta["seconds"] = round(time.time() - started, 1)
    return vocab


def save(vocab: vwt.Vocabulary, folder: Path) -> Path:
    """Save the learned words; where the folder refuses them now (it was checked at the start), they go
    to a new temporary folder instead and a one-line error says where: the k-means is never lost."""
    try:
        return vocab.save(folder)
    except OSError as e:
        rescue = Path(tempfile.mkdtemp(prefix="vwt-vocab-"))
        vocab.save(rescue)
        raise UserError(f"cannot write the vocabulary to {folder} ({cli.first_line(e)}); it was saved to "
                        f"{rescue} instead") from None


if __name__ == "__main__":
    cli.main(main)
