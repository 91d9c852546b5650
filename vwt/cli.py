"""Options and plumbing shared by the scripts: model loading, method flags, devices, results files,
and one-line errors for bad input."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import UserError, first_line  # noqa: F401  (re-exported for the scripts)
from .results import write_json  # noqa: F401  (re-exported for the scripts)

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


def main(fn: Callable[[], Any]) -> None:
    """Run a script's main, turning UserError (and a missing file) into a one-line error and exit 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
                   help="VWT inter-image: vocabulary size, read from tokenizers/<data>/v<SIZE>/vocab.pt")
    g.add_argument("--vocab-path", type=Path, default=None,
                   help="VWT inter-image: a vocab.pt (ours or the published ones) instead of --vocab")
    g.add_argument("--vocab-data", default="imgnet", help="data set the --vocab vocabulary was learned on")
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

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available here; use --device cpu")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@dataclass
class Loaded:
    model: nn.Module           # the whole model (CLIPModel, BlipForConditionalGeneration, open_clip CLIP, timm ViT)
    family: str                # hf_clip, hf_blip, open_clip, timm
    name: str
    pretrained: bool           # False: random weights
    tokenizer: Optional[Callable] = None  # text tokenizer / processor where the family has one

    @property
    def vision(self) -> nn.Module:
        """The vision tower alone (what eff.py times)."""
        if self.family in ("hf_clip", "hf_blip"):
            return self.model.vision_model
        if self.family == "open_clip":
            return self.model.visual
        return self.model


def _hf_random_config(name: str):
    from transformers import BlipConfig, CLIPConfig

    low = name.lower()
    if "blip" in low:
        return BlipConfig()  # defaults are BLIP base: ViT-B/16 at 384 px
    patch = 14 if "patch14" in low else 32 if "patch32" in low else 16
    size = 336 if "336" in low else 224
    if "large" in low:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=patch, image_size=size)
        return CLIPConfig(vision_config=vision, text_config=dict(hidden_size=768, intermediate_size=3072,
                                                                 num_attention_heads=12), projection_dim=768)
    return CLIPConfig(vision_config=dict(patch_size=patch, image_size=size))


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
               random_weights: bool = False) -> Loaded:
    """Load a model by name. ``random_weights`` builds the same architecture with random weights
    (for runtime and energy only: weights do not change them)."""
    try:
        if name.startswith("open_clip:"):
            import open_clip

            arch, _, pre = name[len("open_clip:"):].partition("/")
            model = open_clip.create_model(arch, pretrained=None if random_weights else (pre or None))
            loaded = Loaded(model, "open_clip", name, not random_weights and bool(pre), open_clip.get_tokenizer(arch))
        elif name.startswith("timm:"):
            import timm

            model = timm.create_model(name[len("timm:"):], pretrained=not random_weights)
            loaded = Loaded(model, "timm", name, not random_weights)
        else:
            loaded = _load_hf(name, random_weights)
    except UserError:
        raise
    except Exception as e:  # hub unreachable, unknown name, ...
        raise UserError(f"cannot load model {name!r}: {first_line(e)}. Models come from the Hugging Face hub "
                        "(or its local cache); pass a cached or local model, or --random-weights where "
                        "the script offers it") from None
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _load_hf(name: str, random_weights: bool) -> Loaded:
    from transformers import BlipForConditionalGeneration, CLIPModel

    is_blip = "blip" in name.lower()
    cls = BlipForConditionalGeneration if is_blip else CLIPModel
    if random_weights:
        torch.manual_seed(0)
        return Loaded(cls(_hf_random_config(name)), "hf_blip" if is_blip else "hf_clip", name, False)
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
    if getattr(args, "vocab", None) is not None:
        vocab = f"v{args.vocab}"
    elif getattr(args, "vocab_path", None) is not None:
        vocab = Path(args.vocab_path).parent.name
    return method_label(getattr(args, "top_k", None), vocab, getattr(args, "thresh", 0.1),
                        getattr(args, "random", False), getattr(args, "tome", None), getattr(args, "evit", None),
                        getattr(args, "lgtm", None), getattr(args, "quant", False))


