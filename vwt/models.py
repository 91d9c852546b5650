"""Models by name: Hugging Face CLIP and BLIP ids, ``open_clip:ARCH[/PRETRAINED]`` and ``timm:NAME``,
with pretrained or random weights, and the one check of whether the model hub answers at all."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .backends import family_for_config, family_of, hf_supported
from .errors import UserError, first_line

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


@dataclass
class Loaded:
    model: nn.Module           # the whole model (CLIPModel, BlipForConditionalGeneration, open_clip CLIP, timm ViT)
    family: Optional[str]      # hf_clip, hf_blip, open_clip, timm: the registry's name (None: look it up)
    name: str
    pretrained: bool           # False: random weights
    tokenizer: Optional[Callable] = None  # text tokenizer / processor where the family has one
    note: str = ""             # why the weights are random where pretrained ones were asked for
    guessed: str = ""          # random weights of an architecture guessed from the name: which, and why
    missing: tuple = ()        # parameters the checkpoint lacked or held in another shape (left random)

    def __post_init__(self):
        found = family_of(self.model).name
        if self.family not in (None, found):
            raise ValueError(f"Loaded: {type(self.model).__name__} is a {found} model, not {self.family}")
        self.family = found

    @property
    def vision(self) -> nn.Module:
        """The vision tower alone (what eff.py times): the module the family's backend patches."""
        return family_of(self.model).vision(self.model)


HF = ("hf_clip", "hf_blip")  # the families whose random text tower ``vision_only`` shrinks
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)


def _hf_random_config(name: str, vision_only: bool = False):
    """A configuration guessed from the name alone, for random weights where the checkpoint's own
    config.json cannot be read (a hub id, offline, not cached); ``vision_only``: text tower SMALL_TEXT."""
    low = name.lower()
    if "blip" in low:
        from transformers import BlipConfig

        # defaults are BLIP base: ViT-B/16 at 384 px
        return BlipConfig(text_config=dict(SMALL_TEXT)) if vision_only else BlipConfig()
    from transformers import CLIPConfig

    patch = 14 if "patch14" in low else 32 if "patch32" in low else 16
    size = 336 if "336" in low else 224
    if "large" in low:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=patch, image_size=size)
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
        return CLIPConfig(vision_config=vision, text_config=dict(SMALL_TEXT) if vision_only else text,
                          projection_dim=768)
    return CLIPConfig(vision_config=dict(patch_size=patch, image_size=size),
                      text_config=dict(SMALL_TEXT) if vision_only else None)


HUB_TIMEOUT = 2.0  # seconds: how long to wait for the hub to answer, once per process
_hub_answered: Optional[bool] = None
HUB_CHECK = {"seconds": 0.0}  # how long this process spent asking the hub (scripts report it)


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
        started = time.perf_counter()
        _hub_answered = _answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/", timeout)
        HUB_CHECK["seconds"] = time.perf_counter() - started
        if not _hub_answered:
            go_offline()
    return _hub_answered


PARTS = ("all", "vision")  # what of a model a run uses: everything (clip.py, blip.py), or the vision tower alone


def lacking(loaded: Loaded, needs: str = "all") -> list:
    """The parameters of the part ``needs`` names (:data:`PARTS`) that ``loaded``'s checkpoint lacked:
    all of them, or those inside the vision tower."""
    if needs == "all" or not loaded.missing:
        return list(loaded.missing)
    prefix = next((n for n, m in loaded.model.named_modules() if m is loaded.vision), "")
    return [k for k in loaded.missing if not prefix or k.startswith(prefix + ".")]


