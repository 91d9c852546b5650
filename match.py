"""match.py: see what a token reducer does to each image.

One PNG per image: the image as the model sees it (its own preprocessing), with
  * VWT inter-image (--vocab / --vocab-path): every patch that matched a visual word tinted with that
    word's colour (a word keeps its colour in every image); unmatched patches left clear;
  * VWT intra-image (--top_k): the dropped patches blanked in solid grey;
  * ToMe / LGTM / EViT (--tome / --lgtm / --evit): the patches each final token holds (merge groups of
    two or more patches) tinted alike; single patches left clear.
The token count is in the title, the colours in the legend. The PNGs go to OUT/figures/match/<method>/
(e.g. runs/figures/match/inter-v100-t0.1__1f3a9c2e/astronaut.png: the method, then a digest of the
whole configuration, so runs that differ in model, dtype or vocabulary file never share a folder); a
results file match.json beside them records the configuration, the machine, and for each image its
token counts, the colour key of every patch and where the image lies in the PNG (so the figure can be
checked pixel by pixel).

With no method flag it draws VWT intra-image (--top_k 0.5) and inter-image (--vocab 100 --vocab-data
samples). A samples vocabulary (--vocab SIZE --vocab-data samples) is learned on the sample photographs
on first use and cached in tokenizers/samples/, as eff.py does. Without access to the model hub (or
its cache) VWT figures use random weights of the model's architecture, with a note: they do not
depend on the weights.

VWT matching and dropping happen in pixel space before the first block, so inter/intra figures do not
depend on the model's weights (only on its preprocessing and patch size): --random-weights gives the same
figures. ToMe, LGTM and EViT groups do depend on the weights; their figures say "random weights" when
--random-weights was used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vwt import cli, datasets, figures


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the model with random weights (no download). Inter/intra figures are the same "
                        "with any weights; ToMe/LGTM/EViT figures are then labelled 'random weights'")
    cli.add_data_args(p, choices=datasets.NAMES)
    cli.add_method_args(p)
    g = p.add_argument_group("figures")
    g.add_argument("--limit", type=int, default=None, help="draw at most this many images (default all)")
    g.add_argument("--alpha", type=float, default=0.5, help="opacity of the word / group colours (default 0.5)")
    g.add_argument("--scale", type=cli.scale_int, default=2,
                   help="enlarge the image by this integer factor, nearest neighbour (default 2)")
    g.add_argument("--legend", type=int, default=12, help="list at most this many words or groups (default 12)")
    return p.parse_args(argv)


def figure_dir(args, loaded) -> Path:
    """OUT/figures/match/<method>[-random-weights]__<digest of the configuration> (vwt.figures)."""
    return figures.figure_dir(cli.spec_from_args(args, figures.MatchFigures), loaded)


def run(args, loaded=None) -> dict:
    """Draw the figures (``vwt.figures.match``); ``loaded`` (a cli.Loaded) replaces --model (tests pass
    tiny models). With no method flag, draws the defaults and returns {"runs": [result, result]}."""
    return figures.match(cli.spec_from_args(args, figures.MatchFigures), loaded)


if __name__ == "__main__":
    cli.main(lambda: run(parse_args()))
