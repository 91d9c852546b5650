"""vwt.IntraImage and vwt.InterImage against references written here from the VWT paper's description
(arXiv 2411.15397; DESIGN.md section 4), one image at a time with plain loops, on every backend.

The reference never calls vwt. For one image (3, H, W) of the normalised pixels the model receives:

* pixel patches: patch (i, j) is ``img[:, iP:(i+1)P, jP:(j+1)P]`` flattened in (channel, row, column)
  order, patches numbered row-major;
* intra-image: keep the ``int(N * (1 - drop))`` patches of highest variance, in their original order,
  behind the class token;
* inter-image: a patch's nearest word is the one of highest cosine with the L2-normalised words; it
  matches when ``1 - cos <= thresh``. The patches matching one word become one token, the mean of their
  embeddings (position embeddings added), size = their count. Order: class token, matched words by
  word index, then the unmatched patches in patch order.

The tokens then run through the model's own modules by hand (the pre-norm, every block with plain
softmax attention, ``log(size)`` added to the logits when ``prop_attn``, the final norm and head).
Outputs are compared whole: every real token in order, the pads of a padded batch (exactly zero) and
the pooled or head output, within 1e-5 on weights at unit scale (``lively``). Every backend and
pooling of tests/test_merge_reference.py: the class-token heads, and the average pools of timm and
open_clip (the mean of the final tokens weighted by the patches each holds: pads hold none; followed
by ToMe, each real token once, as official ToMe pools).
"""
import math

import pytest
import torch

import tiny
import vwt
from vwt.tokenizer import tokenize
from test_evit_reference import clip_tower
from test_merge_reference import POOLS
from test_tome_reference import TOL, attend, lively, official_schedule, reference_merge

DEPTH = 4
P = tiny.PATCH
D = 3 * P * P


# ------------------------------------------------------------------------------------------------
# Each family's embedded tokens (class token first, position embeddings added) and its pre-norm
# ------------------------------------------------------------------------------------------------
def clip_tokens(m, img):
    return clip_tower(m).embeddings(img[None])[0]


def blip_tokens(m, img):
    return m.embeddings(img[None])[0]


def open_clip_tokens(v, img):
    patches = v.conv1(img[None]).flatten(2)[0].T                        # (N, C) row-major
    return torch.cat([v.class_embedding[None], patches]) + v.positional_embedding


def timm_tokens(m, img):
    return m._pos_embed(m.patch_embed(img[None]))[0]


# family -> (embedded tokens, pre-norm applied after the input reduction)
EMBED = {
    "hf_clip": (clip_tokens, lambda m, t: clip_tower(m).pre_layrnorm(t)),
    "hf_blip": (blip_tokens, lambda m, t: t),
    "open_clip": (open_clip_tokens, lambda v, t: v.ln_pre(t)),
    "timm": (timm_tokens, lambda m, t: m.norm_pre(t)),
}


# family -> the patch projections (N, C) of one image, before position embeddings (what an "embed"
# space vocabulary is matched against)
PROJECT = {
    "hf_clip": lambda m, img: clip_tower(m).embeddings.patch_embedding(img[None]).flatten(2)[0].T,
    "hf_blip": lambda m, img: m.embeddings.patch_embedding(img[None]).flatten(2)[0].T,
    "open_clip": lambda v, img: v.conv1(img[None]).flatten(2)[0].T,
    "timm": lambda m, img: m.patch_embed(img[None]).reshape(-1, m.embed_dim),
}


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------
def patches_of(img):
    """(N, 3·P·P) the pixel patches of one image, row-major, each in (channel, row, column) order."""
    rows, cols = img.shape[1] // P, img.shape[2] // P
    return [img[:, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1) for i in range(rows) for j in range(cols)]


def intra_select(tokens, patches, drop, highest=True):
    """Class token, then the int(N * (1 - drop)) highest-variance patches in patch order; sizes 1.
    ``highest=False`` keeps the lowest-variance ones instead (to show the comparison can fail)."""
    n = len(patches)
    variance = [p.var().item() for p in patches]
    kept = sorted(sorted(range(n), key=lambda i: -variance[i] if highest else variance[i])[:int(n * (1 - drop))])
    return torch.stack([tokens[0]] + [tokens[1 + i] for i in kept]), torch.ones(1 + len(kept))


def nearest_word(patch, words):
    """(index, cosine distance) of the word nearest to ``patch``, by a loop over the words."""
    best, index = -math.inf, None
    for w, word in enumerate(words):
        cos = (torch.dot(patch, word) / (patch.norm() * word.norm())).item()
        if cos > best:
            best, index = cos, w
    return index, 1 - best


