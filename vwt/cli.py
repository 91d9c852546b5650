"""Argument parsing and plumbing shared by the scripts: the option groups, devices, one-line errors
for bad input, results files and their summaries. The library never imports this module; the
library names the scripts use are imported here so that a script needs ``vwt.cli`` and ``vwt``."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import distributed, methods, metrics, protocol, vocab_files
# re-exported for the scripts: the library's own definitions, in one place each
from .batching import batch_order  # noqa: F401
from .errors import UserError, first_line  # noqa: F401
from .methods import PAPER_FAMILIES, build_reducers, check_methods, method_label, quantize  # noqa: F401
from .models import (DEFAULT_BLIP, DEFAULT_CLIP, HUB_TIMEOUT, Loaded, fill_random, go_offline,  # noqa: F401
                     hub_reachable, load_model)
from .patch import describe_tokens  # noqa: F401
from .results import model_label, write_json, writable_dir  # noqa: F401
from .tokenizer import tokenize
from .spec import SETTINGS, Recipe, RunSpec
from .vocab_files import read_vocabulary, samples_vocabulary, tokenizer_dir, vocab_candidates  # noqa: F401


def _one_line_usage_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(fn: Callable[[], Any]) -> None:
    """Run a script's main, turning UserError into a one-line error and exit 2. Bad command lines too:
    argparse's usage-plus-message is replaced by one ``error: ...`` line while ``fn`` runs."""
    usage_error, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _one_line_usage_error
    try:
        with distributed.session():  # under torchrun: the process group (see vwt.distributed)
            fn()
    except UserError as e:
        print(f"error: {distributed.tag()}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        argparse.ArgumentParser.error = usage_error


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, default: str = DEFAULT_CLIP) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help="Hugging Face id (CLIP or BLIP), 'open_clip:ARCH[/PRETRAINED]' or 'timm:NAME' "
                        f"(default {default})")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model and input precision")


def add_data_args(p: argparse.ArgumentParser, default: str = "samples", choices=None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, choices=choices, help=f"data set (default {default})")
    g.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    g.add_argument("--batch", default=1, type=int, help="batch size (default 1)")
    g.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=None,
                   help="batch images of similar token counts together (one tokenizer pass first; results stay "
                        "per image): on by default with an input reducer (--top_k, --vocab) and --batch > 1")
    g.add_argument("--out", default="results", type=Path, help="output folder (default results/)")




