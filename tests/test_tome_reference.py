"""vwt.ToMe against references written here from the descriptions, one image at a time, with plain
loops and the models' own modules:

* official ToMe (Bolya et al., facebookresearch/ToMe ``bipartite_soft_matching`` + ``merge_wavg`` and
  its timm patch): on timm ViTs with a class token, without one (average pool) and with a
  distillation token, over several consecutive merging blocks, with the official token schedule;
* the VWT paper's ToMe (its ``utils/modeling_clip.py`` / ``modeling_blip.py``): ``sizes="per-block"``
  on tiny Hugging Face CLIP (proportional attention from the previous block only) and BLIP (none).
"""
import math

import pytest
import torch

import tiny
import vwt

TOL = 1e-5


def lively(model, seed=0):
    """Redraw every weight at unit-ish scale: the tiny random BLIP's outputs are about 1e-7, where an
    absolute tolerance would prove nothing. Norm weights stay near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else noise * p.shape[-1] ** -0.5)
    return model


# ------------------------------------------------------------------------------------------------
# Reference: one merge step of official ToMe on one image, from its description
# ------------------------------------------------------------------------------------------------
def reference_merge(x, metric, size, r, protected):
    """x (N, C), metric (N, d), size (N,) of one image; ``protected`` leading tokens never merge.

    Positions 0, 2, 4, ... form set A and 1, 3, 5, ... set B; a protected A token has no candidates, a
    protected B token is never a candidate. Each A token's candidate is its most cosine-similar B token;
    the r A tokens with the best candidates merge into them (sum of size * x over the group, divided by
    the group's size; sizes add). New order: protected tokens, the unmerged A tokens (in position order
    when there is a protected class token, else from best to worst score), then the B tokens."""
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    sim = unit[a_pos] @ unit[b_pos].T
    best, partner = {}, {}
    for ai, i in enumerate(a_pos):
        if i < protected:
            best[i] = -math.inf
            continue
        row = [(sim[ai, bj].item(), j) for bj, j in enumerate(b_pos) if j >= protected]
        best[i], partner[i] = max(row)
    ranked = sorted(a_pos, key=lambda i: -best[i])
    merged, unmerged = ranked[:r], ranked[r:]
    if protected:
        unmerged = sorted(unmerged)
    groups = {t: [t] for t in range(n)}
    for i in merged:
        groups[partner[i]].append(i)
    order = list(range(protected)) + [i for i in unmerged if i >= protected] + [j for j in b_pos if j >= protected]
    new_x = torch.stack([(x[groups[t]] * size[groups[t], None]).sum(0) / size[groups[t]].sum() for t in order])
    new_size = torch.stack([size[groups[t]].sum() for t in order])
    return new_x, new_size


def attend(q, k, v, scale, size):
    """Softmax attention of one image (heads, N, d), with log(size) added to the logits when given."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if size is not None:
        logits = logits + size.log()[None, None, :]
    return (logits.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)


def reference_timm(model, x, r, merge=reference_merge):
    """Official ToMe's timm patch, one image at a time: (final-norm tokens, head output, tokens per block)."""
    protected = model.num_prefix_tokens
    feats, logits, counts = [], [], []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        size, seen = None, [t.shape[0]]
        for blk in model.blocks:
            a = blk.attn
            q, k, v = a.qkv(blk.norm1(t)).reshape(t.shape[0], 3, a.num_heads, -1).permute(1, 2, 0, 3)
            t = t + blk.ls1(a.proj(attend(q, k, v, a.scale, size)))
            t, size = merge(t, k.mean(0), torch.ones(t.shape[0]) if size is None else size, r, protected)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            seen.append(t.shape[0])
        f = model.norm(t[None])
        feats.append(f[0])
        logits.append(model.forward_head(f)[0])
        counts.append(seen)
    return torch.stack(feats), torch.stack(logits), counts


