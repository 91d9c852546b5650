"""VWT intra-image and inter-image: exact token counts on constructed images, the merge itself against a
per-image reference, parity when nothing is reduced, and batch invariance on every backend."""
import pytest
import torch

import vwt
from tiny import ENTRIES, GRID, IMAGE, NUM_PATCHES, PATCH, hf_blip, images, tile, timm_vit
from vwt.encoder import InputContext, initial_state
from vwt.tokenizer import pixel_patches
from vwt.vocab import patch_embedder

D = 3 * PATCH * PATCH


def some_words(n=6, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def tokens_in(model):
    return vwt.stats(model)["tokens_per_layer"][:, 0]


def test_pixel_patches_order():
    x = images(2)
    p = pixel_patches(x, PATCH)
    assert p.shape == (2, NUM_PATCHES, D)
    i, j = 2, 1
    assert torch.equal(p[:, i * GRID + j], x[:, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH].reshape(2, -1))
    assert torch.equal(pixel_patches(tile(some_words(16), range(NUM_PATCHES))[None], PATCH)[0, 5], some_words(16)[5])


def test_uniform_image_with_its_colour_in_the_vocabulary_is_one_token():
    colour = torch.tensor([0.3, -0.5, 0.8])
    image = colour.view(3, 1, 1).expand(3, IMAGE, IMAGE).clone()
    word = colour.view(3, 1).expand(3, PATCH * PATCH).reshape(-1)
    vocab = vwt.Vocabulary(torch.cat([some_words(5), word[None]]))
    model = timm_vit()
    vwt.patch(model, vwt.InterImage(vocab, thresh=0.01))
    with torch.no_grad():
        model(image[None])
    s = vwt.stats(model)
    assert tokens_in(model).tolist() == [2]
    assert (s["labels"] == 1).all()
    assert s["size"].tolist() == [[1.0, float(NUM_PATCHES)]]


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_image_tiled_from_k_words_gives_k_tokens(k):
    words = some_words(16)
    ids = torch.arange(NUM_PATCHES) % k
    model = timm_vit()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-4))
    with torch.no_grad():
        model(tile(words, ids)[None])
    s = vwt.stats(model)
    assert tokens_in(model).tolist() == [1 + k]
    assert torch.equal(s["labels"][0], 1 + ids)  # word w is the token after the class token, in word order
    assert s["size"][0, 1:].tolist() == torch.bincount(ids).float().tolist()


def _reference_merge(x, word, matched, num_words):
    """Per-image loop: class token, matched words by word index (mean), unmatched in patch order."""
    out, sizes, labels = [], [], torch.zeros_like(word)
    for b in range(x.shape[0]):
        toks, sz = [x[b, 0]], [1.0]
        for w in range(num_words):
            sel = matched[b] & (word[b] == w)
            if sel.any():
                labels[b, sel] = len(toks)
                toks.append(x[b, 1:][sel].mean(0))
                sz.append(float(sel.sum()))
        for p in range(word.shape[1]):
            if not matched[b, p]:
                labels[b, p] = len(toks)
                toks.append(x[b, 1 + p])
                sz.append(1.0)
        out.append(torch.stack(toks))
        sizes.append(sz)
    n = max(len(t) for t in out)
    xs = torch.zeros(x.shape[0], n, x.shape[-1])
    ss = torch.zeros(x.shape[0], n)
    for b, (t, s) in enumerate(zip(out, sizes)):
        xs[b, :len(t)], ss[b, :len(s)] = t, torch.tensor(s)
    return xs, ss, labels


