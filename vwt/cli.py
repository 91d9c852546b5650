"""Options and plumbing shared by the scripts: model loading, method flags, devices, results files,
and one-line errors for bad input."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (at most ``limit`` characters), or its type name
    when it has none: what a one-line error quotes of the cause."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


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
def method_name(args) -> str:
    """A short label of the configuration, e.g. 'inter-v1000-t0.1+tome8+int8', or 'base'."""
    parts = []
    if getattr(args, "top_k", None) is not None:
        parts.append(f"intra{args.top_k:g}" + ("-random" if args.random else ""))
    if getattr(args, "vocab", None) is not None or getattr(args, "vocab_path", None) is not None:
        size = args.vocab if args.vocab is not None else Path(args.vocab_path).parent.name
        parts.append(f"inter-v{size}-t{args.thresh:g}".replace("-vv", "-v") + ("-random" if args.random else ""))
    if getattr(args, "tome", None) is not None:
        parts.append(f"tome{args.tome}")
    if getattr(args, "evit", None) is not None:
        parts.append(f"evit{args.evit:g}")
    if getattr(args, "lgtm", None) is not None:
        parts.append(f"lgtm{args.lgtm}")
    if getattr(args, "quant", False):
        parts.append("int8")
    return "+".join(parts) or "base"


def vocab_path(args) -> Optional[Path]:
    if getattr(args, "vocab_path", None) is not None:
        return Path(args.vocab_path)
    if getattr(args, "vocab", None) is not None:
        return Path("tokenizers") / args.vocab_data / f"v{args.vocab}" / "vocab.pt"
    return None


def reducers_from_args(args) -> list:
    """The reducers the method flags ask for (the vocabulary is loaded and checked here)."""
    import vwt

    if getattr(args, "top_k", None) is not None and vocab_path(args) is not None:
        raise UserError("choose one input reducer: --top_k (intra-image) or --vocab/--vocab-path (inter-image)")
    if sum(getattr(args, k, None) is not None for k in ("tome", "evit", "lgtm")) > 1:
        raise UserError("choose one in-network reducer: --tome, --evit or --lgtm")
    reducers = []
    if getattr(args, "top_k", None) is not None:
        if not 0 <= args.top_k < 1:
            raise UserError(f"--top_k is the fraction of patches to drop, in [0, 1); got {args.top_k}")
        reducers.append(vwt.IntraImage(drop=args.top_k, random=args.random))
    path = vocab_path(args)
    if path is not None:
        if not path.exists():
            raise UserError(f"vocabulary {path} not found; learn it with `python process.py --data "
                            f"{getattr(args, 'vocab_data', 'imgnet')} --vocab {args.vocab}` or pass --vocab-path")
        try:
            vocab = vwt.Vocabulary.load(path)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"cannot read vocabulary {path}: {e}") from None
        reducers.append(vwt.InterImage(vocab, thresh=args.thresh, random=args.random, prop_attn=args.prop_attn))
    if getattr(args, "tome", None) is not None:
        reducers.append(vwt.ToMe(r=args.tome))
    if getattr(args, "evit", None) is not None:
        reducers.append(vwt.EViT(keep=args.evit))
    if getattr(args, "lgtm", None) is not None:
        reducers.append(vwt.LGTM(r=args.lgtm))
    return reducers


def quantize(model: nn.Module) -> nn.Module:
    """``--quant``: vwt.quantize, with its "cannot run here" errors (no CUDA for bitsandbytes, a backend
    that is not installed) as one-line UserErrors."""
    import vwt

    try:
        return vwt.quantize(model)
    except RuntimeError as e:
        raise UserError(str(e)) from None


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


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
