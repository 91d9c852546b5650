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
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import vwt
from vwt import cli, datasets, distributed, metrics, results
from vwt.cli import UserError

GROUPED = ("waterbirds", "celeba", "meta")
TAGS = ("openimages-common", "openimages-rare")
DATA = GROUPED + TAGS + ("imgnet",)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p, default="waterbirds", choices=DATA)
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
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes (0: in the main process)")
    g.add_argument("--summary", action="store_true",
                   help="do not evaluate: gather the results files under <out>/clip into summary.md and summary.csv")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------
def _tensor(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; 4.x returns the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_features(loaded: cli.Loaded, prompts: list[str], device) -> torch.Tensor:
    """(len(prompts), D) L2-normalised text embeddings, with the model's own tokenizer."""
    tok = loaded.tokenizer
    if tok is None:
        raise UserError(f"{loaded.name}: no text tokenizer could be loaded for zero-shot prompts")
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), 256):
            chunk = prompts[i:i + 256]
            if loaded.family == "open_clip":
                f = loaded.model.encode_text(tok(chunk).to(device))
            else:
                enc = getattr(tok, "tokenizer", tok)(chunk, padding=True, truncation=True, return_tensors="pt")
                f = _tensor(loaded.model.get_text_features(input_ids=enc["input_ids"].to(device),
                                                           attention_mask=enc["attention_mask"].to(device)))
            out.append(F.normalize(f.float(), dim=-1))
    return torch.cat(out)


def image_scores(loaded: cli.Loaded, pixels: torch.Tensor, text) -> torch.Tensor:
    """(B, classes): cosine similarity to every prompt, or a timm classifier's logits."""
    if loaded.family == "timm":
        return loaded.model(pixels).float()
    if loaded.family == "open_clip":
        f = loaded.model.encode_image(pixels)
    else:
        f = _tensor(loaded.model.get_image_features(pixel_values=pixels))
    return F.normalize(f.float(), dim=-1) @ text.T


def class_names(args, ds) -> list[str]:
    """The prompt labels: the data set's class (or tag) names, or --labels."""
    if args.labels is None:
        return list(ds.classes)
    names = [s.strip() for s in args.labels.split(",")]
    if len(names) != len(ds.classes):
        raise UserError(f"--labels gives {len(names)} names; {args.data} has {len(ds.classes)} classes")
    return names


def check_model_and_data(args, loaded: cli.Loaded) -> None:
    if args.data == "imgnet" and loaded.family != "timm":
        raise UserError("--data imgnet measures the top-1 of a timm classifier: pass --model timm:NAME")
    if args.data != "imgnet" and loaded.family not in ("hf_clip", "open_clip"):
        raise UserError(f"zero-shot {args.data} needs a CLIP model (Hugging Face or open_clip:ARCH/PRETRAINED); "
                        f"{loaded.name} is {loaded.family}")


def default_seeds(args) -> list[int]:
    """--seeds, or the protocol's: the paper's 1 2 3 re-splits of the confounder data sets (seed 0 for
    the others, which it ran once), or 0 1 2."""
    if args.seeds is not None:
        return list(args.seeds)
    if args.protocol == "paper":
        return list(datasets.PAPER_SEEDS) if args.data in GROUPED else [0]
    return [0, 1, 2]


def resplit(args) -> bool:
    """Whether each seed re-splits the data (the paper's protocol on Waterbirds, CelebA, MetaShift)."""
    return args.protocol == "paper" and args.data in GROUPED


def load_data(args, seed: int, transform=None):
    """The evaluated split for ``seed``: the paper's re-split of it (see :func:`resplit`), else the fixed one."""
    ds = datasets.load(args.data, args.data_root, transform, split=args.split,
                       seed=seed if resplit(args) else None, protocol=args.protocol, limit=args.limit)
    if len(ds) == 0:
        raise UserError(f"{args.data}: no images in split {args.split or 'default'}")
    return ds


def transform_of(args, loaded: cli.Loaded):
    """The preprocessing: the paper's for the data set (at the model's input size and normalisation;
    CLIP's for CLIP) under paper, the model's own under standard."""
    own = datasets.preprocess_for(loaded.model)
    if args.protocol == "standard":
        return own
    return datasets.transform_for(args.data, "paper", image_size=own.size, mean=own.mean, std=own.std)