def inter_select(tokens, patches, words, thresh, order="word"):
    """Class token, one token per matched word (the mean of its patches' tokens, by word index), then
    the unmatched patches in patch order; the sizes. ``order="first patch"`` puts the matched words in
    the order of their first patch instead (a wrong reading, to show the comparison can fail)."""
    groups, unmatched = {}, []
    for i, patch in enumerate(patches):
        w, dist = nearest_word(patch, words)
        if dist <= thresh:
            groups.setdefault(w, []).append(i)
        else:
            unmatched.append(i)
    matched = sorted(groups) if order == "word" else list(groups)
    rows = [tokens[0]] + [torch.stack([tokens[1 + i] for i in groups[w]]).mean(0) for w in matched]
    rows += [tokens[1 + i] for i in unmatched]
    sizes = [1.0] + [float(len(groups[w])) for w in matched] + [1.0] * len(unmatched)
    return torch.stack(rows), torch.tensor(sizes)


def features_of(family, model, img, space):
    """What one image's patches are matched by: pixel patches, or the patch projections."""
    return patches_of(img) if space == "pixel" else list(PROJECT[family.split("-")[0]](model, img))


def selected(family, model, x, select, space="pixel"):
    """Per image, (tokens, sizes) entering the pre-norm: ``select`` on the embedded tokens."""
    embed = EMBED[family.split("-")[0]][0]
    return [select(embed(model, img), features_of(family, model, img, space)) for img in x]


def reference(family, model, x, select, prop_attn, space="pixel", step=None, pool_by_size=True):
    """Per image, the outputs of ``family`` (as POOLS' finish names them) after ``select``
    (tokens, patch features) -> (tokens, sizes) on the embedded input; ``step(tokens, metric, sizes)``
    -> (tokens, sizes), when given, runs after every block's attention residual (an in-network reducer
    after the input one). An average pool weighs each token by its size, or with ``pool_by_size`` off
    counts each once (official ToMe)."""
    embed, pre_norm = EMBED[family.split("-")[0]]
    blocks, finish = POOLS[family][2:4]
    out = []
    for img in x:
        t, size = select(embed(model, img), features_of(family, model, img, space))
        t = pre_norm(model, t)
        for qkv, scale, proj, mlp in blocks(model):
            q, k, v = qkv(t)
            t = t + proj(attend(q, k, v, scale, size if prop_attn else None))
            if step is not None:
                t, size = step(t, k.mean(0), size)
            t = t + mlp(t)
        out.append(finish(model, t, size if pool_by_size else torch.ones_like(size)))
    return out


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def intra_images(batch, seed=3):
    """Random images whose patches have well-separated variances (each patch scaled by 0.5 to 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, tiny.IMAGE, tiny.IMAGE, generator=g)
    scale = 0.5 + 1.5 * torch.rand(batch, 1, tiny.GRID, 1, tiny.GRID, 1, generator=g)
    return (x.view(batch, 3, tiny.GRID, P, tiny.GRID, P) * scale).view_as(x)


NEAR, MID = 0.98, 0.7  # a patch's cosine to its word: distance 0.02 (matches at thresh 0.1) or 0.3 (at 0.4)


def inter_case(batch, seed=10, v=5):
    """(words (v, D), images (batch, 3, H, W)): each patch is near a word (cosine 0.98), at distance 0.3
    from one, or random (cosine ~0, never matches); at a random scale, so a word's patches differ. With
    the default seed, image 0 merges at both thresholds and image 2 matches nothing at 0.1 (an image
    left whole inside a padded batch)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(v, D, generator=g)
    unit = words / words.norm(dim=1, keepdim=True)
    images = []
    for _ in range(batch):
        rows = []
        for _ in range(tiny.NUM_PATCHES):
            kind, w = torch.randint(3, (1,), generator=g).item(), torch.randint(v, (1,), generator=g).item()
            e = torch.randn(D, generator=g)
            if kind == 2:
                rows.append(e)
                continue
            e = e - (e @ unit[w]) * unit[w]
            c = NEAR if kind == 0 else MID
            rows.append((0.5 + 1.5 * torch.rand(1, generator=g)) * (c * unit[w] + math.sqrt(1 - c * c) * e / e.norm()))
        images.append(tiny.tile(torch.stack(rows), range(tiny.NUM_PATCHES)))
    return words, torch.stack(images)


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------
def assert_equal_per_image(ours, refs):
    """Every output of every image: the real tokens (a reference's token count) in order, the rest of
    the padded row exactly zero, and the pooled/head outputs."""
    assert ours.keys() == refs[0].keys()
    for i, ref in enumerate(refs):
        for name, want in ref.items():
            got = ours[name][i]
            if want.dim() == 2:                                          # (tokens, C)
                assert (got[want.shape[0]:] == 0).all(), f"image {i} {name}: a pad is not zero"
                got = got[:want.shape[0]]
            assert got.shape == want.shape, (i, name)
            err = (got - want).abs().max().item()
            assert err < TOL, f"image {i} {name}: max abs difference {err:.2e}"


