"""Token counts after the VWT tokenizer, and how often each visual word is used.

    python len.py --data waterbirds --vocab 1000 --vocab-data imgnet --thresh 0.1
    python len.py --data coco --vocab-path tokenizers/coco/v100/vocab.pt
    python len.py --data samples --top_k 0.5

For every image: the number of tokens entering the first block (class token included) after the input
reducer (--vocab/--vocab-path: inter-image; --top_k: intra-image). Reports mean, std (ddof 1, as the
paper's pandas describe()), min and max over the data set and per group where the data has groups
(Waterbirds, CelebA, MetaShift), and for the inter-image tokenizer two visual-word frequencies: the
paper's (its len.py --metric freq: per image, patches labelled by the rank of their word among the
image's distinct matched words, unmatched patches after them one label each; the share of patches per
label below the vocabulary size) and ours (patches matched to each real word id). Only the embedding and
the tokenizer run (no transformer block). --protocol paper (default) uses the data set's paper
preprocessing and, for Waterbirds/CelebA/MetaShift, the paper's re-split of --seed with that seed's
vocabulary (default: the seed of the vocabulary found, else 1, the seed of the paper's frequency
figure); standard: the model's preprocessing and the fixed split. Writes
<out>/len/<data>__<model>__<method>__<hash>.json (configuration, versions, machine, per-image counts; the
hash covers the whole configuration, so runs that differ in anything never share a file) and the same
name .png (token-count histogram, the paper's and our word frequency).
"""
from __future__ import annotations

import argparse

from vwt import cli, datasets, lengths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p, default="samples", choices=datasets.NAMES)
    p.set_defaults(batch=32)
    p.add_argument("--split", default=None, help="split to read (default: the data set's evaluation split)")
    p.add_argument("--max-images", default=None, type=int, help="use only the first N images (default: all)")
    cli.add_workers_arg(p)
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    p.add_argument("--seed", default=None, type=cli.seed_int,
                   help="the paper's re-split and vocabulary of this seed (Waterbirds, CelebA, MetaShift under "
                        "--protocol paper; default: the seed of the vocabulary found, else 1)")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict:
    """Run len.py (see vwt.lengths.run). ``loaded`` (tests only) replaces --model with an already-loaded model."""
    spec = lengths.settle(cli.spec_from_args(parse_args(argv), lengths.Options))
    return lengths.run(spec, loaded)


if __name__ == "__main__":
    cli.main(main)
