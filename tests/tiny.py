"""Tiny randomly initialised models of every supported family, built offline from configs.

All take 32x32 images with 8x8 patches (a 4x4 grid, 16 patches + class token), width 64, 4 heads,
``depth`` blocks. ``make(family)`` returns (model, entry) where entry(pixel_values) is the output to
compare, so tests can loop over every backend and entry point alike.
"""
from __future__ import annotations

import torch

IMAGE, PATCH, WIDTH, HEADS = 32, 8, 64, 4
GRID = IMAGE // PATCH
NUM_PATCHES = GRID * GRID


def _seeded(seed):
    torch.manual_seed(seed)


def hf_clip_config(depth=4):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=depth,
                           num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH),
        projection_dim=32)


def hf_clip(depth=4, seed=0):
    from transformers import CLIPModel

    _seeded(seed)
    return CLIPModel(hf_clip_config(depth)).eval()


def hf_clip_vision(depth=4, seed=0, projection=False):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    _seeded(seed)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    return cls(hf_clip_config(depth).vision_config).eval()


def blip_config(depth=4):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=depth,
                           num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH),
        text_config=dict(vocab_size=120, hidden_size=32, encoder_hidden_size=WIDTH, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=30, eos_token_id=2, sep_token_id=2, pad_token_id=0),
        projection_dim=32)


def hf_blip(depth=4, seed=0):
    from transformers import BlipForConditionalGeneration

    _seeded(seed)
    return BlipForConditionalGeneration(blip_config(depth)).eval()


def hf_blip_vision(depth=4, seed=0):
    from transformers import BlipVisionModel

    _seeded(seed)
    return BlipVisionModel(blip_config(depth).vision_config).eval()


def open_clip_model(depth=4, seed=0, pool="tok"):
    import open_clip

    _seeded(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=depth, width=WIDTH, head_width=WIDTH // HEADS,
                                           image_size=IMAGE, patch_size=PATCH, pool_type=pool)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=99, width=32, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def timm_vit(depth=4, seed=0, pool="token", num_classes=10, **options):
    """``options``: further VisionTransformer arguments (dropout rates, ...)."""
    from timm.models.vision_transformer import VisionTransformer

    _seeded(seed)
    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                             num_classes=num_classes, global_pool=pool, qkv_bias=True, **options).eval()


def _hf_out(o):
    return torch.cat([o.last_hidden_state.flatten(1), o.pooler_output.flatten(1)], 1)


# name -> (builder, entry(model, pixels) -> tensor, the module vwt.patch is given)
ENTRIES = {
    "hf_clip.image_features": (hf_clip, lambda m, x: m.get_image_features(pixel_values=x).pooler_output),
    "hf_clip.forward": (hf_clip, lambda m, x: m(input_ids=torch.arange(1, 9).view(2, 4), pixel_values=x).logits_per_image),
    "hf_clip.vision": (hf_clip_vision, lambda m, x: _hf_out(m(pixel_values=x))),
    "hf_clip.vision_projection": (lambda **k: hf_clip_vision(projection=True, **k),
                                  lambda m, x: m(pixel_values=x).image_embeds),
    "hf_blip.vision": (hf_blip_vision, lambda m, x: _hf_out(m(pixel_values=x))),
    "hf_blip.forward": (hf_blip, lambda m, x: m(pixel_values=x, input_ids=torch.tensor([[30, 5, 6, 7]] * x.shape[0])).logits),
    "open_clip.encode_image": (open_clip_model, lambda m, x: m.encode_image(x)),
    "open_clip.avg": (lambda **k: open_clip_model(pool="avg", **k), lambda m, x: m.encode_image(x)),
    "open_clip.visual": (lambda **k: open_clip_model(**k).visual, lambda m, x: m(x)),
    "timm.token": (timm_vit, lambda m, x: m(x)),
    "timm.avg": (lambda **k: timm_vit(pool="avg", **k), lambda m, x: m(x)),
    "timm.features": (timm_vit, lambda m, x: m.forward_features(x)),
}


def one_entry_per_family() -> list[str]:
    """The first entry of ENTRIES (in its order) of every registered backend (vwt.backends.REGISTRY),
    so tests that check something once per family cover a new family as soon as it is registered
    (a backend without tiny models fails here)."""
    from vwt.backends import REGISTRY

    return [next(n for n in ENTRIES if n.split(".")[0] == b.name) for b in REGISTRY]


def loaded(build=hf_clip, name="tiny-clip", tokenizer=None):
    """A tiny model as the scripts get it from vwt.cli.load_model (random weights; family from the registry)."""
    from vwt import cli

    return cli.Loaded(build(), None, name, False, tokenizer)


def tile(words: torch.Tensor, ids) -> torch.Tensor:
    """A (3, IMAGE, IMAGE) image whose patch p is the pixel-space word ``words[ids[p]]``."""
    blocks = words[torch.as_tensor(ids)].view(GRID, GRID, 3, PATCH, PATCH)
    return blocks.permute(2, 0, 3, 1, 4).reshape(3, IMAGE, IMAGE)


def images(n, seed=1):
    """n random normalised-looking images (B, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=g)
