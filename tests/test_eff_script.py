"""eff.py end to end on a tiny model with very short windows: the table, CSV, JSON and PNG, the honest
"not measurable" statement on a machine without an energy counter, energy accounting with a meter
that can measure, FLOPs consistent with vwt.flops, and one-line errors for bad input."""
import functools
import json
import math
import subprocess
import time
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import eff
import vwt
from tiny import NUM_PATCHES, open_clip_model, timm_vit
from tiny import loaded as tiny_loaded
from vwt import cli, datasets, energy, flops

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--seconds", "0.001", "--min-iters", "2", "--warmup", "0", "--limit", "4", "--device", "cpu"]


_sample_images = functools.lru_cache(maxsize=1)(datasets.sample_images)


@pytest.fixture(autouse=True)
def decode_samples_once(monkeypatch):
    """The sample photographs are decoded once per test session (the slow part of a tiny run)."""
    monkeypatch.setattr(datasets, "sample_images", _sample_images)


def no_rapl(monkeypatch, tmp_path):
    """Make the run see a CPU without a readable RAPL counter, whatever machine runs the test."""
    real = energy.best_meter
    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: real(device, interval,
                                                                                   rapl_root=tmp_path / "none"))


def test_default_methods_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    methods = "base,intra,inter,tome,evit,lgtm,int8,inter+tome"
    loaded = tiny_loaded()
    df = eff.main(["--methods", methods, "--batch", "1", "2", "--vocab", "8", "--out", "res"] + FAST, loaded=loaded)
    out = capsys.readouterr().out

    csv = tmp_path / "res" / "eff_samples_tiny-clip.csv"
    table = pd.read_csv(csv)
    assert list(table.columns) == eff.COLUMNS
    assert (tmp_path / "res" / "eff_samples_tiny-clip.png").stat().st_size > 0
    meta = json.loads((tmp_path / "res" / "eff_samples_tiny-clip.json").read_text())
    assert meta["weights"] == "random" and "torch" in meta["environment"]["versions"]
    assert (tmp_path / "tokenizers" / "samples" / "v8-p8-32px" / "vocab.pt").exists()

    assert len(table) == 8 * 2
    assert list(table["method"].unique()) == methods.split(",")
    assert energy.NOT_MEASURABLE in out and "weights: random" in out
    assert table["energy_j_per_image"].isna().all() and table["power_w_mean"].isna().all()

    ran = table[table["latency_ms_median"].notna()]
    skipped = table[table["latency_ms_median"].isna()]
    # only a method this install cannot run (int8 without its backend) may be skipped, and it says why
    assert set(skipped["method"]) <= {"int8"} and skipped["note"].str.startswith("not run").all()
    assert (ran["note"].str.contains(energy.NOT_MEASURABLE)).all()
    assert (ran["latency_ms_p90"] >= ran["latency_ms_median"]).all() and (ran["throughput_img_s"] > 0).all()
    assert (ran["calls"] >= 2).all() and (ran["images"] == ran["calls"] * ran["batch"]).all()

    # token counts and FLOPs agree with the model and with vwt.flops
    dims = flops.dims_of(loaded.vision)
    base = table[table["method"] == "base"]
    assert (base["tokens_in"] == NUM_PATCHES + 1).all() and (base["tokens_mean"] == NUM_PATCHES + 1).all()
    assert list(base["gflops_per_image"] * 1e9) == pytest.approx([flops.dense_flops(dims)] * 2)
    assert (base["flops_ratio"] == 1).all()
    intra = table[table["method"] == "intra"]
    kept = 1 + int(NUM_PATCHES * (1 - eff.PAPER["top_k"]))
    assert (intra["tokens_in"] == kept).all()
    assert list(intra["gflops_per_image"] * 1e9) == pytest.approx([flops.tower_flops(dims, [kept] * (dims.depth + 1))] * 2)
    for m in ("intra", "tome", "evit", "lgtm", "inter+tome"):
        assert (table.loc[table["method"] == m, "flops_ratio"] < 1).all(), m
    if "int8" in set(ran["method"]):
        int8 = table[table["method"] == "int8"]
        assert (int8["tokens_in"].values == base["tokens_in"].values).all()
    assert df.shape == table.shape