def test_merge_equals_per_image_reference():
    words = some_words(6)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (3, NUM_PATCHES), generator=g)
    pixels = torch.stack([tile(words, i) for i in ids])
    noisy = torch.rand(3, NUM_PATCHES, generator=g) < 0.4  # these patches become noise: no word matches
    patches = pixel_patches(pixels, PATCH)
    patches[noisy] = torch.randn(int(noisy.sum()), D, generator=g)
    pixels = patches.view(3, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(3, 3, IMAGE, IMAGE)

    x = torch.randn(3, 1 + NUM_PATCHES, 10, generator=g)
    state = initial_state(x.clone(), (GRID, GRID), 1)
    reducer = vwt.InterImage(vwt.Vocabulary(words), thresh=0.05)
    out = reducer.reduce_input(state, InputContext(pixels, PATCH, None))
    ref_x, ref_size, ref_labels = _reference_merge(x, ids, ~noisy, 6)
    assert len(set((ref_size > 0).sum(1).tolist())) > 1  # different lengths: padding happens
    assert out.x.shape == ref_x.shape
    assert (out.x - ref_x).abs().max() < 1e-6
    assert torch.equal(out.size, ref_size)
    assert torch.equal(out.labels, ref_labels)


def test_intra_keeps_highest_variance_patches_in_order():
    g = torch.Generator().manual_seed(0)
    amp = torch.randperm(NUM_PATCHES, generator=g).float() + 1  # patch p has spread amp[p]
    patches = torch.randn(1, NUM_PATCHES, D, generator=g)
    patches = (patches - patches.mean(-1, keepdim=True)) / patches.std(-1, keepdim=True) * amp[None, :, None]
    pixels = patches.view(1, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, IMAGE, IMAGE)
    model = timm_vit()
    vwt.patch(model, vwt.IntraImage(drop=0.25))
    with torch.no_grad():
        model(pixels)
    keep = int(NUM_PATCHES * 0.75)
    kept = amp.argsort(descending=True)[:keep].sort().values
    labels = vwt.stats(model)["labels"][0]
    assert tokens_in(model).tolist() == [1 + keep]
    assert torch.equal((labels >= 0).nonzero().flatten(), kept)
    assert torch.equal(labels[kept], torch.arange(1, keep + 1))


def test_intra_random_keeps_the_same_number_of_other_patches():
    model = timm_vit()
    x = images(3)
    vwt.patch(model, vwt.IntraImage(drop=0.5))
    with torch.no_grad():
        model(x)
    by_variance = vwt.stats(model)["labels"] >= 0
    vwt.patch(model, vwt.IntraImage(drop=0.5, random=True))
    torch.manual_seed(0)
    with torch.no_grad():
        model(x)
    at_random = vwt.stats(model)["labels"] >= 0
    assert (tokens_in(model) == 1 + NUM_PATCHES // 2).all()
    assert (at_random.sum(1) == NUM_PATCHES // 2).all()
    assert not torch.equal(at_random, by_variance)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_nothing_reduced_equals_unpatched(name):
    build, entry = ENTRIES[name]
    model = build()
    x = images(2)
    with torch.no_grad():
        ref = entry(model, x)
        for reducer in (vwt.InterImage(vwt.Vocabulary(some_words()), thresh=0.0), vwt.IntraImage(drop=0.0)):
            vwt.patch(model, reducer)
            out = entry(model, x)
            assert (tokens_in(model) == 1 + NUM_PATCHES).all()
            assert (out - ref).abs().max().item() < 1e-5, reducer


def _batch_of_different_lengths():
    words = some_words(6)
    ids = [torch.zeros(NUM_PATCHES, dtype=torch.long), torch.arange(NUM_PATCHES) % 3,
           torch.arange(NUM_PATCHES) // 4, torch.arange(NUM_PATCHES) % 6]
    x = torch.stack([tile(words, i) for i in ids])
    x[2, :, :PATCH * 2] = images(1)[0, :, :PATCH * 2]  # two rows of unmatched patches
    x[3] = images(1, seed=7)[0]  # nothing matches: all 17 tokens
    return words, x


def _per_image(model, name, entry, x):
    """Each image's output; for token-sequence outputs only its real (non-pad) tokens."""
    if name in ("hf_clip.vision", "hf_blip.vision", "timm.features"):
        if name == "timm.features":
            tokens, pooled = model.forward_features(x), None
        else:
            o = model(pixel_values=x)
            tokens, pooled = o.last_hidden_state, o.pooler_output
        real = vwt.stats(model)["size"] > 0
        return [torch.cat([tokens[i][real[i]].flatten()] + ([pooled[i]] if pooled is not None else []))
                for i in range(x.shape[0])]
    return list(entry(model, x))


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_inter_batch_invariance(name):
    build, entry = ENTRIES[name]
    model = build()
    words, x = _batch_of_different_lengths()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3))
    with torch.no_grad():
        batched = _per_image(model, name, entry, x)
        counts = tokens_in(model).tolist()
        assert counts == [2, 4, 1 + 2 + 8, 1 + NUM_PATCHES]
        for i in range(x.shape[0]):
            alone = _per_image(model, name, entry, x[i:i + 1])[0]
            assert alone.shape == batched[i].shape
            assert (alone - batched[i]).abs().max().item() < 1e-4, (name, i)


def test_blip_captions_same_alone_and_in_a_batch():
    model = hf_blip()
    words, x = _batch_of_different_lengths()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3))
    kw = dict(num_beams=3, max_length=10, min_length=5)
    with torch.no_grad():
        batch = model.generate(pixel_values=x, **kw)
        assert len(set(tokens_in(model).tolist())) == 4
        pad = model.config.text_config.pad_token_id
        for i in range(4):
            alone = model.generate(pixel_values=x[i:i + 1], **kw)[0]
            row = batch[i]
            assert torch.equal(alone[alone != pad], row[row != pad]), i