def write_predictions(path: Path, ds, scores: np.ndarray) -> Path:
    """One row per image, as the paper's predictions.csv (Prediction, Label, Group; OpenImages: the
    top tag only) with the image id first."""
    import csv
    import io

    buf = io.StringIO()
    grouped = ds.records and "group" in ds.records[0]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "Prediction"] + (["Label", "Group"] if grouped else []))
    for rec, pred in zip(ds.records, scores.argmax(1).tolist()):
        w.writerow([rec["image_id"], pred] + ([rec["label"], rec["group"]] if grouped else []))
    from vwt.results import atomic_write_text

    atomic_write_text(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
def evaluate(args, loaded: cli.Loaded, ds, text, device, dtype, desc: str) -> tuple[dict, np.ndarray]:
    """Scores every image, then the task's metrics; also the tokens entering the first block and the
    mean over the blocks (per image). Returns (metrics, the (images, classes) scores)."""
    order = cli.batch_order(args, loaded, ds, device, dtype)  # --bucket: neighbours in token count
    mine, done = distributed.shard(order), []  # torchrun: this process's batches (all of them alone)
    for (pixels, _), idx in tqdm(zip(datasets.batches(ds, args.batch, args.workers, mine), mine),
                                 total=len(mine), desc=desc, file=sys.stderr, disable=not distributed.is_main()):
        with torch.inference_mode():
            rows = image_scores(loaded, pixels.to(device, dtype), text).cpu()
        st = vwt.stats(loaded.model)
        done.append((idx, rows, {k: st[k] for k in ("tokens_first_block", "tokens_last_block", "tokens_mean")}))
    scores, tokens = [None] * len(ds), []
    for idx, rows, st in distributed.unshard(done):  # every process's batches, in one-process order
        for i, row in zip(idx.tolist(), rows):
            scores[i] = row
        tokens.append(st)
    s = torch.stack(scores).numpy()
    summary = vwt.token_summary(tokens)
    out = {k: summary[k] for k in ("tokens_first_block", "tokens_mean")}
    recs = ds.records
    if args.data in GROUPED:
        label, group = [r["label"] for r in recs], [r["group"] for r in recs]
        out.update(metrics.group_accuracy(s.argmax(1), label, group, ds.group_names))
        out.update(metrics.group_loss(s, label, group, ds.group_names))
    elif args.data in TAGS:
        targets = np.zeros_like(s, dtype=bool)
        for i, r in enumerate(recs):
            targets[i, r["labels"]] = True
        out["mAP"], ap = metrics.mean_average_precision(s, targets)
        out["tags_with_positives"] = int(np.isfinite(ap).sum())
    else:
        if s.shape[1] != len(ds.classes):  # labels index the sorted synset folders: all of them must be there
            raise UserError(f"{loaded.name} has {s.shape[1]} classes but {args.data} has {len(ds.classes)} synset "
                            f"folders; the top-1 needs every class folder ({datasets.layout('imgnet')})")
        out["top1"] = metrics.top1(s, [r["label"] for r in recs])
    return out, s


def aggregate(runs: list[dict]) -> tuple[dict, dict]:
    """Per-seed metrics -> ({metric: {"mean", "std"}} with groups nested, the table's summary in percent)."""
    def ms(values):
        m, s = metrics.mean_std(values)
        return {"mean": m, "std": s}

    agg = {}
    for key in runs[0]:
        if key in ("groups", "group_loss"):
            agg[key] = {g: ms([r[key][g] for r in runs]) for g in runs[0][key]}
        elif key in ("counts", "seed", "vocab_path", "predictions"):
            continue
        else:
            agg[key] = ms([r[key] for r in runs])
    if "counts" in runs[0]:
        agg["counts"] = runs[0]["counts"]
    summary = {}
    for key in ("avg", "worst", "mAP", "top1"):  # the paper's table; worst_class stays in "metrics"
        if key in agg:
            summary[key] = [100 * agg[key]["mean"], 100 * agg[key]["std"]]
    summary["tokens"] = [agg["tokens_first_block"]["mean"], agg["tokens_first_block"]["std"]]
    return agg, summary


def results_path(args, model_name: str) -> Path:
    """<out>/clip/<data>__<model>__<method>[__first<N>]__<hash>.json: the hash covers the whole
    configuration (dtype, vocabulary file, seeds, ...), so two different runs never share a file."""
    split = f"-{args.split}" if args.split else ""
    first = f"first{args.limit}" if args.limit else ""
    config = {**results.config_of(args), "model": model_name}
    stem = results.run_stem([f"{args.data}{split}", cli.model_label(model_name), cli.method_name(args), first,
                             args.protocol], config)
    return Path(args.out) / "clip" / f"{stem}.json"


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
    seeds = default_seeds(args)
    cli.reducers_from_args(args, seed=seeds[0])  # bad flags and missing data fail before the model loads
    ds = load_data(args, seeds[0])
    loaded = model_for(args, loaded, device, dtype)
    check_model_and_data(args, loaded)
    transform = transform_of(args, loaded)
    full = 0
    for seed in seeds:  # every seed's vocabulary must fit the model before any image is scored
        full = cli.check_input_reducers(loaded.vision, cli.reducers_from_args(args, seed=seed, family=loaded.family),
                                        transform.size, device, dtype)
    names = class_names(args, ds)
    quant_first = args.quant and args.protocol == "paper"  # the paper's text features come from the int8 model
    if quant_first:
        cli.quantize(loaded.model, args.protocol, loaded.family)
    text = None if loaded.family == "timm" else text_features(loaded, [args.prompt.format(n) for n in names], device)
    if args.quant and not quant_first:
        cli.quantize(loaded.model, args.protocol, loaded.family)

    if not loaded.pretrained:
        print("warning: evaluating random weights (test hook)", file=sys.stderr)
    vocabs = {s: cli.vocab_path(args, seed=s) for s in seeds}
    deterministic = not args.random and not resplit(args) and len(set(vocabs.values())) <= 1
    seeds = seeds[:1] if deterministic else seeds
    stem = results_path(args, loaded.name).with_suffix("")
    runs = []
    try:
        for seed in seeds:
            ds = load_data(args, seed, transform)
            cli.seed_everything(seed)
            vwt.patch(loaded.model, *cli.reducers_from_args(args, seed=seed, family=loaded.family))
            run, scores = evaluate(args, loaded, ds, text, device, dtype, desc=f"{args.data} seed {seed}")
            preds = stem.parent / f"{stem.name}.seed{seed}.predictions.csv"
            if distributed.is_main():  # torchrun: every process has every score; the main one writes
                write_predictions(preds, ds, scores)
            runs.append({"seed": seed, "vocab_path": None if vocabs[seed] is None else str(vocabs[seed]),
                         "images": len(ds), "predictions": str(preds), **run})
    finally:
        vwt.unpatch(loaded.model)
    if not distributed.is_main():
        return None
    agg, summary = aggregate(runs)
    result = {
        "task": "clip", "protocol": args.protocol, "model": loaded.name, "pretrained": loaded.pretrained,
        "method": cli.method_name(args),
        "data": args.data + (f"-{args.split}" if args.split else "") + (f" (first {args.limit})" if args.limit else ""),
        "split": args.split, "resplit_per_seed": resplit(args), "images": len(ds), "prompt": args.prompt,
        "labels": names if args.data in GROUPED else None,
        "seeds": seeds, "deterministic": deterministic, "runs": runs, "metrics": agg, "summary": summary,
        "config": results.config_of(args),
        "environment": cli.environment(device), "seconds": time.time() - started,
    }
    reducers = cli.reducers_from_args(args, seed=seeds[0], family=loaded.family)
    result["note"] = cli.nothing_merged_note(reducers, full, agg["tokens_first_block"]["mean"], agg["tokens_mean"]["mean"])
    path = cli.save_json(results_path(args, loaded.name), result)
    print(report(result) + f"\nresults: {path}")
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


def report(result: dict) -> str:
    m = result["metrics"]
    lines = [f"{result['data']}  {result['model']}  {result['method']}  ({result['images']} images, "
             f"seeds {' '.join(map(str, result['seeds']))}, protocol {result['protocol']})"]
    for key in ("avg", "worst", "worst_class", "mAP", "top1"):
        if key in m:
            lines.append(f"  {key:<8} {100 * m[key]['mean']:6.2f} ± {100 * m[key]['std']:.2f}")
    for g, v in m.get("groups", {}).items():
        cell = "n/a" if math.isnan(v["mean"]) else f"{100 * v['mean']:6.2f} ± {100 * v['std']:.2f}"
        lines.append(f"  {g:<22} {cell}")
    lines.append("  " + cli.describe_tokens(m["tokens_first_block"]["mean"], m["tokens_mean"]["mean"]))
    if result.get("note"):
        lines.append(f"  {result['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.main(lambda: main())
