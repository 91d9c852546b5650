"""vwt.LGTM against a plain per-image reference written from Heo et al., arXiv 2303.02331 v1 and its
pipeline figure (Window Partitioning -> Stack -> Local Merging -> Concat -> Global Merging): dense first
blocks, then in each local block the patch tokens cut into the grid's four half-by-half windows, each
window its own sequence for ToMe's bipartite matching (A/B alternating inside it) merging
min(ceil(r/4), n_w // 2) tokens, the windows concatenated behind the class token in window order; then
official ToMe. Also: DFE alone (no local block) is official ToMe after the dense blocks."""
import math

import pytest
import torch

import vwt
from test_tome_reference import TOL, attend, reference_merge, timm_model


def window_of(patch: int, rows: int, cols: int) -> int:
    i, j = divmod(patch, cols)
    return (2 * i) // rows * 2 + (2 * j) // cols


def reference_local(x, metric, size, windows, r, protected):
    """One local block on one image: x (N, C), metric (N, d), size (N,), windows: the window of each
    non-protected token. Returns the new tokens, sizes and windows."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    rows_x, rows_size, new_windows = [x[:protected]], [size[:protected]], []
    for w in range(4):
        seq = [t for t in range(protected, x.shape[0]) if windows[t - protected] == w]
        a_set, b_set = seq[0::2], seq[1::2]
        budget = min(math.ceil(r / 4), len(seq) // 2)
        best, partner = {}, {}
        for a in a_set:
            sims = [(unit[a] @ unit[bt]).item() for bt in b_set]
            k = max(range(len(sims)), key=lambda i: (sims[i], -i)) if sims else None
            best[a], partner[a] = (sims[k], b_set[k]) if sims else (-math.inf, None)
        merged = sorted(a_set, key=lambda a: -best[a])[:budget]
        groups = {t: [t] for t in seq}
        for a in merged:
            groups[partner[a]].append(a)
        for t in [a for a in a_set if a not in merged] + b_set:
            g = groups[t]
            rows_x.append(((x[g] * size[g, None]).sum(0) / size[g].sum())[None])
            rows_size.append(size[g].sum()[None])
            new_windows.append(w)
    return torch.cat(rows_x), torch.cat(rows_size), new_windows


def reference_lgtm(model, x, r, dense, local):
    """DFE + LGTM on a timm ViT, one image at a time: (final-norm tokens, head output, tokens per block)."""
    protected = model.num_prefix_tokens
    rows, cols = model.patch_embed.grid_size
    feats, logits, counts = [], [], []
    for img in x:
        t = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
        size, windows, seen = None, [window_of(p, rows, cols) for p in range(rows * cols)], [t.shape[0]]
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            q, k, v = a.qkv(blk.norm1(t)).reshape(t.shape[0], 3, a.num_heads, -1).permute(1, 2, 0, 3)
            t = t + blk.ls1(a.proj(attend(q, k, v, a.scale, size)))
            ones = torch.ones(t.shape[0]) if size is None else size
            if dense <= i < dense + local:
                t, size, windows = reference_local(t, k.mean(0), ones, windows, r, protected)
            elif i >= dense + local:
                t, size = reference_merge(t, k.mean(0), ones, r, protected)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            seen.append(t.shape[0])
        f = model.norm(t[None])
        feats.append(f[0])
        logits.append(model.forward_head(f)[0])
        counts.append(seen)
    return torch.stack(feats), torch.stack(logits), counts


def run_vwt(model, x, reducer):
    vwt.patch(model, reducer)
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
        counts = vwt.stats(model)["tokens_per_layer"]
    finally:
        vwt.unpatch(model)
    return feats, logits, counts


@pytest.mark.parametrize("kind", ["class", "avg"])
@pytest.mark.parametrize("r", [8, 19])
@pytest.mark.parametrize("batch", [1, 4])
def test_lgtm_equals_the_stacked_window_reference(kind, r, batch):
    model = timm_model(kind, depth=6, seed=r)
    x = torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want_f, want_l, want_n = reference_lgtm(model, x, r, dense=1, local=2)
    got_f, got_l, got_n = run_vwt(model, x, vwt.LGTM(r=r, dense=1, local=2))
    assert got_n.tolist() == want_n
    assert torch.allclose(got_f, want_f, atol=TOL) and torch.allclose(got_l, want_l, atol=TOL), \
        (got_f - want_f).abs().max()


def test_dfe_alone_is_official_tome_after_the_dense_blocks():
    model = timm_model("class", depth=6, seed=3)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_f, want_l, want_n = reference_lgtm(model, x, 8, dense=2, local=0)
    got_f, got_l, got_n = run_vwt(model, x, vwt.LGTM(r=8, dense=2, local=0))
    assert got_n.tolist() == want_n and torch.allclose(got_l, want_l, atol=TOL)


def test_the_reference_tells_stacked_windows_from_interleaved_ones():
    """The former local stage (A/B alternating over the whole sequence, pairs restricted to a window)
    gives other windows' A sets: the reference must see the difference."""
    model = timm_model("class", depth=4, seed=8)
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stacked = reference_lgtm(model, x, 8, dense=0, local=4)[1]
        whole = reference_lgtm(model, x, 0, dense=0, local=4)[1]
    assert not torch.allclose(stacked, whole, atol=1e-3)  # merging moves the output by far more than TOL


def test_lgtm_is_batch_invariant():
    model = timm_model("class", depth=6, seed=1)
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    together = run_vwt(model, x, vwt.LGTM(r=19, dense=1, local=2))[1]
    alone = torch.cat([run_vwt(model, x[i:i + 1], vwt.LGTM(r=19, dense=1, local=2))[1] for i in range(4)])
    assert torch.allclose(together, alone, atol=TOL)
