"""The methods a configuration asks for, from the method table (vwt.method_table): the flags, its
short label, the rule one input reducer plus one in-network reducer, its reducers under a protocol,
and its int8."""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import quant
from .encoder import check_rule
from .errors import UserError
from .method_table import (INTER_FLAGS, METHODS, PAPER_FAMILIES, Method, Settings,  # noqa: F401
                           by_dest, given, register, rows)
from .protocol import get as get_protocol
from .tokenizer import THRESH
from .vocab_files import missing_vocab_hint, read_vocabulary, vocab_data, vocab_label, vocab_path


def __getattr__(attr: str):  # the former constants, read from the table when asked
    from . import method_table

    return getattr(method_table, attr)


def add_method_args(p, measured: bool = False) -> None:
    """Every row's flag (and its extra flags) in one argument group; ``measured``: eff.py's, where each
    flag defaults to its row's setting (``Method.add_to``)."""
    about = ("without --methods or any of these flags: base and every method alone, each at the\n"
             "default given here" if measured else None)
    g = p.add_argument_group("methods (one input reducer + one in-network reducer, optionally --quant)", about)
    for m in rows():
        m.add_to(g, measured)


def method_label(thresh: float = THRESH, random: bool = False, vocab: Optional[str] = None, **values) -> str:
    """A short label of a configuration, e.g. 'inter-v1000-t0.1+tome8+int8', or 'base'. ``values``:
    each row's value by its dest (None or False: not asked for); ``vocab`` is the vocabulary's short
    name ('v1000', or the folder of a vocab.pt), None without inter-image."""
    s = Settings(thresh=thresh, random=random, vocab_name=vocab)
    values = dict(values, vocab=vocab)
    parts = [m.label(values[m.dest], s) for m in rows() if given(values.get(m.dest))]
    return "+".join(p for p in parts if p) or "base"


def method_name(spec) -> str:
    """The label of the configuration a run's recipe asks for (see :func:`method_label`); ``spec``: a
    ``vwt.spec.RunSpec``."""
    recipe, vocab = spec.method, None
    if recipe.vocab is not None:  # another data set's vocabulary is named, as the paper's v<SIZE>-imgnet
        source = vocab_data(spec)
        vocab = f"v{recipe.vocab}" + ("" if source == (spec.data or source) else f"-{source}")
    elif recipe.vocab_path is not None:
        vocab = vocab_label(recipe.vocab_path)
    values = {d: v for d, v in recipe.values().items() if d != "vocab"}
    return method_label(recipe.threshold, recipe.random, vocab, **values)


def check_methods(**chosen) -> None:
    """The reducer rule (one input reducer + one in-network reducer, ``vwt.encoder.check_rule``) on the
    method flags, before anything is loaded: ``chosen`` maps rows' dests to the value asked for (None:
    not asked); a clash is a one-line UserError naming the flags."""
    kinds = {m.dest: m for m in rows()}
    picked = [(kinds[k].flag if k in kinds else f"--{k}", "input" if k in kinds and kinds[k].kind == "input"
               else "block") for k, v in chosen.items() if v is not None and (k not in kinds or kinds[k].kind != "int8")]
    inputs = [f"{m.flag} ({m.title})" for m in rows("input")]
    blocks = [m.flag for m in rows("block")]
    try:
        check_rule(picked, {"input": ", ".join(inputs[:-1]) + " or " + inputs[-1],
                            "block": ", ".join(blocks[:-1]) + " or " + blocks[-1]})
    except ValueError as e:
        raise UserError(str(e)) from None


def build_reducers(thresh: float = THRESH, random: bool = False, prop_attn: bool = False, protocol="paper",
                   family: Optional[str] = None, **values) -> list:
    """The reducers of one configuration, in table order; ``values``: each row's value by its dest
    (``vocab``: a loaded Vocabulary for inter-image); settings the reducers refuse become one-line
    UserErrors.

    ``--tome`` under a protocol with ``paper_tome`` on the families the paper ran (``family`` hf_clip,
    hf_blip) is the paper's ToMe, ``vwt.ToMe(r, sizes="per-block")``, with proportional attention in
    CLIP only, as its modeling_clip.py / modeling_blip.py; otherwise (protocol ``standard``, open_clip,
    timm, or an unknown family) official ToMe, ``vwt.ToMe(r)``."""
    unknown = [k for k in values if k not in {m.dest for m in rows()}]
    if unknown:
        raise TypeError(f"build_reducers: no method row for {', '.join(unknown)}")
    check_methods(**{k: v for k, v in values.items() if given(v)})
    s = Settings(thresh=thresh, random=random, prop_attn=prop_attn, vocab=values.get("vocab"), protocol=protocol,
                 family=family)
    try:
        return [m.build(values[m.dest], s) for m in rows()
                if m.build is not None and given(values.get(m.dest))]
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def reducers_for(spec, *, seed: Optional[int] = None, family: Optional[str] = None) -> list:
    """The reducers a run's recipe asks for (``spec``: a ``vwt.spec.RunSpec``), with ``seed``'s
    vocabulary (see :func:`vocab_path`; loaded and checked here), under the run's protocol for a model
    of ``family`` (see :func:`build_reducers`)."""
    recipe = spec.method
    path = vocab_path(spec, seed)
    values = {m.dest: getattr(recipe, m.dest) for m in rows() if m.kind != "int8"}
    check_methods(**dict(values, vocab=path))
    values["vocab"] = None if path is None else read_vocabulary(path, missing_vocab_hint(spec))
    return build_reducers(recipe.threshold, recipe.random, recipe.prop_attn,
                          protocol=spec.protocol, family=family, **values)


def quantize(model: nn.Module, protocol: str = "standard", family: Optional[str] = None) -> nn.Module:
    """``--quant``, with its "cannot run here" errors (a bitsandbytes without LLM.int8 on the CPU, a
    backend that is not installed) as one-line UserErrors. Protocol ``paper`` on Hugging Face CLIP/BLIP
    (``family`` hf_clip, hf_blip): the whole model through accelerate, as the paper
    (``vwt.quant.quantize_whole_model``: on CUDA, and on the CPU where bitsandbytes runs LLM.int8);
    otherwise the vision tower (``vwt.quantize``: bitsandbytes on CUDA, torchao on a CPU)."""
    whole = get_protocol(protocol).whole_model_int8
    try:
        if whole and family in PAPER_FAMILIES:
            return quant.quantize_whole_model(model)
        return quant.quantize(model)
    except RuntimeError as e:
        hint = "; --protocol standard quantizes the vision tower with torchao on a CPU" if whole else ""
        raise UserError(str(e) + hint) from None

