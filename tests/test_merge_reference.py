"""vwt.ToMe and vwt.LGTM on every backend (Hugging Face CLIP and BLIP vision towers, open_clip, timm)
against the per-image references of tests/test_tome_reference.py (official ToMe, Bolya et al.) and
tests/test_lgtm_reference.py (DFE + LGTM, Heo et al. arXiv 2303.02331 v1: stacked windows), written
from the papers and run here through each model's own modules by hand (the block walkers of
tests/test_evit_reference.py), one image at a time.

In every block, after the attention residual: the keys averaged over heads are the metric; sizes are
carried from block to block (official ToMe); ``log(size)`` is added to the attention logits only with
``prop_attn``. Outputs are compared whole (every token in order and the pooled or head output) within
1e-5 on weights at unit scale (``lively``), and so are the token counts after every block.

Besides the class-token heads, the average pools of timm and open_clip: under ToMe their pooled output
is the plain mean of the final non-prefix tokens (official ToMe leaves timm's pooling as it is); under
LGTM the mean weighted by the patches each token holds (the unreduced model's average; pads and dropped
patches hold none).
"""
import pytest
import torch

import tiny
import vwt
from test_evit_reference import FAMILIES, assert_equal_outputs, open_clip_visual
from test_lgtm_reference import reference_local, window_of
from test_tome_reference import TOL, attend, lively, official_schedule, reference_merge


# ------------------------------------------------------------------------------------------------
# Every backend and pooling: FAMILIES (class token) and the average pools of timm and open_clip
# ------------------------------------------------------------------------------------------------
def weighted_mean(tokens, size):
    return (tokens * size[:, None]).sum(0) / size.sum()


def timm_avg_finish(m, t, size):
    feats = m.norm(t[None])[0]
    return {"features": feats, "logits": m.head(m.fc_norm(weighted_mean(feats[1:], size[1:])))}


def open_clip_avg_finish(v, t, size):
    tokens = v.ln_post(t)
    return {"pooled": weighted_mean(tokens[1:], size[1:]) @ v.proj, "tokens": tokens[1:]}


def _sizeless(finish):
    return lambda m, t, size: finish(m, t)


# name -> (build(depth), embed, blocks, finish(model, tokens, sizes), outputs); a name's part before
# "-" is its backend in FAMILIES
POOLS = {name: (build, embed, blocks, _sizeless(finish), outputs)
         for name, (build, embed, blocks, finish, outputs) in FAMILIES.items()}
POOLS["timm-avg"] = (lambda depth: tiny.timm_vit(depth=depth, pool="avg"), *FAMILIES["timm"][1:3], timm_avg_finish,
                     FAMILIES["timm"][4])
POOLS["open_clip-avg"] = (lambda depth: open_clip_visual(depth=depth, pool="avg"), *FAMILIES["open_clip"][1:3],
                          open_clip_avg_finish, FAMILIES["open_clip"][4])


def reference(family, model, x, make_step, prop_attn, pool_by_size=True):
    """Per image: the outputs of ``family`` (POOLS' finish names them) and the token count after
    every block. ``make_step()`` gives one image's step(block, tokens, metric, sizes) -> (tokens, sizes),
    run after each block's attention residual. An average pool weighs each token by its size, or with
    ``pool_by_size`` off counts each token once."""
    embed, blocks, finish = POOLS[family][1:4]
    outs, counts = [], []
    for img in x:
        t = embed(model, img)
        size, step, seen = torch.ones(t.shape[0]), make_step(), [t.shape[0]]
        for i, (qkv, scale, proj, mlp) in enumerate(blocks(model)):
            q, k, v = qkv(t)
            t = t + proj(attend(q, k, v, scale, size if prop_attn else None))
            t, size = step(i, t, k.mean(0), size)
            t = t + mlp(t)
            seen.append(t.shape[0])
        outs.append(finish(model, t, size if pool_by_size else torch.ones_like(size)))
        counts.append(seen)
    return {name: torch.stack([o[name] for o in outs]) for name in outs[0]}, counts


def run_vwt(family, model, x, reducer):
    outputs = POOLS[family][4]
    vwt.patch(model, reducer)
    try:
        with torch.no_grad():
            ours = outputs(model, x)
        counts = vwt.stats(model)["tokens_per_layer"].tolist()
    finally:
        vwt.unpatch(model)
    return ours, counts


