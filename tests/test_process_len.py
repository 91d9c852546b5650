"""process.py and len.py end to end on samples and on tiny fixtures in the real Waterbirds and COCO layouts,
with tiny models (through the test-only ``loaded`` argument); their numbers are checked against direct
computation, and a missing data set is one line on stderr."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
import process as process_script
import tiny
import vwt
from vwt import cli
from vwt import datasets as D
from vwt.tokenizer import pixel_patches

len_script = importlib.import_module("len")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    fixtures.write_waterbirds(r)
    fixtures.write_coco(r, fmt="karpathy")
    return r


def clip_loaded():
    return cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-hf-clip", False)


def learn(argv, loaded=None):
    return process_script.main(argv + ["--workers", "0", "--device", "cpu"], loaded or clip_loaded())


def count(argv, loaded=None):
    return len_script.main(argv + ["--workers", "0", "--device", "cpu"], loaded or clip_loaded())


def test_process_on_samples_writes_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vocab = learn(["--data", "samples", "--vocab", "12", "--batch", "4"])
    path = tmp_path / "tokenizers" / "samples" / "v12" / "vocab.pt"
    loaded = vwt.Vocabulary.load(path)
    assert torch.equal(loaded.words, vocab.words) and loaded.words.shape == (12, 3 * tiny.PATCH ** 2)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["patch_size"] == tiny.PATCH and info["image_size"] == tiny.IMAGE and info["space"] == "pixel"
    assert info["patches_seen"] == 12 * tiny.NUM_PATCHES and info["data"] == "samples"
    assert info["mean"] == list(D.OPENAI_CLIP_MEAN) and "torch" in info["environment"]["versions"]
    # the inertia it records is the k-means' own, on the same patches
    assert info["inertia"] > 0 and info["inertia_patches"] == 12 * tiny.NUM_PATCHES
    # the same seed gives the same words; embed space goes to its own folder
    assert torch.equal(learn(["--data", "samples", "--vocab", "12", "--batch", "4"]).words, vocab.words)
    learn(["--data", "samples", "--vocab", "12", "--batch", "4", "--space", "embed"])
    assert vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / "v12-embed").dim == tiny.WIDTH


@pytest.mark.parametrize("data,split", [("waterbirds", "train"), ("coco", "train")])
def test_process_on_fixtures(root, tmp_path, data, split):
    vocab = learn(["--data", data, "--data-root", str(root), "--vocab", "6", "--batch", "2", "--out", str(tmp_path)])
    ds = D.load(data, root, None, split=split)
    assert vocab.meta["patches_seen"] == len(ds) * tiny.NUM_PATCHES and vocab.meta["split"] == split
    assert vwt.Vocabulary.load(tmp_path).words.shape == (6, 3 * tiny.PATCH ** 2)


def _direct_counts(loaded, ds, reducer):
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    vwt.patch(loaded.model, reducer)
    with torch.no_grad():
        loaded.model.get_image_features(pixel_values=pixels)
    counts = vwt.stats(loaded.model)["tokens_per_layer"][:, 0]
    vwt.unpatch(loaded.model)
    return pixels, counts


def test_len_on_waterbirds_counts_per_group_and_words(root, tmp_path):
    learn(["--data", "waterbirds", "--data-root", str(root), "--vocab", "8", "--batch", "2",
           "--out", str(tmp_path / "v8")])
    out = tmp_path / "results"
    res = count(["--data", "waterbirds", "--data-root", str(root), "--vocab-path", str(tmp_path / "v8" / "vocab.pt"),
                 "--thresh", "0.3", "--batch", "3", "--out", str(out), "--protocol", "standard"])
    loaded = clip_loaded()
    ds = D.load("waterbirds", root, D.preprocess_for(loaded.model))
    inter = vwt.InterImage(vwt.Vocabulary.load(tmp_path / "v8"), thresh=0.3)
    pixels, direct = _direct_counts(loaded, ds, inter)
    assert res["per_image"] == direct.tolist()
    assert (direct < 1 + tiny.NUM_PATCHES).any()  # the threshold merges something
    groups = np.array([r["group"] for r in ds.records])
    assert list(res["groups"]) == ds.group_names
    for g, name in enumerate(ds.group_names):
        assert res["groups"][name]["mean"] == pytest.approx(direct[torch.from_numpy(groups == g)].float().mean().item())
    word, dist = inter.match(pixel_patches(pixels, tiny.PATCH))
    matched = dist <= 0.3
    assert res["word_counts"] == torch.bincount(word[matched], minlength=8).tolist()
    files = sorted(p.name for p in (out / "len").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    saved = json.loads((out / "len" / files[0]).read_text())
    assert saved["tokens"] == res["tokens"] and "torch" in saved["environment"]["versions"]
    with Image.open(out / "len" / files[1]) as im:
        assert im.size[0] > 500


def test_len_intra_on_coco_and_samples(root, tmp_path):
    for data in ("coco", "samples"):
        res = count(["--data", data, "--data-root", str(root), "--top_k", "0.5", "--out", str(tmp_path)])
        assert set(res["per_image"]) == {1 + tiny.NUM_PATCHES // 2} and "word_counts" not in res


def test_len_refuses_a_vocabulary_that_does_not_fit(tmp_path):
    torch.save(torch.randn(5, 768), tmp_path / "vocab.pt")
    with pytest.raises(cli.UserError, match=r"\(5, 768\).*\(\d+, 16, 192\)"):
        count(["--data", "samples", "--vocab-path", str(tmp_path / "vocab.pt"), "--out", str(tmp_path)])


def test_len_needs_a_tokenizer(tmp_path):
    with pytest.raises(cli.UserError, match="choose a tokenizer"):
        count(["--data", "samples", "--out", str(tmp_path)])


@pytest.mark.parametrize("script,argv", [("process.py", ["--data", "waterbirds", "--vocab", "10"]),
                                         ("len.py", ["--data", "coco", "--top_k", "0.5"])])
def test_missing_data_set_is_one_line_naming_the_layout(tmp_path, script, argv):
    proc = subprocess.run([sys.executable, str(REPO / script)] + argv + ["--data-root", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expected layout" in lines[0], proc.stderr