def official_schedule(n, r, protected, depth):
    out = [n]
    for _ in range(depth):
        out.append(out[-1] - max(0, min(r, (out[-1] - protected) // 2)))
    return out


def timm_model(kind, depth=4, seed=0):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(img_size=48, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=10, qkv_bias=True)
    if kind == "class":
        return VisionTransformer(**kw).eval()
    if kind == "avg":
        return VisionTransformer(class_token=False, global_pool="avg", **kw).eval()
    return VisionTransformerDistilled(**kw).eval()  # deit_tiny_distilled_patch16_224's layout, tiny


@pytest.mark.parametrize("kind,protected", [("class", 1), ("avg", 0), ("distilled", 2)])
@pytest.mark.parametrize("r", [5, 8])
def test_tome_equals_official_tome_on_timm(kind, protected, r):
    model = timm_model(kind)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_feats, ref_logits, ref_counts = reference_timm(model, x, r)
        vwt.patch(model, vwt.ToMe(r=r))
        feats, logits = model.forward_features(x), model(x)
    schedule = official_schedule(36 + protected, r, protected, 4)
    assert ref_counts == [schedule] * 3
    assert vwt.stats(model)["tokens_per_layer"].tolist() == [schedule] * 3
    assert schedule[-1] < schedule[-2] < schedule[1] < schedule[0]  # every block merged
    assert feats.shape == ref_feats.shape and (feats - ref_feats).abs().max().item() < TOL  # order included
    assert (logits - ref_logits).abs().max().item() < TOL  # timm's own head: average pooling unweighted too


@pytest.mark.parametrize("r", [4, 8])
def test_tome_pools_an_average_pooled_vit_as_official_tome_or_by_size_when_asked(r):
    """timm's average pool (no class token) runs the final norm on the tokens (Identity with
    global_pool="avg"), takes their mean, then fc_norm: official ToMe leaves it so, a plain mean of the
    merged tokens. ``pool="size-weighted"`` weighs each token by the patches it holds instead."""
    model = timm_model("avg")
    model.reset_classifier(0)  # the pooled feature itself
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    out = {}
    with torch.no_grad():
        for pool in ("unweighted", "size-weighted"):
            vwt.patch(model, vwt.ToMe(r=r) if pool == "unweighted" else vwt.ToMe(r=r, pool=pool))
            tokens, out[pool], size = model.forward_features(x), model(x), vwt.stats(model)["size"]
            vwt.unpatch(model)
    assert tokens.shape[1] < 36 and bool((size > 1).any())  # tokens merged, sizes differ
    unweighted = model.fc_norm(tokens.mean(1))
    weighted = model.fc_norm((tokens * size[..., None]).sum(1) / size.sum(1, keepdim=True))
    assert (out["unweighted"] - unweighted).abs().max().item() < TOL
    assert (out["size-weighted"] - weighted).abs().max().item() < TOL
    assert (unweighted - weighted).abs().max().item() > 100 * TOL  # the two pools tell apart


def test_the_reference_tells_the_partitions_apart():
    """The test above can fail: swapping A and B after the class token (the old partition) moves the
    output well beyond the tolerance."""
    model = timm_model("class")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(7))

    def swapped(t, metric, size, r, protected):
        keep = reference_merge(t[1:], metric[1:], size[1:], r, 0)
        return torch.cat([t[:1], keep[0]]), torch.cat([size[:1], keep[1]])

    with torch.no_grad():
        _, ref, _ = reference_timm(model, x, 8)
        _, other, _ = reference_timm(model, x, 8, merge=swapped)
        vwt.patch(model, vwt.ToMe(r=8))
        ours = model(x)
    assert (ours - ref).abs().max().item() < TOL
    assert (ours - other).abs().max().item() > 100 * TOL


# ------------------------------------------------------------------------------------------------
# Reference: the VWT paper's encoder layer (utils/modeling_clip.py, utils/modeling_blip.py)
# ------------------------------------------------------------------------------------------------
def paper_layers(vm, t, r, clip):
    """The paper's encoder loop for one image (N, C): each layer attends (CLIP adds log(size) of the
    size the previous layer returned; BLIP never does), then, when r > 0 and at least r tokens remain,
    merges with sizes starting from 1 and returns the counts of that merge; otherwise it returns the
    size it was given."""
    size = None
    for layer in vm.encoder.layers:
        a = layer.self_attn
        h = layer.layer_norm1(t)
        n, heads = t.shape[0], a.num_heads
        if clip:
            q, k, v = (proj(h).reshape(n, heads, -1).transpose(0, 1) for proj in (a.q_proj, a.k_proj, a.v_proj))
            out = a.out_proj
        else:
            q, k, v = a.qkv(h).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)
            out = a.projection
        t = t + out(attend(q, k, v, a.scale, size if clip else None))
        if r > 0 and t.shape[0] >= r:
            t, size = reference_merge(t, k.mean(0), torch.ones(t.shape[0]), r, protected=1)
        t = t + layer.mlp(layer.layer_norm2(t))
    return t


def paper_reference(vm, x, r, clip):
    last, pooled = [], []
    for img in x:
        t = vm.embeddings(img[None])
        t = paper_layers(vm, (vm.pre_layrnorm(t) if clip else t)[0], r, clip)
        if clip:
            last.append(t)
            pooled.append(vm.post_layernorm(t[:1])[0])
        else:
            last.append(vm.post_layernorm(t))
            pooled.append(vm.post_layernorm(last[-1][:1])[0])
    return torch.stack(last), torch.stack(pooled)


@pytest.mark.parametrize("family", ["hf_clip", "hf_blip"])
@pytest.mark.parametrize("r", [3, 6])  # r = 6: capped in block 2, skipped in block 3 (4 tokens < 6)
def test_per_block_tome_equals_the_papers_layers(family, r):
    clip = family == "hf_clip"
    vm = lively(tiny.hf_clip_vision() if clip else tiny.hf_blip_vision())
    x = tiny.images(3)
    reducer = vwt.ToMe(r=r, prop_attn=clip, sizes="per-block")
    with torch.no_grad():
        ref_last, ref_pooled = paper_reference(vm, x, r, clip)
        out = vwt.patch(vm, reducer)(pixel_values=x)
        counts = vwt.stats(vm)["tokens_per_layer"].tolist()
        cumulative = vwt.patch(vm, vwt.ToMe(r=r, prop_attn=clip))(pixel_values=x)
    expect = {3: [17, 14, 11, 8, 5], 6: [17, 11, 6, 4, 4]}[r]
    assert ref_last.shape[1] == expect[-1]
    assert counts == [expect] * 3
    assert (out.last_hidden_state - ref_last).abs().max().item() < TOL
    assert (out.pooler_output - ref_pooled).abs().max().item() < TOL
    assert ref_pooled.abs().mean() > 0.1  # outputs at a scale where the tolerance means something
    # and the paper's variant is not official ToMe: carried sizes (and no skipping) move the output
    assert (cumulative.pooler_output - ref_pooled).abs().max().item() > 100 * TOL


def test_per_block_sizes_count_the_last_merge_only():
    vm = tiny.hf_clip_vision()
    with torch.no_grad():
        vwt.patch(vm, vwt.ToMe(r=3, sizes="per-block"))(pixel_values=tiny.images(2))
    s = vwt.stats(vm)
    assert s["size"].sum(1).tolist() == [5 + 3, 5 + 3]  # 5 tokens, 3 of them took one more in the last block
    held = torch.zeros_like(s["size"]).scatter_add_(1, s["labels"], torch.ones_like(s["labels"], dtype=torch.float))
    assert held.sum(1).tolist() == [16, 16]  # the labels still follow every patch


def test_sizes_is_checked():
    with pytest.raises(ValueError, match="sizes must be one of"):
        vwt.ToMe(r=2, sizes="per-layer")


@pytest.mark.parametrize("r,sizes,expect", [(1, "per-block", [1.0, 1.0]),  # capped to 0 merges: sizes still reset
                                            (3, "per-block", [1.0, 4.0]),  # 2 tokens < r: the block is skipped
                                            (1, "cumulative", [1.0, 4.0])])
def test_per_block_sizes_reset_even_when_nothing_merges(r, sizes, expect):
    from vwt.encoder import BlockContext, initial_state

    x = torch.randn(1, 2, 8)  # class token + one token that stood for 4 patches
    state = initial_state(x, (1, 4), prefix=1)
    state.size = torch.tensor([[1.0, 4.0]])
    k = torch.randn(1, 2, 2, 4)
    out = vwt.ToMe(r=r, sizes=sizes).after_attn(state, BlockContext(0, 1, q=k, k=k, scale=1.0, bias=None))
    assert out.size.tolist() == [expect] and torch.equal(out.x, x)
