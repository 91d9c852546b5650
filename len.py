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
from pathlib import Path

import numpy as np
import torch

import vwt
from vwt import cli, datasets, distributed, methods, metrics, protocol, results
from vwt.cli import UserError
from vwt.tokenizer import tokenize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p, default="samples", choices=datasets.NAMES)
    p.set_defaults(batch=32)
    p.add_argument("--split", default=None, help="split to read (default: the data set's evaluation split)")
    p.add_argument("--max-images", default=None, type=int, help="use only the first N images")
    p.add_argument("--workers", default=4, type=int, help="data-loading worker processes (default 4; 0 = none)")
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    p.add_argument("--seed", default=None, type=int,
                   help="the paper's re-split and vocabulary of this seed (Waterbirds, CelebA, MetaShift under "
                        "--protocol paper; default: the seed of the vocabulary found, else 1)")
    return p.parse_args(argv)


def summary(counts: np.ndarray) -> dict:
    """Count, mean, std with ddof 1 (pandas describe(), as the paper reports; 0 for one image), min, max."""
    std = float(counts.std(ddof=1)) if counts.size > 1 else 0.0
    return {"images": int(counts.size), "mean": float(counts.mean()), "std": std,
            "min": int(counts.min()), "max": int(counts.max())}


def seeded(args) -> argparse.Namespace:
    """--seed settled and that seed's vocabulary named in --vocab-path (see cli.vocab_path). Default for
    the paper's re-split data sets under paper: the seed of the vocabulary the flags find (a
    seed_<N> / -seed<N> folder), else 1 (the paper's frequency figure); none otherwise."""
    import re

    rules = protocol.get(args.protocol)
    if args.seed is None and rules.resplits(datasets.row(args.data).resplit):
        found = cli.vocab_path(args)
        learned = re.fullmatch(r"(?:seed_|v\d+-seed)(\d+)", found.parent.name) if found is not None else None
        args.seed = int(learned.group(1)) if learned else rules.len_seed
    if args.vocab_path is None and args.vocab is not None:
        args.vocab_path = cli.vocab_path(args, seed=args.seed)
    return args


def data_for(args, own: datasets.Preprocess):
    """The images to count, with the protocol's preprocessing (the paper's for the data set at the
    model's size and normalisation, or the model's own) and split (the seed's re-split under paper)."""
    pre = (datasets.transform_for(args.data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)
           if protocol.get(args.protocol).data_preprocessing else own)
    return datasets.load(args.data, args.data_root, pre, split=args.split, seed=args.seed, protocol=args.protocol,
                         limit=args.max_images)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict:
    """Run len.py. ``loaded`` (tests only) replaces --model with an already-loaded model."""
    args = parse_args(argv)
    cli.at_least_one(args, "batch", "max_images")
    others = [m for m in methods.rows() if m.kind != "input"]
    if any(methods.given(getattr(args, m.dest, None)) for m in others):
        inputs = " or ".join(m.flag for m in methods.rows("input"))
        raise UserError(f"len.py counts the tokens the VWT tokenizer leaves: use {inputs}, "
                        f"not {'/'.join(m.flag for m in others)}")
    if args.bucket:  # accepted like every script's data flags, so one command line serves them all
        print("note: len.py runs only the tokenizer, which pads nothing: --bucket changes nothing here")
    args = seeded(args)
    reducers = cli.reducers_from_args(args)
    if not reducers:
        raise UserError("choose a tokenizer: --vocab SIZE (or --vocab-path FILE) for inter-image, --top_k DROP for intra-image")
    reducer = reducers[0]
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(Path(args.out) / "len")
    data = datasets.load(args.data, args.data_root, None, split=args.split, limit=args.max_images)
    if loaded is None:
        pixel = getattr(getattr(reducer, "vocab", None), "space", "pixel") == "pixel"  # counts need no weights
        loaded = cli.load_model(args.model, device, dtype, fallback_random=pixel)
    pre = datasets.preprocess_for(loaded.model)
    data = data_for(args, pre)
    if len(data) == 0:
        raise UserError(f"{args.data}: no images in the chosen split")
    full = cli.check_input_reducers(loaded.vision, reducers, pre.size, device, dtype)
    inter = reducer if isinstance(reducer, vwt.InterImage) else None

    per_batch = distributed.unshard(count_batches(args, loaded, reducer, data, device, dtype))
    if not distributed.is_main():  # under torchrun: the main process writes and prints
        return None
    counts = torch.cat([b["counts"] for b in per_batch]).numpy()
    groups = np.asarray([g for b in per_batch for g in b["groups"]])
    words = sum(b["words"] for b in per_batch) if inter is not None else None
    paper_words = sum(b["paper_words"] for b in per_batch) if inter is not None else None
    patches, prefix = per_batch[0]["patches"], per_batch[0]["prefix"]

    method = cli.method_name(args)
    result = {
        "data": args.data, "split": args.split, "model": loaded.name, "method": method,
        "reducer": repr(reducer), "tokens_include_class_token": True,
        "patches_per_image": patches, "tokens": summary(counts),
        "groups": {}, "config": results.config_of(args),
        "environment": cli.environment(device),
    }
    names = getattr(data, "group_names", [])
    for g in sorted(set(groups.tolist()) - {-1}):
        name = names[g] if g < len(names) else str(g)
        result["groups"][name] = summary(counts[groups == g])
    if words is not None:
        result["word_counts"] = words.tolist()
        result["word_frequency_paper"] = (paper_words / max(1, paper_words.sum())).tolist()
        result["words_used"] = int((words > 0).sum())
    result["per_image"] = counts.tolist()

    result["note"] = cli.nothing_merged_note(reducers, full, float(counts.min()), float(counts.min()))
    config = {**results.config_of(args), "model": loaded.name}
    stem = results.run_stem([args.data, cli.model_label(loaded.name), method], config)
    json_path, png_path = Path(args.out) / "len" / f"{stem}.json", Path(args.out) / "len" / f"{stem}.png"
    cli.save_json(json_path, result)
    figure(png_path, counts, words, f"{args.data}: {method} ({loaded.name})", paper_words)
    t = result["tokens"]
    print(f"{args.data} {method}: tokens per image {t['mean']:.2f} ± {t['std']:.2f} (min {t['min']}, max {t['max']}) "
          f"of {patches + prefix}")
    if result["note"]:
        print(result["note"])
    for name, s in result["groups"].items():
        print(f"  {name}: {s['mean']:.2f} ± {s['std']:.2f} (min {s['min']}, max {s['max']}, {s['images']} images)")
    print(f"written: {json_path}, {png_path}")
    return result


