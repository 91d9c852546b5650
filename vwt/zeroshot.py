"""Zero-shot evaluation of CLIP-style models, as clip.py runs it: the prompts' text features, every
image's scores, the task's metrics (group accuracy on Waterbirds, CelebA, MetaShift; mAP on OpenImages;
top-1 of a timm classifier on ImageNet), their mean and spread over seeds, the per-image predictions
CSV and the results file's name. ``score_images`` is the one loop over the images."""
from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import datasets, distributed, metrics, results
from .batching import batch_order
from .errors import UserError
from .methods import method_name
from .patch import describe_tokens, stats, token_summary
from .protocol import get as get_protocol

TASKS = ("groups", "tags", "top1")  # the data-set table's tasks clip.py evaluates


def data_names() -> tuple:
    """The data sets clip.py evaluates: every row of the data-set table with one of ``TASKS``."""
    return datasets.names(TASKS)


def task_of(data: str) -> str:
    return datasets.row(data).task


def _tensor(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; 4.x returns the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_features(loaded, prompts: list[str], device) -> torch.Tensor:
    """(len(prompts), D) L2-normalised text embeddings, with the model's own tokenizer (``loaded``:
    a ``vwt.models.Loaded``)."""
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


def image_scores(loaded, pixels: torch.Tensor, text) -> torch.Tensor:
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


def check_model_and_data(args, loaded) -> None:
    """ImageNet needs a timm classifier; the other data sets a CLIP model."""
    if task_of(args.data) == "top1" and loaded.family != "timm":
        raise UserError(f"--data {args.data} measures the top-1 of a timm classifier: pass --model timm:NAME")
    if task_of(args.data) != "top1" and loaded.family not in ("hf_clip", "open_clip"):
        raise UserError(f"zero-shot {args.data} needs a CLIP model (Hugging Face or open_clip:ARCH/PRETRAINED); "
                        f"{loaded.name} is {loaded.family}")


def default_seeds(args) -> list[int]:
    """--seeds, or the protocol's: the paper's 1 2 3 re-splits of the confounder data sets (seed 0 for
    the others, which it ran once), or 0 1 2."""
    if args.seeds is not None:
        return list(args.seeds)
    return get_protocol(args.protocol).seeds_for(datasets.row(args.data).resplit)


def resplit(args) -> bool:
    """Whether each seed re-splits the data (the paper's protocol on Waterbirds, CelebA, MetaShift)."""
    return get_protocol(args.protocol).resplits(datasets.row(args.data).resplit)


def load_data(args, seed: int, transform=None):
    """The evaluated split for ``seed``: the paper's re-split of it (see :func:`resplit`), else the fixed one."""
    ds = datasets.load(args.data, args.data_root, transform, split=args.split,
                       seed=seed if resplit(args) else None, protocol=args.protocol, limit=args.limit)
    if len(ds) == 0:
        raise UserError(f"{args.data}: no images in split {args.split or 'default'}")
    return ds


def transform_of(args, loaded):
    """The preprocessing: the paper's for the data set (at the model's input size and normalisation;
    CLIP's for CLIP) under paper, the model's own under standard."""
    own = datasets.preprocess_for(loaded.model)
    if not get_protocol(args.protocol).data_preprocessing:
        return own
    return datasets.transform_for(args.data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)


def write_predictions(path: Path, ds, scores: np.ndarray) -> Path:
    """One row per image, as the paper's predictions.csv (Prediction, Label, Group; OpenImages: the
    top tag only) with the image id first."""
    buf = io.StringIO()
    grouped = ds.records and "group" in ds.records[0]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "Prediction"] + (["Label", "Group"] if grouped else []))
    for rec, pred in zip(ds.records, scores.argmax(1).tolist()):
        w.writerow([rec["image_id"], pred] + ([rec["label"], rec["group"]] if grouped else []))
    results.atomic_write_text(path, buf.getvalue())
    return path


