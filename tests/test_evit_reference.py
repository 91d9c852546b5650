"""vwt.EViT against a reference written here from the EViT paper (Liang et al., ICLR 2022, "Not All
Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"), used
training-free as the VWT paper compares it.

The reference runs one image at a time through the model's own modules (timm, Hugging Face CLIP and
BLIP, open_clip), written out by hand with plain softmax attention; it never calls vwt. At each EViT
layer, after the attention residual and before the MLP: the class token's attention to every token,
averaged over the heads, ranks the N - 1 non-class tokens; the ceil(keep * (N - 1)) most attended stay,
most attended first; with fusion one token is appended, the sum of the dropped tokens weighted by their
attention (not renormalised). The fused token is an ordinary token in later layers.

Outputs are compared whole (every token, in order, and the pooled or head output), so a kept token that
is lost, zeroed or moved fails, not only a wrong token count.
"""
import math

import pytest
import torch

import tiny
import vwt
from test_tome_reference import lively

TOL = 1e-5
DEPTH = 4  # the tiny models' depth: EViT's default layers (4th, 7th, 10th of 12) become blocks 1, 2, 3


# ------------------------------------------------------------------------------------------------
# The reference, one image at a time
# ------------------------------------------------------------------------------------------------
def evit_step(t, cls_attn, keep, fuse):
    """One EViT reorganisation of one image's tokens t (N, C), class token first; cls_attn (N,) is the
    class token's attention to each token, heads averaged."""
    n = t.shape[0] - 1
    kept = math.ceil(keep * n)
    if kept >= n:
        return t
    score = cls_attn[1:].tolist()
    ranked = sorted(range(n), key=lambda i: -score[i])                  # most attended first
    rows = [t[0]] + [t[1 + i] for i in ranked[:kept]]
    if fuse:
        rows.append(sum(score[i] * t[1 + i] for i in ranked[kept:]))
    return torch.stack(rows)


def attend(q, k, v, scale):
    """Plain softmax attention of one image, q, k, v (heads, N, d): the output (N, heads * d) and the
    class token's attention to every token averaged over the heads (N,)."""
    probs = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)             # (heads, N, N)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1), probs[:, 0].mean(0)


def heads(x, h):
    """(N, h * d) -> (h, N, d)."""
    return x.reshape(x.shape[0], h, -1).transpose(0, 1)


# Each family: embed(model, image (3, H, W)) -> the tokens (N, C) entering the first block;
# blocks(model) -> per block: qkv(t) -> q, k, v (heads, N, d) from the normed stream, the attention scale,
# out(o) -> the attention branch added to the stream, mlp(t) -> the MLP branch added to the stream;
# finish(model, t) -> the outputs to compare.
def clip_tower(m):
    """CLIPVisionModel's transformer (transformers 5 holds its modules directly, 4 in .vision_model)."""
    return getattr(m, "vision_model", m)


def clip_embed(m, img):
    vm = clip_tower(m)
    return vm.pre_layrnorm(vm.embeddings(img[None]))[0]


def clip_blocks(m):
    for layer in clip_tower(m).encoder.layers:
        a = layer.self_attn

        def qkv(t, layer=layer, a=a):
            h = layer.layer_norm1(t)
            return [heads(proj(h), a.num_heads) for proj in (a.q_proj, a.k_proj, a.v_proj)]
        yield qkv, a.scale, a.out_proj, lambda t, layer=layer: layer.mlp(layer.layer_norm2(t))


def clip_finish(m, t):
    return {"last_hidden_state": t, "pooler_output": clip_tower(m).post_layernorm(t[0])}


def blip_embed(m, img):
    return m.embeddings(img[None])[0]


def blip_blocks(m):
    for layer in m.encoder.layers:
        a = layer.self_attn

        def qkv(t, layer=layer, a=a):
            return a.qkv(layer.layer_norm1(t)).reshape(t.shape[0], 3, a.num_heads, -1).permute(1, 2, 0, 3)
        yield qkv, a.scale, a.projection, lambda t, layer=layer: layer.mlp(layer.layer_norm2(t))


def blip_finish(m, t):
    last = m.post_layernorm(t)
    return {"last_hidden_state": last, "pooler_output": m.post_layernorm(last[0])}


def open_clip_embed(v, img):
    patches = v.conv1(img[None]).flatten(2)[0].T                        # (P, C)
    return v.ln_pre(torch.cat([v.class_embedding[None], patches]) + v.positional_embedding)


