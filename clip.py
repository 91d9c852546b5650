"""clip.py: zero-shot accuracy of CLIP-style models with and without token reduction.

  Waterbirds, CelebA, MetaShift   average accuracy, worst-group accuracy and every group's accuracy
  OpenImages common / rare        mAP over the tag list (every tag scored for every image)
  ImageNet-1K (--data imgnet)     top-1 of a timm classifier (--model timm:NAME)

Zero-shot prompts are "a photo of a {label}" (--prompt), with the paper's labels
  waterbirds: landbird, waterbird      celeba (Blond_Hair): non-blond, blond
  meta: dog, cat (paper) / cat, dog    openimages: the tag list itself
(--protocol standard: "non-blond person", "blond person"; --labels replaces them).

--protocol paper (default) evaluates as the paper's code: seeds 1 2 3 for Waterbirds, CelebA and
MetaShift, each re-splitting the data (split labels permuted within each group, seeded; same group
counts, other test images) and using its own in-domain vocabulary (tokenizers/<data>/v<SIZE>/seed_<i>/);
MetaShift's generated 25% test split; each data set's own preprocessing (Resize 256 + CenterCrop 224,
bilinear; CelebA CenterCrop 178 + Resize 224); seed 0 once for OpenImages. --protocol standard: seeds
0 1 2 on the release's fixed split, the model's own preprocessing, MetaShift's every image. Either way
the mean and standard deviation over the seeds are reported; a configuration with nothing random (one
split, no --random, one vocabulary for all seeds) runs once, since every seed would give the same
numbers. A results file per run goes to <out>/clip/ (naming the protocol), with one
predictions CSV per seed (image_id, Prediction, Label, Group, as the paper's predictions.csv); --summary
gathers the results into the paper-style table (summary.md and summary.csv there).

Models must have pretrained weights: accuracy on random weights means nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vwt import cli, zeroshot as zs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p, default="waterbirds", choices=zs.data_names())
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--split", default=None,
                   help="data split (default: test; MetaShift under standard: all of train and test; ImageNet: val)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke runs; default: all)")
    g.add_argument("--seeds", type=cli.seed_int, nargs="+", default=None,
                   help="seeds of the runs (default: paper 1 2 3 for Waterbirds/CelebA/MetaShift, each its own "
                        "split and vocabulary, 0 otherwise; standard 0 1 2); '{seed}' in --vocab-path picks a "
                        "vocabulary per seed")
    g.add_argument("--prompt", default="a photo of a {}", type=cli.prompt_template, help="zero-shot prompt, {} = label (default 'a photo of a {}')")
    g.add_argument("--labels", default=None, type=cli.label_list, help="comma-separated class names replacing the defaults (in class order)")
    cli.add_compile_arg(g, "the prompts' text features stay eager (computed once)")
    cli.add_workers_and_summary(g, "clip", "evaluate")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict | None:
    """Run clip.py: parser, spec, run (``vwt.zeroshot.run``), report. ``loaded`` (tests only) is an
    already-loaded model, used as it is, random weights included; the command line always loads
    pretrained weights."""
    spec = cli.spec_from_args(parse_args(argv), zs.ZeroShot)
    if spec.options.summary:
        return cli.write_summary(Path(spec.out) / "clip", "clip.py")
    result = zs.run(spec, loaded)
    if result is not None:
        print(zs.report(result) + f"\nresults: {zs.results_path(spec, result['model'])}")
    return result


if __name__ == "__main__":
    cli.main(lambda: main())
