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
--max-points-per-centroid patches per word, bottom-k sampled by a seeded hash of each patch's index while
the images stream (memory: the sample, as 8-bit values); the README compares the two. --protocol standard uses it by default, with the model's own
preprocessing and images (not captions) once.

Writes ``vocab.pt`` (raw centres, the published format) and ``vocab.json`` (patch size, image size,
normalisation, space, data, seed, k-means, patches seen, inertia, configuration, versions, machine); an
existing vocabulary is kept unless --overwrite. Pixel-space words need no weights: without the model
(offline, no cache) its architecture is built with random weights. clip.py, blip.py, len.py and eff.py
read these folders with ``--vocab SIZE`` (in-domain by default, ``--imgnet``) or ``--vocab-path``.
Under torchrun each process reads only its part of every batch: for --kmeans paper (--engine torch) the
processes share each step (one all-reduce of per-word sums and counts); for fast each samples its own
patches by a seeded hash of their global index and only the samples travel; --engine sklearn sends the
parts to rank 0, which fits. The words are one process's (paper: within float32 rounding; fast: identical).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vwt import cli, datasets, learning
from vwt.vocab import INIT, INITS, MAX_POINTS_PER_CENTROID, NITER


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imgnet", choices=datasets.names(learnable=True), help="data set to learn the words on (default imgnet)")
    p.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    p.add_argument("--split", default=None,
                   help="split to read (default train; samples has none; COCO train needs Karpathy's dataset_coco.json)")
    p.add_argument("--vocab", default=1000, type=int, metavar="SIZE", help="number of visual words (default 1000)")
    p.add_argument("--space", default="pixel", choices=("pixel", "embed"),
                   help="pixel: normalised pixel patches (the paper; default); embed: the model's patch projections")
    cli.add_model_args(p, default=None, shown=f"{cli.DEFAULT_BLIP} for coco, else {cli.DEFAULT_CLIP}")
    cli.add_protocol_arg(p)
    p.add_argument("--kmeans", default=None, choices=("paper", "fast"),
                   help="paper: scikit-learn's MiniBatchKMeans as the paper ran it (default under --protocol paper); "
                        "fast: FAISS k-means on a seeded random sample of the patches (default under standard)")
    p.add_argument("--engine", default=None, choices=("sklearn", "torch"),
                   help="--kmeans paper: sklearn (bit-exact, the default on one CPU process) or torch (the same step "
                        "on --device, equal within float32 rounding; the default on a GPU and under torchrun, "
                        "where the processes share the fit)")
    p.add_argument("--seeds", default=None, type=cli.seed_int, nargs="+",
                   help="data seeds, one vocabulary each (default under paper: 1 2 3 for waterbirds, celeba, meta, "
                        "else 0; under standard 0). Seeds other than 0 re-split the data as the paper's code and, "
                        "for --kmeans fast, also seed its sample and k-means")
    p.add_argument("--batch", default=None, type=int,
                   help="images per batch: per k-means update for --kmeans paper (default 1024, as the paper); "
                        "per read while sampling for fast (default 32)")
    p.add_argument("--max-images", default=None, type=int,
                   help="use at most this many images (paper: the first in loader order; fast: a seeded random subset; "
                        "default: all)")
    p.add_argument("--niter", default=None, type=int,
                   help=f"--kmeans fast: FAISS k-means iterations (default {NITER}; FAISS's own default, 25, "
                        "gives better words in more time)")
    p.add_argument("--init", default=None, choices=INITS,
                   help=f"--kmeans fast: first centres, FAISS's AFK-MC2 seeding or k random patches (default {INIT})")
    p.add_argument("--max-points-per-centroid", default=None, type=cli.positive_int, metavar="N",
                   help=f"--kmeans fast: sample at most N patches per word (default {MAX_POINTS_PER_CENTROID}, "
                        "as FAISS; a pass over the data either way)")
    cli.add_workers_arg(p)
    p.add_argument("--overwrite", action="store_true", help="learn again where the vocabulary already exists")
    p.add_argument("--out", default=None, type=Path,
                   help="output folder in place of tokenizers/<data>/v<SIZE>, the default (seed_<N>/ and, for --space "
                        "embed, <model>/ are made below it as the paper's code does)")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict:
    """Run process.py (see vwt.learning.run); returns {seed: Vocabulary}. ``loaded`` (tests only) replaces --model."""
    spec = learning.settle(cli.spec_from_args(parse_args(argv), learning.Options))
    return learning.run(spec, loaded)


if __name__ == "__main__":
    cli.main(main)