def assert_same_input(model, x, reducer, want):
    """vwt.tokenize's tokens and sizes entering the pre-norm equal the reference's, image by image (a
    pre-norm is scale-invariant, so a sum in place of a mean would hardly show in the outputs of CLIP)."""
    state, _ = tokenize(model, reducer, x)
    sizes = state.sizes()
    for i, (tokens, size) in enumerate(want):
        n = tokens.shape[0]
        assert (sizes[i, n:] == 0).all() and torch.equal(sizes[i, :n], size), f"image {i}: sizes"
        err = (state.x[i, :n] - tokens).abs().max().item()
        assert err < TOL, f"image {i}: tokens entering the blocks differ by {err:.2e}"


def run_vwt(family, model, x, reducer, packing="auto"):
    outputs = POOLS[family][4]
    vwt.patch(model, *(reducer if isinstance(reducer, list) else [reducer]), packing=packing)
    try:
        with torch.no_grad():
            ours = outputs(model, x)
        s = vwt.stats(model)
    finally:
        vwt.unpatch(model)
    return ours, s


def build(family):
    return lively(POOLS[family][0](depth=DEPTH))


# ------------------------------------------------------------------------------------------------
# The matrix
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("drop", [0.5, 0.25])
@pytest.mark.parametrize("family", sorted(POOLS))
def test_intra_equals_the_papers_reference(family, drop, batch):
    model, x = build(family), intra_images(batch)
    select = lambda t, p: intra_select(t, p, drop)                       # noqa: E731
    with torch.no_grad():
        refs = reference(family, model, x, select, prop_attn=False)
        assert_same_input(model, x, vwt.IntraImage(drop=drop), selected(family, model, x, select))
    ours, s = run_vwt(family, model, x, vwt.IntraImage(drop=drop))
    kept = int(tiny.NUM_PATCHES * (1 - drop))
    assert s["tokens_per_layer"][:, 0].tolist() == [1 + kept] * batch
    assert_equal_per_image(ours, refs)


@pytest.mark.parametrize("batch,packing", [(1, "auto"), (4, "auto"), (4, "off")],
                         ids=["batch1", "batch4-packed", "batch4-padded"])
@pytest.mark.parametrize("prop_attn", [False, True], ids=["plain", "prop"])
@pytest.mark.parametrize("thresh", [0.1, 0.4])
@pytest.mark.parametrize("family", sorted(POOLS))
def test_inter_equals_the_papers_reference(family, thresh, prop_attn, batch, packing):
    words, x = inter_case(batch)
    model = build(family)
    select = lambda t, p: inter_select(t, p, words, thresh)              # noqa: E731
    reducer = vwt.InterImage(vwt.Vocabulary(words), thresh=thresh, prop_attn=prop_attn)
    with torch.no_grad():
        refs = reference(family, model, x, select, prop_attn)
        assert_same_input(model, x, reducer, selected(family, model, x, select))
    ours, s = run_vwt(family, model, x, reducer, packing)
    counts = [r[next(k for k, v in r.items() if v.dim() == 2)].shape[0] for r in refs]
    counts = [c + family.startswith("open_clip") for c in counts]        # open_clip's tokens omit the class token
    assert s["tokens_per_layer"][:, 0].tolist() == counts
    assert counts[0] < 1 + tiny.NUM_PATCHES                              # patches merged in every case
    if batch > 1:
        assert len(set(counts)) > 1                                      # so the batch is padded
        assert s["execution"] == {"auto": "packed", "off": "padded"}[packing]
    assert_equal_per_image(ours, refs)


