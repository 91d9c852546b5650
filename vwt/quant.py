"""int8 linear layers of the vision tower: bitsandbytes LLM.int8 (on CUDA, and on the CPU where the
installed bitsandbytes runs it: 0.50 does) or torchao int8 (CPU or CUDA; ``auto`` picks it on a CPU); and
the VWT paper's int8 of the whole model (:func:`quantize_whole_model`, CUDA or that CPU).

Only the vision tower's modules are touched (Hugging Face CLIP/BLIP ``vision_model``, open_clip
``visual``, the whole timm model), in place. The vwt backends call the model's own Linear modules by
attribute lookup at every forward, so quantized layers are used by ``vwt.patch`` whether the model is
quantized before or after patching.

What is quantized: every ``nn.Linear`` of the tower (q/k/v or packed qkv, output projection, MLP, and
for timm the classifier head). open_clip with ``nn.MultiheadAttention`` is the exception: its q/k/v
projection is the packed ``in_proj_weight`` parameter (not a Linear module) and its ``out_proj`` is read
as a raw weight by ``nn.MultiheadAttention``'s own forward, so both stay in floating point there and
only the MLP (``c_fc``, ``c_proj``) is int8. open_clip's own ``Attention`` blocks quantize
``out_proj`` too (the packed in_proj stays float).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import types
from typing import Optional

import torch
from torch import nn

from .backends import family_of

BACKENDS = ("auto", "bitsandbytes", "torchao")
THRESHOLD = 6.0  # LLM.int8 outlier threshold, as in the paper


def vision_tower(model: nn.Module) -> nn.Module:
    """The module holding the vision tower's layers, as the vwt backends see it."""
    return family_of(model, "vwt.quantize").vision(model)


def _quantizable(mod: nn.Module) -> bool:
    # nn.MultiheadAttention reads out_proj.weight in its own forward: leave that Linear in float
    return isinstance(mod, nn.Linear) and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear)


def quantize(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make the vision tower's linear layers int8, in place; returns the model.

    backend: "bitsandbytes" (LLM.int8, ``bnb.nn.Linear8bitLt`` with outlier threshold 6.0, on the device
    the model is on: CUDA, or the CPU where the installed bitsandbytes runs LLM.int8 there, else one
    line; casts the whole model to float16, the paper's setting), "torchao" (int8 dynamic activations +
    int8 weights, per-row; CPU or CUDA), or "auto": bitsandbytes when the model is on a CUDA device,
    torchao otherwise (faster on a CPU, and float32 activations). Quantizing twice is a no-op for the
    layers already quantized.
    """
    chosen, tower = _backend(model, backend), vision_tower(model)
    if chosen == "bitsandbytes":
        return _bitsandbytes(model, tower, next(tower.parameters()).device)
    return _torchao(model, tower)


def quantized_copy(model: nn.Module, backend: str = "auto") -> nn.Module:
    """An int8 copy of ``model`` (as :func:`quantize`), leaving ``model`` as it is. torchao swaps new
    weight tensors into the copy's Linear modules and leaves the old ones alone, so there the copy
    shares the float parameters and buffers (copying ViT-B's weights takes most of a second on a small
    CPU); bitsandbytes casts the whole model to float16 in place, so it gets a full copy."""
    if _backend(model, backend) == "torchao":
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        return quantize(copy.deepcopy(model, shared), "torchao")
    return quantize(copy.deepcopy(model), "bitsandbytes")


def _backend(model: nn.Module, backend: str) -> str:
    """``backend`` checked, with "auto" resolved: bitsandbytes when the tower is on a CUDA device."""
    if backend not in BACKENDS:
        raise ValueError(f"vwt.quantize: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "bitsandbytes" if next(vision_tower(model).parameters()).device.type == "cuda" else "torchao"
    return backend


def _bitsandbytes(model: nn.Module, tower: nn.Module, device: torch.device) -> nn.Module:
    bnb = _import_bitsandbytes("vwt.quantize: backend='bitsandbytes'")
    _runs_here(device, "vwt.quantize: backend='bitsandbytes'", "backend='torchao' (or 'auto') on a CPU")
    model.half()  # LLM.int8 with float16 activations, as in the paper
    targets = [(parent, name, child) for parent in tower.modules() for name, child in parent.named_children()
               if _quantizable(child) and not isinstance(child, bnb.nn.Linear8bitLt)]
    for parent, name, lin in targets:
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=THRESHOLD)
        new.weight = bnb.nn.Int8Params(lin.weight.data.to("cpu", torch.float16), requires_grad=False,
                                       has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.to(torch.float16), requires_grad=False)
        setattr(parent, name, new.to(device))  # the weight becomes int8 as it moves from the CPU (to the CPU too)
    return model


def _import_bitsandbytes(who: str):
    """bitsandbytes, or one line saying it cannot be imported. Its import tries to fetch a 4-bit CPU
    kernel from the Hugging Face Hub and logs two warnings when it cannot (offline); LLM.int8 does not
    use that kernel, so those warnings are held back while it imports."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise RuntimeError(f"{who} needs bitsandbytes, which is not importable ({e}); pip install bitsandbytes") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return bitsandbytes


@functools.lru_cache(maxsize=None)
def cpu_int8_unsupported() -> Optional[str]:
    """None where the installed bitsandbytes runs LLM.int8 on the CPU (0.50 does): a ``Linear8bitLt``
    whose weight becomes int8 as it moves to the CPU, and whose float16 forward runs, an outlier column
    (above the threshold) included. Otherwise why not, in a few words."""
    bnb = _import_bitsandbytes("LLM.int8")
    try:
        layer = bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False, threshold=THRESHOLD).to("cpu")
        x = torch.ones(2, 8, dtype=torch.float16)
        x[:, 0] = 2 * THRESHOLD
        with torch.no_grad():
            out = layer(x)
    except Exception as e:  # whatever the installed version raises for an operation it lacks on a CPU
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if layer.weight.dtype != torch.int8:
        return f"its weights stay {layer.weight.dtype}"
    return None if torch.isfinite(out).all() else "its output is not finite"