def score_images(args, loaded, ds, text, device, dtype, desc: str) -> tuple[np.ndarray, dict]:
    """The one loop over the images: every image's scores ((images, classes), in data-set order) and
    the per-image token statistics averaged over the images (``vwt.token_summary``)."""
    order = batch_order(args, loaded, ds, device, dtype)  # --bucket: neighbours in token count
    mine, done = distributed.shard(order), []  # torchrun: this process's batches (all of them alone)
    for (pixels, _), idx in tqdm(zip(datasets.batches(ds, args.batch, args.workers, mine), mine),
                                 total=len(mine), desc=desc, file=sys.stderr, disable=not distributed.is_main()):
        with torch.inference_mode():
            rows = image_scores(loaded, pixels.to(device, dtype), text).cpu()
        st = stats(loaded.model)
        done.append((idx, rows, {k: st[k] for k in ("tokens_first_block", "tokens_last_block", "tokens_mean")}))
    scores, tokens = [None] * len(ds), []
    for idx, rows, st in distributed.unshard(done):  # every process's batches, in one-process order
        for i, row in zip(idx.tolist(), rows):
            scores[i] = row
        tokens.append(st)
    return torch.stack(scores).numpy(), token_summary(tokens)


def task_metrics(args, loaded, ds, s: np.ndarray) -> dict:
    """The task's metrics from the (images, classes) scores ``s``."""
    recs, out = ds.records, {}
    task = task_of(args.data)
    if task == "groups":
        label, group = [r["label"] for r in recs], [r["group"] for r in recs]
        out.update(metrics.group_accuracy(s.argmax(1), label, group, ds.group_names))
        out.update(metrics.group_loss(s, label, group, ds.group_names))
    elif task == "tags":
        targets = np.zeros_like(s, dtype=bool)
        for i, r in enumerate(recs):
            targets[i, r["labels"]] = True
        out["mAP"], ap = metrics.mean_average_precision(s, targets)
        out["tags_with_positives"] = int(np.isfinite(ap).sum())
    else:
        if s.shape[1] != len(ds.classes):  # labels index the sorted synset folders: all of them must be there
            raise UserError(f"{loaded.name} has {s.shape[1]} classes but {args.data} has {len(ds.classes)} synset "
                            f"folders; the top-1 needs every class folder ({datasets.layout(args.data)})")
        out["top1"] = metrics.top1(s, [r["label"] for r in recs])
    return out


def evaluate(args, loaded, ds, text, device, dtype, desc: str) -> tuple[dict, np.ndarray]:
    """Scores every image, then the task's metrics; also the tokens entering the first block and the
    mean over the blocks (per image). Returns (metrics, the (images, classes) scores)."""
    s, summary = score_images(args, loaded, ds, text, device, dtype, desc)
    out = {k: summary[k] for k in ("tokens_first_block", "tokens_mean")}
    out.update(task_metrics(args, loaded, ds, s))
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
    stem = results.run_stem([f"{args.data}{split}", results.model_label(model_name), method_name(args), first,
                             args.protocol], config)
    return Path(args.out) / "clip" / f"{stem}.json"


def report(result: dict) -> str:
    """The results as clip.py prints them."""
    m = result["metrics"]
    lines = [f"{result['data']}  {result['model']}  {result['method']}  ({result['images']} images, "
             f"seeds {' '.join(map(str, result['seeds']))}, protocol {result['protocol']})"]
    for key in ("avg", "worst", "worst_class", "mAP", "top1"):
        if key in m:
            lines.append(f"  {key:<8} {100 * m[key]['mean']:6.2f} ± {100 * m[key]['std']:.2f}")
    for g, v in m.get("groups", {}).items():
        cell = "n/a" if math.isnan(v["mean"]) else f"{100 * v['mean']:6.2f} ± {100 * v['std']:.2f}"
        lines.append(f"  {g:<22} {cell}")
    lines.append("  " + describe_tokens(m["tokens_first_block"]["mean"], m["tokens_mean"]["mean"]))
    if result.get("note"):
        lines.append(f"  {result['note']}")
    return "\n".join(lines)
