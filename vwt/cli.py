"""Options and plumbing shared by the scripts: model loading, method flags, devices, results files,
and one-line errors for bad input."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import vwt  # the library; vwt/__init__ never imports cli, so this is no cycle

from . import datasets, distributed, metrics
from .backends import family_of
from .backends.base import patch_info
from .batching import buckets, input_reducer, token_counts
from .encoder import check_rule
from .flops import dims_of
from .errors import UserError, first_line  # noqa: F401  (re-exported for the scripts)
from .results import write_json
from .tokenizer import tokenize

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


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


PROTOCOLS = ("paper", "standard")


def add_protocol_arg(p: argparse.ArgumentParser) -> None:
    """``--protocol paper|standard``: ``paper`` (default) reproduces what the VWT paper's code did;
    ``standard`` uses this project's choices where they are better for a user (README, protocol table)."""
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS,
                   help="paper (default): as the VWT paper's code ran it; standard: this project's choices "
                        "(official ToMe, vision-tower int8, ...); the README's protocol table lists each difference")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods (one input reducer + one in-network reducer, optionally --quant)")
    g.add_argument("--top_k", type=float, default=None, metavar="DROP",
                   help="VWT intra-image: fraction of patches to drop (lowest pixel variance)")
    g.add_argument("--vocab", type=int, default=None, metavar="SIZE",
                   help="VWT inter-image: vocabulary size, read from process.py's folders "
                        "tokenizers/<vocab data>/v<SIZE>/[seed_<N>/]vocab.pt")
    g.add_argument("--vocab-path", type=Path, default=None,
                   help="VWT inter-image: a vocab.pt (ours or the published ones) instead of --vocab; "
                        "'{seed}' in it picks one per seed")
    g.add_argument("--vocab-data", default=None,
                   help="data set the --vocab vocabulary was learned on (default: under --protocol paper the "
                        "evaluated data set's own, COCO's for NoCaps, ImageNet's for OpenImages; under "
                        "--protocol standard imgnet)")
    g.add_argument("--imgnet", action="store_true",
                   help="use the ImageNet vocabulary (tokenizers/imgnet/v<SIZE>/), as the paper's --imgnet True")
    g.add_argument("--thresh", type=float, default=0.1, help="VWT inter-image: cosine-distance threshold")
    g.add_argument("--random", action="store_true", help="VWT ablation: random drop / random matching scores")
    g.add_argument("--prop-attn", action="store_true", help="VWT inter-image: proportional attention")
    g.add_argument("--tome", type=int, default=None, metavar="R", help="ToMe: merge R tokens per block")
    g.add_argument("--evit", type=float, default=None, metavar="KEEP", help="EViT: keep rate at its layers")
    g.add_argument("--lgtm", type=int, default=None, metavar="R", help="DFE + LGTM: merge R tokens per block")
    g.add_argument("--quant", action="store_true", help="int8 linear layers (bitsandbytes on CUDA, torchao on CPU)")


# --------------------------------------------------------------------------------------------------
# Devices and models
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


@dataclass
class Loaded:
    model: nn.Module           # the whole model (CLIPModel, BlipForConditionalGeneration, open_clip CLIP, timm ViT)
    family: Optional[str]      # hf_clip, hf_blip, open_clip, timm: the registry's name (None: look it up)
    name: str
    pretrained: bool           # False: random weights
    tokenizer: Optional[Callable] = None  # text tokenizer / processor where the family has one
    note: str = ""             # why the weights are random where pretrained ones were asked for

    def __post_init__(self):
        found = family_of(self.model).name
        if self.family not in (None, found):
            raise ValueError(f"Loaded: {type(self.model).__name__} is a {found} model, not {self.family}")
        self.family = found

    @property
    def vision(self) -> nn.Module:
        """The vision tower alone (what eff.py times): the module the family's backend patches."""
        return family_of(self.model).vision(self.model)