def test_inter_flops_match_vwt_flops_and_the_vocabulary_is_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    argv = ["--methods", "inter", "--batch", "2", "--vocab", "8", "--metric", "time", "--out", "res"] + FAST
    eff.main(argv, loaded=tiny_loaded())

    def refuse(*a, **k):
        raise AssertionError("the cached vocabulary should have been reused")

    monkeypatch.setattr(vwt.Vocabulary, "learn", refuse)
    loaded = tiny_loaded()
    table = eff.main(argv, loaded=loaded)
    # recompute from the same vocabulary and images, one image at a time (FLOPs count real tokens only)
    vocab = vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / "v8-p8-32px" / "vocab.pt")
    pre = datasets.preprocess_for(loaded.model)
    images = torch.stack([datasets.Samples(pre, limit=4)[i][0] for i in range(4)])
    vision = loaded.vision
    vwt.patch(vision, vwt.InterImage(vocab, thresh=eff.PAPER["thresh"]))
    with torch.inference_mode():
        per_image, tokens = [], []
        for x in images:
            vision(x[None])
            per_image.append(flops.flops_of_last_forward(vision).item())
            tokens.append(vwt.stats(vision)["tokens_per_layer"][0, 0].item())
    vwt.unpatch(vision)
    assert table.loc[0, "gflops_per_image"] * 1e9 == pytest.approx(sum(per_image) / 4)
    assert table.loc[0, "tokens_in"] == pytest.approx(sum(tokens) / 4)
    # --metric time asks for no energy: no note claiming anything about it
    assert table.loc[0, "note"] == "" and math.isnan(table.loc[0, "energy_j_per_image"])


class CountingMeter(energy.Meter):
    """A meter that can measure: 25 W constant, every window's Reading kept."""

    name, measurable, has_power, note = "fake", True, True, "fake meter"

    def __init__(self):
        self.readings, self.powers = [], 0
        self._t0 = None

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        s = time.perf_counter() - self._t0
        r = energy.Reading(seconds=s, joules=25.0 * s, source="fake", mean_watts=25.0, samples=2, note=self.note)
        self.readings.append(r)
        return r

    def power(self):
        self.powers += 1
        return 42.0


@pytest.mark.parametrize("metric", ["all", "energy", "watt"])
def test_energy_accounting_with_a_measurable_meter(tmp_path, monkeypatch, metric):
    meter = CountingMeter()
    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: meter)
    row = eff.main(["--methods", "base", "--batch", "2", "--metric", metric, "--out", str(tmp_path)] + FAST,
                   loaded=tiny_loaded()).iloc[0]
    window = meter.readings[0]  # the timed window (or, for watt, the per-batch power window)
    if metric == "watt":
        assert math.isnan(row["latency_ms_median"])
        assert row["energy_j_per_image"] == pytest.approx(window.joules / (meter.powers * 2))
    else:
        assert row["energy_j_per_image"] == pytest.approx(window.joules / row["images"])
        assert row["energy_window_s"] == pytest.approx(window.seconds)
    assert row["power_w_mean"] == 25.0 and row["energy_source"] == "fake"
    if metric == "energy":
        assert meter.powers == 0 and math.isnan(row["power_w_paper"])
    else:
        assert meter.powers >= 2 and row["power_w_paper"] == 42.0
    assert len(meter.readings) == (2 if metric == "all" else 1)


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_other_families_run_through_their_vision_tower(tmp_path, monkeypatch, family):
    build = {"open_clip": open_clip_model, "timm": timm_vit}[family]
    no_rapl(monkeypatch, tmp_path)
    loaded = cli.Loaded(build(), family, f"tiny-{family}", False)
    table = eff.main(["--methods", "base,tome+int8", "--batch", "2", "--metric", "time", "--out", str(tmp_path)]
                     + FAST, loaded=loaded)
    assert table["latency_ms_median"].notna().all()
    assert table.loc[0, "tokens_in"] == NUM_PATCHES + 1 and table.loc[1, "flops_ratio"] < 1


