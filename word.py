"""word.py: a vocabulary's visual words drawn as image patches, and images' patches beside their words.

Writes, under OUT/figures/word/<data>-v<size>__<digest of the configuration>/ (runs that differ in
vocabulary file, model or flags never share a folder):
  words.png   every visual word (a k-means centre of normalised pixel patches) de-normalised with the
              vocabulary's own normalisation and drawn as a P x P patch, row-major by word index;
  NAME.png    for each chosen image, every patch that matched a word (cosine distance <= --thresh)
              beside that word: "patch | word" pairs ordered by word index;
  word.json   the configuration, the machine, and the geometry of every grid (where each cell lies in
              the PNG and which word / patch it shows).

The images are matched the way the model would see them: the model's preprocessing and patch size,
through vwt.InterImage itself. Matching happens in pixel space before any block, so the weights do not
matter: --random-weights gives the same figures, and without access to the model hub (or its cache)
random weights of the model's architecture are used, with a note. Only pixel-space vocabularies can be
drawn. With no vocabulary flag it draws --vocab 100 --vocab-data samples; a samples vocabulary is
learned on the sample photographs on first use and cached in tokenizers/samples/, as eff.py does.
"""
from __future__ import annotations

import argparse

from vwt import cli, datasets, figures
from vwt.tokenizer import THRESH


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the model with random weights (no download); the figures do not depend on them")
    cli.add_data_args(p, choices=datasets.NAMES)
    g = p.add_argument_group("vocabulary")
    g.add_argument("--vocab", type=int, default=None, metavar="SIZE",
                   help="vocabulary size, read from tokenizers/<vocab-data>/v<SIZE>/vocab.pt (default 100 on the "
                        "samples, learned on first use)")
    g.add_argument("--vocab-path", type=cli.vocab_path_template, default=None, help="a vocab.pt (ours or the published ones) instead of --vocab (default: none)")
    g.add_argument("--vocab-data", default="samples", help="data set the --vocab vocabulary was learned on (default samples)")
    g.add_argument("--thresh", type=float, default=THRESH,
                   help=f"cosine-distance threshold for a match (default {THRESH:g})")
    g = p.add_argument_group("figures")
    g.add_argument("--images", nargs="*", default=None, metavar="NAME",
                   help="images to show beside their words, by name (default: the first --limit images)")
    g.add_argument("--limit", type=int, default=3, help="how many images when --images is not given (default 3)")
    g.add_argument("--pairs", type=int, default=64, help="at most this many patch | word pairs per image (default 64)")
    g.add_argument("--cols", type=cli.positive_int, default=None, help="cells per row of the word grid (default: square)")
    g.add_argument("--scale", type=cli.scale_int, default=None,
                   help="enlarge the grids by this integer factor (default: so the word grid is about 600 px wide)")
    p.set_defaults(random=False, prop_attn=False)  # recorded in the configuration (and its digest) as ever
    return p.parse_args(argv)


def run(args, loaded=None) -> dict:
    """Draw the figures (``vwt.figures.words``); ``loaded`` (a cli.Loaded) replaces --model (tests pass
    tiny models)."""
    return figures.words(cli.spec_from_args(args, figures.WordFigures), loaded)


if __name__ == "__main__":
    cli.main(lambda: run(parse_args()))
