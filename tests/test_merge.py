"""ToMe, EViT and DFE + LGTM: parity at zero reduction, exact token counts, the merges themselves on
constructed states, windows respected, and batch invariance with inter-image padding."""
import argparse
import math

import pytest
import torch

import vwt
from test_tome_reference import lively
from tiny import ENTRIES, GRID, IMAGE, NUM_PATCHES, PATCH, images, tile, timm_vit
from vwt.encoder import BlockContext, initial_state

TOL = 1e-5
DEPTH = 4  # the tiny models' depth


def counts(model):
    return vwt.stats(model)["tokens_per_layer"]


def run(model, x, *reducers, entry=lambda m, x: m(x)):
    vwt.patch(model, *reducers)
    with torch.no_grad():
        return entry(model, x)


# ------------------------------------------------------------------------------------------------
# Zero reduction = the unpatched model
# ------------------------------------------------------------------------------------------------
ONE_PER_BACKEND = ["hf_clip.forward", "hf_blip.forward", "open_clip.avg", "timm.token"]
ZERO = [(n, "tome") for n in sorted(ENTRIES)] + [(n, m) for n in ONE_PER_BACKEND for m in ("evit", "lgtm")]


@pytest.mark.parametrize("name,method", ZERO)
def test_zero_reduction_equals_unpatched(name, method):
    reducer = {"tome": lambda: vwt.ToMe(r=0), "evit": lambda: vwt.EViT(keep=1.0), "lgtm": lambda: vwt.LGTM(r=0)}[method]
    build, entry = ENTRIES[name]
    model = build()
    x = images(2)
    with torch.no_grad():
        ref = entry(model, x)
    out = run(model, x, reducer(), entry=entry)
    assert out.shape == ref.shape and (out - ref).abs().max().item() < TOL
    assert (counts(model) == NUM_PATCHES + 1).all()


