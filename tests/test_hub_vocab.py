"""Published vocabularies by name (issue #24, item 7): ``--vocab-path hf:OWNER/NAME`` reads the
repository's bare ``vocab.pt`` through huggingface_hub's cache. Offline, with a hub cache folder laid
out as huggingface_hub lays it out (refs/main -> a commit, snapshots/<commit>/vocab.pt -> blobs/<sha256>),
and offline without it: one line that says how to get it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import len as len_script
import tiny
import vwt
from vwt import cli, vocab_files
from vwt import datasets as D
from vwt.tokenizer import pixel_patches

REPO_ID = "LeonidasY/inter-image-imgnet-1000"
NAME = "hf:" + REPO_ID
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(folder: Path, repo_id: str, words: torch.Tensor) -> Path:
    """A huggingface_hub cache holding ``repo_id``'s vocab.pt at main, as hf_hub_download leaves it."""
    repo = folder / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    blob = repo / "blobs" / "tmp"
    blob.parent.mkdir()
    torch.save(words, blob)
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob = blob.rename(blob.with_name(sha))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    os.symlink(Path("..") / ".." / "blobs" / sha, snapshot / "vocab.pt")
    return snapshot / "vocab.pt"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline, that huggingface_hub reads from now on (and no remembered look-up)."""
    from huggingface_hub import constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab_files.hub_vocabulary.cache_clear()
    yield folder
    vocab_files.hub_vocabulary.cache_clear()


def count(argv):
    loaded = cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-hf-clip", False)
    return len_script.main(argv + ["--workers", "0", "--device", "cpu", "--protocol", "standard"], loaded)


def test_a_published_vocabulary_is_read_from_the_hub_cache_offline(cache, tmp_path):
    """len.py counts with the cached tensor exactly the tokens the same bare tensor gives when loaded
    from a plain path: pixel space, P from its width, CLIP normalisation."""
    words = torch.randn(12, 3 * tiny.PATCH ** 2, generator=torch.Generator().manual_seed(0))
    file = hub_cache(cache, REPO_ID, words)
    assert vocab_files.hub_vocabulary(NAME).resolve() == file.resolve()
    res = count(["--data", "samples", "--vocab-path", NAME, "--thresh", "1.0", "--out", str(tmp_path / "out")])
    plain = tmp_path / "plain" / "vocab.pt"
    plain.parent.mkdir()
    torch.save(words, plain)
    vocab = vwt.Vocabulary.load(plain)
    assert vocab.space == "pixel" and vocab.patch_size == tiny.PATCH
    ds = D.Samples(D.preprocess_for(tiny.hf_clip()))
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    word, dist = vwt.InterImage(vocab, thresh=1.0).match(pixel_patches(pixels, tiny.PATCH))
    assert res["word_counts"] == torch.bincount(word[dist <= 1.0], minlength=12).tolist()
    assert sum(res["word_counts"]) > 0  # the threshold matches something


def test_a_published_vocabulary_missing_from_the_cache_offline_is_one_line(cache, tmp_path):
    with pytest.raises(cli.UserError) as e:
        count(["--data", "samples", "--vocab-path", NAME, "--out", str(tmp_path)])
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"--vocab-path {NAME} is not in the Hugging Face cache ({cache})")
    assert line.endswith(f"run once online, or: hf download {REPO_ID} vocab.pt"), line


@pytest.mark.parametrize("name", ["hf:LeonidasY", "hf:a/b/c", "hf:LeonidasY/inter-image-imgnet-{seed}", "hf:/x"])
def test_a_malformed_hub_name_says_how_to_spell_it(cache, name):
    with pytest.raises(cli.UserError, match=r"named hf:OWNER/NAME.*e\.g\. hf:LeonidasY/inter-image-imgnet-1000"):
        vocab_files.hub_vocabulary(name)


def test_the_method_label_names_the_repository(cache):
    """The results' method label and name carry the repository's name (not the cache's commit folder)."""
    import argparse

    from vwt import methods

    hub_cache(cache, REPO_ID, torch.randn(4, 768))
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="samples")
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    spec = cli.as_spec(p.parse_args(["--vocab-path", NAME]))
    assert methods.method_name(spec) == "inter-vinter-image-imgnet-1000-t0.1"


def test_eff_measures_with_a_published_vocabulary_and_names_it(cache, tmp_path, monkeypatch):
    import eff
    from test_eff_script import FAST, no_rapl

    no_rapl(monkeypatch, tmp_path)
    hub_cache(cache, REPO_ID, torch.randn(12, 3 * tiny.PATCH ** 2, generator=torch.Generator().manual_seed(1)))
    table = eff.main(["--methods", "base,inter", "--vocab-path", NAME, "--thresh", "1.0", "--batch", "1",
                      "--metric", "time", "--out", str(tmp_path / "out")] + FAST, loaded=tiny.loaded())
    assert list(table["config"]) == ["base", "inter-vinter-image-imgnet-1000-t1"]
    assert table.loc[1, "tokens_mean"] < table.loc[0, "tokens_mean"]  # the published words merged patches


def test_eff_refuses_an_uncached_published_vocabulary_before_loading_the_model(cache, tmp_path, monkeypatch):
    import eff

    def never(*a, **kw):
        raise AssertionError("the model was loaded before the vocabulary was found missing")

    monkeypatch.setattr("vwt.efficiency.load_model", never)
    with pytest.raises(cli.UserError, match="is not in the Hugging Face cache"):
        eff.main(["--methods", "base,inter", "--vocab-path", NAME, "--out", str(tmp_path)])
