"""What every experiment's run does besides its own work, in one place each: the device and dtype a
spec names, seeding, the machine and versions a results file records, the check that the methods fit
the model before any image is read, the note for a run that removed nothing, and saving finished
results so that they are never lost. ``vwt.cli`` re-exports these for the scripts."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import distributed, metrics
from .errors import UserError
from .results import write_json
from .tokenizer import tokenize


# --------------------------------------------------------------------------------------------------
# Devices and seeds
# --------------------------------------------------------------------------------------------------
SEED_MAX = 2 ** 32 - 1  # NumPy's seeds (np.random.seed): 0 to 2^32 - 1; Python and torch take these too


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the random ablations draw from torch); a seed
    outside 0 to 2^32 - 1 is a one-line UserError (the scripts' argparse refuses it first)."""
    import random

    import numpy as np

    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed {seed} is outside 0 to {SEED_MAX} (2^32 - 1), the seeds NumPy takes")

    seed = distributed.seed(seed)  # under torchrun every process draws its own numbers (rank 0: seed itself)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


DEVICE_HINT = "use --device cpu, cuda, cuda:N, mps or auto"


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch.device that exists on this machine; anything else is a one-line UserError
    (an unknown name, CUDA or MPS where the build or machine has none, a CUDA index out of range)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name!r} is not a device name; {DEVICE_HINT}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {name}: this PyTorch build or machine has no MPS (Apple GPU) device; "
                            "use --device cpu")
        return dev
    raise UserError(f"--device {name}: the scripts run on cpu, cuda and mps devices; {DEVICE_HINT}")


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------
def environment(device: Optional[torch.device] = None) -> dict:
    """Library versions and the machine, recorded in every results file."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "transformers", "timm", "open_clip_torch", "torchao", "bitsandbytes",
                "scikit-learn", "faiss-cpu", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# --------------------------------------------------------------------------------------------------
# Bad input found before the long work starts, and finished work that is never lost
# --------------------------------------------------------------------------------------------------
def at_least_one(run, *names: str) -> None:
    """Refuse integer settings (``--limit``, ``--batch``, ...) below 1 where they are given (``run``: a
    RunSpec, or a mapping of settings by their command-line names)."""
    given = run if isinstance(run, dict) else run.config() if hasattr(run, "config") else vars(run)
    for name in names:
        value = given.get(name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1; got {v}")


def save_json(path: Path, payload: Any) -> Path:
    """Write a finished run's results atomically; where that fails (the folder went away, the disk is
    full) the results go to the temporary-files folder instead, and a one-line UserError says where
    (vwt.results.write_files, the one writer). Returns where they went."""
    return write_json(path, payload)


def check_input_reducers(vision: nn.Module, reducers: list, image_size: int, device=None, dtype=None,
                         preprocess=None) -> int:
    """Run the input reducer (if any) on one blank image, before any data: a vocabulary that does not
    fit the model (patch size, space, width, or ``preprocess``'s normalisation where given:
    ``Vocabulary.check_normalisation``) or an intra-image drop that keeps no patch is a one-line
    UserError now rather than a traceback later. Returns the tokens an image has without reduction."""
    blank = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    state, _ = tokenize(vision, None, blank)
    full = state.num_tokens
    for r in reducers:
        if getattr(r, "kind", None) != "input":
            continue
        try:
            tokenize(vision, r, blank)
            if preprocess is not None and getattr(r, "vocab", None) is not None:
                r.vocab.check_normalisation(getattr(preprocess, "mean", None), getattr(preprocess, "std", None))
        except ValueError as e:
            raise UserError(str(e)) from None
    return full


def nothing_merged_note(reducers: list, full: int, tokens_first: float, tokens_mean: float) -> Optional[str]:
    """The summary line's note when legal settings removed no token on this data (e.g. --thresh 0, or
    a vocabulary far from these images), so such a run is never mistaken for a reduced one."""
    if not reducers:
        return None
    inputs = [r for r in reducers if getattr(r, "kind", None) == "input"]
    if inputs and tokens_first >= full and tokens_mean >= full:
        return (f"note: the methods removed no token on this data (every image kept all {full} tokens): "
                "the run equals the unreduced model" + ("; raise --thresh or check the vocabulary"
                                                        if any(hasattr(r, "vocab") for r in inputs) else ""))
    if not inputs and tokens_mean >= full:
        return f"note: the methods removed no token on this data (every block kept all {full} tokens)"
    return None


def write_summary(folder: Path, script: str) -> None:
    """``--summary``: gather ``script``'s results files under ``folder`` into summary.md and summary.csv
    (a folder without any, or with only other JSON files, is a one-line error, never an empty table; a
    malformed results file is one too: ``vwt.metrics.read_results``)."""
    if not folder.is_dir() or not metrics.read_results(p for p in folder.rglob("*.json") if p.name != "summary.json"):
        raise UserError(f"no {script} results under {folder} to summarise: run {script} first, or pass the --out "
                        "the runs used")
    md, csv_path, table = metrics.write_summary(folder)
    print(table + f"\nwritten: {md}, {csv_path}")