def check_weights(loaded: Loaded, needs: str = "all") -> Loaded:
    """A one-line UserError where the checkpoint lacked weights of the part the run uses (``needs``):
    transformers would fill them with random values and the results would mean nothing."""
    gone = lacking(loaded, needs)
    if gone:
        parts = sorted({k.split(".")[0] for k in gone})
        raise UserError(f"{loaded.name} has no weights (or weights of another shape) for {', '.join(parts)} "
                        f"({len(gone)} tensors, e.g. {gone[0]}), "
                        f"which this run uses ({'the whole model' if needs == 'all' else 'the vision tower'}); pass "
                        "a checkpoint that holds them" + (f" (e.g. {DEFAULT_BLIP})" if loaded.family == "hf_blip"
                                                           else f" (e.g. {DEFAULT_CLIP})"))
    return loaded


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32, random_weights: bool = False,
               fallback_random: bool = False, vision_only: bool = False, needs: str = "all") -> Loaded:
    """Load a model by name; a Hugging Face id or folder as the family its own config.json names.
    ``random_weights`` builds the same architecture with random weights (for runtime, energy and
    pixel-space work only: they do not depend on weights). Before touching
    the hub, :func:`hub_reachable` decides once whether to work offline. ``fallback_random``: where
    the pretrained weights cannot be loaded, build random ones and print a one-line note (kept in
    ``Loaded.note``). ``vision_only``: random Hugging Face CLIP and BLIP get a one-layer text tower
    (eff.py times the vision tower alone; making ViT-B/16 CLIP's text tower costs half a second).
    ``needs``: the part of the model the run uses (:data:`PARTS`); pretrained weights that lack any of
    it are a UserError (:func:`check_weights`), or with ``fallback_random`` random weights with a note."""
    if not random_weights:
        hub_reachable()
    try:
        loaded = _load(name, random_weights, vision_only)
        if not random_weights:
            check_weights(loaded, needs)
    except UnsupportedModel:
        raise
    except UserError as e:
        if not fallback_random or random_weights:
            raise
        loaded = _load(name, True, vision_only)
        loaded.note = f"pretrained weights unavailable ({getattr(e, 'cause', None) or first_line(e)})"
    tower = " (and a one-layer text tower)" if vision_only and loaded.family in HF else ""
    why = "" if random_weights else " (runtime and energy do not depend on weights)"
    if loaded.guessed:  # asked for or fallen back to: say the architecture is a guess
        loaded.note = "; ".join(filter(None, (loaded.note, f"using random weights of {loaded.guessed}{tower}")))
        print(f"note: {name}: {loaded.note}{why}")
    elif loaded.note:
        print(f"note: {name}: {loaded.note}; using random weights of the same "
              f"{'vision tower' + tower if tower else 'architecture'}{why}")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _load(name: str, random_weights: bool, vision_only: bool = False) -> Loaded:
    known(name)
    try:
        if name.startswith("open_clip:"):
            import open_clip

            arch, _, pre = name[len("open_clip:"):].partition("/")
            with _open_clip_quiet():
                model = open_clip.create_model(arch, pretrained=None if random_weights else (pre or None))
                tokenizer = open_clip.get_tokenizer(arch)
            return Loaded(model, "open_clip", name, not random_weights and bool(pre), tokenizer)
        if name.startswith("timm:"):
            import timm

            return Loaded(timm.create_model(name[len("timm:"):], pretrained=not random_weights), "timm", name,
                          not random_weights)
        return _load_hf(name, random_weights, vision_only)
    except UserError:
        raise
    except Exception as e:  # hub unreachable, not cached, ...
        cause = first_line(e).rstrip(".")
        raise Unavailable(f"cannot load model {name!r}: {cause}. Models come from the Hugging Face hub (or its "
                          "local cache); pass a cached or local model, or --random-weights where the script offers it",
                          cause) from None


@contextlib.contextmanager
def _open_clip_quiet():
    """Hold back what open_clip logs on the root logger while it builds a model ("No pretrained weights
    loaded" for random weights, "Failed to download" before the note that quotes it): vwt says it once.
    A NullHandler meanwhile keeps ``logging.warning`` from configuring the root logger for good (a
    handler bound to whatever ``sys.stderr`` is at that moment)."""
    root, hold = logging.getLogger(), logging.NullHandler()
    root.addHandler(hold)
    root.addFilter(_not_open_clip)
    try:
        yield
    finally:
        root.removeFilter(_not_open_clip)
        root.removeHandler(hold)


def _not_open_clip(record: logging.LogRecord) -> bool:
    return f"{os.sep}open_clip{os.sep}" not in record.pathname


class Unavailable(UserError):
    """Pretrained weights that cannot be had (hub unreachable, not cached); ``cause``: the library's
    own words, which a note quotes where random weights stand in."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def known(name: str) -> None:
    """An :class:`UnsupportedModel` for a ``timm:`` or ``open_clip:`` name its library does not know (a
    typo): random weights cannot build an unknown architecture. Hub names (``hf-hub:``) and files are
    left to the library."""
    import difflib

    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if ":" in arch:
            return
        base, tag = timm.models.split_model_name_tag(arch)
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models(), n=3)
            raise UnsupportedModel(f"timm has no model {base!r}{_closest(close)}; timm.list_models() lists them")
        tags = [n.partition(".")[2] for n in timm.list_pretrained(base + ".*")]
        if tag and tag not in tags:
            raise UnsupportedModel(f"timm has no pretrained weights {tag!r} for {base}; its tags: "
                                   f"{', '.join(tags) or 'none'} (timm:{base} alone: its default weights)")
    if name.startswith("open_clip:"):
        import open_clip

        arch, _, pre = name[len("open_clip:"):].partition("/")
        if ":" in arch:
            return
        if arch not in open_clip.list_models():
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            raise UnsupportedModel(f"open_clip has no model {arch!r}{_closest(close)}; open_clip.list_models() "
                                   "lists them")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pre and pre not in tags and not os.path.exists(pre):
            raise UnsupportedModel(f"open_clip has no pretrained weights {pre!r} for {arch} and no file of that name; "
                                   f"its tags: {', '.join(tags) or 'none'} (open_clip:{arch} alone: random weights)")


def _closest(names: list) -> str:
    return f" (closest: {', '.join(names)})" if names else ""


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


class UnsupportedModel(UserError):
    """A checkpoint whose own configuration names a model type no backend loads (random weights of it
    would not help either)."""


def _hf_config(name: str):
    """The checkpoint's own configuration, as its family's config class, and the backend of that
    family; (None, None, why) where config.json cannot be read (a hub id offline and not cached, no
    such folder). A config.json of a model type no backend loads is an :class:`UnsupportedModel`."""
    from transformers import PretrainedConfig

    try:
        found, _ = PretrainedConfig.get_config_dict(name)
    except Exception as e:  # offline and not cached, no such repository or folder, no config.json
        if _no_such_repository(e):
            raise UnsupportedModel(f"{name} is neither a local folder nor a model on the Hugging Face hub (the hub "
                                   "has no such repository); check the name, e.g. " + DEFAULT_CLIP) from None
        return None, None, e
    backend = family_for_config(found)
    if backend is None:
        kind = f"a {found['model_type']!r} model" if found.get("model_type") else "a model of no Hugging Face model_type"
        archs = ", ".join(found.get("architectures") or ())
        raise UnsupportedModel(f"{name} is {kind}{f' ({archs})' if archs else ''} by its config.json; vwt loads "
                               f"Hugging Face model types {hf_supported()}, 'open_clip:ARCH[/PRETRAINED]' and "
                               "'timm:NAME'")
    return _hf_class(backend).config_class.from_dict(found), backend, None


def _no_such_repository(e: BaseException) -> bool:
    """Whether the hub answered that the repository does not exist (huggingface_hub's
    RepositoryNotFoundError, somewhere in the chain of causes; a gated repository is another matter)."""
    while e is not None:
        names = {c.__name__ for c in type(e).__mro__}
        if "RepositoryNotFoundError" in names and "GatedRepoError" not in names:
            return True
        e = e.__cause__ or e.__context__
    return False


def _hf_class(backend):
    """The transformers class of ``backend``'s checkpoints, imported alone (each family costs seconds)."""
    import transformers

    return getattr(transformers, backend.hf_class)


