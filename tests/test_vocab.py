"""Vocabularies: save/load with the sidecar, the published bare format, refusal of a vocabulary that does
not fit the model, and the k-means that learns them."""
import json

import pytest
import torch

import vwt
from tiny import NUM_PATCHES, PATCH, images, timm_vit
from vwt.tokenizer import pixel_patches
from vwt.vocab import (INIT, INITS, NITER, bottom_k_sample, faiss_kmeans, inertia, merge_samples,
                       patch_embedder)

D = 3 * PATCH * PATCH


def test_save_and_load_keep_words_and_sidecar(tmp_path):
    words = torch.randn(7, D)
    vocab = vwt.Vocabulary(words, space="pixel", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                           data="samples", patches_seen=123, inertia=4.5)
    path = vocab.save(tmp_path / "v7")
    assert path.name == "vocab.pt"
    raw = torch.load(path)  # the published format: a bare float32 tensor
    assert isinstance(raw, torch.Tensor) and torch.equal(raw, words)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["patch_size"] == PATCH and info["space"] == "pixel" and info["data"] == "samples"
    loaded = vwt.Vocabulary.load(tmp_path / "v7")
    assert torch.equal(loaded.words, words) and loaded.patch_size == PATCH
    assert loaded.meta["mean"] == [0.5, 0.5, 0.5] and loaded.meta["patches_seen"] == 123


def test_published_bare_vocab_loads_and_tokenizes(tmp_path):
    words = torch.randn(5, D)
    torch.save(words, tmp_path / "vocab.pt")
    vocab = vwt.Vocabulary.load(tmp_path / "vocab.pt")
    assert vocab.space == "pixel" and vocab.patch_size == PATCH and len(vocab) == 5
    ids = torch.arange(NUM_PATCHES) % 2
    pixels = words[ids].view(4, 4, 3, PATCH, PATCH).permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32)
    model = timm_vit()
    vwt.patch(model, vwt.InterImage(vocab, thresh=1e-4))
    with torch.no_grad():
        model(pixels)
    assert vwt.stats(model)["tokens_per_layer"][:, 0].tolist() == [3]


def test_published_vit_b16_shape_means_patch_16(tmp_path):
    torch.save(torch.randn(4, 768), tmp_path / "vocab.pt")
    vocab = vwt.Vocabulary.load(tmp_path / "vocab.pt")
    assert (vocab.patch_size, vocab.space, vocab.dim) == (16, "pixel", 768)


def test_wrong_size_vocabulary_is_refused_with_both_shapes():
    model = timm_vit()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(torch.randn(10, 768)), thresh=0.1))
    with pytest.raises(ValueError) as e, torch.no_grad():
        model(images(2))
    msg = str(e.value)
    assert "(10, 768)" in msg and "patch 16" in msg and f"(2, {NUM_PATCHES}, {D})" in msg and "patch 8" in msg
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(torch.randn(3, 32), space="embed"), thresh=0.1))
    with pytest.raises(ValueError, match=r"\(3, 32\).*\(2, 16, 64\)"), torch.no_grad():
        model(images(2))


@pytest.mark.parametrize("content", ["garbage", {"words": 1}, torch.randn(3, 3, 3), torch.randn(4, 100)])
def test_not_a_vocabulary_file_is_refused(tmp_path, content):
    path = tmp_path / "vocab.pt"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError):
        vwt.Vocabulary.load(path)


def _blobs(k=6, per=400, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g) * 10
    x = means.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, dim, generator=g)
    return x[torch.randperm(len(x), generator=g)], means


def _stream(x, sizes):
    """``x`` cut into consecutive blocks of the given sizes (cycled)."""
    out, s, i = [], 0, 0
    while s < len(x):
        out.append(x[s:s + sizes[i % len(sizes)]])
        s, i = s + sizes[i % len(sizes)], i + 1
    return out


def _numbered(blocks):
    start = 0
    for x in blocks:
        yield x, start
        start += x.shape[0]


