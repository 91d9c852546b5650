"""Hugging Face BLIP: BlipForConditionalGeneration (forward and generate) and BlipVisionModel.

Image tokens padded by a reducer are exactly zero in ``last_hidden_state``; a pre-hook on the text
decoder turns them into a cross-attention mask, so captions (``generate`` with beams included) never
attend to pads. With nothing padded the decoder's inputs are left untouched.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..encoder import Block, Tower, identity, zero_pads
from .base import Patch, grid_of, replace_forward, run_tower
from .hf_clip import HFClip


def vision_model(model: nn.Module):
    """The BlipVisionModel inside ``model`` (or ``model`` itself), or None."""
    if not type(model).__module__.startswith("transformers"):
        return None
    for m in (model, getattr(model, "vision_model", None)):
        if m is not None and type(m).__name__ == "BlipVisionModel":
            return m
    return None


def _block(layer) -> Block:
    attn = layer.self_attn

    def qkv(h):
        b, n, c = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    return Block(norm1=layer.layer_norm1, qkv=qkv, out_proj=lambda o: attn.projection(o),
                 norm2=layer.layer_norm2, mlp=layer.mlp, scale=attn.scale,
                 attn_drop=attn.dropout.p if attn.training else 0.0)


def tower(vm: nn.Module, interpolate_pos_encoding: bool = False) -> Tower:
    emb = vm.embeddings

    def embed(pixel_values: Tensor, interpolate_pos_encoding: bool = interpolate_pos_encoding):
        b, _, h, w = pixel_values.shape
        dtype = emb.patch_embedding.weight.dtype
        patches = emb.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.expand(b, 1, -1).to(dtype), patches], dim=1)
        pos = emb.interpolate_pos_encoding(x, h, w) if interpolate_pos_encoding else emb.position_embedding
        x = x + pos[:, : x.size(1), :].to(dtype)
        return x, patches, grid_of(pixel_values, emb.patch_size)

    return Tower(embed=embed, pre_norm=identity, blocks=[_block(l) for l in vm.encoder.layers],
                 patch_size=emb.patch_size, training=vm.training,
                 embed_any=lambda pixel_values: embed(pixel_values, True))


def _mask_pads(module, inputs, kwargs):
    """Text-decoder pre-hook: AND the cross-attention mask with 'image token is not a zero pad'."""
    states = kwargs.get("encoder_hidden_states")
    if states is None or states.dim() != 3:
        return None
    real = states.ne(0).any(-1)
    if bool(real.all()):
        return None
    mask = kwargs.get("encoder_attention_mask")
    mask = real.long() if mask is None else mask * real.to(mask.dtype)
    return inputs, {**kwargs, "encoder_attention_mask": mask}


def _forward(vm: nn.Module, info: Patch, pixel_values=None, interpolate_pos_encoding=False,
             output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    """The patched forward of the BlipVisionModel ``vm`` (installed by :func:`patch`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    if output_attentions or output_hidden_states:
        raise ValueError("a vwt-patched BLIP vision model does not return attentions or hidden states")
    state = run_tower(info, tower(vm, interpolate_pos_encoding), pixel_values)
    last = zero_pads(state, vm.post_layernorm(state.x))
    pooled = vm.post_layernorm(last[:, 0, :])
    if return_dict is False:
        return last, pooled
    return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


def patch(model: nn.Module, info: Patch) -> None:
    replace_forward(vision_model(model), _forward, info)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:
        handle = decoder.register_forward_pre_hook(_mask_pads, with_kwargs=True)
        info.restore.append(handle.remove)  # a bound method of the handle: copies and pickles carry it


class HFBlip(HFClip):
    name = "hf_blip"
    describes = "BlipForConditionalGeneration / BlipVisionModel"
    crop = False  # BLIP's processor resizes to size x size
    model_types = ("blip",)
    hf_class = "BlipForConditionalGeneration"

    def vision(self, model):
        return vision_model(model)

    def tower_of(self, vision: nn.Module, interpolate_pos_encoding: bool = False) -> Tower:
        return tower(vision, interpolate_pos_encoding)

    def patch(self, model, info):
        patch(model, info)  # the whole model: the text decoder gets the pad mask


BACKEND = HFBlip()
