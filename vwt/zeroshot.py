"""Zero-shot evaluation of CLIP-style models, as clip.py runs it: the prompts' text features, every
image's scores, the task's metrics (group accuracy on Waterbirds, CelebA, MetaShift; mAP on OpenImages;
top-1 of a timm classifier on ImageNet), their mean and spread over seeds, the per-image predictions
CSV and the results file's name. ``score_images`` is the one loop over the images."""
from __future__ import annotations

import csv
import io
import math
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import compiling, datasets, distributed, metrics, results
from .batching import batch_order
from .errors import UserError
from .methods import method_name, quantize, reducers_for
from . import models
from .models import Loaded
from .patch import patch, unpatch
from .runtime import (at_least_one, check_input_reducers, environment, nothing_merged_note, resolve_device,
                      resolve_dtype, save_json, seed_everything)
from .patch import describe_tokens, stats, token_summary
from .spec import RunSpec
from .vocab_files import vocab_path

TASKS = ("groups", "tags", "top1")  # the data-set table's tasks clip.py evaluates


@dataclass(frozen=True)
class ZeroShot:
    """clip.py's own settings: the prompt template ({} = class name), class names replacing the data
    set's (comma-separated), --summary (gather results instead of evaluating) and --compile (the
    patched vision tower under torch.compile, :func:`vwt.compiling.compiled_module`; text stays eager)."""

    prompt: str = "a photo of a {}"
    labels: Optional[str] = None
    summary: bool = False
    compile: bool = False


def data_names() -> tuple:
    """The data sets clip.py evaluates: every row of the data-set table with one of ``TASKS``."""
    return datasets.names(TASKS)


def task_of(data: str) -> str:
    return datasets.row(data).task