def _hf_random_config(name: str):
    low = name.lower()
    if "blip" in low:
        from transformers import BlipConfig

        return BlipConfig()  # defaults are BLIP base: ViT-B/16 at 384 px
    from transformers import CLIPConfig

    patch = 14 if "patch14" in low else 32 if "patch32" in low else 16
    size = 336 if "336" in low else 224
    if "large" in low:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=patch, image_size=size)
        return CLIPConfig(vision_config=vision, text_config=dict(hidden_size=768, intermediate_size=3072,
                                                                 num_attention_heads=12), projection_dim=768)
    return CLIPConfig(vision_config=dict(patch_size=patch, image_size=size))


HUB_TIMEOUT = 2.0  # seconds: how long to wait for the hub to answer, once per process
_hub_answered: Optional[bool] = None


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def go_offline() -> None:
    """Make the hub clients use their local cache only, from now on (no retries, no waiting)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # read at import; the clients ask it on every call
    except ImportError:
        pass


def _answers(url: str, timeout: float) -> bool:
    """Whether ``url`` gives any HTTP answer within ``timeout`` seconds (name lookup included: the
    request runs in a daemon thread that is abandoned when it takes longer)."""
    import threading
    import urllib.error
    import urllib.request

    answered: list = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an error page is an answer
        except Exception:
            answered.append(False)

    thread = threading.Thread(target=ask, name="vwt-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) answers: False at once
    under HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE; otherwise asked once per process, within ``timeout``
    seconds. When it does not answer, the hub clients go offline at once (cache only) instead of
    retrying for tens of seconds."""
    global _hub_answered
    if _offline_env():
        return False
    if _hub_answered is None:
        _hub_answered = _answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/", timeout)
        if not _hub_answered:
            go_offline()
    return _hub_answered


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32, random_weights: bool = False,
               fallback_random: bool = False) -> Loaded:
    """Load a model by name. ``random_weights`` builds the same architecture with random weights
    (for runtime, energy and pixel-space work only: they do not depend on weights). Before touching
    the hub, :func:`hub_reachable` decides once whether to work offline. ``fallback_random``: where
    the pretrained weights cannot be loaded, build random ones and print a one-line note (kept in
    ``Loaded.note``)."""
    if not random_weights:
        hub_reachable()
    try:
        loaded = _load(name, random_weights)
    except UserError as e:
        if not fallback_random or random_weights:
            raise
        loaded = _load(name, True)
        loaded.note = f"pretrained weights unavailable ({first_line(e, 160)})"
        print(f"note: {name}: {loaded.note}; using random weights of the same architecture "
              "(runtime and energy do not depend on weights)")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _load(name: str, random_weights: bool) -> Loaded:
    try:
        if name.startswith("open_clip:"):
            import open_clip

            arch, _, pre = name[len("open_clip:"):].partition("/")
            model = open_clip.create_model(arch, pretrained=None if random_weights else (pre or None))
            return Loaded(model, "open_clip", name, not random_weights and bool(pre), open_clip.get_tokenizer(arch))
        if name.startswith("timm:"):
            import timm

            return Loaded(timm.create_model(name[len("timm:"):], pretrained=not random_weights), "timm", name,
                          not random_weights)
        return _load_hf(name, random_weights)
    except UserError:
        raise
    except Exception as e:  # hub unreachable, unknown name, ...
        raise UserError(f"cannot load model {name!r}: {first_line(e)}. Models come from the Hugging Face hub "
                        "(or its local cache); pass a cached or local model, or --random-weights where "
                        "the script offers it") from None


