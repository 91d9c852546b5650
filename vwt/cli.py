"""The command-line module: the option groups every script shares, the one function that turns a
parsed command line into a ``vwt.spec.RunSpec`` (:func:`spec_from_args`), and running a script's main
with one-line errors. The library never imports this module; the
library names the scripts use are imported here so that a script needs ``vwt.cli`` and ``vwt``."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import bench, distributed, methods, protocol, results, vocab_files, zeroshot
# re-exported for the scripts: the library's own definitions, in one place each
from .batching import batch_order  # noqa: F401
from .errors import UserError, first_line  # noqa: F401
from .methods import PAPER_FAMILIES, build_reducers, check_methods, method_label, quantize  # noqa: F401
from .models import (DEFAULT_BLIP, DEFAULT_CLIP, HUB_TIMEOUT, Loaded, fill_random, go_offline,  # noqa: F401
                     hub_reachable, load_model)
from .patch import describe_tokens  # noqa: F401
from .results import DEFAULT_OUT, model_label, write_json, writable_dir  # noqa: F401
from .runtime import SEED_MAX  # 0 to 2^32 - 1: NumPy's seeds
from .spec import CONFIG_NAMES, SETTINGS, Recipe, RunSpec
from .vocab_files import read_vocabulary, samples_vocabulary, tokenizer_dir, vocab_candidates  # noqa: F401


def _one_line_usage_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(fn: Callable[[], Any]) -> None:
    """Run a script's main, turning UserError into a one-line error and exit 2. Bad command lines too:
    argparse's usage-plus-message is replaced by one ``error: ...`` line while ``fn`` runs."""
    usage_error, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _one_line_usage_error
    try:
        with distributed.session(), results.saving_what_it_can():  # torchrun's process group; a full disk
            fn()                                                     # keeps every later result (one line at the end)
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
# Value types: a value no run can use is refused by argparse itself, before anything loads, as one line
# ``error: argument --penalty: must be a finite number; got nan`` (exit 2). A check that needs two flags
# or the model is the experiment's own (e.g. vwt.captioning.check_lengths).


