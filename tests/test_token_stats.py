"""One definition of the per-image token statistics (vwt.token_stats): clip.py, blip.py, len.py and
eff.py report the same numbers for the same model, reducers and images, and those numbers are the
ones a direct patched forward gives (tokens entering the first block; mean over the blocks of the
tokens entering each block)."""
import importlib
import json

import pandas as pd
import pytest
import torch

import blip as blip_script
import clip as clip_script
import eff
import fixtures
import tiny
import vwt
from vwt import datasets as D

len_script = importlib.import_module("len")
FAST = ["--seconds", "0.001", "--min-iters", "1", "--warmup", "0", "--warmup-seconds", "0", "--device", "cpu", "--metric", "time"]


def test_token_stats_definition():
    counts = torch.tensor([[17, 15, 13, 11, 9], [9, 9, 9, 9, 9]])  # entering block 0, then after each of 4
    s = vwt.token_stats(counts)
    assert s["tokens_first_block"].tolist() == [17, 9] and s["tokens_last_block"].tolist() == [9, 9]
    assert s["tokens_mean"].tolist() == [(17 + 15 + 13 + 11) / 4, 9]  # entering each block, not after
    only_input = vwt.token_stats(torch.tensor([[5], [7]]))  # no block ran (vwt.tokenizer.tokenize)
    assert only_input["tokens_mean"].tolist() == [5, 7] == only_input["tokens_first_block"].tolist()
    assert vwt.token_summary([s, only_input]) == {"tokens_first_block": 38 / 4, "tokens_last_block": 30 / 4,
                                                  "tokens_mean": (14 + 9 + 5 + 7) / 4}


def _reference(loaded, pixels, reducers):
    """Per-image tokens entering block 0 and mean over blocks of the tokens entering each, by hand."""
    vwt.patch(loaded.model, *reducers)
    try:
        with torch.no_grad():
            loaded.vision(pixels)
        counts = vwt.stats(loaded.model)["tokens_per_layer"].float()
    finally:
        vwt.unpatch(loaded.model)
    return counts[:, 0].mean().item(), counts[:, :-1].mean(1).mean().item(), counts[:, 0]


def _vocab(tmp_path, pixels):
    """Six words learned on the images themselves, and a threshold at which some patches match."""
    vocab = vwt.Vocabulary.learn([pixels], size=6, patch_size=tiny.PATCH)
    path = vocab.save(tmp_path / "v6")
    return vwt.Vocabulary.load(path), path


def _eff(loaded, tmp_path, data, root, images, flags):
    eff.main(["--data", data, "--data-root", str(root), "--limit", str(images), "--batch", "1", "2",
              "--methods", "inter,tome,inter+tome", "--out", str(tmp_path / "eff"), "--protocol", "standard"] + flags + FAST, loaded=loaded)
    (csv,) = (tmp_path / "eff").rglob("*.csv")
    table = pd.read_csv(csv)
    return {m: (part["tokens_in"].tolist(), part["tokens_mean"].tolist()) for m, part in table.groupby("method")}


def _len(loaded, tmp_path, data, root, flags):
    res = len_script.main(["--data", data, "--data-root", str(root), "--out", str(tmp_path / "len"),
                           "--protocol", "standard", "--workers", "0", "--device", "cpu", "--batch", "3"] + flags, loaded)
    return res["tokens"]["mean"]


def _check(methods: dict, reference: dict, eff_rows: dict, len_mean: float):
    for name, (first, mean) in reference.items():
        assert methods[name] == pytest.approx((first, mean), abs=1e-9), name
        ins, means = eff_rows[name]
        assert ins == pytest.approx([first] * len(ins)) and means == pytest.approx([mean] * len(means)), name
    assert len_mean == pytest.approx(reference["inter"][0])


def _setup(loaded, data, root, tmp_path):
    """The images of ``data`` as the scripts preprocess them under --protocol standard (one fixed split,
    the model's own preprocessing), a vocabulary learned on them, each
    configuration's flags and reducers, and the reference statistics of a direct patched forward."""
    ds = D.load(data, root, D.preprocess_for(loaded.model))
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    vocab, path = _vocab(tmp_path, pixels)
    thresh = 0.25
    inter = ["--vocab-path", str(path), "--thresh", str(thresh)]
    configs = {"inter": inter, "tome": ["--tome", "2"], "inter+tome": inter + ["--tome", "2"]}
    reducers = {"inter": [vwt.InterImage(vocab, thresh)], "tome": [vwt.ToMe(r=2)],
                "inter+tome": [vwt.InterImage(vocab, thresh), vwt.ToMe(r=2)]}
    reference = {k: _reference(loaded, pixels, r)[:2] for k, r in reducers.items()}
    per_image = _reference(loaded, pixels, reducers["inter"])[2]
    assert len(set(per_image.tolist())) > 1  # images differ: the averages are over real per-image values
    assert reference["tome"][1] < reference["tome"][0]
    return len(ds), inter, configs, reference


def test_clip_len_and_eff_report_the_same_token_statistics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = fixtures.write_waterbirds(tmp_path / "data")
    loaded = tiny.loaded(tiny.hf_clip, "tiny-clip", fixtures.char_clip_tokenizer(tmp_path / "tok"))
    images, inter, configs, reference = _setup(loaded, "waterbirds", root, tmp_path)
    reported = {}
    for name, flags in configs.items():
        m = clip_script.main(["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path / "clip"),
                              "--protocol", "standard", "--workers", "0", "--device", "cpu", "--batch", "3"] + flags, loaded)["metrics"]
        reported[name] = (m["tokens_first_block"]["mean"], m["tokens_mean"]["mean"])
    eff_rows = _eff(loaded, tmp_path, "waterbirds", root, images, inter + ["--tome", "2"])
    _check(reported, reference, eff_rows, _len(loaded, tmp_path, "waterbirds", root, inter))


def test_blip_len_and_eff_report_the_same_token_statistics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = fixtures.write_coco(tmp_path / "data")
    loaded = tiny.loaded(tiny.hf_blip, "tiny-blip", fixtures.word_bert_tokenizer(tmp_path / "tok"))
    images, inter, configs, reference = _setup(loaded, "coco", root, tmp_path)
    reported = {}
    for name, flags in configs.items():
        out = tmp_path / "blip" / name  # one folder per configuration: its one captions file
        blip_script.main(["--data", "coco", "--data-root", str(root), "--out", str(out), "--no-score",
                          "--workers", "0", "--device", "cpu", "--batch", "3", "--max-length", "8"] + flags, loaded)
        (captions,) = out.rglob("*.captions.jsonl")
        lines = [json.loads(l) for l in captions.read_text().splitlines()[1:]]
        assert len(lines) == images
        reported[name] = (sum(l["tokens_first_block"] for l in lines) / images,
                          sum(l["tokens_mean"] for l in lines) / images)
    eff_rows = _eff(loaded, tmp_path, "coco", root, images, inter + ["--tome", "2"])
    _check(reported, reference, eff_rows, _len(loaded, tmp_path, "coco", root, inter))