# ------------------------------------------------------------------------------------------------
# Token counts after every block, sizes, labels
# ------------------------------------------------------------------------------------------------
def tome_schedule(r, n=NUM_PATCHES + 1, depth=DEPTH):
    out = [n]
    for i in range(depth):
        ri = r if isinstance(r, int) else r[i]
        out.append(out[-1] - min(ri, (out[-1] - 1) // 2))
    return out


def evit_schedule(keep, layers, fuse=True, n=NUM_PATCHES + 1, depth=DEPTH):
    out = [n]
    for i in range(depth):
        m = out[-1]
        kept = math.ceil(keep * (m - 1))
        out.append(1 + kept + (1 if fuse and kept < m - 1 else 0) if i in layers else m)
    return out


@pytest.mark.parametrize("r", [3, [8, 8, 8, 8], [0, 5, 0, 2]])
def test_tome_counts_follow_the_schedule(r):
    model = timm_vit()
    run(model, images(3), vwt.ToMe(r=r))
    assert counts(model).tolist() == [tome_schedule(r)] * 3


@pytest.mark.parametrize("keep,layers,fuse", [(0.7, None, True), (0.5, (0, 2), False), (0.3, (3,), True)])
def test_evit_counts_follow_the_schedule(keep, layers, fuse):
    model = timm_vit()
    run(model, images(3), vwt.EViT(keep=keep, layers=layers, fuse=fuse))
    expect_layers = layers if layers is not None else (1, 2, 3)  # 4th, 7th, 10th of 12 scaled to 4 blocks
    assert counts(model).tolist() == [evit_schedule(keep, expect_layers, fuse)] * 3


def test_evit_default_layers_scale_with_depth():
    assert vwt.EViT().layers_for(12) == (3, 6, 9)
    assert vwt.EViT().layers_for(24) == (6, 12, 18)


def test_lgtm_counts_dense_local_global():
    # 4x4 grid: four 2x2 windows of 4 patches, each with 2 A and 2 B tokens on a fresh state.
    # Block 0 dense; block 1 local: min(ceil(r / 4), 4 // 2) merges per window; blocks 2-3 global r.
    r = 6
    model = timm_vit()
    run(model, images(2), vwt.LGTM(r=r, dense=1, local=1))
    after_local = 17 - 4 * min(math.ceil(r / 4), 2)
    after_global = tome_schedule(r, n=after_local, depth=2)
    assert counts(model).tolist() == [[17, 17] + after_global] * 2
    assert vwt.LGTM().schedule(12) == (2, 2) and vwt.LGTM().schedule(24) == (4, 4)


@pytest.mark.parametrize("reducer", [vwt.ToMe(r=3), vwt.EViT(keep=0.5), vwt.LGTM(r=4)], ids=repr)
@pytest.mark.parametrize("name", ["hf_clip.vision", "hf_blip.vision", "open_clip.avg", "timm.token"])
def test_sizes_sum_to_patches_and_labels_point_at_holders(name, reducer):
    build, entry = ENTRIES[name]
    model = build()
    run(model, images(3), reducer, entry=entry)
    s = vwt.stats(model)
    size, labels = s["size"], s["labels"]
    assert torch.equal(size.sum(1), torch.full((3,), NUM_PATCHES + 1.0))
    # every patch is held by a real token, and each token's size is the number of patches it holds
    assert (labels >= 1).all()
    held = torch.zeros_like(size).scatter_add_(1, labels, torch.ones_like(labels, dtype=size.dtype))
    assert torch.equal(held[:, 1:], size[:, 1:])


def window_of_patch(rows, cols):
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return ((2 * i) // rows * 2 + (2 * j) // cols).flatten()


@pytest.mark.parametrize("grid, batch, lgtm", [
    (8, 3, dict(r=12, dense=1, local=3)),  # 8x8 grid: four 4x4 windows, then global merging
    (7, 2, dict(r=8, dense=0, local=3)),   # 7x7 grid: windows of 4 and 3 rows/cols, local stage only
])
def test_lgtm_local_stage_never_merges_across_windows(grid, batch, lgtm):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    depth = lgtm["dense"] + lgtm["local"]
    model = VisionTransformer(img_size=8 * grid, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                              num_classes=4).eval()
    run(model, torch.randn(batch, 3, 8 * grid, 8 * grid), vwt.LGTM(**lgtm))
    labels = vwt.stats(model)["labels"]
    win = window_of_patch(grid, grid).expand_as(labels)
    n = grid * grid + 1
    lo = torch.full((batch, n), 9).scatter_reduce(1, labels, win, "amin")
    hi = torch.full((batch, n), -1).scatter_reduce(1, labels, win, "amax")
    held = hi >= 0
    assert torch.equal(lo[held], hi[held])  # every token's patches lie in one window
    assert (counts(model)[:, -1] < n - depth * lgtm["r"] // 2).all()  # and plenty were merged
    assert (counts(model)[:, -1] < 50).all()


# ------------------------------------------------------------------------------------------------
# The merges themselves on constructed states
# ------------------------------------------------------------------------------------------------
def make_state(x, size=None):
    b, n, _ = x.shape
    grid = (1, n - 1)
    s = initial_state(x, grid, prefix=1)
    s.size = size
    return s


def test_tome_merges_the_most_similar_pair_by_size_weighted_mean():
    torch.manual_seed(0)
    b, n, c = 1, 9, 6  # the whole sequence alternates: A = 0 (class), 2, 4, 6, 8; B = 1, 3, 5, 7
    x = torch.randn(b, n, c)
    k = torch.randn(b, 1, n, 4) * 0.1 + torch.eye(4).repeat(1, 1, 3, 1)[:, :, :n]  # heads = 1
    k[0, 0, 6] = k[0, 0, 3] * 2  # token 6 (A) points the same way as token 3 (B): the best pair
    k[0, 0, 0] = k[0, 0, 1]  # the class token (A) matches token 1 perfectly, yet never merges
    size = torch.tensor([[1.0, 1, 1, 2, 1, 1, 3, 1, 1]])
    state = make_state(x, size)
    ctx = BlockContext(0, 1, q=k, k=k, scale=1.0, bias=None)
    out = vwt.ToMe(r=1).after_attn(state, ctx)
    # new order: class + unmerged A in order (0, 2, 4, 8), then B (1, 3, 5, 7 with 6 merged into 3)
    order = [0, 2, 4, 8, 1, 3, 5, 7]
    keep = [0, 1, 2, 3, 4, 6, 7]
    assert torch.allclose(out.x[:, keep], x[:, [order[i] for i in keep]])
    merged = (3 * x[:, 6] + 2 * x[:, 3]) / 5
    assert torch.allclose(out.x[:, 5], merged, atol=1e-6)
    assert out.size.tolist() == [[1, 1, 1, 1, 1, 5, 1, 1]]
    assert out.labels.tolist() == [[4, 1, 5, 2, 6, 5, 7, 3]]  # patch p was token p + 1


def test_evit_keeps_top_attention_and_fuses_the_rest_weighted_by_attention():
    torch.manual_seed(0)
    b, n, c = 2, 11, 5
    x = torch.randn(b, n, c)
    logit = torch.randn(b, n)  # class-token logits, built into q and k
    q = torch.zeros(b, 1, n, 2)
    q[..., 0] = 1.0
    k = torch.zeros(b, 1, n, 2)
    k[:, 0, :, 0] = logit
    ctx = BlockContext(0, 1, q=q, k=k, scale=1.0, bias=None)
    out = vwt.EViT(keep=0.6, layers=(0,)).after_attn(make_state(x), ctx)
    attn = logit.softmax(-1)[:, 1:]
    kept = math.ceil(0.6 * (n - 1))
    order = attn.argsort(1, descending=True)
    top, rest = order[:, :kept], order[:, kept:]
    tokens = x[:, 1:]
    assert torch.equal(out.x[:, 1:1 + kept], tokens.gather(1, top[..., None].expand(-1, -1, c)))
    fused = (attn.gather(1, rest)[..., None] * tokens.gather(1, rest[..., None].expand(-1, -1, c))).sum(1)
    assert torch.allclose(out.x[:, -1], fused, atol=1e-6)
    assert out.size[:, -1].tolist() == [n - 1 - kept] * b
    assert (out.labels == 1 + kept).sum(1).tolist() == [n - 1 - kept] * b


def test_pads_are_never_merged_chosen_or_kept():
    # image 1 has 4 real tokens then 4 pads whose keys equal a real token's: the pads must not merge,
    # be chosen as partners or take one of the 3 merges (4 real tokens allow 4 // 2 = 2)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6)
    size = torch.ones(2, 9)
    size[1, 5:] = 0
    k = torch.randn(2, 1, 9, 4)
    k[1, 0, 5:] = k[1, 0, 1]
    state = make_state(x, size)
    state.labels = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 1, 2, 3, 4]])
    ctx = BlockContext(0, 1, q=k, k=k, scale=1.0, bias=None)
    out = vwt.ToMe(r=3).after_attn(state, ctx)

    alone_state = make_state(x[1:, :5])
    alone_state.labels = state.labels[1:]
    alone = vwt.ToMe(r=3).after_attn(alone_state, BlockContext(0, 1, q=k[1:, :, :5], k=k[1:, :, :5], scale=1.0, bias=None))
    assert alone.num_tokens == 3 and out.num_tokens == 6
    assert out.size[1].tolist() == alone.size[0].tolist() + [0, 0, 0]  # pads keep size 0, at the end
    assert torch.equal(out.x[1, :3], alone.x[0])
    assert torch.equal(out.labels[1], alone.labels[0])
    assert out.size[0].sum() == 9 and (out.size[0] > 0).all()


# ------------------------------------------------------------------------------------------------
# A padded batch gives each image the same output as alone (InterImage + each in-network reducer)
# ------------------------------------------------------------------------------------------------
def padded_batch():
    """Three images whose patches match 15, 6 and 0 patches (2, 2 and 0 words) of a 3-word vocabulary: lengths 4, 13, 17 (class token included)."""
    g = torch.Generator().manual_seed(3)
    words = torch.randn(3 + 3 * NUM_PATCHES, 3 * PATCH * PATCH, generator=g)
    fresh = iter(range(3, words.shape[0]))
    ids0 = [0] * 8 + [1] * 7 + [next(fresh)]
    ids1 = [2, 2, 2, 0, 0, 0] + [next(fresh) for _ in range(10)]
    ids2 = [next(fresh) for _ in range(16)]
    x = torch.stack([tile(words, ids) for ids in (ids0, ids1, ids2)])
    return x, vwt.Vocabulary(words[:3], space="pixel", patch_size=PATCH)


def _hidden(m, x):
    return m(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("reducer", [vwt.ToMe(r=3), vwt.ToMe(r=[8, 2, 8, 1]), vwt.ToMe(r=3, sizes="per-block"),
                                     vwt.ToMe(r=[8, 2, 8, 1], prop_attn=False, sizes="per-block"),
                                     vwt.EViT(keep=0.6), vwt.EViT(keep=0.3, layers=(0, 1, 2, 3)),
                                     vwt.LGTM(r=4, dense=1, local=2)],
                         ids=repr)
@pytest.mark.parametrize("name", ["timm.token", "open_clip.avg", "hf_blip.vision"])
def test_padded_batch_equals_each_image_alone(name, reducer):
    build, entry = ENTRIES[name]
    model = build()
    if name == "hf_blip.vision":
        entry = _hidden
        lively(model)  # the tiny BLIP's own outputs are about 1e-7: below the tolerance
    x, vocab = padded_batch()
    inter = vwt.InterImage(vocab, thresh=0.1)
    batch = run(model, x, inter, reducer, entry=entry)
    batch_counts = counts(model)
    assert batch_counts[:, 0].tolist() == [4, 13, 17]
    for i in range(3):
        alone = run(model, x[i:i + 1], inter, reducer, entry=entry)
        assert torch.equal(counts(model)[0], batch_counts[i])
        if alone.dim() == 3:  # token outputs: the batch row is the image's tokens then zero pads
            n = alone.shape[1]
            assert (batch[i, :n] - alone[0]).abs().max().item() < TOL
            assert (batch[i, n:] == 0).all()
        else:
            assert (batch[i] - alone[0]).abs().max().item() < TOL


@pytest.mark.parametrize("reducer", [vwt.ToMe(r=3), vwt.ToMe(r=[8, 2, 8, 1]), vwt.LGTM(r=4, dense=1, local=2)], ids=repr)
def test_padded_batch_without_a_class_token_equals_each_image_alone(reducer):
    # no prefix token: official ToMe leaves the unmerged A tokens in score order; pads stay behind them
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                              class_token=False, global_pool="avg").eval()
    x, vocab = padded_batch()
    inter = vwt.InterImage(vocab, thresh=0.1)
    batch = run(model, x, inter, reducer, entry=lambda m, x: m.forward_features(x))
    batch_counts = counts(model)
    assert batch_counts[:, 0].tolist() == [3, 12, 16] and (batch_counts[:, -1] < batch_counts[:, 0]).all()
    for i in range(3):
        alone = run(model, x[i:i + 1], inter, reducer, entry=lambda m, x: m.forward_features(x))
        assert torch.equal(counts(model)[0], batch_counts[i])
        n = alone.shape[1]
        assert (batch[i, :n] - alone[0]).abs().max().item() < TOL and (batch[i, n:] == 0).all()


@pytest.mark.parametrize("reducer", [vwt.ToMe(r=2), vwt.EViT(keep=0.5), vwt.LGTM(r=4)], ids=repr)
def test_combines_with_intra_image(reducer):
    model = timm_vit()
    x = images(2)
    run(model, x, vwt.IntraImage(drop=0.5), reducer)
    s = vwt.stats(model)
    assert s["tokens_per_layer"][:, 0].tolist() == [9, 9]
    assert s["size"].sum(1).tolist() == [9, 9]
    assert ((s["labels"] >= 0).sum(1) == 8).all()


# ------------------------------------------------------------------------------------------------
# Bad input, script flags
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: vwt.ToMe(r=-1), "non-negative"),
    (lambda: vwt.ToMe(r=2.5), "non-negative"),
    (lambda: vwt.EViT(keep=0), "keep must be in"),
    (lambda: vwt.EViT(keep=1.5), "keep must be in"),
    (lambda: vwt.LGTM(r=-2), "non-negative"),
    (lambda: vwt.LGTM(r=4, dense=-1), "dense"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("reducer,match", [(vwt.ToMe(r=[1, 2]), "2 entries but the model has 4 blocks"),
                                           (vwt.EViT(layers=(2, 7)), r"layers \[7\] out of range")])
def test_schedule_that_does_not_fit_the_model(reducer, match):
    with pytest.raises(ValueError, match=match):
        run(timm_vit(), images(1), reducer)


@pytest.mark.parametrize("flags,cls,attrs", [(["--tome", "13"], vwt.ToMe, {"r": 13}),
                                             (["--evit", "0.7"], vwt.EViT, {"keep": 0.7}),
                                             (["--lgtm", "8"], vwt.LGTM, {"r": 8})])
def test_script_flags_build_the_reducers(flags, cls, attrs):
    from vwt import cli

    p = argparse.ArgumentParser()
    cli.add_method_args(p)
    (red,) = cli.reducers_from_args(p.parse_args(flags))
    assert type(red) is cls and all(getattr(red, k) == v for k, v in attrs.items())
    model = timm_vit()
    run(model, images(1), red)
    assert counts(model)[0, -1] < NUM_PATCHES + 1


@pytest.mark.parametrize("protocol,family,expect", [
    ("paper", "hf_clip", ("per-block", True)),    # the paper's modeling_clip.py: previous block's sizes
    ("paper", "hf_blip", ("per-block", False)),   # modeling_blip.py: no proportional attention
    ("paper", "timm", ("cumulative", True)),      # the paper never ran these: official ToMe
    ("paper", "open_clip", ("cumulative", True)),
    ("paper", None, ("cumulative", True)),
    ("standard", "hf_clip", ("cumulative", True)),
    ("standard", "hf_blip", ("cumulative", True)),
])
def test_protocol_picks_the_tome(protocol, family, expect):
    from vwt import cli

    p = argparse.ArgumentParser()
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    (red,) = cli.reducers_from_args(p.parse_args(["--tome", "13", "--protocol", protocol]), family=family)
    assert (red.r, red.sizes, red.prop_attn) == (13,) + expect
    (red,) = cli.build_reducers(tome=13, protocol=protocol, family=family)
    assert (red.r, red.sizes, red.prop_attn) == (13,) + expect
    assert type(cli.build_reducers(lgtm=8, protocol=protocol, family=family)[0]) is vwt.LGTM


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reducer", [vwt.ToMe(r=3), vwt.EViT(keep=0.5), vwt.LGTM(r=4)], ids=repr)
def test_half_precision_follows_float32(reducer, dtype):
    build, entry = ENTRIES["open_clip.avg"]
    x = images(2)
    ref = run(build(), x, reducer, entry=entry)
    model = build().to(dtype)
    with torch.inference_mode():
        out = entry(vwt.patch(model, reducer), x.to(dtype)).float()
    assert torch.nn.functional.cosine_similarity(out, ref).min().item() > 0.99


def test_too_few_tokens_to_merge_is_a_noop():
    x = torch.randn(2, 2, 8)  # class token + one token
    k = torch.randn(2, 1, 2, 4)
    ctx = BlockContext(2, 4, q=k, k=k, scale=1.0, bias=None)
    for reducer in (vwt.ToMe(r=4), vwt.LGTM(r=4, dense=0, local=4), vwt.EViT(keep=0.5, layers=(2,))):
        out = reducer.after_attn(make_state(x), ctx)
        assert torch.equal(out.x, x)