def _tensor(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; 4.x returns the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_features(loaded, prompts: list[str], device, model_dtype: bool = False) -> torch.Tensor:
    """(len(prompts), D) L2-normalised text embeddings, with the model's own tokenizer (``loaded``:
    a ``vwt.models.Loaded``); float32, or with ``model_dtype`` in the dtype the model gives them (the
    paper's int8 CLIP: float16, normalised in float16 as its ``utils/enc.py``), which
    :func:`image_scores` then computes in."""
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
            out.append(F.normalize(f if model_dtype else f.float(), dim=-1))
    return torch.cat(out)


def image_scores(loaded, pixels: torch.Tensor, text) -> torch.Tensor:
    """(B, classes) float32: cosine similarity to every prompt, computed in the text features' dtype
    (float16 for the paper's int8, then widened, as its clip.py did), or a timm classifier's logits."""
    if loaded.family == "timm":
        return loaded.model(pixels).float()
    if loaded.family == "open_clip":
        f = loaded.model.encode_image(pixels)
    else:
        f = _tensor(loaded.model.get_image_features(pixel_values=pixels))
    return (F.normalize(f.to(text.dtype), dim=-1) @ text.T).float()


PROMPT_HINT = "write {} where the label goes, e.g. 'a photo of a {}' (a literal brace: {{ or }})"


def check_prompt(prompt: str) -> None:
    """A prompt template has ``{}`` where the label goes (repeated is fine) and no other field; anything
    else (no field: every class the same prompt; ``{1}``, ``{label}``, an unclosed ``{``) is a ValueError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as e:
        raise ValueError(f"{prompt!r} is not a prompt template ({e}); {PROMPT_HINT}") from None
    other = [f for f in fields if f not in ("", "0")]
    if other:
        raise ValueError(f"{prompt!r} has the field {{{other[0]}}}, but a prompt gets only the label; {PROMPT_HINT}")
    if not fields:
        raise ValueError(f"{prompt!r} has no {{}} for the label: every class would get the same prompt; {PROMPT_HINT}")
    try:
        prompt.format("label")
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{prompt!r} is not a prompt template ({e}); {PROMPT_HINT}") from None


def check_labels(labels: str) -> list[str]:
    """Comma-separated class names, none empty, none twice (two classes of one name get one prompt: the
    model could not tell them apart); returns the names, else a ValueError."""
    names = [s.strip() for s in labels.split(",")]
    if any(not n for n in names):
        raise ValueError(f"{labels!r} has an empty class name; give one name per class, comma-separated")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{labels!r} names {', '.join(map(repr, twice))} more than once; every class needs its "
                         "own name")
    return names


def class_names(spec: RunSpec, ds) -> list[str]:
    """The prompt labels: the data set's class (or tag) names, or --labels."""
    labels = spec.options.labels
    if labels is None:
        return list(ds.classes)
    try:
        names = check_labels(labels)
    except ValueError as e:
        raise UserError(f"--labels {e}") from None
    if len(names) != len(ds.classes):
        raise UserError(f"--labels gives {len(names)} names; {spec.data} has {len(ds.classes)} classes")
    return names


def check_model_and_data(spec: RunSpec, loaded) -> None:
    """A top-1 data set (ImageNet) needs a timm classifier; the other data sets a CLIP model."""
    if task_of(spec.data) == "top1" and loaded.family != "timm":
        raise UserError(f"--data {spec.data} measures the top-1 of a timm classifier: pass --model timm:NAME")
    if task_of(spec.data) != "top1" and loaded.family not in ("hf_clip", "open_clip"):
        raise UserError(f"zero-shot {spec.data} needs a CLIP model (Hugging Face or open_clip:ARCH/PRETRAINED); "
                        f"{loaded.name} is {loaded.family}")


def default_seeds(spec: RunSpec) -> list[int]:
    """The run's seeds, or the protocol's: the paper's 1 2 3 re-splits of the confounder data sets (seed
    0 for the others, which it ran once), or 0 1 2."""
    if spec.seeds is not None:
        return list(spec.seeds)
    return spec.protocol.seeds_for(datasets.row(spec.data).resplit)


def resplit(spec: RunSpec) -> bool:
    """Whether each seed re-splits the data (the paper's protocol on Waterbirds, CelebA, MetaShift)."""
    return spec.protocol.resplits(datasets.row(spec.data).resplit)


def load_data(spec: RunSpec, seed: int, transform=None):
    """The evaluated split for ``seed``: the paper's re-split of it (see :func:`resplit`), else the fixed one."""
    ds = datasets.load(spec.data, spec.root, transform, split=spec.split,
                       seed=seed if resplit(spec) else None, protocol=spec.protocol, limit=spec.limit)
    if len(ds) == 0:
        raise UserError(f"{spec.data}: no images in split {spec.split or 'default'}")
    return ds


def transform_of(spec: RunSpec, loaded):
    """The preprocessing: the data set's own (the paper's loaders, at the model's input size and
    normalisation) where the protocol says so, else the model's own."""
    own = datasets.preprocess_for(loaded.model)
    if not spec.protocol.data_preprocessing:
        return own
    return datasets.transform_for(spec.data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)


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


def score_images(spec: RunSpec, loaded, ds, text, device, dtype, desc: str) -> tuple[np.ndarray, dict]:
    """The one loop over the images: every image's scores ((images, classes), in data-set order) and
    the per-image token statistics averaged over the images (``vwt.token_summary``)."""
    order = batch_order(spec, loaded, ds, device, dtype)  # bucketing: neighbours in token count
    mine, done = distributed.shard(order), []  # torchrun: this process's batches (all of them alone)
    for (pixels, _), idx in tqdm(zip(datasets.batches(ds, spec.batch, spec.workers, mine), mine),
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


def task_metrics(spec: RunSpec, loaded, ds, s: np.ndarray) -> dict:
    """The task's metrics from the (images, classes) scores ``s``."""
    recs, out = ds.records, {}
    task = task_of(spec.data)
    if task == "groups":
        label, group = [r["label"] for r in recs], [r["group"] for r in recs]
        out.update(metrics.group_accuracy(s.argmax(1), label, group, ds.group_names))
        out.update(metrics.group_loss(s, label, group, ds.group_names))
    elif task == "tags":
        targets = np.zeros_like(s, dtype=bool)
        for i, r in enumerate(recs):
            targets[i, r["labels"]] = True
        out["mAP"], _ = metrics.mean_average_precision(s, targets, paper=spec.protocol.paper_map)
        out["tags_with_positives"] = int(targets.any(0).sum())
    else:
        if s.shape[1] != len(ds.classes):  # labels index the sorted synset folders: all of them must be there
            raise UserError(f"{loaded.name} has {s.shape[1]} classes but {spec.data} has {len(ds.classes)} synset "
                            f"folders; the top-1 needs every class folder ({datasets.layout(spec.data)})")
        out["top1"] = metrics.top1(s, [r["label"] for r in recs])
    return out


def evaluate(spec: RunSpec, loaded, ds, text, device, dtype, desc: str) -> tuple[dict, np.ndarray]:
    """Scores every image, then the task's metrics; also the tokens entering the first block and the
    mean over the blocks (per image). Returns (metrics, the (images, classes) scores)."""
    s, summary = score_images(spec, loaded, ds, text, device, dtype, desc)
    out = {k: summary[k] for k in ("tokens_first_block", "tokens_mean")}
    out.update(task_metrics(spec, loaded, ds, s))
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
        elif key in ("counts", "seed", "vocab_path", "predictions", "compile"):
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


def results_path(spec: RunSpec, model_name: str) -> Path:
    """<out>/clip/<data>__<model>__<method>[__first<N>]__<protocol>__<hash>.json: the hash covers the
    whole configuration (dtype, vocabulary file, seeds, ...), so two different runs never share a file."""
    split = f"-{spec.split}" if spec.split else ""
    first = f"first{spec.limit}" if spec.limit else ""
    config = {**results.config_of(spec), "model": model_name}
    stem = results.run_stem([f"{spec.data}{split}", results.model_label(model_name), method_name(spec), first,
                             spec.protocol.name], config)
    return Path(spec.out) / "clip" / f"{stem}.json"


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
    if result.get("compile"):
        lines.extend("  " + line for line in compiling.describe(result["compile"]))
    if result.get("note"):
        lines.append(f"  {result['note']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The experiment: run(spec)
# --------------------------------------------------------------------------------------------------
def model_for(spec: RunSpec, loaded: Optional[Loaded], device, dtype) -> Loaded:
    """The model: ``loaded`` (tests) moved to the device, or the spec's model with pretrained weights
    (zero-shot accuracy of random weights means nothing)."""
    if loaded is not None:
        loaded.model.to(device=device, dtype=dtype).eval()
        return loaded
    no_weights = spec.model.startswith("open_clip:") and "/" not in spec.model
    loaded = None if no_weights else models.load_model(spec.model, device, dtype)
    if loaded is None or not loaded.pretrained:
        raise UserError(f"{spec.model} has no pretrained weights (open_clip names need /PRETRAINED, e.g. "
                        "open_clip:ViT-B-16/openai): zero-shot accuracy of random weights means nothing")
    return loaded


@dataclass
class Prepared:
    """A zero-shot run ready to score: the model, each seed's reducers (built once), the preprocessing,
    the class names and their text features, and the tokens an image has without reduction."""

    loaded: Loaded
    reducers: dict
    transform: object
    names: list
    text: Optional[torch.Tensor]
    full: int


def prepare(spec: RunSpec, loaded: Optional[Loaded], device, dtype) -> Prepared:
    """Everything before the first image: bad flags, missing data, an image of any seed's split that
    cannot be opened and every seed's vocabulary fail here, before any image is scored; int8 as the protocol orders it (the paper's text features come
    from its whole-model int8; otherwise from the float model, then the vision tower is quantized)."""
    seeds = default_seeds(spec)
    reducers_for(spec, seed=seeds[0])  # bad flags and missing data fail before the model loads
    ds = load_data(spec, seeds[0])
    datasets.check_images(ds, *(load_data(spec, s) for s in seeds[1:]))  # every seed's images, before any is scored
    loaded = model_for(spec, loaded, device, dtype)
    check_model_and_data(spec, loaded)
    transform = transform_of(spec, loaded)
    reducers = {seed: reducers_for(spec, seed=seed, family=loaded.family) for seed in seeds}
    full = 0
    for seed in seeds:  # every seed's vocabulary must fit the model before any image is scored
        full = check_input_reducers(loaded.vision, reducers[seed], transform.size, device, dtype,
                                    preprocess=transform)
    names = class_names(spec, ds)
    quant_first = spec.method.quant and spec.protocol.whole_model_int8
    if quant_first:
        quantize(loaded.model, spec.protocol, loaded.family)
    prompts = [spec.options.prompt.format(n) for n in names]
    text = None if loaded.family == "timm" else text_features(
        loaded, prompts, device, model_dtype=quant_first and spec.protocol.int8_float16_scores)
    if spec.method.quant and not quant_first:
        quantize(loaded.model, spec.protocol, loaded.family)
    return Prepared(loaded, reducers, transform, names, text, full)


def evaluate_seed(spec: RunSpec, prep: Prepared, ds, seed: int, device, dtype) -> tuple[dict, np.ndarray, dict]:
    """:func:`evaluate` of one seed's split on the patched model; with --compile its vision tower
    compiled for the seed (``dynamic`` where an input reducer varies the token count), and the third
    value ``{"compile": what the compiler did}`` (vwt.compiling); else ``{}``."""
    desc = f"{spec.data} seed {seed}"
    if not spec.options.compile:
        return (*evaluate(spec, prep.loaded, ds, prep.text, device, dtype, desc), {})
    with compiling.compiled_pass(prep.loaded.vision, prep.reducers[seed], "vision tower") as record:
        run, scores = evaluate(spec, prep.loaded, ds, prep.text, device, dtype, desc + " (compiled)")
    return run, scores, {"compile": record}


def run_seeds(spec: RunSpec, prep: Prepared, seeds: list, device, dtype) -> tuple[list, object]:
    """Score every seed's split with its reducers; each seed's predictions CSV is written as it ends.
    Returns (per-seed runs, the last seed's data set)."""
    loaded, stem, runs, ds = prep.loaded, results_path(spec, prep.loaded.name).with_suffix(""), [], None
    try:
        for seed in seeds:
            ds = load_data(spec, seed, prep.transform)
            seed_everything(seed)
            patch(loaded.model, *prep.reducers[seed])
            run, scores, compiled = evaluate_seed(spec, prep, ds, seed, device, dtype)
            preds = stem.parent / f"{stem.name}.seed{seed}.predictions.csv"
            if distributed.is_main():  # torchrun: every process has every score; the main one writes
                write_predictions(preds, ds, scores)
            vocab = vocab_path(spec, seed=seed)
            runs.append({"seed": seed, "vocab_path": None if vocab is None else str(vocab),
                         "images": len(ds), "predictions": str(preds), **run, **compiled})
    finally:
        unpatch(loaded.model)
    return runs, ds


def run(spec: RunSpec, loaded: Optional[Loaded] = None) -> Optional[dict]:
    """Zero-shot accuracy of ``spec`` (clip.py's experiment): every seed's split scored with its
    reducers, the task's metrics with their mean and spread over the seeds, the results file and one
    predictions CSV per seed under ``<out>/clip/``. ``loaded`` (tests) is used as it is, random weights
    included. A configuration with nothing random (one split, no random ablation, one vocabulary for
    every seed) runs once, since every seed would give the same numbers. Returns the results (None on
    torchrun's other processes)."""
    spec = spec.with_options(ZeroShot)
    at_least_one(spec, "batch", "limit")
    try:
        check_prompt(spec.options.prompt)
    except ValueError as e:
        raise UserError(f"--prompt {e}") from None
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    results.writable_dir(Path(spec.out) / "clip")
    started = time.time()
    prep = prepare(spec, loaded, device, dtype)
    if not prep.loaded.pretrained:
        print("warning: evaluating random weights (test hook)", file=sys.stderr)
    seeds = default_seeds(spec)
    vocabs = {s: vocab_path(spec, seed=s) for s in seeds}
    deterministic = not spec.method.random and not resplit(spec) and len(set(vocabs.values())) <= 1
    seeds = seeds[:1] if deterministic else seeds
    runs, ds = run_seeds(spec, prep, seeds, device, dtype)
    if not distributed.is_main():
        return None
    agg, summary = aggregate(runs)
    result = {
        "task": "clip", "protocol": spec.protocol.name, "model": prep.loaded.name, "pretrained": prep.loaded.pretrained,
        "method": method_name(spec),
        "data": spec.data + (f"-{spec.split}" if spec.split else "") + (f" (first {spec.limit})" if spec.limit else ""),
        "split": spec.split, "resplit_per_seed": resplit(spec), "images": len(ds), "prompt": spec.options.prompt,
        "labels": prep.names if task_of(spec.data) == "groups" else None,
        "seeds": seeds, "deterministic": deterministic, "runs": runs, "metrics": agg, "summary": summary,
        "config": results.config_of(spec),
        "environment": environment(device), "seconds": time.time() - started,
    }
    result["note"] = nothing_merged_note(prep.reducers[seeds[0]], prep.full, agg["tokens_first_block"]["mean"],
                                         agg["tokens_mean"]["mean"])
    if spec.options.compile:
        result["compile"] = compiling.combined([r["compile"] for r in runs])
    save_json(results_path(spec, prep.loaded.name), result)
    return result
