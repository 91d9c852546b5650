"""The methods a configuration asks for: its short label, the rule one input reducer plus one
in-network reducer on the method flags, its reducers under a protocol, and its int8."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from . import quant
from .encoder import check_rule
from .errors import UserError
from .merge import EViT, LGTM, ToMe
from .tokenizer import InterImage, IntraImage
from .vocab_files import missing_vocab_hint, read_vocabulary, vocab_data, vocab_path


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
            reducers.append(IntraImage(drop=top_k, random=random))
        if vocab is not None:
            reducers.append(InterImage(vocab, thresh=thresh, random=random, prop_attn=prop_attn))
        if tome is not None and protocol == "paper" and family in PAPER_FAMILIES:
            reducers.append(ToMe(r=tome, prop_attn=PAPER_FAMILIES[family], sizes="per-block"))
        elif tome is not None:
            reducers.append(ToMe(r=tome))
        if evit is not None:
            reducers.append(EViT(keep=evit))
        if lgtm is not None:
            reducers.append(LGTM(r=lgtm))
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
            return quant.quantize_whole_model(model)
        return quant.quantize(model)
    except RuntimeError as e:
        hint = "; --protocol standard quantizes the vision tower with torchao on a CPU" if protocol == "paper" else ""
        raise UserError(str(e) + hint) from None