def add_protocol_arg(p: argparse.ArgumentParser) -> None:
    """``--protocol paper|standard``: ``paper`` (default) reproduces what the VWT paper's code did;
    ``standard`` uses this project's choices where they are better for a user (README, protocol table)."""
    p.add_argument("--protocol", default=protocol.DEFAULT.name, choices=list(protocol.PROTOCOLS),
                   help="paper (default): as the VWT paper's code ran it; standard: this project's choices "
                        "(official ToMe, vision-tower int8, ...); the README's protocol table lists each difference")


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The method flags, one per row of the method table (``vwt.methods.METHODS``)."""
    methods.add_method_args(p)


def add_workers_and_summary(g, task: str, verb: str) -> None:
    """``--workers`` and ``--summary`` of the evaluation scripts (clip.py, blip.py): ``task`` names the
    results folder under --out, ``verb`` what a run does instead of summarising."""
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding processes (0: in the main process)")
    g.add_argument("--summary", action="store_true",
                   help=f"do not {verb}: gather the results files under <out>/{task} into summary.md and summary.csv")


# --------------------------------------------------------------------------------------------------
# The seam: a command line becomes a RunSpec here, once
# --------------------------------------------------------------------------------------------------
SPEC_NAMES = {"data_root": "root"}  # command-line name -> RunSpec field, where they differ


def spec_from_args(args: argparse.Namespace, options: Optional[type] = None) -> RunSpec:
    """The RunSpec of a parsed command line: its common settings, the method recipe (the method table's
    flags and the VWT settings) and the experiment's own settings as an ``options`` dataclass (its
    fields named as the flags). Every flag must land somewhere: a flag nothing takes is a TypeError
    (a script bug), never a setting silently dropped."""
    given = dict(vars(args))
    common = {f.name for f in dataclasses.fields(RunSpec)} - {"method", "options", "names"}
    top, recipe, opts = {}, {}, {}
    own = {f.name for f in dataclasses.fields(options)} if options is not None else set()
    dests = {m.dest for m in methods.rows()}
    for name, value in given.items():
        if isinstance(value, list):
            value = tuple(value)
        field_name = SPEC_NAMES.get(name, name)
        if name in own:
            opts[name] = value
        elif field_name in common:
            top[field_name] = value
        elif name in dests or name in SETTINGS:
            recipe[name] = value
        else:
            raise TypeError(f"spec_from_args: the flag {name!r} belongs to no RunSpec field, method row or "
                            f"{getattr(options, '__name__', 'options')} field")
    return RunSpec(**top, method=Recipe(**recipe), options=options(**opts) if options is not None else None,
                   names=tuple(given))


def as_spec(run) -> RunSpec:
    """``run`` as a RunSpec: a RunSpec as it is, a parsed command line through :func:`spec_from_args`
    (with its script-only flags as plain options)."""
    if isinstance(run, RunSpec):
        return run
    dests = {m.dest for m in methods.rows()} | set(SETTINGS)
    common = {f.name for f in dataclasses.fields(RunSpec)}
    rest = [k for k in vars(run) if k not in dests and SPEC_NAMES.get(k, k) not in common]
    extra = dataclasses.make_dataclass("ScriptOptions", rest, frozen=True) if rest else None
    return spec_from_args(run, extra)


def method_name(run) -> str:
    """The label of the configuration a command line (or RunSpec) asks for (``vwt.methods.method_name``)."""
    return methods.method_name(as_spec(run))


def reducers_from_args(run, *, seed: Optional[int] = None, family: Optional[str] = None) -> list:
    """The reducers a command line (or RunSpec) asks for (``vwt.methods.reducers_for``)."""
    return methods.reducers_for(as_spec(run), seed=seed, family=family)


def vocab_path(run, seed: Optional[int] = None):
    """The vocabulary file a command line (or RunSpec) reads for ``seed`` (``vwt.vocab_files.vocab_path``)."""
    return vocab_files.vocab_path(as_spec(run), seed)


def vocab_data(run) -> str:
    return vocab_files.vocab_data(as_spec(run))


def missing_vocab_hint(run) -> str:
    return vocab_files.missing_vocab_hint(as_spec(run))


# --------------------------------------------------------------------------------------------------
# Devices and seeds
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the random ablations draw from torch)."""
    import random

    import numpy as np

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
    for pkg in ("torch", "torchvision", "transformers", "timm", "open_clip_torch", "torchao", "bitsandbytes"):
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
def at_least_one(args, *names: str) -> None:
    """Refuse integer flags (``--limit``, ``--batch``, ...) below 1 where they are given."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1; got {value}")


def save_json(path: Path, payload: Any) -> Path:
    """Write a finished run's results atomically; where that fails (the folder went away, the disk is
    full) the results go to the temporary-files folder instead, and a one-line UserError says where."""
    try:
        return write_json(path, payload)
    except OSError as e:
        rescue = Path(tempfile.gettempdir()) / Path(path).name
        try:
            write_json(rescue, payload)
        except OSError:
            raise UserError(f"cannot write {path} ({first_line(e)}), nor a copy in {rescue.parent}") from None
        raise UserError(f"cannot write {path} ({first_line(e)}); the finished results were saved to {rescue}") from None


def check_input_reducers(vision: nn.Module, reducers: list, image_size: int, device=None, dtype=None) -> int:
    """Run the input reducer (if any) on one blank image, before any data: a vocabulary that does not
    fit the model (patch size, space, width) or an intra-image drop that keeps no patch is a one-line
    UserError now rather than a traceback later. Returns the tokens an image has without reduction."""
    blank = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    state, _ = tokenize(vision, None, blank)
    full = state.num_tokens
    for r in reducers:
        if getattr(r, "kind", None) != "input":
            continue
        try:
            tokenize(vision, r, blank)
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
    (a folder without any is a one-line error, never an empty table)."""
    if not folder.is_dir() or not any(folder.rglob("*.json")):
        raise UserError(f"no {script} results under {folder} to summarise: run {script} first, or pass the --out "
                        "the runs used")
    md, csv_path, table = metrics.write_summary(folder)
    print(table + f"\nwritten: {md}, {csv_path}")
