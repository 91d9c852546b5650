"""int8 linear layers of the vision tower: bitsandbytes LLM.int8 on CUDA, torchao int8 on CPU; and the
VWT paper's int8 of the whole model (:func:`quantize_whole_model`, CUDA only).

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

import copy
import logging

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

    backend: "bitsandbytes" (LLM.int8, ``bnb.nn.Linear8bitLt`` with outlier threshold 6.0; needs CUDA and
    casts the whole model to float16, the paper's setting), "torchao" (int8 dynamic activations + int8
    weights, per-row; CPU or CUDA), or "auto": bitsandbytes when the model is on a CUDA device,
    torchao otherwise. Quantizing twice is a no-op for the layers already quantized.
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
    if not torch.cuda.is_available():
        raise RuntimeError("vwt.quantize: backend='bitsandbytes' (LLM.int8) needs a CUDA GPU and this machine has "
                           "none; use backend='torchao' (or 'auto') on a CPU")
    if device.type != "cuda":
        raise RuntimeError(f"vwt.quantize: backend='bitsandbytes' needs the model on a CUDA device (it is on "
                           f"{device}); call model.cuda() first")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError(f"vwt.quantize: bitsandbytes is not importable ({e}); install bitsandbytes") from None

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
        setattr(parent, name, new.to(device))  # the weight is quantized to int8 as it moves to the GPU
    return model


def _torchao(model: nn.Module, tower: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, quantize_
    except ImportError as e:
        raise RuntimeError(f"vwt.quantize: torchao is not importable ({e}); install torchao") from None

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
    last child, with tied embeddings): only the vision model is int8. Needs CUDA and the model on a
    CUDA device; quantizes in place and returns the model."""
    if not torch.cuda.is_available():
        raise RuntimeError("the paper's int8 (bitsandbytes LLM.int8 on the whole model through accelerate) needs "
                           "CUDA, and this machine has no CUDA GPU")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"the paper's int8 needs the model on a CUDA device (it is on {device}); use a CUDA device")
    try:
        import bitsandbytes  # noqa: F401
        from accelerate.utils import BnbQuantizationConfig, load_and_quantize_model
    except ImportError as e:
        raise RuntimeError(f"the paper's int8 needs accelerate and bitsandbytes ({e}); pip install accelerate "
                           "bitsandbytes") from None
    log = logging.getLogger("accelerate.utils.bnb")
    level = log.level
    log.setLevel(logging.ERROR)  # "not recommended to quantize a loaded model": the weights are loaded, as intended
    try:
        model.to("cpu")  # bitsandbytes quantizes a weight as it moves from the CPU to the GPU
        with torch.cuda.device(device):
            return load_and_quantize_model(model, BnbQuantizationConfig(load_in_8bit=True))
    finally:
        log.setLevel(level)