def test_bottom_k_sample_is_uniform_over_the_stream():
    """Row r of the stream holds the value r. 48,000 rows in blocks of uneven sizes, 4,000 kept: each of
    8 equal parts of the stream should give 500 of them. A part's count is hypergeometric, std
    sqrt(4000 * 1/8 * 7/8 * 44000/47999) = 20.0; we allow 5 std (100) per part and seed by seed, and
    the mean over 5 seeds within 3 std of the mean (27)."""
    n, cap, parts = 48_000, 4_000, 8
    x = torch.arange(n, dtype=torch.float32)[:, None]
    counts = []
    for seed in range(5):
        sample, keys, seen = bottom_k_sample(_numbered(_stream(x, [1000, 2500, 777, 64])), cap, seed=seed)
        assert seen == n and sample.shape == (cap, 1) and torch.equal(keys, keys.sort().values)
        rows = sample[:, 0].long()
        assert len(rows.unique()) == cap and bool(((rows >= 0) & (rows < n)).all())  # distinct rows of the stream
        assert torch.equal(keys & 0xFFFFFFFF, rows)  # each key ends in its row's index
        counts.append(torch.bincount(rows // (n // parts), minlength=parts).float())
        assert (counts[-1] - cap / parts).abs().max() <= 100, counts[-1]
    assert (torch.stack(counts).mean(0) - cap / parts).abs().max() <= 27
    # the same seed gives the same sample; another seed another one
    again = bottom_k_sample(_numbered(_stream(x, [1000, 2500, 777, 64])), cap, seed=4)[0]
    assert torch.equal(again, sample)
    assert not torch.equal(bottom_k_sample(_numbered(_stream(x, [1000])), cap, seed=5)[0], sample)


def test_bottom_k_sample_does_not_depend_on_how_the_stream_is_split():
    """Any blocking, any order of the blocks, or shares sampled apart and merged: the same sample."""
    x = torch.randn(5000, 3)
    ref = bottom_k_sample(_numbered(_stream(x, [5000])), 700, seed=1)
    blocks = list(_numbered(_stream(x, [13, 400, 77])))
    again = bottom_k_sample(blocks[::-1], 700, seed=1)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1]) and again[2] == ref[2]
    shares = [bottom_k_sample(blocks[i::3], 700, seed=1) for i in range(3)]
    merged = merge_samples([s[:2] for s in shares], 700)
    assert torch.equal(merged[0], ref[0]) and torch.equal(merged[1], ref[1]) and sum(s[2] for s in shares) == 5000


def test_bottom_k_sample_keeps_a_short_stream_whole():
    x = torch.randn(1000, 6)
    for cap in (1000, 5000):
        sample, keys, seen = bottom_k_sample(_numbered(_stream(x, [300, 1, 99])), cap, seed=0)
        assert seen == 1000 and torch.equal(sample, x[keys & 0xFFFFFFFF]) and len(keys.unique()) == 1000
    with pytest.raises(ValueError, match="no data"):
        bottom_k_sample(iter([]), 10)


def test_faiss_kmeans_is_seeded_euclidean_lloyd():
    """Same seed: the same words, bitwise; another seed: others. Run to convergence, the words are a
    fixed point of Lloyd's step (each the plain mean of the rows nearest it: Euclidean, not normalised),
    and the inertia it reports (at the last assignment) is then the sum of squared distances to them."""
    x, _ = _blobs(k=12, per=100, dim=10, seed=2)
    x = x + 3 * torch.randn_like(x)  # overlapping: a real clustering problem
    for init in INITS:
        a, ra = faiss_kmeans(x, 12, niter=4, seed=3, init=init)
        b, rb = faiss_kmeans(x, 12, niter=4, seed=3, init=init)
        assert torch.equal(a, b) and ra == rb == {"inertia": ra["inertia"], "kmeans_on": "cpu", "init": init,
                                              "fit_from": "float32 rows"}
        assert not torch.equal(a, faiss_kmeans(x, 12, niter=4, seed=4, init=init)[0])
    ia = ra["inertia"]
    c, rc = faiss_kmeans(x, 12, niter=200, seed=3)
    ic = rc["inertia"]
    nearest = torch.cdist(x.double(), c.double()).argmin(1)
    for j in range(12):
        assert torch.allclose(c[j].double(), x[nearest == j].double().mean(0), atol=1e-4)
    assert ic == pytest.approx(inertia(x, c), rel=1e-5) and ic <= ia
    assert ia >= inertia(x, a) * (1 - 1e-6)  # before the last update: an upper bound
    assert c.norm(dim=1).std() > 0.1  # not unit vectors