def open_clip_blocks(v):
    for blk in v.transformer.resblocks:
        a = blk.attn                                                     # nn.MultiheadAttention: packed q, k, v

        def qkv(t, blk=blk, a=a):
            return [heads(z, a.num_heads) for z in (blk.ln_1(t) @ a.in_proj_weight.T + a.in_proj_bias).chunk(3, -1)]
        yield (qkv, (a.embed_dim // a.num_heads) ** -0.5, lambda o, blk=blk, a=a: blk.ls_1(a.out_proj(o)),
               lambda t, blk=blk: blk.ls_2(blk.mlp(blk.ln_2(t))))


def open_clip_finish(v, t):
    tokens = v.ln_post(t)
    return {"pooled": tokens[0] @ v.proj, "tokens": tokens[1:]}


def timm_embed(m, img):
    return m.norm_pre(m._pos_embed(m.patch_embed(img[None])))[0]


def timm_blocks(m):
    for blk in m.blocks:
        a = blk.attn

        def qkv(t, blk=blk, a=a):
            q, k, v = a.qkv(blk.norm1(t)).reshape(t.shape[0], 3, a.num_heads, -1).permute(1, 2, 0, 3)
            return a.q_norm(q), a.k_norm(k), v
        yield (qkv, a.scale, lambda o, blk=blk, a=a: blk.ls1(a.proj(o)),
               lambda t, blk=blk: blk.ls2(blk.mlp(blk.norm2(t))))


def timm_finish(m, t):
    feats = m.norm(t[None])
    return {"features": feats[0], "logits": m.forward_head(feats)[0]}


def reference(family, model, x, keep, layers, fuse, step=evit_step):
    """Every output of ``family`` (as ``outputs`` names them) for images x (B, 3, H, W), image by image."""
    embed, blocks, finish = FAMILIES[family][1:4]
    per_image = []
    for img in x:
        t = embed(model, img)
        for i, (qkv, scale, out, mlp) in enumerate(blocks(model)):
            o, cls_attn = attend(*qkv(t), scale)
            t = t + out(o)                                               # the attention residual
            if i in layers:
                t = step(t, cls_attn, keep, fuse)
            t = t + mlp(t)
        per_image.append(finish(model, t))
    return {name: torch.stack([o[name] for o in per_image]) for name in per_image[0]}


# ------------------------------------------------------------------------------------------------
# The patched models' outputs, under the same names
# ------------------------------------------------------------------------------------------------
def hf_outputs(m, x):
    o = m(pixel_values=x)
    return {"last_hidden_state": o.last_hidden_state, "pooler_output": o.pooler_output}


def open_clip_outputs(v, x):
    pooled, tokens = v(x)
    return {"pooled": pooled, "tokens": tokens}


def timm_outputs(m, x):
    return {"features": m.forward_features(x), "logits": m(x)}


def open_clip_visual(**kw):
    v = tiny.open_clip_model(**kw).visual
    assert not v.final_ln_after_pool and v.attn_pool is None
    v.output_tokens = True                                               # every token comes back too
    return v


# family -> (build, embed, blocks, finish, outputs)
FAMILIES = {
    "hf_clip": (tiny.hf_clip_vision, clip_embed, clip_blocks, clip_finish, hf_outputs),
    "hf_blip": (tiny.hf_blip_vision, blip_embed, blip_blocks, blip_finish, hf_outputs),
    "open_clip": (open_clip_visual, open_clip_embed, open_clip_blocks, open_clip_finish, open_clip_outputs),
    "timm": (tiny.timm_vit, timm_embed, timm_blocks, timm_finish, timm_outputs),
}


def compare(family, keep, layers, fuse, batch):
    """(vwt's outputs, the reference's, the layers EViT acted at) on a lively tiny model."""
    build, outputs = FAMILIES[family][0], FAMILIES[family][4]
    model = lively(build(depth=DEPTH))
    x = tiny.images(batch, seed=3)
    reducer = vwt.EViT(keep=keep, layers=layers, fuse=fuse)
    at = reducer.layers_for(DEPTH)
    with torch.no_grad():
        ref = reference(family, model, x, keep, at, fuse)
        vwt.patch(model, reducer)
        ours = outputs(model, x)
    return ours, ref, at


def assert_equal_outputs(ours, ref):
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        err = (ours[name] - ref[name]).abs().max().item()
        assert err < TOL, f"{name}: max abs difference {err:.2e}"


def tokens_after(keep, layers, fuse, n=tiny.NUM_PATCHES + 1):
    for i in range(DEPTH):
        kept = math.ceil(keep * (n - 1))
        n = 1 + kept + int(fuse and kept < n - 1) if i in layers else n
    return n


# ------------------------------------------------------------------------------------------------
# The matrix
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("keep", [0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evit_equals_the_papers_reference(family, fuse, keep, batch):
    ours, ref, at = compare(family, keep, None, fuse, batch)
    assert at == (1, 2, 3)
    assert_equal_outputs(ours, ref)


@pytest.mark.parametrize("layers", [(0, 2), (0, 1, 2, 3), (3,)], ids=str)
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evit_custom_layers_equal_the_papers_reference(family, fuse, layers):
    ours, ref, at = compare(family, 0.5, layers, fuse, 4)
    assert at == layers
    assert_equal_outputs(ours, ref)
    tokens = next(v for k, v in ref.items() if v.dim() == 3)             # (B, N', C) every token
    assert tokens.shape[1] + (1 if family == "open_clip" else 0) == tokens_after(0.5, layers, fuse)


def test_the_reference_sees_a_lost_kept_token():
    """The matrix can fail: the reference itself, with the lowest-ranked kept token zeroed at each drop
    (the fault fuse=False once had), moves the outputs far beyond the tolerance."""
    model = lively(tiny.timm_vit(depth=DEPTH))
    x = tiny.images(2, seed=3)

    def zero_last(t, cls_attn, keep, fuse):
        out = evit_step(t, cls_attn, keep, fuse).clone()
        out[-1] = 0
        return out

    with torch.no_grad():
        good = reference("timm", model, x, 0.7, (1, 2, 3), False)
        bad = reference("timm", model, x, 0.7, (1, 2, 3), False, step=zero_last)
    assert (good["logits"] - bad["logits"]).abs().max().item() > 1000 * TOL