def tokenizer_dir(data: str, size: int) -> Path:
    """Where process.py puts a vocabulary of ``size`` words learned on ``data`` (and the scripts look)."""
    return Path("tokenizers") / data / f"v{size}"


def vocab_path(args) -> Optional[Path]:
    if getattr(args, "vocab_path", None) is not None:
        return Path(args.vocab_path)
    if getattr(args, "vocab", None) is not None:
        return tokenizer_dir(args.vocab_data, args.vocab) / "vocab.pt"
    return None


def read_vocabulary(path: Path, missing_hint: str = ""):
    """Load a vocabulary; a missing or unreadable file is a one-line UserError."""
    import vwt

    if not Path(path).exists():
        raise UserError(f"vocabulary {path} not found{missing_hint}")
    try:
        return vwt.Vocabulary.load(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"cannot read vocabulary {path}: {e}") from None


PAPER_FAMILIES = {"hf_clip": True, "hf_blip": False}  # the families the paper's code ran -> its ToMe's prop_attn


def build_reducers(top_k: Optional[float] = None, vocab=None, thresh: float = 0.1, random: bool = False,
                   prop_attn: bool = False, tome=None, evit=None, lgtm=None, protocol: str = "paper",
                   family: Optional[str] = None) -> list:
    """The reducers of one configuration (``vocab``: a loaded Vocabulary for inter-image); settings the
    reducers refuse become one-line UserErrors.

    ``--tome`` under protocol ``paper`` on the families the paper ran (``family`` hf_clip, hf_blip) is
    the paper's ToMe, ``vwt.ToMe(r, sizes="per-block")``, with proportional attention in CLIP only, as
    its modeling_clip.py / modeling_blip.py; otherwise (protocol ``standard``, open_clip, timm, or an
    unknown family) official ToMe, ``vwt.ToMe(r)``."""
    import vwt

    if top_k is not None and vocab is not None:
        raise UserError("choose one input reducer: --top_k (intra-image) or --vocab/--vocab-path (inter-image)")
    if sum(v is not None for v in (tome, evit, lgtm)) > 1:
        raise UserError("choose one in-network reducer: --tome, --evit or --lgtm")
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


def reducers_from_args(args, family: Optional[str] = None) -> list:
    """The reducers the method flags ask for (the vocabulary is loaded and checked here), under
    ``args.protocol`` (default paper) for a model of ``family`` (see :func:`build_reducers`)."""
    if getattr(args, "top_k", None) is not None and vocab_path(args) is not None:
        raise UserError("choose one input reducer: --top_k (intra-image) or --vocab/--vocab-path (inter-image)")
    if sum(getattr(args, k, None) is not None for k in ("tome", "evit", "lgtm")) > 1:
        raise UserError("choose one in-network reducer: --tome, --evit or --lgtm")
    path = vocab_path(args)
    vocab = None if path is None else read_vocabulary(
        path, f"; learn it with `python process.py --data {getattr(args, 'vocab_data', 'imgnet')} --vocab "
              f"{args.vocab}` or pass --vocab-path")
    return build_reducers(getattr(args, "top_k", None), vocab, getattr(args, "thresh", 0.1),
                          getattr(args, "random", False), getattr(args, "prop_attn", False),
                          getattr(args, "tome", None), getattr(args, "evit", None), getattr(args, "lgtm", None),
                          protocol=getattr(args, "protocol", "paper"), family=family)


def quantize(model: nn.Module, protocol: str = "standard", family: Optional[str] = None) -> nn.Module:
    """``--quant``, with its "cannot run here" errors (no CUDA, a backend that is not installed) as
    one-line UserErrors. Protocol ``paper`` on Hugging Face CLIP/BLIP (``family`` hf_clip, hf_blip):
    the whole model through accelerate, as the paper (``vwt.quant.quantize_whole_model``; CUDA only);
    otherwise the vision tower (``vwt.quantize``: bitsandbytes on CUDA, torchao on a CPU)."""
    import vwt
    from vwt.quant import quantize_whole_model

    try:
        if protocol == "paper" and family in PAPER_FAMILIES:
            return quantize_whole_model(model)
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