def test_learn_is_faiss_on_the_seeded_sample_and_records_it():
    """Vocabulary.learn = bottom_k_sample over the batches' patches + faiss_kmeans, both seeded alike;
    a sample of 4 patches per word from 3 x 4 images (192 patches)."""
    batches = [images(4, seed=s) for s in range(3)]
    a = vwt.Vocabulary.learn(batches, size=10, patch_size=PATCH, seed=1, max_points_per_centroid=4, data="random")
    b = vwt.Vocabulary.learn([(x, None) for x in batches], size=10, patch_size=PATCH, seed=1, max_points_per_centroid=4)
    assert torch.equal(a.words, b.words)
    sample = bottom_k_sample(_numbered(pixel_patches(x, PATCH).reshape(-1, D) for x in batches), 40, seed=1)[0]
    words, run = faiss_kmeans(sample, 10, niter=NITER, seed=1)
    assert torch.equal(a.words, words) and a.meta["inertia"] == run["inertia"] and a.meta["init"] == INIT
    assert a.meta["patches_seen"] == 3 * 4 * NUM_PATCHES and a.meta["sample"] == a.meta["inertia_patches"] == 40
    assert (a.meta["data"], a.meta["kmeans"], a.meta["niter"], a.meta["seed"]) == ("random", "fast", NITER, 1)
    assert not torch.equal(vwt.Vocabulary.learn(batches, size=10, patch_size=PATCH, seed=2).words, a.words)


def test_learn_holds_one_batch_at_a_time():
    """When each batch of pixels is read, no earlier batch's pixels or patches are alive (the sample
    holds copies of some rows)."""
    import weakref

    refs, alive = [], []

    def make(seed):
        alive.append(sum(r() is not None for r in refs))
        x = images(3, seed=seed)
        refs.append(weakref.ref(x))
        return x

    def stream(n):
        for s in range(n):
            yield make(s)  # the generator keeps no reference to what it handed on

    class Bar:
        ticks = 0

        def update(self, n):
            self.ticks += n

    bar = Bar()
    vocab = vwt.Vocabulary.learn(stream(6), size=8, patch_size=PATCH, progress=bar)
    assert alive == [0] * 6 and bar.ticks == 6 and vocab.meta["patches_seen"] == 6 * 3 * NUM_PATCHES


def test_learn_refuses_fewer_patches_than_words():
    with pytest.raises(ValueError, match="at least 100 patches"):
        vwt.Vocabulary.learn([images(1)], size=100, patch_size=PATCH)
    with pytest.raises(ValueError, match="at least 1"):
        vwt.Vocabulary.learn([images(1)], size=4, patch_size=PATCH, niter=0)


def test_learn_in_embed_space():
    model = timm_vit()
    vocab = vwt.Vocabulary.learn([images(4)], size=8, space="embed", patch_size=PATCH, embed=patch_embedder(model))
    assert vocab.space == "embed" and vocab.dim == 64
    assert "forward" not in model.__dict__  # the capture patch was undone
    vwt.patch(model, vwt.InterImage(vocab, thresh=0.5))
    with torch.no_grad():
        model(images(4))
    assert (vwt.stats(model)["tokens_per_layer"][:, 0] < 1 + NUM_PATCHES).any()


# --------------------------------------------------------------------------------------------------
# The paper's recipe: scikit-learn's MiniBatchKMeans, one partial_fit per batch, NumPy seeded 0
# --------------------------------------------------------------------------------------------------
def official_patches(pixels, p):
    """(B, N, 3·P·P) as the paper's pretokenize: row-major patches, each channel-major (c, y, x)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def sklearn_by_hand(batches, size, batch_size):
    """The paper's learn_words driven by hand: global NumPy seed 0, default random_state."""
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans as SK

    np.random.seed(0)
    km = SK(n_clusters=size, n_init="auto", batch_size=batch_size)
    for x in batches:
        km.partial_fit(official_patches(x, PATCH).reshape(-1, D).numpy())
    return torch.from_numpy(km.cluster_centers_)


def test_learn_paper_is_sklearn_partial_fit_per_batch():
    import numpy as np

    batches = [images(5, seed=s) for s in range(4)]
    np.random.seed(123)  # the recipe's seeding does not depend on (or change) NumPy's global state
    state = np.random.get_state()[1].copy()
    vocab = vwt.Vocabulary.learn_paper(batches, size=9, patch_size=PATCH, batch_size=5, data="random")
    assert np.array_equal(np.random.get_state()[1], state)
    assert torch.equal(vocab.words, sklearn_by_hand(batches, 9, 5))
    assert vocab.meta["patches_seen"] == 4 * 5 * NUM_PATCHES and vocab.meta["kmeans"] == "paper"
    assert vocab.meta["inertia"] > 0 and vocab.meta["data"] == "random"
    # a different batching is a different run of the recipe
    assert not torch.equal(vocab.words, sklearn_by_hand([torch.cat(batches)], 9, 5))