def fill_random(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Give every parameter random values quickly: one seeded normal(0, std) block of 2^20 values,
    tiled (drawing 150M fresh values takes seconds on a small CPU; timing and pixel-space work do not
    depend on the values)."""
    block = torch.randn(2 ** 20, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for i in range(0, flat.numel(), block.numel()):
                part = flat[i:i + block.numel()]
                part.copy_(block[:part.numel()])
    return model


def _load_hf(name: str, random_weights: bool) -> Loaded:
    is_blip = "blip" in name.lower()
    if is_blip:  # import only the family asked for: each costs seconds on a small CPU
        from transformers import BlipForConditionalGeneration as cls
    else:
        from transformers import CLIPModel as cls
    if random_weights:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = cls(_hf_random_config(name))
        return Loaded(fill_random(model), "hf_blip" if is_blip else "hf_clip", name, False)
    model = cls.from_pretrained(name)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except Exception:
        processor = None
    return Loaded(model, "hf_blip" if is_blip else "hf_clip", name, True, processor)


# --------------------------------------------------------------------------------------------------
# Methods from flags
# --------------------------------------------------------------------------------------------------
def method_label(top_k: Optional[float] = None, vocab: Optional[str] = None, thresh: float = 0.1,
                 random: bool = False, tome=None, evit=None, lgtm=None, quant: bool = False) -> str:
    """A short label of a configuration, e.g. 'inter-v1000-t0.1+tome8+int8', or 'base'. ``vocab`` is
    the vocabulary's short name ('v1000', or the folder of a vocab.pt), None without inter-image."""
    parts = []
    if top_k is not None:
        parts.append(f"intra{top_k:g}" + ("-random" if random else ""))
    if vocab is not None:
        parts.append(f"inter-{vocab if vocab.startswith('v') else 'v' + vocab}-t{thresh:g}"
                     + ("-random" if random else ""))
    if tome is not None:
        parts.append(f"tome{tome}")
    if evit is not None:
        parts.append(f"evit{evit:g}")
    if lgtm is not None:
        parts.append(f"lgtm{lgtm}")
    if quant:
        parts.append("int8")
    return "+".join(parts) or "base"


def method_name(args) -> str:
    """The label of the configuration the method flags ask for (see :func:`method_label`)."""
    vocab = None
    if getattr(args, "vocab", None) is not None:  # another data set's vocabulary is named, as the paper's v<SIZE>-imgnet
        source = vocab_data(args)
        vocab = f"v{args.vocab}" + ("" if source == (getattr(args, "data", None) or source) else f"-{source}")
    elif getattr(args, "vocab_path", None) is not None:
        vocab = Path(args.vocab_path).parent.name
    return method_label(getattr(args, "top_k", None), vocab, getattr(args, "thresh", 0.1),
                        getattr(args, "random", False), getattr(args, "tome", None), getattr(args, "evit", None),
                        getattr(args, "lgtm", None), getattr(args, "quant", False))


def tokenizer_dir(data: str, size: int) -> Path:
    """Where process.py puts the vocabularies of ``size`` words learned on ``data``, as the paper's code:
    ``vocab.pt`` here for data sets learned once (COCO, ImageNet), ``seed_<N>/vocab.pt`` below it for
    those learned once per seed (Waterbirds, CelebA, MetaShift)."""
    return Path("tokenizers") / data / f"v{size}"


# The in-domain vocabulary of a data set where it is not the data set's own (the paper's blip.py reads
# COCO's for NoCaps; no vocabulary is learned on OpenImages, whose runs use ImageNet's).
IN_DOMAIN = {"nocaps": "coco", "openimages-common": "imgnet", "openimages-rare": "imgnet"}


def vocab_data(args) -> str:
    """The data set whose --vocab vocabulary a run reads: --imgnet, --vocab-data, or by default the
    in-domain one under --protocol paper (as the paper's scripts) and ImageNet's under standard."""
    chosen = getattr(args, "vocab_data", None)
    if getattr(args, "imgnet", False):
        if chosen not in (None, "imgnet"):
            raise UserError(f"--imgnet reads the ImageNet vocabulary; it contradicts --vocab-data {chosen}: drop one")
        return "imgnet"
    if chosen:
        return chosen
    if getattr(args, "protocol", "paper") == "standard":
        return "imgnet"
    data = getattr(args, "data", None) or "imgnet"
    return IN_DOMAIN.get(data, data)


def vocab_candidates(data: str, size: int, seed: Optional[int] = None) -> list:
    """The vocab.pt files that may hold ``data``'s ``size``-word vocabulary for ``seed``, best first:
    the paper's ``v<SIZE>/seed_<N>/`` and ours ``v<SIZE>-seed<N>/`` for a seed other than 0, then the
    seed-less ``v<SIZE>/`` (data sets learned once), then for no seed the lowest ``v<SIZE>/seed_<N>/``."""
    base = tokenizer_dir(data, size)
    found = []
    if seed:
        found += [base / f"seed_{seed}" / "vocab.pt", base.with_name(f"{base.name}-seed{seed}") / "vocab.pt"]
    found += [base / "vocab.pt", base / "seed_0" / "vocab.pt"]
    if seed is None and base.is_dir():
        seeds = sorted(int(d.name[5:]) for d in base.glob("seed_*") if d.name[5:].isdigit())
        found += [base / f"seed_{s}" / "vocab.pt" for s in seeds]
    return found


def vocab_path(args, seed: Optional[int] = None) -> Optional[Path]:
    """The vocabulary file a run uses for ``seed`` (None: the data set's one, or its first seed's):
    --vocab-path ('{seed}' in it replaced by the seed, 0 for none), or for --vocab SIZE the first
    existing of :func:`vocab_candidates` (the first candidate when none exists, for the error)."""
    if getattr(args, "vocab_path", None) is not None:
        path = str(args.vocab_path)
        return Path(path.format(seed=seed or 0) if "{seed}" in path else path)
    if getattr(args, "vocab", None) is None:
        return None
    candidates = vocab_candidates(vocab_data(args), args.vocab, seed)
    return next((c for c in candidates if c.exists()), candidates[0])


def read_vocabulary(path: Path, missing_hint: str = ""):
    """Load a vocabulary; a missing or unreadable file is a one-line UserError."""
    if not Path(path).exists():
        raise UserError(f"vocabulary {path} not found{missing_hint}")
    try:
        return vwt.Vocabulary.load(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"cannot read vocabulary {path}: {e}") from None


INPUT_FLAGS = {"top_k": "--top_k", "vocab": "--vocab/--vocab-path"}
IN_NETWORK = ("tome", "evit", "lgtm")
PAPER_FAMILIES = {"hf_clip": True, "hf_blip": False}  # the families the paper's code ran -> its ToMe's prop_attn


def check_methods(**chosen) -> None:
    """The reducer rule (one input reducer + one in-network reducer, ``vwt.encoder.check_rule``) on the
    method flags, before anything is loaded: ``chosen`` maps top_k, vocab, tome, evit, lgtm to the
    value asked for (None: not asked); a clash is a one-line UserError naming the flags."""
    picked = [(INPUT_FLAGS.get(k, f"--{k}"), "input" if k in INPUT_FLAGS else "block")
              for k, v in chosen.items() if v is not None]
    try:
        check_rule(picked, {"input": "--top_k (intra-image) or --vocab/--vocab-path (inter-image)",
                            "block": "--tome, --evit or --lgtm"})
    except ValueError as e:
        raise UserError(str(e)) from None


def missing_vocab_hint(args) -> str:
    """What to do when the vocabulary the flags name does not exist (appended to 'not found')."""
    if getattr(args, "vocab_path", None) is not None:
        return "; check the path, or learn one with `python process.py --data DATA --vocab SIZE --out FOLDER`"
    data = vocab_data(args)
    if data not in PROCESS_DATA:
        return f"; process.py does not learn on {data}: pass --vocab-data, --imgnet or --vocab-path"
    return (f"; learn it with `python process.py --data {data} --vocab {args.vocab}`, or pass --vocab-data, "
            "--imgnet or --vocab-path")


PROCESS_DATA = ("imgnet", "waterbirds", "celeba", "meta", "coco", "samples")  # what process.py learns on


def build_reducers(top_k: Optional[float] = None, vocab=None, thresh: float = 0.1, random: bool = False,
                   prop_attn: bool = False, tome=None, evit=None, lgtm=None, protocol: str = "paper",
                   family: Optional[str] = None) -> list:
    """The reducers of one configuration (``vocab``: a loaded Vocabulary for inter-image); settings the
    reducers refuse become one-line UserErrors.

    ``--tome`` under protocol ``paper`` on the families the paper ran (``family`` hf_clip, hf_blip) is
    the paper's ToMe, ``vwt.ToMe(r, sizes="per-block")``, with proportional attention in CLIP only, as
    its modeling_clip.py / modeling_blip.py; otherwise (protocol ``standard``, open_clip, timm, or an
    unknown family) official ToMe, ``vwt.ToMe(r)``."""
    check_methods(top_k=top_k, vocab=vocab, tome=tome, evit=evit, lgtm=lgtm)
    if top_k is not None and not 0 <= top_k < 1:
        raise UserError(f"--top_k is the fraction of patches to drop, in [0, 1); got {top_k}")
    try:
        reducers = []
        if top_k is not None:
            reducers.append(vwt.IntraImage(drop=top_k, random=random))
        if vocab is not None:
            reducers.append(vwt.InterImage(vocab, thresh=thresh, random=random, prop_attn=prop_attn))
        if tome is not None and protocol == "paper" and family in PAPER_FAMILIES:
            reducers.append(vwt.ToMe(r=tome, prop_attn=PAPER_FAMILIES[family], sizes="per-block"))
        elif tome is not None:
            reducers.append(vwt.ToMe(r=tome))
        if evit is not None:
            reducers.append(vwt.EViT(keep=evit))
        if lgtm is not None:
            reducers.append(vwt.LGTM(r=lgtm))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    return reducers


def reducers_from_args(args, *, seed: Optional[int] = None, family: Optional[str] = None) -> list:
    """The reducers the method flags ask for, with ``seed``'s vocabulary (see :func:`vocab_path`;
    loaded and checked here), under ``args.protocol`` (default paper) for a model of ``family`` (see
    :func:`build_reducers`)."""
    path = vocab_path(args, seed)
    check_methods(top_k=getattr(args, "top_k", None), vocab=path, **{k: getattr(args, k, None) for k in IN_NETWORK})
    vocab = None if path is None else read_vocabulary(path, missing_vocab_hint(args))
    return build_reducers(getattr(args, "top_k", None), vocab, getattr(args, "thresh", 0.1),
                          getattr(args, "random", False), getattr(args, "prop_attn", False),
                          getattr(args, "tome", None), getattr(args, "evit", None), getattr(args, "lgtm", None),
                          protocol=getattr(args, "protocol", "paper"), family=family)


def quantize(model: nn.Module, protocol: str = "standard", family: Optional[str] = None) -> nn.Module:
    """``--quant``, with its "cannot run here" errors (no CUDA, a backend that is not installed) as
    one-line UserErrors. Protocol ``paper`` on Hugging Face CLIP/BLIP (``family`` hf_clip, hf_blip):
    the whole model through accelerate, as the paper (``vwt.quant.quantize_whole_model``; CUDA only);
    otherwise the vision tower (``vwt.quantize``: bitsandbytes on CUDA, torchao on a CPU)."""
    try:
        if protocol == "paper" and family in PAPER_FAMILIES:
            return vwt.quant.quantize_whole_model(model)
        return vwt.quantize(model)
    except RuntimeError as e:
        hint = "; --protocol standard quantizes the vision tower with torchao on a CPU" if protocol == "paper" else ""
        raise UserError(str(e) + hint) from None


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


def batch_order(args, loaded: Loaded, dataset, device, dtype) -> list:
    """The index batches a script reads ``dataset`` in: ``--bucket`` (default: on with an input reducer
    and --batch > 1) sorts the images by the tokens the patched model's input reducer leaves them
    (``vwt.batching``) and batches neighbours; otherwise data-set order."""
    info = patch_info(loaded.model)
    reducer = input_reducer(info.reducers) if info is not None else None
    bucket = args.bucket if args.bucket is not None else (reducer is not None and args.batch > 1)
    plain = list(torch.arange(len(dataset)).split(args.batch))
    if not bucket or reducer is None:
        return plain
    mine = distributed.shard(plain)  # under torchrun each process counts its share of the batches
    counts = [token_counts(loaded.vision, reducer, [x.to(device, dtype)])
              for x, _ in datasets.batches(dataset, args.batch, args.workers, mine)]
    return buckets(torch.cat(distributed.unshard(counts)), args.batch)


def describe_tokens(first_block: float, mean: float) -> str:
    """The scripts' one-line reading of the token statistics (``vwt.token_stats``)."""
    return f"tokens entering block 1: {first_block:.1f}, mean over blocks: {mean:.1f}"
# --------------------------------------------------------------------------------------------------
# Bad input found before the long work starts, and finished work that is never lost
# --------------------------------------------------------------------------------------------------
def model_label(name: str) -> str:
    """A model's name as results file names show it: a local model folder by its last component (the
    file name's hash still tells two folders of the same name apart), anything else as it is."""
    return Path(name).name if os.path.isdir(name) else name


def at_least_one(args, *names: str) -> None:
    """Refuse integer flags (``--limit``, ``--batch``, ...) below 1 where they are given."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1; got {value}")


def writable_dir(path, flag: str = "--out") -> Path:
    """Make sure results can be written into the folder ``path`` (created if missing) before any long
    work: an existing file in the way or a folder that refuses a file is a one-line UserError."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a folder; pass a folder "
                            "(it is created if missing)")
    created = [d for d in [path, *path.parents] if not d.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({first_line(e)}); pass a folder you can write to") from None
    finally:
        for d in created:  # leave no empty folders behind: the results create them when they are written
            try:
                d.rmdir()
            except OSError:
                break
    return path


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


def samples_vocabulary(size: int, vision: nn.Module, preprocess, images: Optional[torch.Tensor] = None):
    """A pixel-space vocabulary of ``size`` words learned on the ``samples`` photographs with the model's
    patch size and preprocessing, cached in tokenizers/samples/v<size>/ (v<size>-p<P>-<S>px for models
    other than patch 16 at 224 px): learned on first use, relearned when the cache does not fit the
    model. ``images``: the preprocessed samples where the caller has them. Returns (vocab, path)."""
    patch, px = dims_of(vision).patch_size, preprocess.size
    cache = tokenizer_dir("samples", size)
    path = (cache if (patch, px) == (16, 224) else cache.with_name(f"v{size}-p{patch}-{px}px")) / "vocab.pt"
    if path.exists():
        vocab = read_vocabulary(path)
        if (vocab.space, vocab.patch_size, tuple(vocab.meta.get("mean", ())), tuple(vocab.meta.get("std", ()))) == \
                ("pixel", patch, tuple(preprocess.mean), tuple(preprocess.std)):
            return vocab, path
    if images is None:
        ds = datasets.Samples(preprocess)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
    n = images.shape[0] * (images.shape[-1] // patch) * (images.shape[-2] // patch)
    if n < size:
        raise UserError(f"cannot learn {size} visual words from the {n} patches of the samples; use a smaller "
                        "--vocab or pass --vocab-path")
    writable_dir(path.parent, "the vocabulary folder")
    print(f"learning a {size}-word vocabulary on the {images.shape[0]} sample images -> {path}", file=sys.stderr)
    vocab = vwt.Vocabulary.learn([images[i:i + 64] for i in range(0, len(images), 64)], size=size, space="pixel",
                                 patch_size=patch, data="samples", image_size=px, mean=list(preprocess.mean),
                                 std=list(preprocess.std))
    vocab.save(path.parent)
    return vocab, path


def write_summary(folder: Path, script: str) -> None:
    """``--summary``: gather ``script``'s results files under ``folder`` into summary.md and summary.csv
    (a folder without any is a one-line error, never an empty table)."""
    if not folder.is_dir() or not any(folder.rglob("*.json")):
        raise UserError(f"no {script} results under {folder} to summarise: run {script} first, or pass the --out "
                        "the runs used")
    md, csv_path, table = metrics.write_summary(folder)
    print(table + f"\nwritten: {md}, {csv_path}")
