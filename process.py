"""Learn a VWT visual-word vocabulary by mini-batch k-means over the patches of a data set.

    python process.py --data imgnet --vocab 1000                  # tokenizers/imgnet/v1000/vocab.pt
    python process.py --data waterbirds --vocab 100 --seed 1      # in-domain, another seed
    python process.py --data samples --vocab 100 --space embed    # words on the patch projections

Images are read in a seeded random order (mini-batch k-means needs shuffled batches), with the model's
own preprocessing; every batch is one k-means update. Writes ``vocab.pt`` (raw centres, the published
format) and ``vocab.json`` (patch size, image size, normalisation, space, data, patches seen, inertia,
the configuration, library versions and machine). clip.py, blip.py, len.py and eff.py read it back
with ``--vocab SIZE --vocab-data DATA`` (pixel space, seed 0) or ``--vocab-path``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import vwt
from vwt import cli, datasets
from vwt.cli import UserError
from vwt.tokenizer import tokenize
from vwt.vocab import patch_embedder

DATA = ("imgnet", "waterbirds", "celeba", "meta", "coco", "samples")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imgnet", choices=DATA, help="data set to learn the words on (default imgnet)")
    p.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    p.add_argument("--split", default=None,
                   help="split to read (default train; samples has none; COCO train needs Karpathy's dataset_coco.json)")
    p.add_argument("--vocab", default=1000, type=int, metavar="SIZE", help="number of visual words (default 1000)")
    p.add_argument("--space", default="pixel", choices=("pixel", "embed"),
                   help="pixel: normalised pixel patches (the paper); embed: the model's patch projections")
    cli.add_model_args(p)
    p.add_argument("--seed", default=0, type=int, help="seed of the image order and of k-means (default 0)")
    p.add_argument("--batch", default=32, type=int, help="images per k-means update (default 32)")
    p.add_argument("--max-images", default=None, type=int, help="use at most this many images (a seeded random subset)")
    p.add_argument("--passes", default=1, type=int, help="mini-batch k-means passes over the images (default 1, as the paper)")
    p.add_argument("--refine", default=2, type=int,
                   help="then this many Lloyd passes, each one more pass over the images (default 2: better words "
                        "than scikit-learn's mini-batch k-means; 0 for the single mini-batch pass)")
    p.add_argument("--workers", default=4, type=int, help="data-loading worker processes (default 4; 0 = none)")
    p.add_argument("--out", default=None, type=Path,
                   help="output folder (default tokenizers/<data>/v<SIZE>, with -embed for --space embed "
                        "and -seed<N> for a seed other than 0)")
    return p.parse_args(argv)


def out_dir(args) -> Path:
    if args.out is not None:
        return Path(args.out)
    base = cli.tokenizer_dir(args.data, args.vocab)
    return base.with_name(base.name + ("-embed" if args.space == "embed" else "") + (f"-seed{args.seed}" if args.seed else ""))


def main(argv=None, loaded: cli.Loaded | None = None) -> vwt.Vocabulary:
    """Run process.py. ``loaded`` (tests only) replaces --model with an already-loaded model."""
    args = parse_args(argv)
    for flag in ("vocab", "batch", "passes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1; got {getattr(args, flag)}")
    if args.refine < 0:
        raise UserError(f"--refine must be 0 or more; got {args.refine}")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be at least 1; got {args.max_images}")
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(out_dir(args))  # an unwritable folder fails now, not after the k-means
    split = None if args.data == "samples" else (args.split or "train")
    data = datasets.load(args.data, args.data_root, None, split=split)  # a missing data set fails before the model loads
    if loaded is None:
        loaded = cli.load_model(args.model, device, dtype)
    pre = datasets.preprocess_for(loaded.model)
    data.transform = pre
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    if args.max_images is not None:
        order = order[: args.max_images]
    data = torch.utils.data.Subset(data, order.tolist())
    blank = torch.zeros(1, 3, pre.size, pre.size, device=device, dtype=dtype)
    patch_size = tokenize(loaded.vision, None, blank)[1].patch_size
    patches = len(data) * (pre.size // patch_size) ** 2
    if patches < args.vocab:
        raise UserError(f"{len(data)} images give {patches} patches, fewer than --vocab {args.vocab} words")

    from tqdm import tqdm

    embed = patch_embedder(loaded.vision) if args.space == "embed" else None
    steps = -(-len(data) // args.batch)

    def progress(it):
        return tqdm(it, total=steps, desc=f"k-means {args.data} v{args.vocab}", unit="batch")

    class Pixels:  # re-iterable for --passes > 1; pixels moved to the model's device and dtype
        def __iter__(self):
            for pixels, _ in datasets.batches(data, args.batch, args.workers):
                yield pixels.to(device, dtype)

    started = time.time()
    vocab = vwt.Vocabulary.learn(
        Pixels(), size=args.vocab, space=args.space, patch_size=patch_size, embed=embed, passes=args.passes,
        refine=args.refine, seed=args.seed, device=device, progress=progress,
        data=args.data, split=split, images=len(data), image_size=pre.size, mean=list(pre.mean), std=list(pre.std),
        model=loaded.name, config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        environment=cli.environment(device))
    vocab.meta["seconds"] = round(time.time() - started, 1)
    path = save(vocab, out_dir(args))
    per_patch = vocab.meta["inertia"] / max(vocab.meta["inertia_patches"], 1)
    print(f"{len(vocab)} {args.space}-space words of {vocab.dim} values from {vocab.meta['patches_seen']} patches "
          f"({len(data)} images, {args.passes} mini-batch + {args.refine} Lloyd pass(es)); inertia {per_patch:.4g} per patch; written: {path}")
    return vocab


def save(vocab: vwt.Vocabulary, folder: Path) -> Path:
    """Save the learned words; where the folder refuses them now (it was checked at the start), they go
    to a new temporary folder instead and a one-line error says where: the k-means is never lost."""
    import tempfile

    try:
        return vocab.save(folder)
    except OSError as e:
        rescue = Path(tempfile.mkdtemp(prefix="vwt-vocab-"))
        vocab.save(rescue)
        raise UserError(f"cannot write the vocabulary to {folder} ({cli.first_line(e)}); it was saved to "
                        f"{rescue} instead") from None


if __name__ == "__main__":
    cli.main(main)