def _guess(config) -> str:
    """What a name-guessed configuration builds, for the note."""
    v = config.vision_config
    return (f"an architecture guessed from the name (its config.json cannot be read): {config.model_type.upper()} "
            f"ViT width {v.hidden_size}, {v.num_hidden_layers} blocks, patch {v.patch_size}, {v.image_size} px")


def _hf_models_without_torchao() -> None:
    """Import transformers' model code, the first time, with its probe for torchao answering no.
    transformers' quantizers import torchao wherever it is installed, only to load checkpoints that
    torchao quantized (vwt loads none): that cost every start 1.5 to 2 s and two torch deprecation
    warnings. ``vwt.quantize`` imports torchao itself when int8 is asked for; the transformers modules
    imported here keep the answer no (a torchao-quantized checkpoint is then refused by transformers)."""
    import sys

    if "transformers.modeling_utils" in sys.modules:
        return
    from transformers import utils as hf_utils
    from transformers.utils import import_utils

    probe = getattr(import_utils, "is_torchao_available", None)
    answered = [m for m in (import_utils, hf_utils) if probe is not None and getattr(m, "is_torchao_available", None) is probe]
    for module in answered:
        module.is_torchao_available = _no_torchao
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        for module in answered:
            module.is_torchao_available = probe


def _no_torchao(*_, **__) -> bool:
    return False


def _load_hf(name: str, random_weights: bool, vision_only: bool = False) -> Loaded:
    """A Hugging Face checkpoint as the family its own config.json names, whatever its name or folder
    says; only where that cannot be read do random weights fall back to a guess from the name."""
    _hf_models_without_torchao()
    config, backend, unread = _hf_config(name)
    guessed = ""
    if config is None:
        if not random_weights:
            raise unread  # nothing to load the weights with: _load words it
        config = _hf_random_config(name, vision_only)
        backend, guessed = family_for_config(config), _guess(config)
    elif random_weights and vision_only and hasattr(config, "text_config"):
        for key, value in SMALL_TEXT.items():
            setattr(config.text_config, key, value)
    cls = _hf_class(backend)
    if random_weights:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = cls(config)
        return Loaded(fill_random(model), backend.name, name, False, guessed=guessed)
    model, missing = _from_pretrained(cls, name, config)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
    except Exception:
        processor = None
    return Loaded(model, backend.name, name, True, processor, missing=missing)


def _from_pretrained(cls, name: str, config) -> tuple:
    """(model, the names of the parameters the checkpoint lacked or held in another shape: transformers
    leaves both at random values). Its own report of them (a table of every key) is not printed:
    :func:`check_weights` says it in one line, for the part a run uses. The report and transformers'
    other warnings about the checkpoint's keys (e.g. "This checkpoint seem corrupted. The tied weights
    mapping ...", for the same missing keys) are held back, by a filter: raising the level of transformers' modeling_utils logger instead makes transformers
    (5.x: ``if logger.level >= WARNING: verify_tp_plan(...)``) log every key of the model as "not
    sharded" through another logger."""
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_not_the_load_report)
    try:
        model, info = cls.from_pretrained(name, config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        report.removeFilter(_not_the_load_report)
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
    return model, tuple(sorted(set(info.get("missing_keys") or ()) | mismatched))


def _not_the_load_report(record) -> bool:
    """False for what transformers' loader warns while it loads (its "LOAD REPORT" table of missing and
    mismatched keys, its notes on tied weights those keys lack); its errors pass."""
    return record.levelno > logging.WARNING
