"""blip.py: caption quality of BLIP with and without token reduction.

Captions the COCO Karpathy test split (--data coco) or NoCaps validation (--data nocaps) with beam
search (beam 3, min length 5, max length 20, or 40 with a --penalty above 1). Under --protocol paper
(default) decoding starts from the BOS token with no text prompt, as the paper's code; under standard
from the prompt "a picture of ", as BLIP's own COCO evaluation (a prompt counts towards the lengths and
is cut from the caption). --protocol also picks the paper's ToMe and int8 (README, "Protocols"). Then
it scores the captions with pycocoevalcap:
BLEU-4, METEOR, ROUGE-L, CIDEr, and SPICE where its Stanford CoreNLP jars are installed (otherwise
"SPICE unavailable", never a number). NoCaps also gets CIDEr per domain (in, near, out).
Each run also writes <run>.predictions.json ([{"image_id", "caption"}]: the paper's file, and the
NoCaps EvalAI server's upload format); COCO under the paper protocol is scored against BLIP's
coco_karpathy_test_gt.json where it is there (data/README.md).

Captions are appended to <out>/blip/<run>.captions.jsonl as they are made, with the configuration on
the first line; <run> ends in a digest of that configuration, so another configuration gets its own
file. A run that stops (even killed) resumes where it stopped (finished images are not redone); a file
whose first line is damaged or names another configuration is refused with the `mv` that moves it
aside, never reused; --restart starts this configuration over and removes nothing else. --no-score
only writes captions (say, on a GPU machine without Java); the same command without it scores them.
A results file per run goes to <out>/blip/; --summary gathers them into summary.md and summary.csv.

Models must have pretrained weights: caption scores of random weights mean nothing.
"""
from __future__ import annotations

import argparse

from vwt import captioning as cap, cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p, default=cli.DEFAULT_BLIP)
    cli.add_data_args(p, default="coco", choices=cap.data_names())
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    g = p.add_argument_group("captioning")
    g.add_argument("--split", default=None, help="data split (default: coco test, nocaps val)")
    g.add_argument("--limit", type=int, default=None, help="caption only the first N images (smoke runs; default: all)")
    g.add_argument("--beams", type=int, default=3, help="beam width (default 3)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest caption in tokens, prompt included (default 20, or 40 with --penalty above 1, "
                        "as the paper)")
    g.add_argument("--min-length", type=int, default=5, help="shortest caption in tokens, prompt included (default 5)")
    g.add_argument("--penalty", type=cli.finite_float, default=1.0,
                   help="beam search length penalty (default 1.0; above 1 favours longer captions)")
    g.add_argument("--prompt", default=None, help="text the decoder starts from, cut from the captions (default: "
                                                  "none under --protocol paper, 'a picture of ' under standard)")
    g.add_argument("--seed", type=cli.seed_int, default=0, help="seed (matters for the --random ablations; default 0)")
    g.add_argument("--restart", action="store_true", help="discard this configuration's earlier captions and start over")
    g.add_argument("--no-score", action="store_true", help="write the captions only; score them in a later run")
    cli.add_compile_arg(g, "generate() (beam search) and the text decoder stay eager")
    cli.add_workers_and_summary(g, "blip", "caption")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict | None:
    """Run blip.py. ``loaded`` (tests only) is an already-loaded model, used as it is, random weights
    included; the command line always loads pretrained weights."""
    spec = cap.caption_settings(cli.spec_from_args(parse_args(argv), cap.Decoding))
    result = cap.run(spec, loaded)
    if result is not None:
        print(cap.report(result) + f"\nresults: {cap.results_path(spec, result['model'])}")
    return result


if __name__ == "__main__":
    cli.main(lambda: main())
