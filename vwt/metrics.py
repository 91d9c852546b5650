"""Accuracy metrics of the paper's tables, and the table itself.

* ``group_accuracy``: average accuracy (over all samples), every group's accuracy and the worst
  group's, as reported for Waterbirds, CelebA and MetaShift.
* ``average_precision`` / ``mean_average_precision``: the non-interpolated AP of scikit-learn's
  ``average_precision_score`` (tied scores form one threshold), averaged over the tags that have a
  positive image (OpenImages common and rare); ``paper_average_precision``: the paper's ``get_mAP``.
* ``caption_scores``: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where its Stanford CoreNLP jars are
  installed) with pycocoevalcap, after its PTB tokenization: the same numbers as its ``COCOEvalCap``.
* ``summarise``: results files -> the paper-style table (Markdown and CSV), one row per model and method.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import UserError, first_line


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
def group_accuracy(pred: Sequence[int], label: Sequence[int], group: Sequence[int],
                   group_names: Sequence[str]) -> dict:
    """Average accuracy over all samples, each group's accuracy (None for a group without samples),
    the worst group's accuracy (over the groups present), the worst class's accuracy (over the labels
    present; the paper's "worst-class acc") and each group's sample count."""
    pred, label, group = (np.asarray(a).reshape(-1) for a in (pred, label, group))
    if not (len(pred) == len(label) == len(group)) or len(pred) == 0:
        raise ValueError(f"group_accuracy needs equally long, non-empty inputs; got {len(pred)}, {len(label)}, {len(group)}")
    correct = pred == label
    groups, counts = {}, {}
    for g, name in enumerate(group_names):
        members = group == g
        counts[name] = int(members.sum())
        groups[name] = float(correct[members].mean()) if counts[name] else None
    present = [a for a in groups.values() if a is not None]
    worst_class = min(float(correct[label == c].mean()) for c in np.unique(label))
    return {"avg": float(correct.mean()), "worst": min(present), "worst_class": worst_class, "groups": groups,
            "counts": counts}


def group_loss(scores, label: Sequence[int], group: Sequence[int], group_names: Sequence[str]) -> dict:
    """The paper's loss lines: cross-entropy of the scores as logits (for zero-shot CLIP the cosine
    similarities, unscaled, as the paper's code feeds them), averaged over all samples ("loss") and
    within each group ("group_loss", None for a group without samples)."""
    scores = np.asarray(scores, dtype=np.float64)
    label, group = np.asarray(label).reshape(-1), np.asarray(group).reshape(-1)
    top = scores.max(1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(scores - top).sum(1))
    ce = log_z - scores[np.arange(len(label)), label]
    per_group = {name: (float(ce[group == g].mean()) if (group == g).any() else None)
                 for g, name in enumerate(group_names)}
    return {"loss": float(ce.mean()), "group_loss": per_group}


def top1(logits, label) -> float:
    """Fraction of samples whose highest-scoring class is the label."""
    logits, label = np.asarray(logits), np.asarray(label)
    return float((logits.argmax(1) == label).mean())


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """AP of one ranking: sum over distinct score thresholds (high to low) of (recall gain) x precision,
    ties counted together. NaN when there is no positive."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of every run of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def paper_average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """AP as the paper's ``utils/metrics.py`` (``get_mAP``) computes it: the images ranked one by one
    (no tie thresholds) by an ascending sort reversed, so among equal scores the later image ranks
    first (a stable sort here: numpy's default quicksort keeps equal scores in index order below 17
    items, and may permute larger tied runs); the precision at each positive, summed, over the number of
    positives + 1e-8. A tag without a positive image scores 0."""
    scores = np.asarray(scores).reshape(-1)  # as given: float16 scores tie where float32 ones would not
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    y = positive[np.argsort(scores, kind="stable")[::-1]]
    precision = np.cumsum(y)[y] / (np.flatnonzero(y) + 1)
    return float(precision.sum() / (y.sum() + 1e-8))


def mean_average_precision(scores, targets, paper: bool = False) -> tuple[float, np.ndarray]:
    """Scores and 0/1 targets (images, tags) -> (mAP, per-tag AP). Default: scikit-learn's AP
    (:func:`average_precision`) averaged over the tags with a positive, NaN for the others; ``paper``:
    the paper's AP (:func:`paper_average_precision`) averaged over every tag, 0 for those without one."""
    scores, targets = np.asarray(scores), np.asarray(targets).astype(bool)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must both be (images, tags); got {scores.shape} and {targets.shape}")
    ap_of = paper_average_precision if paper else average_precision
    ap = np.array([ap_of(scores[:, t], targets[:, t]) for t in range(scores.shape[1])])
    return (float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")), ap


def dense_label_counts(keys, size: int) -> np.ndarray:
    """The paper's visual-word frequency (its len.py ``--metric freq``), summed over images: ``keys``
    (images, patches) holds each patch's matched word id, -1 where unmatched. The paper labels an image's
    patches densely: its distinct matched words in ascending id order get labels 0..k-1, each unmatched
    patch its own label after them (in patch order); it counts the patches per label below ``size``.
    Returns those (size,) counts; the paper's figure divides them by their sum."""
    out = np.zeros(size, dtype=np.int64)
    for row in np.asarray(keys).reshape(len(keys), -1):
        _, per_word = np.unique(row[row >= 0], return_counts=True)
        per_label = np.concatenate([per_word, np.ones(int((row < 0).sum()), dtype=np.int64)])[:size]
        out[:len(per_label)] += per_label
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of runs over seeds."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def spice_available() -> tuple[bool, str]:
    """Whether pycocoevalcap's SPICE can run here: Java and its Stanford CoreNLP 3.6.0 jars (which it
    would otherwise try to download at first use)."""
    try:
        import pycocoevalcap.spice as spice
    except ImportError as e:
        return False, f"pycocoevalcap is not installed ({e})"
    lib = Path(spice.__file__).parent / "lib"
    missing = [f for f in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / f).exists()]
    if missing:
        return False, f"Stanford CoreNLP jars {', '.join(missing)} missing in {lib}"
    if shutil.which("java") is None:
        return False, "java not found"
    return True, ""


def check_caption_tools() -> None:
    """What every caption metric needs, checked without running it: pycocoevalcap, and Java for its PTB
    tokenizer and METEOR. Either missing is a one-line UserError, so that a run can refuse before its
    long work rather than after it (SPICE's extra jars are optional: see :func:`spice_available`)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise UserError(f"caption metrics need pycocoevalcap ({first_line(e)}); pip install pycocoevalcap") from None
    if shutil.which("java") is None:
        raise UserError("caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR), and no java is on "
                        "PATH; install a JRE")


def caption_scores(references: dict, candidates: dict, spice: Optional[bool] = None,
                   which: Sequence[str] = CAPTION_METRICS) -> dict:
    """pycocoevalcap's scores of one candidate caption per image against its references.

    references: {image_id: [caption, ...]}, candidates: {image_id: caption}, the same ids. Both are
    PTB-tokenized (lower case, punctuation removed) as ``COCOEvalCap`` does. Returns {metric: score}
    with the scores as pycocoevalcap gives them (fractions; CIDEr can exceed 1), "SPICE" None with a
    "SPICE_note" saying why when SPICE cannot run. ``spice`` False skips it; None runs it if available.
    ``which`` limits the metrics computed (e.g. CIDEr alone per NoCaps domain, without METEOR's slow
    Java start-up)."""
    if set(references) != set(candidates):
        raise ValueError("caption_scores: references and candidates must cover the same image ids")
    if not references:
        raise ValueError("caption_scores: no captions to score")
    check_caption_tools()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(references, key=str)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    unknown = set(which) - set(CAPTION_METRICS)
    if unknown:
        raise ValueError(f"caption_scores: unknown metrics {sorted(unknown)}; known: {CAPTION_METRICS}")
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        if any(m.startswith("BLEU") for m in which):
            bleu, _ = Bleu(4).compute_score(gts, res)
            out.update({f"BLEU-{n}": b for n, b in enumerate(bleu, 1) if f"BLEU-{n}" in which})
        if "METEOR" in which:
            meteor = Meteor()
            try:
                out["METEOR"] = meteor.compute_score(gts, res)[0]
            except ValueError as e:
                raise UserError(f"METEOR failed (pycocoevalcap's meteor-1.5.jar under Java): {e}") from None
            finally:
                del meteor
        if "ROUGE-L" in which:
            out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
        if "CIDEr" in which:
            out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if "SPICE" not in which:
        return {k: float(v) for k, v in sorted(out.items(), key=lambda kv: CAPTION_METRICS.index(kv[0]))}
    out.update(_spice(gts, res, spice))
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in
            sorted(out.items(), key=lambda kv: (CAPTION_METRICS + ("SPICE_note",)).index(kv[0]))}


def _spice(gts: dict, res: dict, spice: Optional[bool]) -> dict:
    """{"SPICE": score} where SPICE runs, else {"SPICE": None, "SPICE_note": why}."""
    ok, why = spice_available() if spice is not False else (False, "not asked for")
    if ok:
        from pycocoevalcap.spice.spice import Spice

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return {"SPICE": Spice().compute_score(gts, res)[0]}
        except Exception as e:  # the jar fails on some Java versions: report, never invent a number
            why = f"SPICE failed: {first_line(e)}"
    return {"SPICE": None, "SPICE_note": f"SPICE unavailable: {why}"}


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (list, tuple)):
        mean, std = v
        return "n/a" if mean is None else f"{mean:.1f} ± {std:.1f}"
    return f"{v:.1f}" if isinstance(v, (int, float)) else str(v)


def _order(method: str) -> tuple:
    return (method != "base", method)


def read_results(paths: Iterable[Path]) -> list[tuple[Path, dict]]:
    """The results files among ``paths`` (JSON objects with "summary" and "method"), in name order; other
    JSON (predictions, sidecars) is passed over. A results file of the wrong shape is a one-line
    UserError naming it, never a traceback or a row of nonsense."""
    found = []
    for path in sorted(Path(p) for p in paths):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(r, dict) or "summary" not in r or "method" not in r:
            continue
        why = _malformed(r)
        if why:
            raise UserError(f"{path} is not a results file of these scripts ({why}): move it out of {path.parent}, "
                            "or rerun the run that wrote it")
        found.append((path, r))
    return found


def _malformed(r: dict) -> Optional[str]:
    """What makes a JSON object with "summary" and "method" no results file (None: nothing)."""
    if not isinstance(r["summary"], dict):
        return f"'summary' must be an object of metric: value; got a JSON {type(r['summary']).__name__}"
    for key in ("model", "method", "data"):
        if not isinstance(r.get(key), str):
            return f"no '{key}' text" if key not in r else f"'{key}' must be text; got {r[key]!r}"
    for metric, v in r["summary"].items():
        pair = isinstance(v, list) and len(v) == 2
        if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in (v if pair else [v])):
            return f"summary value {metric!r} is {v!r}, not a number, null or [mean, std]"
    return None


def summarise(paths: Iterable[Path]) -> tuple[str, str]:
    """Results files -> (Markdown table, CSV text). A results file carries "model", "method", "data" and
    "summary" ({metric: value or [mean, std]}, in percent); rows are (model, method) with the base model
    first, columns (data, metric) in order of appearance. The machines the numbers came from are listed
    under the Markdown table."""
    rows: dict = {}
    columns: list = []
    machines = set()
    for path, r in read_results(paths):
        env = r.get("environment") if isinstance(r.get("environment"), dict) else {}
        machines.add(env.get("gpu") or f"{env.get('processor', '?')} CPU ({env.get('cpu_count', '?')} cores)")
        for metric, value in r["summary"].items():
            col = (r["data"], metric)
            if col not in columns:
                columns.append(col)
            rows.setdefault((r["model"], r["method"]), {})[col] = value
    keys = sorted(rows, key=lambda k: (k[0], _order(k[1])))
    head = ["model", "method"] + [f"{d} {m}" for d, m in columns]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        md.append("| " + " | ".join(list(k) + [_cell(rows[k].get(c)) for c in columns]) + " |")
    if machines:
        md += ["", "Machines: " + "; ".join(sorted(machines)) + "."]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "method"] + [x for d, m in columns for x in (f"{d} {m}", f"{d} {m} std")])
    for k in keys:
        cells = []
        for c in columns:
            v = rows[k].get(c)
            mean, std = (v if isinstance(v, (list, tuple)) else (v, None))
            cells += ["" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
        w.writerow(list(k) + cells)
    return "\n".join(md) + "\n", buf.getvalue()


def write_summary(folder: Path) -> tuple[Path, Path, str]:
    """Gather every results file under ``folder`` into summary.md and summary.csv there."""
    from .results import atomic_write_text

    folder = Path(folder)
    files = [p for p in folder.rglob("*.json") if p.name != "summary.json"]
    md, text = summarise(files)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "summary.md", md)
    atomic_write_text(folder / "summary.csv", text)
    return folder / "summary.md", folder / "summary.csv", md
