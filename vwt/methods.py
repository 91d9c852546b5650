"""The methods a configuration asks for: its short label, the rule one input reducer plus one
in-network reducer on the method flags, its reducers under a protocol, and its int8."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from . import quant
from .encoder import check_rule
from .errors import UserError
from .merge import EViT, LGTM, ToMe
from .protocol import get as get_protocol
from .tokenizer import InterImage, IntraImage
from .vocab_files import missing_vocab_hint, read_vocabulary, vocab_data, vocab_path


# --------------------------------------------------------------------------------------------------
# The method table: one row per reducer flag. The scripts' flags, labels, the combination rule's
# messages, eff.py's --methods and every method list are generated from it; a new reducer is one class
# and one row (``register``).
# --------------------------------------------------------------------------------------------------
PAPER_FAMILIES = {"hf_clip": True, "hf_blip": False}  # the families the paper's code ran -> its ToMe's prop_attn


@dataclass(frozen=True)
class Settings:
    """What a reducer's builder is given besides its own value: the shared VWT settings, the loaded
    vocabulary (inter-image), the protocol and the model family."""

    thresh: float = 0.1
    random: bool = False
    prop_attn: bool = False
    vocab: object = None
    vocab_name: Optional[str] = None  # the vocabulary's short name in labels ('v1000', a folder's name)
    protocol: object = "paper"
    family: Optional[str] = None


@dataclass(frozen=True)
class Method:
    """One row: ``name`` (eff.py's --methods word), ``dest`` (the flag's argparse destination and the
    keyword of :func:`build_reducers`), ``flag`` (how messages name it), ``kind`` ("input", "block"
    for an in-network reducer, "int8"), ``type`` of its value (None: a switch), ``default`` (the
    paper's setting, what eff.py measures), ``title`` (what it is, in messages), ``help``, ``build``
    (value, Settings) -> reducer, ``label`` (value, Settings) -> its part of a configuration's label,
    and ``extra``: further flags (argparse args, kwargs) listed right after its own."""

    name: str
    dest: str
    flag: str
    kind: str
    type: Optional[Callable]
    default: Any
    title: str
    help: str
    build: Optional[Callable] = None
    label: Callable = lambda value, s: ""
    metavar: Optional[str] = None
    extra: tuple = ()
    option: Optional[str] = None  # the command-line option where ``flag`` names more than one

    def add_to(self, g) -> None:
        option = self.option or self.flag
        if self.type is None:
            g.add_argument(option, action="store_true", help=self.help)
        else:
            g.add_argument(option, type=self.type, default=None, metavar=self.metavar, help=self.help)
        for args, kwargs in self.extra:
            g.add_argument(*args, **kwargs)


def _intra(value, s: Settings):
    if not 0 <= value < 1:
        raise UserError(f"--top_k is the fraction of patches to drop, in [0, 1); got {value}")
    return IntraImage(drop=value, random=s.random)


def _tome(value, s: Settings):
    if get_protocol(s.protocol).paper_tome and s.family in PAPER_FAMILIES:
        return ToMe(r=value, prop_attn=PAPER_FAMILIES[s.family], sizes="per-block")
    return ToMe(r=value)


def _inter_label(value, s: Settings) -> str:
    name = s.vocab_name or str(value)
    return f"inter-{name if name.startswith('v') else 'v' + name}-t{s.thresh:g}" + ("-random" if s.random else "")


INTER_FLAGS = (
    (("--vocab-path",), dict(type=Path, default=None,
                             help="VWT inter-image: a vocab.pt (ours or the published ones) instead of --vocab; "
                                  "'{seed}' in it picks one per seed")),
    (("--vocab-data",), dict(default=None,
                             help="data set the --vocab vocabulary was learned on (default: under --protocol paper the "
                                  "evaluated data set's own, COCO's for NoCaps, ImageNet's for OpenImages; under "
                                  "--protocol standard imgnet)")),
    (("--imgnet",), dict(action="store_true",
                         help="use the ImageNet vocabulary (tokenizers/imgnet/v<SIZE>/), as the paper's --imgnet True")),
    (("--thresh",), dict(type=float, default=0.1, help="VWT inter-image: cosine-distance threshold")),
    (("--random",), dict(action="store_true", help="VWT ablation: random drop / random matching scores")),
    (("--prop-attn",), dict(action="store_true", help="VWT inter-image: proportional attention")),
)

METHODS: dict = {}


def register(method: Method) -> Method:
    """Add (or replace) a row: the scripts' flags, labels, rule and --methods then know it."""
    METHODS[method.name] = method
    return method


for _m in (
    Method("intra", "top_k", "--top_k", "input", float, 0.5, "intra-image",
           "VWT intra-image: fraction of patches to drop (lowest pixel variance)", _intra,
           lambda v, s: f"intra{v:g}" + ("-random" if s.random else ""), metavar="DROP"),
    Method("inter", "vocab", "--vocab/--vocab-path", "input", int, 1000, "inter-image",
           "VWT inter-image: vocabulary size, read from process.py's folders "
           "tokenizers/<vocab data>/v<SIZE>/[seed_<N>/]vocab.pt",
           lambda v, s: InterImage(s.vocab, thresh=s.thresh, random=s.random, prop_attn=s.prop_attn),
           _inter_label, metavar="SIZE", extra=INTER_FLAGS, option="--vocab"),
    Method("tome", "tome", "--tome", "block", int, 13, "ToMe", "ToMe: merge R tokens per block", _tome,
           lambda v, s: f"tome{v}", metavar="R"),
    Method("evit", "evit", "--evit", "block", float, 0.7, "EViT", "EViT: keep rate at its layers",
           lambda v, s: EViT(keep=v), lambda v, s: f"evit{v:g}", metavar="KEEP"),
    Method("lgtm", "lgtm", "--lgtm", "block", int, LGTM().r, "DFE + LGTM", "DFE + LGTM: merge R tokens per block",
           lambda v, s: LGTM(r=v), lambda v, s: f"lgtm{v}", metavar="R"),
    Method("int8", "quant", "--quant", "int8", None, True, "int8",
           "int8 linear layers (bitsandbytes on CUDA, torchao on CPU)", None, lambda v, s: "int8" if v else ""),
):
    register(_m)


def rows(kind: Optional[str] = None) -> list:
    """The table's rows in order, those of ``kind`` only where given."""
    return [m for m in METHODS.values() if kind is None or m.kind == kind]


def by_dest(dest: str) -> Method:
    return next(m for m in METHODS.values() if m.dest == dest)


def __getattr__(attr: str):  # lists read from the table when asked (rows may be registered later)
    if attr == "INPUT_FLAGS":
        return {m.dest: m.flag for m in rows("input")}
    if attr == "IN_NETWORK":
        return tuple(m.dest for m in rows("block"))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def add_method_args(p) -> None:
    """Every row's flag (and its extra flags) in one argument group."""
    g = p.add_argument_group("methods (one input reducer + one in-network reducer, optionally --quant)")
    for m in rows():
        m.add_to(g)


def method_label(thresh: float = 0.1, random: bool = False, vocab: Optional[str] = None, **values) -> str:
    """A short label of a configuration, e.g. 'inter-v1000-t0.1+tome8+int8', or 'base'. ``values``:
    each row's value by its dest (None or False: not asked for); ``vocab`` is the vocabulary's short
    name ('v1000', or the folder of a vocab.pt), None without inter-image."""
    s = Settings(thresh=thresh, random=random, vocab_name=vocab)
    values = dict(values, vocab=vocab)
    parts = [m.label(values[m.dest], s) for m in rows() if values.get(m.dest) not in (None, False)]
    return "+".join(p for p in parts if p) or "base"


def method_name(spec) -> str:
    """The label of the configuration a run's recipe asks for (see :func:`method_label`); ``spec``: a
    ``vwt.spec.RunSpec``."""
    recipe, vocab = spec.method, None
    if recipe.vocab is not None:  # another data set's vocabulary is named, as the paper's v<SIZE>-imgnet
        source = vocab_data(spec)
        vocab = f"v{recipe.vocab}" + ("" if source == (spec.data or source) else f"-{source}")
    elif recipe.vocab_path is not None:
        vocab = Path(recipe.vocab_path).parent.name
    values = {d: v for d, v in recipe.values().items() if d != "vocab"}
    thresh = 0.1 if recipe.thresh is None else recipe.thresh
    return method_label(thresh, recipe.random, vocab, **values)


def check_methods(**chosen) -> None:
    """The reducer rule (one input reducer + one in-network reducer, ``vwt.encoder.check_rule``) on the
    method flags, before anything is loaded: ``chosen`` maps rows' dests to the value asked for (None:
    not asked); a clash is a one-line UserError naming the flags."""
    kinds = {m.dest: m for m in rows()}
    picked = [(kinds[k].flag if k in kinds else f"--{k}", "input" if k in kinds and kinds[k].kind == "input"
               else "block") for k, v in chosen.items() if v is not None and (k not in kinds or kinds[k].kind != "int8")]
    inputs = " or ".join(f"{m.flag} ({m.title})" for m in rows("input"))
    blocks = [m.flag for m in rows("block")]
    try:
        check_rule(picked, {"input": inputs, "block": ", ".join(blocks[:-1]) + " or " + blocks[-1]})
    except ValueError as e:
        raise UserError(str(e)) from None


def build_reducers(thresh: float = 0.1, random: bool = False, prop_attn: bool = False, protocol="paper",
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
    check_methods(**{k: v for k, v in values.items() if v not in (None, False)})
    s = Settings(thresh=thresh, random=random, prop_attn=prop_attn, vocab=values.get("vocab"), protocol=protocol,
                 family=family)
    try:
        return [m.build(values[m.dest], s) for m in rows()
                if m.build is not None and values.get(m.dest) not in (None, False)]
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
    return build_reducers(0.1 if recipe.thresh is None else recipe.thresh, recipe.random, recipe.prop_attn,
                          protocol=spec.protocol, family=family, **values)


def quantize(model: nn.Module, protocol: str = "standard", family: Optional[str] = None) -> nn.Module:
    """``--quant``, with its "cannot run here" errors (no CUDA, a backend that is not installed) as
    one-line UserErrors. Protocol ``paper`` on Hugging Face CLIP/BLIP (``family`` hf_clip, hf_blip):
    the whole model through accelerate, as the paper (``vwt.quant.quantize_whole_model``; CUDA only);
    otherwise the vision tower (``vwt.quantize``: bitsandbytes on CUDA, torchao on a CPU)."""
    whole = get_protocol(protocol).whole_model_int8
    try:
        if whole and family in PAPER_FAMILIES:
            return quant.quantize_whole_model(model)
        return quant.quantize(model)
    except RuntimeError as e:
        hint = "; --protocol standard quantizes the vision tower with torchao on a CPU" if whole else ""
        raise UserError(str(e) + hint) from None