def _runs_here(device: torch.device, who: str, instead: str) -> None:
    """LLM.int8 runs on a CUDA device, and on the CPU where the installed bitsandbytes can; otherwise
    one line that says so, and to use a GPU or ``instead`` (if given)."""
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise RuntimeError(f"{who} runs on a CUDA device or the CPU, and the model is on {device}; move it to one")
    reason = cpu_int8_unsupported()
    if reason is not None:
        import bitsandbytes

        gpu = "move the model to the CUDA GPU" if torch.cuda.is_available() else "use a CUDA GPU"
        raise RuntimeError(f"{who}: bitsandbytes {bitsandbytes.__version__} cannot run LLM.int8 on a CPU "
                           f"({reason}); {gpu}" + (f", or {instead}" if instead else ""))


def _enum_notice(record: logging.LogRecord) -> bool:
    """False for torch's notice that registering an Enum as a pytree constant is deprecated, which
    torchao's import sets off once per Enum: a note to torchao's authors, not to a user."""
    return "is an Enum subclass and is now natively supported by torch.compile" not in str(record.msg)


def _torchao(model: nn.Module, tower: nn.Module) -> nn.Module:
    pytree = logging.getLogger("torch.utils._pytree")
    pytree.addFilter(_enum_notice)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, quantize_
    except ImportError as e:
        raise RuntimeError(f"vwt.quantize: torchao is not importable ({e}); install torchao") from None
    finally:
        pytree.removeFilter(_enum_notice)

    def wanted(mod: nn.Module, fqn: str) -> bool:
        return _quantizable(mod) and not isinstance(mod.weight, Int8Tensor)

    quantize_(tower, Int8DynamicActivationInt8WeightConfig(), filter_fn=wanted)
    return model