@pytest.mark.parametrize("batch,packing", [(1, "auto"), (4, "off")], ids=["batch1", "batch4-padded"])
@pytest.mark.parametrize("thresh", [0.1, 0.55])
@pytest.mark.parametrize("family", sorted(POOLS))
def test_inter_in_embed_space_equals_the_reference(family, thresh, batch, packing):
    """The "embed" space option (vwt's, not the paper's): words and patches are the model's patch
    projections before position embeddings; the words here are the projections of inter_case's words,
    so the patches near a word (distance ~0.02) match at 0.1, those at 0.3 in pixels (0.15 to 0.41
    projected) at 0.55, random ones (beyond 0.7) never."""
    words, x = inter_case(batch)
    model = build(family)
    with torch.no_grad():
        unit = words / words.norm(dim=1, keepdim=True)
        tiles = tiny.tile(unit, [i % len(words) for i in range(tiny.NUM_PATCHES)])  # patch w: word w, for w < 5
        embed_words = torch.stack(features_of(family, model, tiles, "embed")[:len(words)])
        select = lambda t, p: inter_select(t, p, embed_words, thresh)    # noqa: E731
        refs = reference(family, model, x, select, False, space="embed")
        reducer = vwt.InterImage(vwt.Vocabulary(embed_words, space="embed", patch_size=P), thresh=thresh)
        assert_same_input(model, x, reducer, selected(family, model, x, select, space="embed"))
    ours, s = run_vwt(family, model, x, reducer, packing)
    assert s["tokens_per_layer"][0, 0] < 1 + tiny.NUM_PATCHES
    assert_equal_per_image(ours, refs)


@pytest.mark.parametrize("family", sorted(POOLS))
def test_inter_then_tome_equals_the_reference_image_by_image(family):
    """InterImage followed by ToMe (vwt allows the pair; the paper ran one method at a time), both with
    proportional attention: on a padded batch each image equals official ToMe run on that image's
    merged tokens alone, with the visual words' sizes as its starting sizes, r capped by its own tokens
    (pads never merge)."""
    words, x = inter_case(4)
    model = build(family)
    select = lambda t, p: inter_select(t, p, words, 0.4)                 # noqa: E731
    step = lambda t, metric, size: reference_merge(t, metric, size, 3, protected=1)  # noqa: E731
    with torch.no_grad():
        refs = reference(family, model, x, select, True, step=step, pool_by_size=False)  # ToMe's own pool
    ours, s = run_vwt(family, model, x, [vwt.InterImage(vwt.Vocabulary(words), thresh=0.4, prop_attn=True),
                                         vwt.ToMe(r=3)])
    assert s["execution"] == "padded"
    first = [8, 14, 11, 8]                                               # the visual words of inter_case at 0.4
    assert s["tokens_per_layer"].tolist() == [official_schedule(n, 3, 1, DEPTH) for n in first]  # own caps
    assert_equal_per_image(ours, refs)


def test_the_larger_threshold_matches_more():
    """The two thresholds are different cases: 0.4 matches the patches at distance 0.3, 0.1 does not."""
    words, x = inter_case(4)
    model = build("timm")
    counts = {t: run_vwt("timm", model, x, vwt.InterImage(vwt.Vocabulary(words), thresh=t))[1]["tokens_per_layer"][:, 0]
              for t in (0.1, 0.4)}
    assert (counts[0.4] < counts[0.1]).all()


def test_the_reference_sees_order_proportional_attention_and_the_kept_set():
    """The matrix can fail: the reference with the matched words in first-patch order, without
    proportional attention where vwt uses it, or keeping the lowest-variance patches, differs from the
    true reference (and so from vwt) far beyond the tolerance."""
    words, x = inter_case(4)
    model = build("hf_clip")

    def last(select, prop):
        with torch.no_grad():
            return [r["last_hidden_state"] for r in reference("hf_clip", model, x, select, prop)]

    def gap(a, b):
        return max((u - w).abs().max().item() for u, w in zip(a, b))

    good = last(lambda t, p: inter_select(t, p, words, 0.4), True)
    reordered = last(lambda t, p: inter_select(t, p, words, 0.4, order="first patch"), True)
    plain = last(lambda t, p: inter_select(t, p, words, 0.4), False)
    assert gap(good, reordered) > 1000 * TOL and gap(good, plain) > 1000 * TOL
    y, model = intra_images(2), build("timm")
    with torch.no_grad():
        a = reference("timm", model, y, lambda t, p: intra_select(t, p, 0.5), False)
        b = reference("timm", model, y, lambda t, p: intra_select(t, p, 0.5, highest=False), False)
    assert max((u["logits"] - w["logits"]).abs().max().item() for u, w in zip(a, b)) > 1000 * TOL