def test_real_data_set_layout_and_its_errors(tmp_path, monkeypatch):
    from fixtures import write_waterbirds

    monkeypatch.chdir(tmp_path)
    root = write_waterbirds(tmp_path / "data")
    argv = ["--data", "waterbirds", "--data-root", str(root), "--batch", "3", "--metric", "time", "--out", "res"]
    fast = [a for a in FAST if a not in ("--limit", "4")]
    table = eff.main(argv + ["--methods", "base,intra"] + fast, loaded=tiny_loaded())
    assert list(table["method"]) == ["base", "intra"] and (table["data"] == "waterbirds").all()
    assert (tmp_path / "res" / "eff_waterbirds_tiny-clip.csv").exists()
    # no in-domain vocabulary learned yet: say how to get one
    with pytest.raises(cli.UserError, match="process.py"):
        eff.main(argv + ["--methods", "inter", "--vocab", "8"] + fast, loaded=tiny_loaded())
    wrong = vwt.Vocabulary(torch.randn(8, 3 * 16 * 16), patch_size=16)  # the tiny model has 8x8 patches
    wrong.save(tmp_path / "wrong")
    with pytest.raises(cli.UserError, match="16x16"):
        eff.main(argv + ["--methods", "inter", "--vocab-path", str(tmp_path / "wrong" / "vocab.pt")] + fast,
                 loaded=tiny_loaded())
    with pytest.raises(cli.UserError, match="waterbirds"):
        eff.main(argv + ["--data-root", str(tmp_path / "empty")] + fast, loaded=tiny_loaded())


def test_plan_from_flags_and_methods():
    names = lambda argv: [c.name for c in eff.plan(eff.parse_args(argv))]  # noqa: E731
    assert names([]) == eff.DEFAULT_METHODS.split(",")
    assert names(["--methods", "all"]) == eff.DEFAULT_METHODS.split(",")
    assert names(["--tome", "8"]) == ["base", "tome"]
    assert names(["--vocab-path", "v.pt", "--tome", "13", "--quant"]) == ["base", "inter+tome+int8"]
    assert names(["--vocab-path", "v.pt"]) == eff.DEFAULT_METHODS.split(",")  # a vocabulary, not a choice
    assert names(["--methods", "inter+tome, int8+evit,base"]) == ["inter+tome", "evit+int8", "base"]
    s = eff.settings(eff.parse_args(["--methods", "tome", "--tome", "4"]))
    assert s["tome"] == 4 and s["evit"] == eff.PAPER["evit"] and s["top_k"] == eff.PAPER["top_k"]


@pytest.mark.parametrize("argv", [["--methods", "bogus"], ["--methods", "intra+inter"], ["--methods", "tome+evit"],
                                  ["--methods", "base+int8"], ["--top_k", "0.5", "--vocab", "10"],
                                  ["--tome", "2", "--evit", "0.5"]])
def test_bad_configurations_are_user_errors(argv):
    with pytest.raises(cli.UserError):
        eff.plan(eff.parse_args(argv))


def test_bad_numbers_are_user_errors(tmp_path):
    for argv in (["--batch", "0"], ["--seconds", "0"], ["--interval", "5"]):
        with pytest.raises(cli.UserError):
            eff.main(argv + ["--out", str(tmp_path)], loaded=tiny_loaded())


def test_script_prints_one_line_error():
    r = subprocess.run([sys.executable, "eff.py", "--methods", "bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "bogus" in lines[0] and "Traceback" not in r.stderr