def test_proportional_attention_changes_merged_outputs_only_when_asked():
    words, x = _batch_of_different_lengths()
    model = timm_vit()
    out = {}
    for prop in (False, True):
        vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3, prop_attn=prop))
        with torch.no_grad():
            out[prop] = model(x)
    assert (out[True][:3] - out[False][:3]).abs().max() > 1e-4  # images with merged tokens
    assert (out[True][3] - out[False][3]).abs().max() < 1e-5  # nothing merged: log(1) = 0


def test_random_ablation_draws_words_and_distances():
    model = timm_vit()
    x = images(2)
    vocab = vwt.Vocabulary(some_words(4))
    with torch.no_grad():
        vwt.patch(model, vwt.InterImage(vocab, thresh=2.0, random=True))
        model(x)
        assert ((tokens_in(model) >= 2) & (tokens_in(model) <= 5)).all()  # every patch matches one of 4 words
        vwt.patch(model, vwt.InterImage(vocab, thresh=0.0, random=True))
        model(x)
        assert (tokens_in(model) == 1 + NUM_PATCHES).all()


def test_embed_space_matches_patch_projections():
    model = timm_vit()
    words = some_words(16)
    ids = torch.arange(NUM_PATCHES) % 3
    pixels = tile(words, ids)[None]
    embeds = patch_embedder(model)(pixels)[0]  # (16, 64)
    vocab = vwt.Vocabulary(embeds[:3], space="embed", patch_size=PATCH)
    vwt.patch(model, vwt.InterImage(vocab, thresh=1e-4))
    with torch.no_grad():
        model(pixels)
    assert tokens_in(model).tolist() == [4]
    assert torch.equal(vwt.stats(model)["labels"][0], 1 + ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merges_like_float32(dtype):
    words, x = _batch_of_different_lengths()
    model = timm_vit()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-2))
    with torch.no_grad():
        ref = model(x)
        counts = tokens_in(model)
        out = model.to(dtype)(x.to(dtype)).float()
    assert torch.equal(tokens_in(model), counts)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="drop"):
        vwt.IntraImage(drop=1.0)
    with pytest.raises(TypeError, match="Vocabulary"):
        vwt.InterImage("tokenizers/imgnet/v1000/vocab.pt")


