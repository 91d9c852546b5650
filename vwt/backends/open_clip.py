"""open_clip: CLIP (``encode_image``, ``forward``) and its VisionTransformer.

The query/key/value projection of open_clip is a packed parameter (``nn.MultiheadAttention``'s
``in_proj_weight``, or open_clip's own ``Attention``), not a Linear module; the output projection and
the MLP are Linear modules and are called as such.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoder import Block, Tower, TowerDims, identity, pooled_mean, resample_pos_grid, zero_pads
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backend, Patch, grid_of, refuse_patch_dropout, replace_forward,
                   run_tower, split_heads)


def find_visual(model: nn.Module):
    """The open_clip VisionTransformer inside ``model`` (or ``model`` itself), or None."""
    for m in (model, getattr(model, "visual", None)):
        if m is not None and type(m).__name__ == "VisionTransformer" and type(m).__module__.startswith("open_clip"):
            return m
    return None


def _block(blk) -> Block:
    attn = blk.attn
    if isinstance(attn, nn.MultiheadAttention):
        heads, out_proj = attn.num_heads, (lambda o: attn.out_proj(o))
        ln_q = ln_k = None
        attn_drop = attn.dropout
    elif type(attn).__name__ == "Attention":
        if attn.logit_scale is not None or attn.head_scale is not None:
            raise ValueError("vwt.patch: open_clip attention with scaled cosine or head scaling is not supported")
        heads, ln_q, ln_k = attn.num_heads, attn.ln_q, attn.ln_k
        ln_attn = getattr(blk, "ln_attn", identity)
        out_proj = lambda o: ln_attn(attn.out_drop(attn.out_proj(attn.ln_inner(o))))  # noqa: E731
        attn_drop = attn.attn_drop.p
    else:
        raise ValueError(f"vwt.patch: open_clip block {type(blk).__name__} is not supported")

    def qkv(h):
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
        if ln_q is not None:
            q, k = ln_q(q), ln_k(k)
        return q, k, v

    return Block(norm1=blk.ln_1, qkv=qkv, out_proj=out_proj, norm2=blk.ln_2, mlp=blk.mlp,
                 ls1=blk.ls_1, ls2=blk.ls_2, attn_drop=attn_drop if attn.training else 0.0)


def tower(visual: nn.Module) -> Tower:
    patch_size = visual.conv1.kernel_size[0]

    def embed(pixel_values: Tensor, interpolate: bool = False):
        refuse_patch_dropout(visual.patch_dropout, "open_clip")
        patches = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))
        grid = tuple(patches.shape[-2:])
        patches = patches.reshape(patches.shape[0], patches.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], -1, -1)
        pos = visual.positional_embedding
        if interpolate:  # as open_clip's resize_pos_embed: bicubic, antialiased
            pos = torch.cat([pos[:1], resample_pos_grid(pos[None, 1:], tuple(visual.grid_size), grid)[0]])
        x = torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)
        return x, patches, grid_of(pixel_values, patch_size)

    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return Tower(embed=embed, pre_norm=visual.ln_pre, blocks=[_block(b) for b in visual.transformer.resblocks],
                 patch_size=patch_size, training=visual.training,
                 embed_any=lambda pixel_values: embed(pixel_values, True),
                 interpolation=cfg.get("interpolation") or "bicubic")


def _forward(visual: nn.Module, info: Patch, x: Tensor):
    """The patched forward of the VisionTransformer ``visual`` (installed by :func:`patch`)."""
    state = run_tower(info, tower(visual), x)
    h = state.x
    if not visual.final_ln_after_pool:
        h = visual.ln_post(h)
    pooled = h[:, 0] if visual.pool_type == "tok" else pooled_mean(state, h)
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(pooled)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    if visual.output_tokens:
        return pooled, zero_pads(state, h)[:, 1:]
    return pooled


def patch(visual: nn.Module, info: Patch) -> None:
    if visual.attn_pool is not None:
        raise ValueError("vwt.patch: open_clip VisionTransformer with attentional pooling is not supported")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"vwt.patch: open_clip pool_type {visual.pool_type!r} is not supported (tok, avg are)")
    replace_forward(visual, _forward, info)


class OpenClip(Backend):
    name = "open_clip"
    describes = "open_clip CLIP / VisionTransformer"

    def vision(self, model):
        return find_visual(model)

    def tower(self, model):
        return tower(self.vision(model))

    def dims(self, model):
        v = self.vision(model)
        blk = v.transformer.resblocks[0]
        return TowerDims(width=v.conv1.out_channels, mlp=blk.mlp.c_fc.out_features,
                         depth=len(v.transformer.resblocks), heads=blk.attn.num_heads,
                         patch_size=v.conv1.kernel_size[0], num_patches=v.grid_size[0] * v.grid_size[1])

    def preprocess(self, model):
        v = self.vision(model)
        size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
        mean = getattr(v, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(v, "image_std", None) or OPENAI_CLIP_STD
        return dict(size=int(size), mean=tuple(mean), std=tuple(std), crop=True)

    def patch(self, model, info):
        patch(self.vision(model), info)


BACKEND = OpenClip()