def _parse_number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def bounded(kind: type, low=None, high=None, above=None, what: str = "") -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` (int or float) value with ``low <= value <= high`` and
    ``value > above`` where given; ``what`` names the range in the message."""
    def parse(text: str):
        value = _parse_number(kind, text)
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and value <= above):
            if what:
                rule = what
            elif above is not None:
                rule = f"must be above {above:g}"
            elif high is None:
                rule = f"must be at least {low}"
            else:
                rule = f"must be from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{rule}; got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


finite_float = bounded(float)
positive_float = bounded(float, above=0)
nonneg_float = bounded(float, low=0)
positive_int = bounded(int, low=1)
nonneg_int = bounded(int, low=0)
seed_int = bounded(int, 0, SEED_MAX, what=f"a seed is an integer from 0 to {SEED_MAX} (2^32 - 1)")
MAX_SCALE = 32  # match.py / word.py --scale: a 224 px image at 32x is a 7168 px figure
scale_int = bounded(int, 1, MAX_SCALE, what=f"the enlargement is an integer from 1 to {MAX_SCALE}")


def _checked(check: Callable[[str], Any], returns: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """An argparse ``type`` from a library check that raises ValueError: its message becomes argparse's
    ``error: argument --X: ...``; the value is ``returns(text)``."""
    def parse(text: str):
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return returns(text)

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


prompt_template = _checked(zeroshot.check_prompt)  # clip.py --prompt: '{}' where the label goes, no other field
label_list = _checked(zeroshot.check_labels)  # clip.py --labels, as given (results record the text)
vocab_path_template = _checked(vocab_files.check_vocab_path, Path)  # --vocab-path: '{seed}' its only field


def _retype(p: argparse.ArgumentParser, dest: str, kind: Callable[[str], Any]) -> None:
    """Give the option ``dest`` (added by the library's method table) the value type ``kind``."""
    for action in p._actions:
        if action.dest == dest:
            action.type = kind


def add_model_args(p: argparse.ArgumentParser, default: Optional[str] = DEFAULT_CLIP,
                   shown: Optional[str] = None) -> None:
    """--model, --device, --dtype; ``shown``: how --help states a default that depends on other flags."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help="Hugging Face id (CLIP or BLIP), 'open_clip:ARCH[/PRETRAINED]' or 'timm:NAME' "
                        f"(default {shown or default})")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: cuda when available (default auto)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model and input precision (default float32)")


OUT_HELP = f"output folder (default {DEFAULT_OUT}/, which git ignores)"


def add_data_args(p: argparse.ArgumentParser, default: str = "samples", choices=None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, choices=choices, help=f"data set (default {default})")
    g.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    g.add_argument("--batch", default=1, type=int, help="batch size (default 1)")
    g.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=None,
                   help="batch images of similar token counts together (one tokenizer pass first; results stay "
                        "per image): on by default with an input reducer (--top_k, --vocab) and --batch > 1")
    g.add_argument("--out", default=DEFAULT_OUT, type=Path, help=OUT_HELP)




def add_protocol_arg(p: argparse.ArgumentParser) -> None:
    """``--protocol paper|standard``: ``paper`` (default) reproduces what the VWT paper's code did;
    ``standard`` uses this project's choices where they are better for a user (README, protocol table)."""
    p.add_argument("--protocol", default=protocol.DEFAULT.name, choices=list(protocol.PROTOCOLS),
                   help="paper (default): as the VWT paper's code ran it; standard: this project's choices "
                        "(official ToMe, vision-tower int8, ...); the README's protocol table lists each difference")


def add_method_args(p: argparse.ArgumentParser, measured: bool = False) -> None:
    """The method flags, one per row of the method table (``vwt.methods.METHODS``); ``measured``:
    eff.py's, whose flags default to the table's settings (the other scripts' are off unless given)."""
    methods.add_method_args(p, measured)
    _retype(p, "vocab_path", vocab_path_template)


def default_workers() -> int:
    """Data-loading worker processes by default: at most 4, and no more than the cores this process may
    use (more only wait for a core, and torch's DataLoader warns)."""
    return min(4, bench.usable_cores())


def add_workers_arg(g, what: str = "data-loading worker processes") -> None:
    """``--workers``, defaulting to :func:`default_workers` on this machine (stated in --help)."""
    n = default_workers()
    g.add_argument("--workers", type=nonneg_int, default=n,
                   help=f"{what} (default {n} here: min(4, the cores this process may use); 0: in the main process)")


def add_workers_and_summary(g, task: str, verb: str) -> None:
    """``--workers`` and ``--summary`` of the evaluation scripts (clip.py, blip.py): ``task`` names the
    results folder under --out, ``verb`` what a run does instead of summarising."""
    add_workers_arg(g, "image-decoding processes")
    g.add_argument("--summary", action="store_true",
                   help=f"do not {verb}: gather the results files under <out>/{task} into summary.md and summary.csv")


def add_compile_arg(g, eager: str) -> None:
    """``--compile`` of the evaluation scripts (clip.py, blip.py): the patched vision tower under
    torch.compile (``vwt.compiling.compiled_module``); ``eager`` says what stays eager."""
    g.add_argument("--compile", action="store_true",
                   help="run the patched vision tower under torch.compile (default mode; dynamic shapes where an "
                        f"input reducer varies the token count), compiled at the first batch of each pass over the data; {eager}. Same outputs "
                        "as eager; the results record the first batch's seconds (the compilation), graph breaks, "
                        "recompilations and recompile-limit hits, and a line says where it did not compile whole")


# --------------------------------------------------------------------------------------------------
# The seam: a command line becomes a RunSpec here, once
# --------------------------------------------------------------------------------------------------
SPEC_NAMES = {name: field for field, name in CONFIG_NAMES.items()}  # command-line name -> RunSpec field


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


# the shared steps of every run, defined in vwt.runtime (the library's experiments use them too)
from .runtime import (DEVICE_HINT, at_least_one, check_input_reducers, environment,  # noqa: E402,F401
                      nothing_merged_note, resolve_device, resolve_dtype, save_json, seed_everything, write_summary)
