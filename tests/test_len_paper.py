"""len.py under the paper's protocol: std with ddof 1 (pandas describe()), the paper's word-frequency
figure (its len.py --metric freq) beside ours, and the seed's re-split, vocabulary and preprocessing."""
import importlib

import numpy as np
import pytest
import torch

import paper_fixtures
import tiny
import vwt
from vwt import cli
from vwt import datasets as D
from vwt import metrics as M
from vwt.tokenizer import pixel_patches

len_script = importlib.import_module("len")


def _paper_freq(keys, size):
    """The paper's frequency from its description, per image: unmatched patches get labels size, size+1, ...
    in patch order; the labels are sorted, renumbered densely by unique_consecutive, put back in patch
    order; the counts of each renumbered label below ``size`` are added up."""
    total = torch.zeros(size, dtype=torch.long)
    for row in torch.as_tensor(keys):
        labels = row.clone()
        unmatched = labels < 0
        labels[unmatched] = torch.arange(int(unmatched.sum())) + size
        ordered, order = labels.sort()
        _, dense = torch.unique_consecutive(ordered, return_inverse=True)
        dense = dense.gather(0, order.argsort())
        dense = dense[dense < size]
        ids, counts = torch.unique(dense, return_counts=True)
        total[ids] += counts
    return total.numpy()


def test_dense_label_counts_equal_the_papers_frequency():
    rng = np.random.RandomState(0)
    for size in (3, 8, 100):
        keys = rng.randint(-1, size, size=(6, 16))
        keys[0] = -1  # an image without a matched patch
        keys[1] = 2 % size  # one word everywhere
        assert M.dense_label_counts(keys, size).tolist() == _paper_freq(keys, size).tolist()
    assert M.dense_label_counts([[5, 5, -1, 2]], 4).tolist() == [1, 2, 1, 0]  # word 2, word 5 (x2), one unmatched


def test_len_paper_protocol_uses_the_seed_split_vocabulary_and_preprocessing(tmp_path, monkeypatch):
    root = paper_fixtures.write_cub(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    transform = D.transform_for("waterbirds", "paper", image_size=tiny.IMAGE)
    ds = D.load("waterbirds", root, transform, seed=2)
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    patches = pixel_patches(pixels, tiny.PATCH).reshape(-1, 3 * tiny.PATCH ** 2)
    words = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:8]]
    vwt.Vocabulary(words, space="pixel", patch_size=tiny.PATCH).save(tmp_path / "tokenizers" / "waterbirds" / "v8" / "seed_2")
    loaded = cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-hf-clip", False)
    res = len_script.main(["--data", "waterbirds", "--data-root", str(root), "--vocab", "8", "--seed", "2",
                           "--thresh", "0.3", "--batch", "5", "--out", str(tmp_path / "out"), "--workers", "0",
                           "--device", "cpu"], loaded)
    inter = vwt.InterImage(vwt.Vocabulary.load(tmp_path / "tokenizers" / "waterbirds" / "v8" / "seed_2"), thresh=0.3)
    vwt.patch(loaded.model, inter)
    try:
        with torch.no_grad():
            loaded.model.get_image_features(pixel_values=pixels)
        direct = vwt.stats(loaded.model)["tokens_per_layer"][:, 0].numpy()
    finally:
        vwt.unpatch(loaded.model)
    assert res["per_image"] == direct.tolist() and (direct < 1 + tiny.NUM_PATCHES).any()
    assert res["tokens"]["std"] == pytest.approx(float(np.std(direct, ddof=1)))
    import pandas as pd

    assert res["tokens"]["std"] == pytest.approx(pd.Series(direct).describe()["std"])
    word, dist = inter.match(pixel_patches(pixels, tiny.PATCH))
    keys = torch.where(dist <= 0.3, word, -1).numpy()
    freq = _paper_freq(keys, 8)
    assert res["word_frequency_paper"] == pytest.approx((freq / freq.sum()).tolist())
    assert res["word_counts"] == np.bincount(keys[keys >= 0], minlength=8).tolist()
    assert res["config"]["protocol"] == "paper" and res["config"]["seed"] == 2


@pytest.mark.parametrize("folder, seed", [("v8/seed_3", 3), ("v8-seed2", 2), ("v8", 1)])
def test_len_default_seed_is_the_vocabularys(tmp_path, monkeypatch, folder, seed):
    root = paper_fixtures.write_cub(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    vwt.Vocabulary(torch.randn(8, 192), space="pixel", patch_size=tiny.PATCH).save(tmp_path / "tokenizers" / "waterbirds" / folder)
    loaded = cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-hf-clip", False)
    res = len_script.main(["--data", "waterbirds", "--data-root", str(root), "--vocab-path",
                           str(tmp_path / "tokenizers" / "waterbirds" / folder / "vocab.pt"), "--out", str(tmp_path / "o"),
                           "--workers", "0", "--device", "cpu"], loaded)
    assert res["config"]["seed"] == seed and res["tokens"]["images"] == len(D.load("waterbirds", root, None, seed=seed))