# ------------------------------------------------------------------------------------------------
# ToMe
# ------------------------------------------------------------------------------------------------
def tome_steps(r):
    """r: an int, or one per block."""
    per_block = (lambda i: r[i]) if isinstance(r, (list, tuple)) else (lambda i: r)
    return lambda: (lambda i, t, metric, size: reference_merge(t, metric, size, per_block(i), protected=1))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("r", [3, 6])                                    # r = 6: capped from block 2 on
@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop", "plain"])
@pytest.mark.parametrize("family", sorted(POOLS))
def test_tome_equals_official_tome_on_every_backend(family, prop_attn, r, batch):
    model = lively(POOLS[family][0](depth=4))
    x = tiny.images(batch, seed=3)
    with torch.no_grad():
        ref, ref_counts = reference(family, model, x, tome_steps(r), prop_attn, pool_by_size=False)
    ours, counts = run_vwt(family, model, x, vwt.ToMe(r=r, prop_attn=prop_attn))
    schedule = official_schedule(1 + tiny.NUM_PATCHES, r, 1, 4)
    assert counts == ref_counts == [schedule] * batch
    assert_equal_outputs(ours, ref)


@pytest.mark.parametrize("family", sorted(POOLS))
def test_tome_per_layer_schedule_equals_official_tome(family):
    """``r`` as one value per block (official ToMe's r list): none in block 0, 4, then 2, then 5."""
    r = [0, 4, 2, 5]
    model = lively(POOLS[family][0](depth=4))
    x = tiny.images(4, seed=3)
    with torch.no_grad():
        ref, ref_counts = reference(family, model, x, tome_steps(r), True, pool_by_size=False)
    ours, counts = run_vwt(family, model, x, vwt.ToMe(r=r))
    assert counts == ref_counts == [[17, 17, 13, 11, 6]] * 4
    assert_equal_outputs(ours, ref)


def test_proportional_attention_is_a_different_case():
    """prop_attn True and False are distinct cases of the matrix: the references differ far beyond
    the tolerance once tokens have merged."""
    model = lively(tiny.hf_clip_vision(depth=4))
    x = tiny.images(2, seed=3)
    with torch.no_grad():
        on = reference("hf_clip", model, x, tome_steps(3), True)[0]["pooler_output"]
        off = reference("hf_clip", model, x, tome_steps(3), False)[0]["pooler_output"]
    assert (on - off).abs().max().item() > 1000 * TOL


# ------------------------------------------------------------------------------------------------
# DFE + LGTM, on a 6 x 6 grid (48 px): four windows of 3 x 3 patches
# ------------------------------------------------------------------------------------------------
LGTM_IMAGE, LGTM_DEPTH = 48, 6


def lgtm_steps(r, dense, local, rows, cols):
    def make():
        windows = [window_of(p, rows, cols) for p in range(rows * cols)]

        def step(i, t, metric, size):
            nonlocal windows
            if i < dense:
                return t, size
            if i < dense + local:
                t, size, windows = reference_local(t, metric, size, windows, r, protected=1)
                return t, size
            return reference_merge(t, metric, size, r, protected=1)
        return step
    return make


def lgtm_model(family, monkeypatch):
    monkeypatch.setattr(tiny, "IMAGE", LGTM_IMAGE)                      # the tiny builders read it when called
    return lively(POOLS[family][0](depth=LGTM_DEPTH), seed=1)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop", "plain"])
@pytest.mark.parametrize("dense,local", [(1, 2), (2, 0), (0, LGTM_DEPTH)], ids=["local+global", "dfe+global", "local"])
@pytest.mark.parametrize("family", sorted(POOLS))
def test_lgtm_equals_the_stacked_window_reference_on_every_backend(family, dense, local, prop_attn, batch, monkeypatch):
    model = lgtm_model(family, monkeypatch)
    x = torch.randn(batch, 3, LGTM_IMAGE, LGTM_IMAGE, generator=torch.Generator().manual_seed(batch))
    grid = LGTM_IMAGE // tiny.PATCH
    with torch.no_grad():
        ref, ref_counts = reference(family, model, x, lgtm_steps(8, dense, local, grid, grid), prop_attn)
    ours, counts = run_vwt(family, model, x, vwt.LGTM(r=8, dense=dense, local=local, prop_attn=prop_attn))
    assert counts == ref_counts
    assert ref_counts[0][dense + 1] < ref_counts[0][dense] == 1 + grid * grid  # dense blocks kept all, then merged
    assert_equal_outputs(ours, ref)
