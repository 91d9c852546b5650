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
import sys
import time
from pathlib import Path

import vwt
from vwt import cli, distributed, protocol, results, zeroshot as zs
from vwt.cli import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p, default="waterbirds", choices=zs.data_names())
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--split", default=None,
                   help="data split (default: test; MetaShift under standard: all of train and test; ImageNet: val)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (smoke runs)")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of the runs (default: paper 1 2 3 for Waterbirds/CelebA/MetaShift, each its own "
                        "split and vocabulary, 0 otherwise; standard 0 1 2); '{seed}' in --vocab-path picks a "
                        "vocabulary per seed")
    g.add_argument("--prompt", default="a photo of a {}", help="zero-shot prompt, {} = label (default 'a photo of a {}')")
    g.add_argument("--labels", default=None, help="comma-separated class names replacing the defaults (in class order)")
    cli.add_workers_and_summary(g, "clip", "evaluate")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict | None:
    """Run clip.py. ``loaded`` (tests only) is an already-loaded model, used as it is, random weights
    included; the command line always loads pretrained weights."""
    args = parse_args(argv)
    if args.summary:
        return cli.write_summary(Path(args.out) / "clip", "clip.py")
    cli.at_least_one(args, "batch", "limit")
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(Path(args.out) / "clip")
    started = time.time()
    seeds = zs.default_seeds(args)
    cli.reducers_from_args(args, seed=seeds[0])  # bad flags and missing data fail before the model loads
    ds = zs.load_data(args, seeds[0])
    loaded = model_for(args, loaded, device, dtype)
    zs.check_model_and_data(args, loaded)
    transform = zs.transform_of(args, loaded)
    full = 0
    for seed in seeds:  # every seed's vocabulary must fit the model before any image is scored
        full = cli.check_input_reducers(loaded.vision, cli.reducers_from_args(args, seed=seed, family=loaded.family),
                                        transform.size, device, dtype)
    names = zs.class_names(args, ds)
    quant_first = args.quant and protocol.get(args.protocol).whole_model_int8  # the paper's text features: int8
    if quant_first:
        cli.quantize(loaded.model, args.protocol, loaded.family)
    text = None if loaded.family == "timm" else zs.text_features(loaded, [args.prompt.format(n) for n in names], device)
    if args.quant and not quant_first:
        cli.quantize(loaded.model, args.protocol, loaded.family)

    if not loaded.pretrained:
        print("warning: evaluating random weights (test hook)", file=sys.stderr)
    vocabs = {s: cli.vocab_path(args, seed=s) for s in seeds}
    deterministic = not args.random and not zs.resplit(args) and len(set(vocabs.values())) <= 1
    seeds = seeds[:1] if deterministic else seeds
    stem = zs.results_path(args, loaded.name).with_suffix("")
    runs = []
    try:
        for seed in seeds:
            ds = zs.load_data(args, seed, transform)
            cli.seed_everything(seed)
            vwt.patch(loaded.model, *cli.reducers_from_args(args, seed=seed, family=loaded.family))
            run, scores = zs.evaluate(args, loaded, ds, text, device, dtype, desc=f"{args.data} seed {seed}")
            preds = stem.parent / f"{stem.name}.seed{seed}.predictions.csv"
            if distributed.is_main():  # torchrun: every process has every score; the main one writes
                zs.write_predictions(preds, ds, scores)
            runs.append({"seed": seed, "vocab_path": None if vocabs[seed] is None else str(vocabs[seed]),
                         "images": len(ds), "predictions": str(preds), **run})
    finally:
        vwt.unpatch(loaded.model)
    if not distributed.is_main():
        return None
    agg, summary = zs.aggregate(runs)
    result = {
        "task": "clip", "protocol": args.protocol, "model": loaded.name, "pretrained": loaded.pretrained,
        "method": cli.method_name(args),
        "data": args.data + (f"-{args.split}" if args.split else "") + (f" (first {args.limit})" if args.limit else ""),
        "split": args.split, "resplit_per_seed": zs.resplit(args), "images": len(ds), "prompt": args.prompt,
        "labels": names if zs.task_of(args.data) == "groups" else None,
        "seeds": seeds, "deterministic": deterministic, "runs": runs, "metrics": agg, "summary": summary,
        "config": results.config_of(args),
        "environment": cli.environment(device), "seconds": time.time() - started,
    }
    reducers = cli.reducers_from_args(args, seed=seeds[0], family=loaded.family)
    result["note"] = cli.nothing_merged_note(reducers, full, agg["tokens_first_block"]["mean"], agg["tokens_mean"]["mean"])
    path = cli.save_json(zs.results_path(args, loaded.name), result)
    print(zs.report(result) + f"\nresults: {path}")
    return result


def model_for(args, loaded, device, dtype) -> cli.Loaded:
    """The model: ``loaded`` (tests) moved to the device, or --model with pretrained weights."""
    if loaded is not None:
        loaded.model.to(device=device, dtype=dtype).eval()
        return loaded
    no_weights = args.model.startswith("open_clip:") and "/" not in args.model
    loaded = None if no_weights else cli.load_model(args.model, device, dtype)
    if loaded is None or not loaded.pretrained:
        raise UserError(f"{args.model} has no pretrained weights (open_clip names need /PRETRAINED, e.g. "
                        "open_clip:ViT-B-16/openai): zero-shot accuracy of random weights means nothing")
    return loaded


if __name__ == "__main__":
    cli.main(lambda: main())