def test_learn_paper_holds_one_batch_at_a_time(monkeypatch):
    """Instrumented: when each batch of pixels is read, no earlier batch's pixels or patches are alive;
    when each batch of patches reaches partial_fit, no earlier batch's patches are."""
    import weakref

    from sklearn.cluster import MiniBatchKMeans as SK

    pixels_refs, patch_refs, alive_pixels, alive_patches, rows = [], [], [], [], []

    def make(seed):  # the next batch is read while nothing of the earlier ones is held
        alive_pixels.append(sum(r() is not None for r in pixels_refs) + sum(r() is not None for r in patch_refs))
        x = images(3, seed=seed)
        pixels_refs.append(weakref.ref(x))
        return x

    def stream(n):
        for s in range(n):
            yield make(s)  # the generator keeps no reference to what it handed on

    real = SK.partial_fit

    def watched(self, X, *a, **k):
        alive_patches.append(sum(r() is not None for r in patch_refs))
        patch_refs.append(weakref.ref(X))
        rows.append(X.shape[0])
        return real(self, X, *a, **k)

    monkeypatch.setattr(SK, "partial_fit", watched)
    vocab = vwt.Vocabulary.learn_paper(stream(6), size=8, patch_size=PATCH, batch_size=3)
    assert rows == [3 * NUM_PATCHES] * 6 and vocab.meta["patches_seen"] == sum(rows)
    assert alive_pixels == [0] * 6 and alive_patches == [0] * 6  # peak: one batch's patches
    assert torch.equal(vocab.words, sklearn_by_hand([images(3, seed=s) for s in range(6)], 8, 3))


def test_learn_paper_refuses_a_first_batch_smaller_than_the_vocabulary():
    with pytest.raises(ValueError, match="first batch gives 16 patches, fewer than the 20 words"):
        vwt.Vocabulary.learn_paper([images(1), images(4)], size=20, patch_size=PATCH)


