"""What a run is, as typed values: :class:`RunSpec` (model, device, data, batching, output, seeds,
protocol, the method :class:`Recipe` and the experiment's own settings). ``vwt.cli.spec_from_args``
makes one from a script's command line, once; below it no function sees an argparse Namespace. From
Python, build one directly: ``RunSpec(model="openai/clip-vit-base-patch16", data="waterbirds",
method=Recipe(tome=13))``.

Results are named and hashed from :meth:`RunSpec.config`: every setting by its command-line name, the
same mapping the scripts recorded (and hashed) before the spec existed, so results names stay put.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .method_table import rows
from .protocol import DEFAULT, Protocol, get as get_protocol
from .results import DEFAULT_OUT
from .tokenizer import THRESH

SETTINGS = ("vocab_path", "vocab_data", "imgnet", "thresh", "random", "prop_attn")  # shared by the VWT rows


def _method_dests() -> tuple:
    return tuple(m.dest for m in rows())


class Recipe:
    """The methods a run asks for: each method-table row's value by its flag's name (``recipe.top_k``,
    ``recipe.tome``, ``recipe.quant``; None or False: not asked for), and the VWT settings the rows share
    (``vocab_path``, ``vocab_data``, ``imgnet``, ``thresh``, ``random``, ``prop_attn``). Immutable."""

    __slots__ = ("_values", "vocab_path", "vocab_data", "imgnet", "thresh", "random", "prop_attn")

    def __init__(self, vocab_path=None, vocab_data: Optional[str] = None, imgnet: bool = False,
                 thresh: Optional[float] = THRESH, random: bool = False, prop_attn: bool = False, **values):
        known = _method_dests()
        unknown = [k for k in values if k not in known]
        if unknown:
            raise TypeError(f"Recipe: no method row for {', '.join(unknown)}; rows: {', '.join(known)}")
        for name, value in dict(vocab_path=None if vocab_path is None else Path(vocab_path), vocab_data=vocab_data,
                                imgnet=imgnet, thresh=thresh, random=random, prop_attn=prop_attn,
                                _values=dict(values)).items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):  # a row's value; a row not given is not asked for
        if name in _method_dests():
            return self._values.get(name, False if name == "quant" else None)
        raise AttributeError(f"Recipe has no setting {name!r}")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"Recipe is immutable: use .replace({name}=...)")

    @property
    def threshold(self) -> float:
        """The inter-image threshold the run uses: ``thresh``, or the paper's where it is None (eff.py
        leaves it None so that its --methods measure the paper's unless the flag is given)."""
        return THRESH if self.thresh is None else self.thresh

    def values(self) -> dict:
        """Every row's value by its dest (rows not given: None, or False for switches)."""
        return {d: getattr(self, d) for d in _method_dests()}

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS}

    def asked(self) -> dict:
        """The rows asked for: {dest: value}."""
        return {d: v for d, v in self.values().items() if v is not None and v is not False}

    def replace(self, **changes) -> "Recipe":
        return Recipe(**{**self.settings(), **self._values, **changes})

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and (self.settings(), self.values()) == (other.settings(), other.values())

    def __hash__(self):
        return hash(tuple(sorted((k, str(v)) for k, v in {**self.settings(), **self.values()}.items())))

    def __repr__(self) -> str:
        given = {**{k: v for k, v in self.settings().items() if v is not None and v is not False}, **self.asked()}
        return "Recipe(" + ", ".join(f"{k}={v!r}" for k, v in given.items()) + ")"


# RunSpec field -> the command-line name results record it under (where they differ)
CONFIG_NAMES = {"root": "data_root"}


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is. ``batch`` is one size, or a tuple of them (eff.py); ``seeds`` None means
    the protocol's; ``options`` is the experiment's own settings (a frozen dataclass, e.g.
    ``vwt.captioning.Decoding``); ``names`` are the command-line names the run was made from (what
    :meth:`config` records; empty: every setting)."""

    model: Optional[str] = None
    device: str = "auto"
    dtype: str = "float32"
    data: Optional[str] = "samples"
    root: Path = Path("data")
    split: Optional[str] = None
    limit: Optional[int] = None
    batch: Any = 1
    bucket: Optional[bool] = None
    workers: int = 0
    out: Optional[Path] = DEFAULT_OUT
    seeds: Optional[tuple] = None
    protocol: Protocol = DEFAULT
    method: Recipe = field(default_factory=Recipe)
    options: Any = None
    names: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "protocol", get_protocol(self.protocol))
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))
        if isinstance(self.method, Mapping):
            object.__setattr__(self, "method", Recipe(**self.method))

    def replace(self, **changes) -> "RunSpec":
        """A copy with ``changes``: RunSpec fields, method settings and rows (``tome=13``), or options."""
        own = {f.name for f in fields(self)}
        mine = {f.name for f in fields(self.options)} if self.options is not None else set()
        top = {k: v for k, v in changes.items() if k in own}
        opts = {k: v for k, v in changes.items() if k not in own and k in mine}  # first, as spec_from_args
        recipe = {k: v for k, v in changes.items() if k not in own and k not in mine
                  and (k in SETTINGS or k in _method_dests())}
        opts.update({k: v for k, v in changes.items() if k not in own and k not in opts and k not in recipe})
        if recipe:
            top["method"] = top.get("method", self.method).replace(**recipe)
        if opts:
            if self.options is None:
                raise TypeError(f"RunSpec has no setting {', '.join(opts)}")
            top["options"] = dataclasses.replace(top.get("options", self.options), **opts)
        return dataclasses.replace(self, **top)

    def with_options(self, cls) -> "RunSpec":
        """This spec, with ``cls()`` (an experiment's default settings) where it has no options yet."""
        return self if self.options is not None else dataclasses.replace(self, options=cls())

    def config(self) -> dict:
        """Every setting by its command-line name: what results files record and hash (only ``names``
        where given, so a script's results keep the names and hashes they had)."""
        flat = {}
        for f in fields(self):
            if f.name in ("method", "options", "names"):
                continue
            value = getattr(self, f.name)
            flat[CONFIG_NAMES.get(f.name, f.name)] = value.name if isinstance(value, Protocol) else value
        flat.update(self.method.settings())
        flat.update(self.method.values())
        if self.options is not None:
            flat.update({f.name: getattr(self.options, f.name) for f in fields(self.options)})
        if self.names:
            return {k: flat[k] for k in self.names if k in flat}
        return flat
