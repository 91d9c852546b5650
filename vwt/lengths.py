"""len.py's experiment as a library call: how many tokens each image keeps after the VWT tokenizer (the
input reducer: inter-image with a vocabulary, intra-image with ``top_k``), over the data set and per
group, and how often each visual word is used (ours, and the paper's len.py --metric freq). Only the
embedding and the tokenizer run, no transformer block.

    from vwt import lengths
    from vwt.spec import Recipe, RunSpec
    lengths.run(RunSpec(data="samples", batch=32, method=Recipe(top_k=0.5)))

:func:`run` writes ``<out>/len/<data>__<model>__<method>__<hash>.json`` and the same name ``.png``,
prints the summary len.py shows, and returns the results.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import datasets, distributed, methods, metrics, models, results, runtime, vocab_files
from .errors import UserError
from .models import Loaded
from .patch import token_stats
from .spec import RunSpec
from .tokenizer import InterImage, tokenize


@dataclass(frozen=True)
class Options:
    """len.py's own settings, named as its flags: ``max_images`` counts only the first N images;
    ``seed`` is the paper's re-split (and that seed's vocabulary) to count on (None: see :func:`seeded`)."""

    max_images: Optional[int] = None
    seed: Optional[int] = None


def summary(counts: np.ndarray) -> dict:
    """Count, mean, std with ddof 1 (pandas describe(), as the paper reports; 0 for one image), min, max."""
    std = float(counts.std(ddof=1)) if counts.size > 1 else 0.0
    return {"images": int(counts.size), "mean": float(counts.mean()), "std": std,
            "min": int(counts.min()), "max": int(counts.max())}


def check(spec: RunSpec) -> None:
    """Refuse what len.py cannot count: sizes below 1, and methods other than an input reducer (only
    the tokenizer runs, so an in-network reducer or int8 would change nothing it measures)."""
    runtime.at_least_one(spec, "batch", "max_images")
    others = [m for m in methods.rows() if m.kind != "input"]
    if any(methods.given(getattr(spec.method, m.dest)) for m in others):
        inputs = " or ".join(m.flag for m in methods.rows("input"))
        raise UserError(f"len.py counts the tokens the VWT tokenizer leaves: use {inputs}, "
                        f"not {'/'.join(m.flag for m in others)}")


def seeded(spec: RunSpec) -> RunSpec:
    """The spec with its seed settled and that seed's vocabulary named in ``vocab_path`` (see
    vocab_files.vocab_path). Default seed for the re-split data sets where the protocol re-splits: the
    seed of the vocabulary the settings find (a seed_<N> / -seed<N> folder), else ``protocol.len_seed``
    (the paper's frequency figure's); none otherwise."""
    if spec.options.seed is None and spec.protocol.resplits(datasets.row(spec.data).resplit):
        found = vocab_files.vocab_path(spec)
        learned = re.fullmatch(r"(?:seed_|v\d+-seed)(\d+)", found.parent.name) if found is not None else None
        spec = spec.replace(seed=int(learned.group(1)) if learned else spec.protocol.len_seed)
    if spec.method.vocab_path is None and spec.method.vocab is not None:
        spec = spec.replace(vocab_path=vocab_files.vocab_path(spec, seed=spec.options.seed))
    return spec


def settle(spec: RunSpec) -> RunSpec:
    """The spec checked (:func:`check`) and seeded (:func:`seeded`); a spec without options gets the
    defaults. Settling a settled spec changes nothing."""
    spec = spec.with_options(Options)
    check(spec)
    return seeded(spec)


def data_for(spec: RunSpec, own: datasets.Preprocess):
    """The images to count, with the protocol's preprocessing (the paper's for the data set at the
    model's size and normalisation, or the model's own) and split (the seed's re-split under paper)."""
    pre = (datasets.transform_for(spec.data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)
           if spec.protocol.data_preprocessing else own)
    return datasets.load(spec.data, spec.root, pre, split=spec.split, seed=spec.options.seed, protocol=spec.protocol,
                         limit=spec.options.max_images)


def results_paths(spec: RunSpec, model_name: str) -> tuple[Path, Path]:
    """The results JSON and figure of a run of ``model_name``: named by data, model and method, and a
    hash of the whole configuration (runs that differ in anything never share a file)."""
    config = {**results.config_of(spec), "model": model_name}
    stem = results.run_stem([spec.data, results.model_label(model_name), methods.method_name(spec)], config)
    folder = Path(spec.out) / "len"
    return folder / f"{stem}.json", folder / f"{stem}.png"


def run(spec: RunSpec, loaded: Optional[Loaded] = None) -> Optional[dict]:
    """Count the tokens ``spec``'s input reducer leaves on every image of ``spec.data``; write the
    results JSON and figure, print the summary and return the results (None on the processes of a
    torchrun other than the main one). ``loaded`` replaces ``spec.model`` with a loaded model."""
    spec = settle(spec)
    if spec.bucket:  # accepted like every script's data flags, so one command line serves them all
        print("note: len.py runs only the tokenizer, which pads nothing: --bucket changes nothing here")
    reducers = methods.reducers_for(spec)
    if not reducers:
        raise UserError("choose a tokenizer: --vocab SIZE (or --vocab-path FILE) for inter-image, --top_k DROP for "
                        "intra-image, --resize SIZE for a smaller image")
    reducer = reducers[0]
    device, dtype = runtime.resolve_device(spec.device), runtime.resolve_dtype(spec.dtype)
    results.writable_dir(Path(spec.out) / "len")
    datasets.check_images(datasets.load(spec.data, spec.root, None, split=spec.split, seed=spec.options.seed,
                                        protocol=spec.protocol, limit=spec.options.max_images))  # missing: fail now
    if loaded is None:
        pixel = getattr(getattr(reducer, "vocab", None), "space", "pixel") == "pixel"  # counts need no weights
        loaded = models.load_model(spec.model, device, dtype, fallback_random=pixel, needs="vision")
    pre = datasets.preprocess_for(loaded.model)
    data = data_for(spec, pre)
    if len(data) == 0:
        raise UserError(f"{spec.data}: no images in the chosen split")
    full = runtime.check_input_reducers(loaded.vision, reducers, pre.size, device, dtype, preprocess=pre)

    per_batch = distributed.unshard(count_batches(spec, loaded, reducer, data, device, dtype))
    if not distributed.is_main():  # under torchrun: the main process writes and prints
        return None
    result, counts, words, paper_words = tabulate(spec, loaded, reducers, full, per_batch, data, device)
    json_path, png_path = results_paths(spec, loaded.name)
    runtime.save_json(json_path, result)
    figure(png_path, counts, words, f"{spec.data}: {result['method']} ({loaded.name})", paper_words)
    print(report(result, per_batch[0]["patches"] + per_batch[0]["prefix"], json_path, png_path))
    return result


def tabulate(spec: RunSpec, loaded: Loaded, reducers: list, full: int, per_batch: list[dict], data, device) -> tuple:
    """The results of the batches' counts: the summary over the data set and per group, the word
    counts and frequencies (inter-image), the per-image counts. Returns (result, counts, word counts,
    the paper's word counts)."""
    reducer = reducers[0]
    inter = reducer if isinstance(reducer, InterImage) else None
    counts = torch.cat([b["counts"] for b in per_batch]).numpy()
    groups = np.asarray([g for b in per_batch for g in b["groups"]])
    words = sum(b["words"] for b in per_batch) if inter is not None else None
    paper_words = sum(b["paper_words"] for b in per_batch) if inter is not None else None
    result = {
        "data": spec.data, "split": spec.split, "model": loaded.name, "method": methods.method_name(spec),
        "reducer": repr(reducer), "tokens_include_class_token": True,
        "patches_per_image": per_batch[0]["patches"], "tokens": summary(counts),
        "groups": {}, "config": results.config_of(spec),
        "environment": runtime.environment(device),
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
    result["note"] = runtime.nothing_merged_note(reducers, full, float(counts.min()), float(counts.min()))
    return result, counts, words, paper_words


def report(result: dict, tokens: int, *written: Path) -> str:
    """The summary len.py prints: tokens per image of ``tokens`` (an image's tokens before the
    tokenizer), the note, each group, the files written."""
    t = result["tokens"]
    lines = [f"{result['data']} {result['method']}: tokens per image {t['mean']:.2f} ± {t['std']:.2f} "
             f"(min {t['min']}, max {t['max']}) of {tokens}"]
    if result["note"]:
        lines.append(result["note"])
    for name, s in result["groups"].items():
        lines.append(f"  {name}: {s['mean']:.2f} ± {s['std']:.2f} (min {s['min']}, max {s['max']}, "
                     f"{s['images']} images)")
    return "\n".join(lines + [f"written: {', '.join(map(str, written))}"])


def count_batches(spec: RunSpec, loaded: Loaded, reducer, data, device, dtype) -> list[dict]:
    """Per batch (this process's share under torchrun, see vwt.distributed): the tokens entering the first
    block of each image, its group, and the batch's visual-word counts (ours and the paper's)."""
    from tqdm import tqdm

    from .vis import MatchRecorder

    inter = reducer if isinstance(reducer, InterImage) else None
    recorder = MatchRecorder(inter) if inter is not None else None
    mine = distributed.shard(list(torch.arange(len(data)).split(spec.batch)))
    out = []
    try:
        for pixels, records in tqdm(datasets.batches(data, spec.batch, spec.workers, mine), desc=f"len {spec.data}",
                                    unit="batch", total=len(mine), disable=not distributed.is_main()):
            try:
                state, _ = tokenize(loaded.vision, reducer, pixels.to(device, dtype))
            except ValueError as e:  # a vocabulary that does not fit the model
                raise UserError(str(e)) from None
            out.append({"counts": token_stats(state.layer_counts())["tokens_first_block"].long().cpu(),
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