# --------------------------------------------------------------------------------------------------
# The bound-and-refine nearest-word search for large vocabularies against the exhaustive one
# --------------------------------------------------------------------------------------------------
def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _search_case(seed=0, v=400, dim=D, thresh=0.1):
    """Words with near-duplicates (ties closer than the bound's slack) and exact duplicates, and unit
    patches: noisy copies of words, points between near-duplicate pairs, patches at cosine distance
    thresh +- 1e-5 from a word, random patches and a zero patch."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(v // 2, dim, generator=g)
    near = base[: v // 4] + 1e-3 * torch.randn(v // 4, dim, generator=g)  # cosines ~1e-6 apart
    words = torch.cat([base, near, base[v // 4: v // 4 + 20]])  # 20 exact duplicates (higher index)
    words = torch.cat([words, torch.randn(v - len(words), dim, generator=g)])
    u = _unit(words)
    pick = torch.randint(v, (300,), generator=g)
    noisy = _unit(u[pick] + 0.02 * torch.randn(300, dim, generator=g))
    a = torch.randint(v // 4, (200,), generator=g)
    t = torch.rand(200, 1, generator=g)
    between = _unit(t * u[a] + (1 - t) * u[v // 2 + a] + 1e-4 * torch.randn(200, dim, generator=g))
    dup = _unit(u[v // 4: v // 4 + 20] + 0.01 * torch.randn(20, dim, generator=g))
    # at distance thresh +- 1e-5 from a word w: cos(theta) w + sin(theta) e with e orthogonal to w
    w = u[torch.randint(v // 2, v // 2 + v // 4, (100,), generator=g)]
    e = torch.randn(100, dim, generator=g)
    e = _unit(e - (e * w).sum(1, keepdim=True) * w)
    c = 1 - thresh + 1e-5 * torch.tensor([-1.0, 1.0]).repeat(50)
    edge = c[:, None] * w + (1 - c * c).sqrt()[:, None] * e
    rand = _unit(torch.randn(100, dim, generator=g))
    feats = torch.cat([noisy, between, dup, edge, rand, torch.zeros(1, dim)]).float()
    return words, _unit(feats)


def _check_against_exhaustive(vocab, f, thresh, **tuning):
    word, cos = vocab.nearest(f, thresh, fast_min_words=1, **tuning)  # the bound-and-refine search
    ref_cos, ref_word = (f @ vocab.unit().T).max(1)  # the exhaustive float32 search
    ref64 = f.double() @ vocab.unit().double().T
    matched = (1 - ref_cos) <= thresh
    assert torch.equal((1 - cos) <= thresh, matched)  # every decision
    assert matched.sum() > 300 and (~matched).sum() > 100
    top2 = ref64.topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # the float32 search itself is exact here
    assert torch.equal(word[matched & clear], ref_word[matched & clear])
    # closer ties: the exactly nearest word, the lowest index among equals (exact duplicates)
    assert torch.equal(word[matched], ref64.max(1).indices[matched])
    assert (cos - ref_cos)[matched].abs().max() < 1e-6
    assert ((1 - cos)[~matched] > thresh).all()
    return matched & ~clear


def test_fast_search_equals_exhaustive_search():
    for seed in range(3):
        words, f = _search_case(seed)
        vocab = vwt.Vocabulary(words, space="embed")
        ties = _check_against_exhaustive(vocab, f, 0.1)
        assert ties.sum() > 20  # near-ties and duplicates are exercised
        # every axis (a bound as tight as rounding allows: the threshold decides alone); a coarse bound
        # (few axes): many candidates per patch; and whole exact rows for the crowded ones
        _check_against_exhaustive(vocab, f, 0.1, sketch_rank=D)
        _check_against_exhaustive(vocab, f, 0.1, sketch_rank=4)
        _check_against_exhaustive(vocab, f, 0.1, sketch_rank=4, dense_row=3)


def test_inter_image_takes_the_fast_search_for_large_vocabularies():
    """InterImage matches through Vocabulary.nearest with max_dist = thresh: exhaustive below
    FAST_MIN_WORDS words, bound-and-refine from there on, with the same decisions."""
    from vwt.vocab import FAST_MIN_WORDS

    for v in (400, FAST_MIN_WORDS):
        words, f = _search_case(5, v=v, dim=D)
        feats = f[:-1].view(4, -1, D) * 3.0  # match normalises
        reducer = vwt.InterImage(vwt.Vocabulary(words), thresh=0.1)
        word, dist = reducer.match(feats)
        unit = _unit(feats.reshape(-1, D))  # as match normalises
        exhaustive = reducer.vocab.nearest(unit)
        fast = reducer.vocab.nearest(unit, 0.1, fast_min_words=1)
        expected = exhaustive if v < FAST_MIN_WORDS else fast
        assert torch.equal(word.flatten(), expected[0]) and torch.equal(dist.flatten(), 1 - expected[1])
        assert not torch.equal(fast[0], exhaustive[0])  # unmatched patches: a near word, not the nearest
        matched = (1 - exhaustive[1]) <= 0.1
        assert torch.equal(dist.flatten() <= 0.1, matched)
    # the fast search's matched words are the exactly nearest (the exhaustive one's may differ on near-ties)
    ref64 = (_unit(feats.double()) @ reducer.vocab.unit().double().T).max(-1).indices.flatten()
    assert torch.equal(word.flatten()[matched], ref64[matched])


def _float32_tie(dim=D, filler=4096, seed=0, patches=100):
    """Unit patches, the first of them with two words (index 0 and 1) within float32 rounding of each
    other: word 1 nearer in float64, word 0 at least as near in the exhaustive float32 matmul, the
    paper's search (a (patches, V) matmul, as its (B, N, D) x (D, V) one). Then ``filler`` random
    words far from the first patch."""
    g = torch.Generator().manual_seed(seed)
    f = _unit(torch.randn(patches, dim, generator=g))
    a = _unit(f[:1] + 0.02 * torch.randn(1, dim, generator=g))  # cos ~0.99: within thresh 0.1
    far = -_unit(torch.randn(filler, dim, generator=g)).abs() * f[:1].sign()
    for _ in range(1000):
        b = _unit(a + 3e-7 * torch.randn(1, dim, generator=g))
        vocab = vwt.Vocabulary(torch.cat([a, b, far]))
        cos64 = f[:1].double() @ vocab.unit().double().T
        cos32 = (f @ vocab.unit().T)[0]
        if cos64[0, 1] > cos64[0, 0] and cos32[0] >= cos32[1]:
            return f, vocab
    raise AssertionError("no float32 tie found")


def test_a_near_tie_goes_to_the_float32_matmuls_word_under_paper_and_to_the_nearer_word_under_standard():
    f, vocab = _float32_tie()
    cos64 = (f[:1].double() @ vocab.unit().double().T)[0]
    assert 1 - cos64[:2].max() <= 0.1 and cos64[2:].max() < 0.5  # the two near words match, the rest far
    papers = (f @ vocab.unit().T).max(1).indices  # the paper's exhaustive float32 matmul and argmax
    assert papers[0] == 0 and int(cos64.argmax()) == 1
    for float32_ties, expected in ((True, 0), (False, 1)):
        word, _ = vocab.nearest(f, 0.1, float32_ties=float32_ties)  # 4098 words: the bound-and-refine search
        assert word[0] == expected
        # whole exact rows (a patch with more candidates than dense_row) decide the same
        assert vocab.nearest(f, 0.1, float32_ties=float32_ties, dense_row=0)[0][0] == expected
    # the method table builds InterImage with the protocol's rule
    from vwt.methods import build_reducers

    for protocol, expected in (("paper", 0), ("standard", 1)):
        inter, = build_reducers(protocol=protocol, vocab=vocab)
        assert inter.match(3.0 * f[None])[0][0, 0] == expected  # match normalises


def test_float32_ties_pick_the_float32_matmuls_word_among_many_near_ties():
    """On the search case's near-duplicate words (cosines ~1e-6 apart) the float32-tie search picks,
    for every matched patch, the word of the exhaustive float32 matmul (the paper's search), whose
    rounding picks other words than the float64-nearest for some of them."""
    for seed in range(3):
        words, f = _search_case(seed)
        vocab = vwt.Vocabulary(words, space="embed")
        cos32, papers = (f @ vocab.unit().T).max(1)
        matched = 1 - cos32 <= 0.1
        nearest64 = (f.double() @ vocab.unit().double().T).max(1).indices
        for tuning in ({}, {"dense_row": 3}):
            word, cos = vocab.nearest(f, 0.1, fast_min_words=1, float32_ties=True, **tuning)
            assert torch.equal(word[matched], papers[matched])
            assert torch.equal(vocab.nearest(f, 0.1, fast_min_words=1, **tuning)[0][matched], nearest64[matched])
        assert (papers[matched] != nearest64[matched]).sum() > 5