def quantize_whole_model(model: nn.Module) -> nn.Module:
    """int8 as the VWT paper's clip.py and blip.py ran it: accelerate's ``load_and_quantize_model`` with
    ``BnbQuantizationConfig(load_in_8bit=True)`` on the whole model. Every ``nn.Linear`` outside
    accelerate's default skip list becomes bitsandbytes LLM.int8 (threshold 6.0) and every other
    parameter float16. For CLIP the skip list is empty: the text tower and both projections are int8
    too (text features then come from the int8 model). For BLIP it holds the text decoder (the model's
    last child, with tied embeddings): only the vision model is int8, the decoder float16. On a CUDA
    device as the paper; on the CPU where the installed bitsandbytes runs LLM.int8 there (see
    :class:`_CpuAsAccelerateDevice` for the one step stood in for). Quantizes in place, returns the model."""
    who = "the paper's int8 (bitsandbytes LLM.int8 of the whole model through accelerate)"
    device = next(model.parameters()).device
    try:
        from accelerate.utils import BnbQuantizationConfig, load_and_quantize_model
    except ImportError as e:
        raise RuntimeError(f"{who} needs accelerate ({e}); pip install accelerate") from None
    _import_bitsandbytes(who)
    _runs_here(device, who, "")
    log = logging.getLogger("accelerate.utils.bnb")
    level = log.level
    log.setLevel(logging.ERROR)  # "not recommended to quantize a loaded model": the weights are loaded, as intended
    try:
        model.to("cpu")  # bitsandbytes quantizes a weight as it moves from the CPU (to the GPU, or the CPU)
        with _accelerate_device(device):
            model = load_and_quantize_model(model, BnbQuantizationConfig(load_in_8bit=True))
    finally:
        log.setLevel(level)
    _float16_rest(model)
    return _int8_checked(model, who)


class _CpuAsAccelerateDevice:
    """What ``accelerate.utils.bnb`` sees as ``torch`` while the paper's int8 runs on the CPU: torch
    itself, except that ``torch.cuda`` says a device is available and that it is ``"cpu"``.

    Why: ``load_and_quantize_model`` on a loaded model swaps the layers (``replace_with_bnb_layers``,
    real ``bnb.nn.Linear8bitLt`` with the float weights), casts every other floating parameter to
    float16 (the dtype pass), and only then moves the model to the accelerator, refusing a machine
    without one ("No GPU or Intel XPU found"). That move is where bitsandbytes quantizes: an
    ``Int8Params`` turns its weight into int8 rows and scales when it moves from the CPU to any
    non-meta device. ``torch.cuda`` is read only in that last step (``torch.cuda.is_available()``, then
    ``model.to(torch.cuda.current_device())``), so with this stand-in the step is ``model.to("cpu")``:
    the same quantization on the CPU. Everything before it is accelerate's own code, unchanged.
    """

    cuda = types.SimpleNamespace(is_available=lambda: True, current_device=lambda: "cpu", empty_cache=lambda: None)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def _accelerate_device(device: torch.device):
    """On a CUDA device: that device is accelerate's current one. On the CPU: accelerate's module sees
    :class:`_CpuAsAccelerateDevice` as ``torch`` (restored after)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
        return
    import accelerate.utils.bnb as accelerate_bnb

    real = accelerate_bnb.torch
    accelerate_bnb.torch = _CpuAsAccelerateDevice()
    try:
        yield
    finally:
        accelerate_bnb.torch = real


def _float16_rest(model: nn.Module) -> None:
    """Every floating parameter float16, as the paper's path leaves it: accelerate before 1.13 computes
    ``param.to(dtype)`` in its dtype pass without keeping it (issue 22), leaving LayerNorms, embeddings,
    biases and BLIP's text decoder in float32. With a later accelerate this changes nothing."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float16:
            p.data = p.data.to(torch.float16)


def _int8_checked(model: nn.Module, who: str) -> nn.Module:
    """``model`` if it holds LLM.int8 layers and each weight is int8; otherwise one line (an accelerate
    that moves the model some other way than the stand-in expects would leave float16 weights)."""
    import bitsandbytes as bnb

    weights = [m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    if not weights or any(dtype != torch.int8 for dtype in weights):
        import accelerate

        raise RuntimeError(f"{who}: accelerate {accelerate.__version__} left {len(weights)} LLM.int8 layers with "
                           f"weights {sorted(set(map(str, weights)))}, not int8; use a CUDA GPU")
    return model
