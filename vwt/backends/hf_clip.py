"""Hugging Face CLIP: CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection.

The patched module is the vision transformer (embeddings, pre_layrnorm, encoder, post_layernorm): in
transformers 5 that is the CLIPVisionModel itself, in 4.x its ``vision_model`` attribute. Every entry
point (``get_image_features``, the full image-text forward, the vision models) goes through it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..encoder import Block, Tower, TowerDims, zero_pads
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backend, Patch, grid_of, replace_forward, run_tower, split_heads


def vision_transformer(model: nn.Module):
    """The module with embeddings, pre_layrnorm, encoder and post_layernorm inside ``model``, or None."""
    if not type(model).__module__.startswith("transformers"):
        return None
    inner = getattr(model, "vision_model", None)
    for m in (model, inner, getattr(inner, "vision_model", None)):
        if m is not None and all(hasattr(m, a) for a in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")):
            if type(m.embeddings).__name__ == "CLIPVisionEmbeddings":
                return m
    return None


def _block(layer) -> Block:
    attn = layer.self_attn

    def qkv(h):
        return (split_heads(attn.q_proj(h), attn.num_heads), split_heads(attn.k_proj(h), attn.num_heads),
                split_heads(attn.v_proj(h), attn.num_heads))

    return Block(norm1=layer.layer_norm1, qkv=qkv, out_proj=lambda o: attn.out_proj(o),
                 norm2=layer.layer_norm2, mlp=layer.mlp, scale=attn.scale,
                 attn_drop=attn.dropout if attn.training else 0.0)


def tower(vt: nn.Module, interpolate_pos_encoding: bool = False) -> Tower:
    emb = vt.embeddings

    def embed(pixel_values: Tensor, interpolate_pos_encoding: bool = interpolate_pos_encoding):
        b, _, h, w = pixel_values.shape
        if not interpolate_pos_encoding and (h != emb.image_size or w != emb.image_size):
            raise ValueError(f"Input image size ({h}*{w}) doesn't match model ({emb.image_size}*{emb.image_size}).")
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.expand(b, 1, -1).to(patches.dtype), patches], dim=1)
        if interpolate_pos_encoding:
            x = x + emb.interpolate_pos_encoding(x, h, w)
        else:
            x = x + emb.position_embedding(emb.position_ids)
        return x, patches, grid_of(pixel_values, emb.patch_size)

    return Tower(embed=embed, pre_norm=vt.pre_layrnorm, blocks=[_block(l) for l in vt.encoder.layers],
                 patch_size=emb.patch_size, training=vt.training,
                 embed_any=lambda pixel_values: embed(pixel_values, True))


def _forward(vt: nn.Module, info: Patch, pixel_values=None, interpolate_pos_encoding=False,
             output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    """The patched forward of the vision transformer ``vt`` (installed by :func:`patch`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    if output_attentions or output_hidden_states:
        raise ValueError("a vwt-patched CLIP vision tower does not return attentions or hidden states")
    state = run_tower(info, tower(vt, interpolate_pos_encoding), pixel_values)
    last = zero_pads(state, state.x)
    pooled = vt.post_layernorm(last[:, 0, :])
    if return_dict is False:
        return last, pooled
    return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


def patch(vt: nn.Module, info: Patch) -> None:
    replace_forward(vt, _forward, info)


class HFClip(Backend):
    """Hugging Face CLIP; :class:`vwt.backends.hf_blip.HFBlip` differs only in the module it finds,
    the embedding, the preprocessing's crop and the decoder hook."""

    name = "hf_clip"
    describes = "Hugging Face CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection"
    crop = True  # CLIP's processor resizes the short side, then centre-crops
    model_types = ("clip",)
    hf_class = "CLIPModel"

    def vision(self, model):
        return vision_transformer(model)

    def tower_of(self, vision: nn.Module, interpolate_pos_encoding: bool = False) -> Tower:
        return tower(vision, interpolate_pos_encoding)

    def tower(self, model, interpolate_pos_encoding: bool = False):
        return self.tower_of(self.vision(model), interpolate_pos_encoding)

    def dims(self, model):
        vt = self.vision(model)
        emb, layer = vt.embeddings, vt.encoder.layers[0]
        return TowerDims(width=emb.embed_dim, mlp=layer.mlp.fc1.out_features, depth=len(vt.encoder.layers),
                         heads=layer.self_attn.num_heads, patch_size=emb.patch_size, num_patches=emb.num_patches)

    def preprocess(self, model):
        return dict(size=self.vision(model).embeddings.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    crop=self.crop)

    def patch(self, model, info):
        patch(self.vision(model), info)


BACKEND = HFClip()
