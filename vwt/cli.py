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


def _one_line_usage_error(self: argparse.ArgumentParser, message: str) -> None:
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(fn: Callable[[], Any]) -> None:
    """Run a script's main, turning UserError into a one-line error and exit 2. Bad command lines too:
    argparse's usage-plus-message is replaced by one ``error: ...`` line while ``fn`` runs."""
    usage_error, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _one_line_usage_error
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
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
               random_weights: bool = False, fallback_random: bool = False) -> Loaded:
    """Load a model by name. ``random_weights`` builds the same architecture with random weights
    (for runtime and energy only: weights do not change them). ``fallback_random``: where the
    pretrained weights cannot be loaded, random ones with a one-line note (stand-in for i12's)."""
    if fallback_random and not random_weights:
        try:
            return load_model(name, device, dtype)
        except UserError as e:
            print(f"note: {name}: pretrained weights unavailable ({first_line(e, 160)}); using random weights of "
                  "the same architecture")
            return load_model(name, device, dtype, random_weights=True)
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


def build_reducers(top_k: Optional[float] = None, vocab=None, thresh: float = 0.1, random: bool = False,
                   prop_attn: bool = False, tome=None, evit=None, lgtm=None) -> list:
    """The reducers of one configuration (``vocab``: a loaded Vocabulary for inter-image); settings the
    reducers refuse become one-line UserErrors."""
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
        if tome is not None:
            reducers.append(vwt.ToMe(r=tome))
        if evit is not None:
            reducers.append(vwt.EViT(keep=evit))
        if lgtm is not None:
            reducers.append(vwt.LGTM(r=lgtm))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    return reducers


def reducers_from_args(args) -> list:
    """The reducers the method flags ask for (the vocabulary is loaded and checked here)."""
    if getattr(args, "top_k", None) is not None and vocab_path(args) is not None:
        raise UserError("choose one input reducer: --top_k (intra-image) or --vocab/--vocab-path (inter-image)")
    if sum(getattr(args, k, None) is not None for k in ("tome", "evit", "lgtm")) > 1:
        raise UserError("choose one in-network reducer: --tome, --evit or --lgtm")
    path = vocab_path(args)
    if getattr(args, "vocab_path", None) is not None:
        hint = "; check the path, or learn one with `python process.py --data DATA --vocab SIZE --out FOLDER`"
    else:
        hint = (f"; learn it with `python process.py --data {getattr(args, 'vocab_data', 'imgnet')} --vocab "
                f"{getattr(args, 'vocab', None)}` or pass --vocab-path")
    vocab = None if path is None else read_vocabulary(path, hint)
    return build_reducers(getattr(args, "top_k", None), vocab, getattr(args, "thresh", 0.1),
                          getattr(args, "random", False), getattr(args, "prop_attn", False),
                          getattr(args, "tome", None), getattr(args, "evit", None), getattr(args, "lgtm", None))


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
    import tempfile

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
    import tempfile

    from .results import write_json as _write

    try:
        return _write(path, payload)
    except OSError as e:
        rescue = Path(tempfile.gettempdir()) / Path(path).name
        try:
            _write(rescue, payload)
        except OSError:
            raise UserError(f"cannot write {path} ({first_line(e)}), nor a copy in {rescue.parent}") from None
        raise UserError(f"cannot write {path} ({first_line(e)}); the finished results were saved to {rescue}") from None


def check_input_reducers(vision: nn.Module, reducers: list, image_size: int, device=None, dtype=None) -> int:
    """Run the input reducer (if any) on one blank image, before any data: a vocabulary that does not
    fit the model (patch size, space, width) or an intra-image drop that keeps no patch is a one-line
    UserError now rather than a traceback later. Returns the tokens an image has without reduction."""
    from .tokenizer import tokenize

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
    import vwt

    from .datasets import Samples
    from .flops import dims_of

    patch, px = dims_of(vision).patch_size, preprocess.size
    cache = tokenizer_dir("samples", size)
    path = (cache if (patch, px) == (16, 224) else cache.with_name(f"v{size}-p{patch}-{px}px")) / "vocab.pt"
    if path.exists():
        vocab = read_vocabulary(path)
        if (vocab.space, vocab.patch_size, tuple(vocab.meta.get("mean", ())), tuple(vocab.meta.get("std", ()))) == \
                ("pixel", patch, tuple(preprocess.mean), tuple(preprocess.std)):
            return vocab, path
    if images is None:
        ds = Samples(preprocess)
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