def reassigning_batches(n=10, rows=300, dim=24, outliers=10, seed=0):
    """float32 batches whose first holds far outliers that k-means++ makes centres and no later batch
    comes near: their counts fall below 1% of the largest, so scikit-learn reassigns them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = [rng.standard_normal((rows, dim)).astype(np.float32) for _ in range(n)]
    out[0][:outliers] += 100 * rng.standard_normal((outliers, dim)).astype(np.float32)
    return out


class CountingState:
    """A NumPy RandomState whose ``choice`` calls (scikit-learn's random reassignments) are counted."""

    @staticmethod
    def make(seed):
        import numpy as np

        class State(np.random.RandomState):
            reassigned = 0

            def choice(self, *a, **k):
                State.reassigned += k.get("replace", True) is False  # not k-means++'s first pick
                return super().choice(*a, **k)

        return State(seed)


def test_compute_labels_false_keeps_the_centres_bit_identical():
    """scikit-learn without its after-update diagnostic: the same centres after every batch, through
    k-means++ seeding and random reassignments (the first batch and every 10 k patches)."""
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans as SK

    from vwt.vocab import paper_kmeans

    assert paper_kmeans(20, 50).compute_labels is False
    batches = reassigning_batches()
    kms = [SK(n_clusters=20, n_init="auto", batch_size=50, compute_labels=c, random_state=CountingState.make(0))
           for c in (True, False)]
    for x in batches:
        for km in kms:
            km.partial_fit(x)
        assert np.array_equal(kms[0].cluster_centers_, kms[1].cluster_centers_)
        assert np.array_equal(kms[0]._counts, kms[1]._counts)
    assert type(kms[1]._random_state).reassigned >= 2


def test_learn_paper_measures_inertia_on_a_sample_and_says_so():
    from vwt import vocab as vocab_mod

    batches = [images(5, seed=s) for s in range(3)]
    vocab = vwt.Vocabulary.learn_paper(batches, size=9, patch_size=PATCH, batch_size=5)
    assert vocab.meta["inertia_patches"] == 3 * min(vocab_mod.INERTIA_SAMPLE, 5 * NUM_PATCHES)
    assert "sample" in vocab.meta["inertia_on"] and vocab.meta["inertia"] > 0


def test_pixel_codec_keeps_8_bit_patches_exactly_in_a_quarter_of_the_memory():
    """Patches of real preprocessing (resize on the 8-bit image, to_tensor, normalize) round-trip bit
    for bit through uint8; rows that are not 8-bit pixels stay float32."""
    from PIL import Image

    from vwt import datasets
    from vwt.vocab import PixelCodec

    pre = datasets.Preprocess(size=32, mean=datasets.OPENAI_CLIP_MEAN, std=datasets.OPENAI_CLIP_STD)
    image = Image.fromarray((torch.rand(50, 40, 3) * 255).to(torch.uint8).numpy())
    rows = pixel_patches(pre(image)[None], PATCH).reshape(-1, D)
    codec = PixelCodec(datasets.OPENAI_CLIP_MEAN, datasets.OPENAI_CLIP_STD, PATCH)
    packed = codec.encode(rows)
    assert packed.dtype == torch.uint8 and torch.equal(codec.decode(packed), rows)
    assert codec.encode(rows + 1e-3).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Issue #30 item 4: the fast recipe fits from its uint8 sample, and the sample is held once
# --------------------------------------------------------------------------------------------------
def _codes(n, dim, seed):
    """uint8 rows around 16 centres, with exact duplicates (AFK-MC2 proposals it has chosen already)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (16, dim), generator=g)
    x = (base[torch.randint(0, 16, (n,), generator=g)] + torch.randint(-30, 30, (n, dim), generator=g)).clamp(0, 255)
    x[: n // 10] = x[0]
    return x.to(torch.uint8)


def test_faiss_fits_from_uint8_rows_to_the_float_rows_centres_bit_for_bit():
    """faiss_kmeans on uint8 rows with their codec = faiss_kmeans on the decoded float32 rows: the same
    centres bitwise and the same inertia, for both seedings; the codec's FAISS decoder is the codec's
    decode bitwise. 32,808 rows: the last block of 32,768 would be 40 rows (FAISS would search them
    without BLAS), so the decode block is widened."""
    from vwt.backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from vwt.vocab import PixelCodec

    codec = PixelCodec(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PATCH)
    for n, k, seed in ((3000, 40, 1), (32808, 25, 2)):
        codes = _codes(n, D, seed)
        rows = codec.decode(codes)
        assert torch.equal(torch.from_numpy(codec.faiss_codec().sa_decode(codes.numpy())), rows)
        for init in INITS:
            a, ra = faiss_kmeans(codes, k, seed=seed, init=init, codec=codec)
            b, rb = faiss_kmeans(rows, k, seed=seed, init=init)
            assert torch.equal(a, b) and ra["inertia"] == rb["inertia"] and ra["init"] == rb["init"] == init
            assert (ra["fit_from"], rb["fit_from"]) == ("uint8 rows", "float32 rows")


def test_afkmc2_replay_is_faiss_seeding():
    """vwt.afkmc2 seeds exactly the centres FAISS's own AFK-MC2 seeding picks, from rows it asks for by
    index: several sizes, seeds and chain lengths, with duplicate rows (proposals already chosen)."""
    import faiss
    import numpy as np

    from vwt import afkmc2

    assert afkmc2.matches_faiss()
    for n, dim, k, seed, chain in ((500, 8, 60, 3, 10), (2000, 48, 200, 11, 50), (120, 4, 120, 0, 10)):
        x = _codes(n, dim, seed).numpy().astype(np.float32) / 7
        asked = []

        def rows(i):
            asked.append(len(i))
            return x[i]

        init = faiss.ClusteringInitialization(dim, k)
        init.method, init.seed, init.afkmc2_chain_length = faiss.ClusteringInitMethod_AFK_MC2, seed, chain
        theirs = np.empty((k, dim), np.float32)
        init.init_centroids(n, faiss.swig_ptr(x), faiss.swig_ptr(theirs))
        assert np.array_equal(afkmc2.seed_centres(n, rows, k, seed, chain), theirs)
        assert max(asked) <= afkmc2.BLOCK  # never every row at once


def test_learn_hands_faiss_the_uint8_sample_and_its_seeds(monkeypatch):
    """Vocabulary.learn in pixel space: FAISS gets the uint8 sample (train_encoded, never train on a
    float32 copy), with the AFK-MC2 centres already in place, so FAISS does not decode the sample
    whole to seed; the words equal FAISS's float path on the decoded sample."""
    import faiss

    calls = []
    encoded = faiss.Clustering.train_encoded

    def spy(self, x, codec, index, weights=None):
        calls.append((x.dtype.name, x.shape, self.centroids.size(), self.k * self.d))
        return encoded(self, x, codec, index, weights)

    from vwt.backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    monkeypatch.setattr(faiss.Clustering, "train_encoded", spy)
    monkeypatch.setattr(faiss.Clustering, "train", lambda *a, **k: pytest.fail("FAISS got float32 rows"))
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    batches = [(images(4, seed=s) * 60 + 128).clamp(0, 255).to(torch.uint8).float().div_(255).sub_(mean).div_(std)
               for s in range(3)]  # 8-bit pixels, as to_tensor and normalize make them
    for init in INITS:
        a = vwt.Vocabulary.learn(batches, size=10, patch_size=PATCH, seed=1, max_points_per_centroid=4, init=init)
        assert calls[-1][:2] == ("uint8", (40, D)) and a.meta["fit_from"] == "uint8 rows"
        assert calls[-1][2] == (calls[-1][3] if init == "afk-mc2" else 0)
    monkeypatch.undo()
    sample = bottom_k_sample(_numbered(pixel_patches(x, PATCH).reshape(-1, D) for x in batches), 40, seed=1)[0]
    assert sample.dtype == torch.float32 and torch.equal(a.words, faiss_kmeans(sample, 10, seed=1, init=init)[0])


def test_bottom_k_sample_holds_the_sample_once(monkeypatch):
    """The sample is the brute-force bottom-k (rows of the lowest keys, sorted by key) with uint8 rows,
    float rows and both mixed; while streaming, the buffer never exceeds the capacity and the rows
    waiting for a merge an eighth of it plus one block (the former merge made a new array: 2.25 samples)."""
    import numpy as np

    from vwt import vocab
    from vwt.backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    codec = vocab.PixelCodec(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PATCH)
    rows = codec.decode(_codes(6000, D, 5))
    rows[4000:4100] += 1e-3  # not 8-bit pixels: stay float32
    held = []
    merge = vocab._Sample._merge

    def spy(self):
        held.append((0 if self.rows is None else len(self.rows), self.waiting))
        merge(self)

    monkeypatch.setattr(vocab._Sample, "_merge", spy)
    cases = ((800, codec, 3900), (800, codec, 6000), (800, None, 6000), (6000, codec, 6000), (7000, codec, 3000))
    for cap, c, upto in cases:
        blocks = [(rows[s:min(s + 97, upto)], s) for s in range(0, upto, 97)]
        held.clear()
        sample, keys, seen = bottom_k_sample(iter(blocks[::-1]), cap, seed=3, codec=c)
        want = torch.argsort(vocab.patch_keys(torch.arange(upto), 3))[:cap]
        assert seen == upto and torch.equal(keys, vocab.patch_keys(want, 3))
        assert torch.equal(codec.decode(sample), rows[want])
        assert sample.dtype == (torch.uint8 if c is not None and upto <= 4000 else torch.float32)
        assert max(h for h, _ in held) <= cap and max(w for _, w in held) <= cap // 8 + 97
    order = np.random.default_rng(0).permutation(1000)
    a = np.random.default_rng(1).integers(0, 256, (1000, 7)).astype(np.uint8)
    want, got = a[order], a.copy()
    vocab._permute_rows(got, order)
    assert np.array_equal(got, want)


def test_faiss_seeds_itself_where_the_replay_would_draw_otherwise(monkeypatch):
    """A FAISS whose draws the replay does not reproduce (afkmc2.matches_faiss False) seeds from the
    uint8 rows itself (decoding them whole, as FAISS does): still the float path's centres."""
    from vwt import afkmc2
    from vwt.backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from vwt.vocab import PixelCodec

    codec = PixelCodec(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PATCH)
    codes = _codes(2000, D, 9)
    monkeypatch.setattr(afkmc2, "seed_centres", lambda *a, **k: pytest.fail("replayed on a FAISS that draws otherwise"))
    monkeypatch.setattr(afkmc2, "matches_faiss", lambda: False)
    a, ra = faiss_kmeans(codes, 30, seed=4, codec=codec)
    assert torch.equal(a, faiss_kmeans(codec.decode(codes), 30, seed=4)[0]) and ra["init"] == "afk-mc2"
