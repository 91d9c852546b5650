"""The method table: one row per reducer flag (its name in eff.py's --methods, flag, kind, value type,
the paper's default, how to build the reducer for a protocol and family, its label). The scripts'
flags, labels, the combination rule's messages, eff.py's --methods and every method list are generated
from it (vwt.methods); a new reducer is one class and one row (:func:`register`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import UserError
from .merge import EViT, LGTM, ToMe
from .protocol import get as get_protocol
from .resize import REFERENCE, Resize
from .tokenizer import THRESH, InterImage, IntraImage

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

    thresh: float = THRESH
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
    ``extra``: further flags (argparse args, kwargs) listed right after its own, and ``source``: where
    ``default`` comes from (a paper's setting, or that no paper sets one)."""

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
    source: str = "the paper's setting"

    def add_to(self, g, measured: bool = False) -> None:
        """Its flag (and extra flags) in argparse group ``g``; --help gives the row's default: the
        setting eff.py measures it at (``measured``), off unless given in the other scripts."""
        option = self.option or self.flag
        if self.type is None:
            g.add_argument(option, action="store_true", help=self.help)
        else:
            default = (f"(default {self.default}: {self.source})" if measured else
                       f"(default: off; eff.py measures {self.default}: {self.source})")
            g.add_argument(option, type=self.type, default=None, metavar=self.metavar, help=f"{self.help} {default}")
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


def lgtm_r(text: str):
    """--lgtm's value: R (an int), or R,DENSE,LOCAL (a tuple of three ints: LGTM's schedule too)."""
    parts = [int(p) for p in str(text).split(",")]
    if len(parts) not in (1, 3):
        raise ValueError(f"--lgtm takes R or R,DENSE,LOCAL; got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _lgtm_label(value, s: Settings) -> str:
    if isinstance(value, tuple):
        return "lgtm{}-d{}-l{}".format(*value)
    return f"lgtm{value}"


def _inter_label(value, s: Settings) -> str:
    name = s.vocab_name or str(value)
    return f"inter-{name if name.startswith('v') else 'v' + name}-t{s.thresh:g}" + ("-random" if s.random else "")


INTER_FLAGS = (
    (("--vocab-path",), dict(type=Path, default=None,
                             help="VWT inter-image: a vocab.pt (ours or the published ones) instead of --vocab; "
                                  "'{seed}' in it picks one per seed, its only field; a literal brace is {{ or }} (default: none)")),
    (("--vocab-data",), dict(default=None,
                             help="data set the --vocab vocabulary was learned on (default: under --protocol paper the "
                                  "evaluated data set's own, COCO's for NoCaps, ImageNet's for OpenImages; under "
                                  "--protocol standard imgnet)")),
    (("--imgnet",), dict(action="store_true",
                         help="use the ImageNet vocabulary (tokenizers/imgnet/v<SIZE>/), as the paper's --imgnet True")),
    (("--thresh",), dict(type=float, default=THRESH,
                         help=f"VWT inter-image: cosine-distance threshold (default {THRESH:g})")),
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
           "VWT intra-image: fraction of patches to drop, those of lowest pixel variance", _intra,
           lambda v, s: f"intra{v:g}" + ("-random" if s.random else ""), metavar="DROP",
           source="the VWT paper's setting"),
    Method("inter", "vocab", "--vocab/--vocab-path", "input", int, 1000, "inter-image",
           "VWT inter-image: vocabulary size, read from process.py's folders "
           "tokenizers/<vocab data>/v<SIZE>/[seed_<N>/]vocab.pt",
           lambda v, s: InterImage(s.vocab, thresh=s.thresh, random=s.random, prop_attn=s.prop_attn,
                                   float32_ties=get_protocol(s.protocol).float32_word_ties),
           _inter_label, metavar="SIZE", extra=INTER_FLAGS, option="--vocab", source="the VWT paper's setting"),
    Method("resize", "resize", "--resize", "input", int, REFERENCE[0], "resize",
           "run the vision tower at SIZE x SIZE pixels (a multiple of the patch size): the image resized with "
           "the model's interpolation, the position embeddings interpolated (the downsampling baseline)",
           lambda v, s: Resize(v), lambda v, s: f"resize{v}", metavar="SIZE",
           source="no paper's: the side whose FLOPs are nearest inter-image's on CLIP ViT-B/16 at 224 "
                  "(vwt.resize.REFERENCE), scaled to another model's image size"),
    Method("tome", "tome", "--tome", "block", int, 13, "ToMe", "ToMe: merge R tokens per block", _tome,
           lambda v, s: f"tome{v}", metavar="R", source="the VWT paper's setting"),
    Method("evit", "evit", "--evit", "block", float, 0.7, "EViT", "EViT: keep rate at its layers",
           lambda v, s: EViT(keep=v), lambda v, s: f"evit{v:g}", metavar="KEEP",
           source="the EViT paper's keep rate (Liang et al.)"),
    Method("lgtm", "lgtm", "--lgtm", "block", lgtm_r, LGTM().r, "DFE + LGTM",
           "DFE + LGTM: merge R tokens per block; R,DENSE,LOCAL also sets how many first blocks stay dense and "
           "how many merge locally (by default 2 and 2 of 12 blocks, scaled with depth)",
           lambda v, s: LGTM(*v) if isinstance(v, tuple) else LGTM(r=v), _lgtm_label, metavar="R[,DENSE,LOCAL]",
           source="Heo et al.'s headline ViT-S point, read from their Pareto figure"),
    Method("int8", "quant", "--quant", "int8", None, True, "int8",
           "int8 linear layers (bitsandbytes on CUDA, torchao on CPU)", None, lambda v, s: "int8" if v else ""),
):
    register(_m)


def given(value) -> bool:
    """Whether a row's value asks for its method: anything but None and a switch left off (0 and 0.0
    are values: ``--top_k 0``, ``--evit 0`` must reach the reducer, which may refuse them)."""
    return value is not None and value is not False


KINDS = ("input", "block", "int8")  # the order of a configuration: what runs first comes first


def rows(kind: Optional[str] = None) -> list:
    """The table's rows, input reducers first, then in-network reducers, then int8 (in the order they
    were registered within a kind): the order of flags, labels and --methods; ``kind``: those only."""
    ordered = sorted(METHODS.values(), key=lambda m: KINDS.index(m.kind))
    return [m for m in ordered if kind is None or m.kind == kind]


def by_dest(dest: str) -> Method:
    return next(m for m in METHODS.values() if m.dest == dest)


def __getattr__(attr: str):  # lists read from the table when asked (rows may be registered later)
    if attr == "INPUT_FLAGS":
        return {m.dest: m.flag for m in rows("input")}
    if attr == "IN_NETWORK":
        return tuple(m.dest for m in rows("block"))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
