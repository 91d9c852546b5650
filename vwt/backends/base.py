"""What every backend shares: the :class:`Backend` interface a family implements, the record of what
patching changed on a model (:class:`Patch`), and the small helpers the adapters use.

A leaf below ``vwt.patch`` and the registry (``vwt.backends``): the backends import it, it imports
none of them, so the patch <-> backends import cycle cannot come back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor, nn

from .. import encoder
from ..encoder import TokenState, Tower, TowerDims

# The normalisation of OpenAI's CLIP (and of BLIP, which reuses it): the model's own preprocessing.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_ATTR = "_vwt_patch"


@dataclass
class Patch:
    """What patching changed on a model, and what its last forward did."""

    backend: str
    reducers: tuple
    packing: str = "auto"
    # picklable callables that undo the patch (records and bound methods, never closures: a deep copy
    # or a pickle of the model undoes on its own modules)
    restore: list = field(default_factory=list)
    last: Optional[TokenState] = None


def patch_info(model: nn.Module) -> Optional[Patch]:
    """The :class:`Patch` of a model ``vwt.patch`` patched, else None."""
    info = getattr(model, PATCH_ATTR, None)
    return info if isinstance(info, Patch) else None


class Backend:
    """One model family's adapter, registered once in ``vwt.backends.REGISTRY``.

    A family answers ``vision(model)`` (the vision module inside ``model``, the one called with
    pixels, that ``vwt.patch`` reroutes and ``vwt.quantize`` quantizes; None: not this family) and
    from it builds the block loop's :class:`vwt.encoder.Tower`, reads the dimensions and the
    preprocessing, and patches the forward."""

    name: str = ""
    describes: str = ""  # the classes it handles, for error messages
    # Hugging Face checkpoints: the config ``model_type`` values of this family, and the transformers
    # class (by name: imported only when loaded) that ``vwt.models`` loads them into. Empty: none.
    model_types: tuple[str, ...] = ()
    hf_class: str = ""

    def vision(self, model: nn.Module) -> Optional[nn.Module]:
        raise NotImplementedError

    def handles(self, model: nn.Module) -> bool:
        return self.vision(model) is not None

    def tower(self, model: nn.Module, **options) -> Tower:
        """The block loop's view of the vision tower of ``model``."""
        raise NotImplementedError

    def dims(self, model: nn.Module) -> TowerDims:
        """The dimensions of the vision tower at its configured image size."""
        raise NotImplementedError

    def preprocess(self, model: nn.Module) -> dict:
        """The model's own image preprocessing: ``size``, ``mean``, ``std`` and ``crop`` (resize the
        short side then centre-crop; False: resize to size x size), read from the model itself."""
        raise NotImplementedError

    def patch(self, model: nn.Module, info: Patch) -> None:
        """Reroute the vision tower's forward through the block loop, recording undo steps in ``info``."""
        raise NotImplementedError

    def unpatch(self, model: nn.Module, info: Patch) -> None:
        """Undo :meth:`patch`: run the recorded undo steps, last first."""
        for undo in reversed(info.restore):
            undo()

    def __repr__(self) -> str:
        return f"<vwt backend {self.name}>"


class PatchedMethod(functools.partial):
    """``fn(module, info, *args)`` installed as ``module``'s own method: a module-level function bound
    to the module and its :class:`Patch` by reference, not a closure, so ``copy.deepcopy``, ``pickle``
    and ``torch.save`` of a patched model give a copy that runs (and unpatches) its own modules."""

    def __repr__(self) -> str:
        module, _ = self.args
        return f"<vwt-patched {self.func.__module__}.{self.func.__name__} of {type(module).__name__}>"


class Replaced:
    """Undo step: give ``module`` back what its instance attribute ``name`` held before patching (or
    remove it). A record, not a closure, for the same reason as :class:`PatchedMethod`."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.had_own = name in module.__dict__
        self.old: Any = module.__dict__.get(name)

    def __call__(self) -> None:
        if self.had_own:
            setattr(self.module, self.name, self.old)
        else:
            delattr(self.module, self.name)

    def __repr__(self) -> str:
        return f"Replaced({type(self.module).__name__}.{self.name})"


def replace_forward(module: nn.Module, forward: Callable, info: Patch, name: str = "forward") -> None:
    """Give ``module`` the instance-level method ``name`` (default ``forward``) that calls the
    module-level function ``forward(module, info, *args, **kwargs)``; undone by ``unpatch``."""
    info.restore.append(Replaced(module, name))
    setattr(module, name, PatchedMethod(forward, module, info))


def run_tower(info: Patch, tower: Tower, pixel_values: Tensor) -> TokenState:
    """Run the block loop with the patch's reducers and keep a light copy of the state for stats."""
    state = encoder.run(tower, pixel_values, info.reducers, info.packing)
    info.last = TokenState(x=None, size=state.sizes(), labels=state.labels, grid=state.grid,
                           prefix=state.prefix, prop_attn=state.prop_attn,
                           tokens_per_layer=state.tokens_per_layer, execution=state.execution)
    return state


def refuse_patch_dropout(drop: nn.Module, family: str) -> None:
    """A ValueError where the model's patch dropout would act (``train()`` mode, a rate above 0): it
    drops random input patches, which the token state (every input patch's token) cannot follow."""
    if drop.training and not isinstance(drop, nn.Identity):
        raise ValueError(f"a vwt-patched {family} model does not run patch dropout (train() mode with a patch "
                         f"dropout rate above 0): call .eval(), or build the model with patch dropout 0")


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def grid_of(pixel_values: Tensor, patch: int) -> tuple[int, int]:
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
