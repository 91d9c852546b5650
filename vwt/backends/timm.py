"""timm: VisionTransformer with class-token or average pooling (size-weighted over real tokens once
tokens are merged or padded). ``forward`` and ``forward_features`` are patched."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..encoder import Block, Tower, TowerDims, identity, pooled_mean, resample_pos_grid, zero_pads
from .base import Backend, Patch, refuse_patch_dropout, replace_forward, run_tower


def matches(model: nn.Module) -> bool:
    return (type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")  # deit *_distilled_*
            and type(model).__module__.startswith("timm"))


def _block(blk) -> Block:
    attn = getattr(blk, "attn", None)
    if type(attn).__name__ != "Attention" or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
        raise ValueError(f"vwt.patch: timm block {type(blk).__name__} with {type(attn).__name__} is not supported")
    norm = getattr(attn, "norm", identity)

    def qkv(h):
        b, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    return Block(norm1=blk.norm1, qkv=qkv, out_proj=lambda o: attn.proj_drop(attn.proj(norm(o))),
                 norm2=blk.norm2, mlp=blk.mlp, scale=attn.scale, ls1=blk.ls1, ls2=blk.ls2,
                 drop1=getattr(blk, "drop_path1", None) if blk.training else None,
                 drop2=getattr(blk, "drop_path2", None) if blk.training else None,
                 attn_drop=attn.attn_drop.p if attn.training else 0.0)


def tower(model: nn.Module) -> Tower:
    patch_size = model.patch_embed.patch_size[0]

    def embed(pixel_values: Tensor):
        refuse_patch_dropout(model.patch_drop, "timm")
        patches = model.patch_embed(pixel_values)
        grid = tuple(patches.shape[1:3]) if patches.dim() == 4 else (
            pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        x = model.patch_drop(model._pos_embed(patches))
        return x, patches.flatten(1, -2), grid  # (B, N, C); flatten, not reshape(-1): a batch of 0 too

    interpolation = (getattr(model, "pretrained_cfg", None) or {}).get("interpolation") or "bicubic"
    return Tower(embed=embed, pre_norm=model.norm_pre, blocks=[_block(b) for b in model.blocks],
                 patch_size=patch_size, prefix=model.num_prefix_tokens, training=model.training,
                 embed_any=embed if model.dynamic_img_size else (lambda pixel_values: embed_any(model, pixel_values)),
                 interpolation=interpolation)


def _features(model: nn.Module, info: Patch, x: Tensor, attn_mask, is_causal):
    if attn_mask is not None or is_causal:
        raise ValueError("a vwt-patched timm model takes no attn_mask / is_causal")
    state = run_tower(info, tower(model), x)
    return state, model.norm(state.x)


def _forward_features(model: nn.Module, info: Patch, x: Tensor, attn_mask=None, is_causal=False):
    """The patched ``forward_features`` (installed by :func:`patch`)."""
    state, h = _features(model, info, x, attn_mask, is_causal)
    return zero_pads(state, h)


def _forward(model: nn.Module, info: Patch, x: Tensor, attn_mask=None, is_causal=False):
    """The patched ``forward`` (installed by :func:`patch`): features, pooling, head."""
    state, h = _features(model, info, x, attn_mask, is_causal)
    if getattr(model, "dist_token", None) is not None:  # deit distilled: its own two-token head
        return model.forward_head(h)
    if model.global_pool == "token":
        pooled = h[:, 0]
    elif model.global_pool == "avg":
        pooled = pooled_mean(state, h)
    else:
        return zero_pads(state, h)
    pooled = model.head_drop(model.fc_norm(pooled))
    return model.head(pooled)


def embed_any(model: nn.Module, pixel_values: Tensor):
    """The embedding at any image size (a multiple of the patch size), as timm's ``_pos_embed`` with
    ``dynamic_img_size``: the patch projection, then the grid position embeddings resampled as timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased), prefix tokens as the model adds them."""
    refuse_patch_dropout(model.patch_drop, "timm")
    pe = model.patch_embed
    patches = pe.norm(pe.proj(pixel_values).flatten(2).transpose(1, 2))
    grid = (pixel_values.shape[-2] // pe.patch_size[0], pixel_values.shape[-1] // pe.patch_size[1])
    prefix = [t.expand(patches.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    if model.pos_embed is None:
        return torch.cat(prefix + [patches], 1), patches, grid
    own = 0 if model.no_embed_class else model.num_prefix_tokens  # prefix positions the pos_embed holds
    pos = torch.cat([model.pos_embed[:, :own], resample_pos_grid(model.pos_embed[:, own:], pe.grid_size, grid)], 1)
    if model.no_embed_class:
        x = torch.cat(prefix + [patches + pos], 1)
    else:
        x = torch.cat(prefix + [patches], 1) + pos
    return model.patch_drop(model.pos_drop(x)), patches, grid


def patch(model: nn.Module, info: Patch) -> None:
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("vwt.patch: timm VisionTransformer with attention pooling ('map') is not supported")
    if model.global_pool not in ("token", "avg", ""):
        raise ValueError(f"vwt.patch: timm global_pool {model.global_pool!r} is not supported (token, avg are)")
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("vwt.patch: timm pool_include_prefix=True is not supported")
    replace_forward(model, _forward, info)
    replace_forward(model, _forward_features, info, name="forward_features")


class Timm(Backend):
    name = "timm"
    describes = "timm VisionTransformer"

    def vision(self, model):
        return model if matches(model) else None

    def tower(self, model):
        return tower(model)

    def dims(self, model):
        blk = model.blocks[0]
        return TowerDims(width=model.embed_dim, mlp=blk.mlp.fc1.out_features, depth=len(model.blocks),
                         heads=blk.attn.num_heads, patch_size=model.patch_embed.patch_size[0],
                         num_patches=model.patch_embed.num_patches, prefix=model.num_prefix_tokens)

    def preprocess(self, model):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return dict(size=int(model.patch_embed.img_size[0]), mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
                    std=tuple(cfg.get("std", (0.5, 0.5, 0.5))), crop=True)

    def patch(self, model, info):
        patch(model, info)


BACKEND = Timm()