def count_batches(args, loaded: cli.Loaded, reducer, data, device, dtype) -> list[dict]:
    """Per batch (this process's share under torchrun, see vwt.distributed): the tokens entering the first
    block of each image, its group, and the batch's visual-word counts (ours and the paper's)."""
    from tqdm import tqdm

    from vwt.vis import MatchRecorder

    inter = reducer if isinstance(reducer, vwt.InterImage) else None
    recorder = MatchRecorder(inter) if inter is not None else None
    mine = distributed.shard(list(torch.arange(len(data)).split(args.batch)))
    out = []
    try:
        for pixels, records in tqdm(datasets.batches(data, args.batch, args.workers, mine), desc=f"len {args.data}",
                                    unit="batch", total=len(mine), disable=not distributed.is_main()):
            try:
                state, _ = tokenize(loaded.vision, reducer, pixels.to(device, dtype))
            except ValueError as e:  # a vocabulary that does not fit the model
                raise UserError(str(e)) from None
            out.append({"counts": vwt.token_stats(state.layer_counts())["tokens_first_block"].long().cpu(),
                        "groups": [r.get("group", -1) for r in records],
                        "patches": int(state.labels.shape[1]), "prefix": int(state.prefix)})
            if recorder is not None:
                keys = recorder.keys()
                out[-1]["paper_words"] = metrics.dense_label_counts(keys, len(inter.vocab))
                keys = keys.ravel()
                out[-1]["words"] = np.bincount(keys[keys >= 0], minlength=len(inter.vocab))
    finally:
        if recorder is not None:
            recorder.detach()
    return out


def figure(path: Path, counts: np.ndarray, words, title: str, paper_words=None) -> None:
    """Token-count histogram; with a vocabulary the paper's word-frequency figure (share of patches per
    per-image label, see metrics.dense_label_counts) and ours (real words ranked by use, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 if words is None else 2 if paper_words is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.hist(counts, bins=np.arange(counts.min(), counts.max() + 2) - 0.5 if counts.max() - counts.min() < 60 else 40)
    ax.set(xlabel="tokens per image (class token included)", ylabel="images", title="token counts")
    if words is not None:
        ax = axes[0, 1]
        ranked = np.sort(words)[::-1]
        ax.bar(np.arange(len(ranked)), np.maximum(ranked, 0), width=1.0)
        if ranked.max() > 0:
            ax.set_yscale("log")
        ax.set(xlabel=f"visual words ranked by use ({int((words > 0).sum())} of {len(words)} used)",
               ylabel="patches matched", title="visual-word frequency (ours)")
    if words is not None and paper_words is not None:
        ax, size = axes[0, 2], len(paper_words)
        ax.bar(range(size), paper_words / max(1, paper_words.sum()))
        ax.set_xticks(list(range(0, size, max(1, size // 10))) + [size - 1])
        ax.set(xlabel="Visual Word", ylabel="Probability", title=f"$T_{{inter}}^{{{size}}}$ (paper's figure)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        results.atomic_savefig(fig, path, dpi=100)  # never a half-written figure under the final name
    finally:
        plt.close(fig)


if __name__ == "__main__":
    cli.main(main)
