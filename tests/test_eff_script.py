"""eff.py end to end on a tiny model with very short windows: the table, CSV, JSON and PNG, the honest
"not measurable" statement on a machine without an energy counter, energy accounting with a meter
that can measure, FLOPs consistent with vwt.flops, the paper's protocol per group (with a fake NVML),
results names that never collide, the start without waiting for an unreachable hub, and one-line
errors for bad input."""
import dataclasses
import functools
import json
import math
import os
import re
import socket
import statistics
import subprocess
import time
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import eff
import vwt
from tiny import NUM_PATCHES, hf_clip, open_clip_model, timm_vit
from tiny import loaded as tiny_loaded
from vwt import cli, datasets, energy, flops, models, results
from vwt import efficiency as fx
from vwt.spec import Recipe, RunSpec

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--seconds", "0.001", "--min-iters", "2", "--warmup", "0", "--warmup-seconds", "0", "--rounds", "2", "--paper-warmup", "1",
        "--paper-runs",
        "--limit", "4", "--device", "cpu"]
WHOLE = [a for a in FAST if a not in ("--limit", "4")] + ["--full"]  # FAST's windows on every image (--full's pool)


def written(folder, suffix=".csv"):
    """The results files eff.py wrote in ``folder``."""
    return sorted(Path(folder).glob(f"eff__*{suffix}"))


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

    [csv] = written(tmp_path / "res")
    assert csv.name.startswith("eff__samples__tiny-clip__base-intra-inter-tome-evit-lgtm-int8-inter-tome__")
    table = pd.read_csv(csv)
    assert list(table.columns) == fx.COLUMNS  # the samples have no groups: no per-group columns
    assert csv.with_suffix(".png").stat().st_size > 0
    meta = json.loads(csv.with_suffix(".json").read_text())
    assert meta["weights"] == "random" and "torch" in meta["environment"]["versions"]
    assert meta["environment"]["allocator"] == fx.bench.steady_allocator()  # glibc's, held steady
    assert meta["busy"] in (True, False) and list(meta["rounds_verdict"]) == ["1", "2"]
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
    assert (ran["calls"] >= 2 * 2).all() and (ran["images"] == ran["calls"] * ran["batch"]).all()
    assert (ran["rounds"] == 2).all() and (ran["time_ms_paper"] > 0).all() and ran["power_w_paper"].isna().all()
    assert (table.loc[table["method"] == "base", "speedup_median"] == 1).all() and (ran["speedup_median"] > 0).all()
    assert sum("machine" in line for line in out.splitlines() if line.startswith("batch ")) == 2

    # token counts and FLOPs agree with the model and with vwt.flops
    dims = flops.dims_of(loaded.vision)
    base = table[table["method"] == "base"]
    assert (base["tokens_in"] == NUM_PATCHES + 1).all() and (base["tokens_mean"] == NUM_PATCHES + 1).all()
    assert list(base["gflops_per_image"] * 1e9) == pytest.approx([flops.dense_flops(dims)] * 2)
    assert (base["flops_ratio"] == 1).all()
    intra = table[table["method"] == "intra"]
    kept = 1 + int(NUM_PATCHES * (1 - fx.PAPER["top_k"]))
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
    assert list(table["method"]) == ["base", "inter"]  # base is always measured: ratios are to it
    table = table.iloc[1:].reset_index(drop=True)
    # recompute from the same vocabulary and images, one image at a time (FLOPs count real tokens only)
    vocab = vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / "v8-p8-32px" / "vocab.pt")
    pre = datasets.preprocess_for(loaded.model)
    images = torch.stack([datasets.Samples(pre, limit=4)[i][0] for i in range(4)])
    vision = loaded.vision
    vwt.patch(vision, vwt.InterImage(vocab, thresh=fx.PAPER["thresh"]))
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


def test_bucketing_regroups_the_same_images_and_every_turn_runs_the_whole_pool(tmp_path, monkeypatch):
    """--bucket (default at batch > 1 with an input reducer): inter-image times batches of neighbours in
    token count, the same images as the base model's batches. Every turn covers the whole pool, so each
    round compares every method on the same images. Token counts do not depend on the grouping."""
    no_rapl(monkeypatch, tmp_path)
    loaded = tiny_loaded()
    argv = ["--methods", "base,inter,tome", "--batch", "1", "3", "--vocab", "8", "--metric", "time",
            "--protocol", "standard"] + FAST
    runs = {}
    for flag in ("--bucket", "--no-bucket"):
        eff.main(argv + [flag, "--out", str(tmp_path / flag)], loaded=loaded)
        runs[flag] = pd.read_csv(written(tmp_path / flag)[0])
    default = eff.main(argv + ["--out", str(tmp_path / "default")], loaded=loaded)
    pool = 4 // 3 + 1  # --limit 4 images in batches of 3: two batches (the last one cycles back)
    on, off = (runs[f].set_index(["method", "batch"]) for f in ("--bucket", "--no-bucket"))
    assert on.loc[("inter", 3), "bucket"] and not on.loc[("inter", 1), "bucket"]
    assert not on.loc[("base", 3), "bucket"] and not on.loc[("tome", 3), "bucket"]  # no input reducer
    assert not off["bucket"].any()
    assert list(default["bucket"]) == list(on["bucket"])  # on by default at batch > 1
    for runs_of in (on, off):  # every turn runs the whole pool: rounds x batches of the pool
        assert (runs_of.xs(3, level="batch")["calls"] == 2 * pool).all()
        assert (runs_of.xs(1, level="batch")["calls"] == 2 * 4).all()  # batch 1: the 4 images
    for col in ("tokens_in", "tokens_mean", "gflops_per_image"):
        assert on.loc[("inter", 3), col] == pytest.approx(off.loc[("inter", 3), col])
    assert written(tmp_path / "--bucket")[0].name != written(tmp_path / "--no-bucket")[0].name  # timing differs


def test_bucketed_batches_hold_the_same_slots_sorted_by_tokens():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)  # image i is filled with i
    batches = fx.make_batches(images, 4, "cpu", torch.float32)  # slots 0..7: images 0..5, 0, 1
    first_block = torch.tensor([5, 1, 4, 1, 3, 2, 5, 1])  # tokens of each slot
    regrouped = fx.bucketed(batches, first_block)
    slots = [int(x[0, 0, 0]) for batch in regrouped for x in batch]
    assert [len(b) for b in regrouped] == [4, 4]
    assert sorted(slots) == sorted(int(x[0, 0, 0]) for b in batches for x in b)  # the same images
    assert slots == [1, 3, 1, 5, 4, 2, 0, 0]  # ascending tokens; ties in slot order


@pytest.mark.parametrize("metric", ["all", "energy", "watt", "time"])
def test_energy_accounting_with_a_measurable_meter(tmp_path, monkeypatch, metric):
    meter = CountingMeter()
    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: meter)
    row = eff.main(["--methods", "base", "--batch", "2", "--metric", metric, "--out", str(tmp_path)] + FAST,
                   loaded=tiny_loaded()).iloc[0]
    assert row["latency_ms_median"] > 0 and row["rounds"] == 2
    if metric == "time":  # no energy asked for: no meter read, no note claiming anything about it
        assert meter.readings == [] and math.isnan(row["energy_j_per_image"]) and row["note"] == ""
        return
    # one energy window per turn (2 rounds of base), each turn's joules over its images, median over turns
    assert len(meter.readings) == 2
    per_turn = row["images"] / row["rounds"]
    assert row["energy_j_per_image"] == pytest.approx(statistics.median(r.joules / per_turn for r in meter.readings))
    assert row["energy_window_s"] == pytest.approx(sum(r.seconds for r in meter.readings))
    assert row["power_w_mean"] == 25.0 and row["energy_source"] == "fake" and row["energy_ratio_median"] == 1
    # the paper's power figure is NVML's: this meter is not, so none is read and the row says why
    assert meter.powers == 0 and math.isnan(row["power_w_paper"])
    assert (metric != "energy") == str(row["note"]).startswith("power: ")


def test_paper_protocol_per_group_with_a_fake_nvml(tmp_path, monkeypatch, capsys):
    """--protocol paper on a grouped data set: per-group time and power columns; with NVML (fake) the
    power is one reading per batch; on a CPU without it, power is empty with a one-line reason."""
    from fixtures import write_waterbirds
    from test_energy import FakeNVML

    root = write_waterbirds(tmp_path / "data")
    argv = ["--data", "waterbirds", "--data-root", str(root), "--batch", "3", "--methods", "base,tome",
            "--metric", "watt", "--out", str(tmp_path / "res")] + WHOLE
    nvml = FakeNVML(energy=range(0, 10 ** 7, 997), watts=lambda i: 50.0 + i % 7)
    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: energy.NvmlMeter(interval=0.5, nvml=nvml))
    power_calls = []
    real = energy.NvmlMeter.power
    monkeypatch.setattr(energy.NvmlMeter, "power", lambda self: power_calls.append(1) or real(self))
    before = []
    real_runs = fx.bench.paper_runs

    def counting_runs(*a, **k):
        before.append(len(power_calls))
        out = real_runs(*a, **k)
        before.append(len(power_calls))
        return out

    monkeypatch.setattr(fx.bench, "paper_runs", counting_runs)
    table = eff.main(argv, loaded=tiny_loaded())
    groups = [f"power_w_paper_group{g}" for g in range(4)]
    assert set(groups + [f"time_ms_paper_group{g}" for g in range(4)]) <= set(table.columns)
    assert table[groups + ["power_w_paper"]].notna().all().all() and table["time_ms_paper"].isna().all()
    # the paper's seeds 1-3, each on its own re-split of 8 test images at batch 3: three batches, one NVML
    # reading after each, per configuration and seed; per-seed columns beside their mean
    assert [b - a for a, b in zip(before[::2], before[1::2])] == [3] * 6
    seeds = [f"power_w_paper_seed{i}" for i in (1, 2, 3)]
    assert table[seeds].notna().all().all()
    assert table["power_w_paper"].tolist() == pytest.approx(table[seeds].mean(axis=1).tolist())

    monkeypatch.undo()
    monkeypatch.setattr(datasets, "sample_images", _sample_images)
    no_rapl(monkeypatch, tmp_path)
    table = eff.main([a if a != "watt" else "all" for a in argv], loaded=tiny_loaded())
    times = [f"time_ms_paper_group{g}" for g in range(4)]
    assert (table[times + ["time_ms_paper"]] > 0).all().all()
    assert table[groups + ["power_w_paper"]].isna().all().all()
    reason = [l for l in capsys.readouterr().out.splitlines() if l.startswith("power: ")]
    assert len(reason) == 1 and "NVML" in reason[0] and table["note"].str.contains("power: ").all()


def test_runs_that_differ_in_dtype_or_vocabulary_file_write_different_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    vocab = vwt.Vocabulary(torch.randn(8, 3 * 8 * 8), patch_size=8)
    vocab.save(tmp_path / "a")
    vocab.save(tmp_path / "b")
    argv = ["--methods", "inter", "--batch", "2", "--metric", "time", "--protocol", "standard", "--out", "res"] + FAST
    table = eff.main(argv + ["--vocab-path", "a/vocab.pt"], loaded=tiny_loaded())
    assert table["time_ms_paper"].isna().all() and (table["protocol"] == "standard").all()  # ours only
    eff.main(argv + ["--vocab-path", "b/vocab.pt"], loaded=tiny_loaded())
    eff.main(argv + ["--vocab-path", "b/vocab.pt", "--dtype", "bfloat16"], loaded=tiny_loaded())
    files = written(tmp_path / "res")
    assert len(files) == 3 and len({f.name.rsplit("__", 1)[0] for f in files}) == 1  # same readable part
    assert not list((tmp_path / "res").glob(".*"))  # no temporary file left behind
    assert "replacing" not in capsys.readouterr().out
    eff.main(argv + ["--vocab-path", "b/vocab.pt"], loaded=tiny_loaded())  # the same run again: same name, said
    assert len(written(tmp_path / "res")) == 3 and "replacing the results" in capsys.readouterr().out


def test_measures_with_threads_it_records_and_restores(tmp_path, monkeypatch, capsys):
    """By default a CPU run measures with half the usable cores (here pretended to be 4, so 2 threads),
    says so, records the count in the configuration (so the results name) and the environment, and
    leaves torch's own count as it found it; --threads overrides it and writes another file."""
    no_rapl(monkeypatch, tmp_path)
    monkeypatch.setattr(vwt.bench, "usable_cores", lambda: 4)
    seen = []
    real_measure = fx.measure
    monkeypatch.setattr(fx, "measure", lambda *a: (seen.append(torch.get_num_threads()), real_measure(*a))[1])
    before = torch.get_num_threads()
    argv = ["--methods", "tome", "--batch", "2", "--metric", "time", "--protocol", "standard",
            "--out", str(tmp_path)] + FAST
    eff.main(argv, loaded=tiny_loaded())
    assert "with 2 torch threads" in capsys.readouterr().out
    eff.main(argv + ["--threads", "1"], loaded=tiny_loaded())
    assert "with 1 torch thread " in capsys.readouterr().out
    assert seen == [2, 1] and torch.get_num_threads() == before
    metas = [json.loads(p.read_text()) for p in written(tmp_path, ".json")]
    assert len(metas) == 2
    assert sorted(m["args"]["threads"] for m in metas) == [1, 2]
    assert all(m["environment"]["torch_threads"] == m["args"]["threads"] for m in metas)


def test_the_int8_tower_shares_the_float_weights_and_leaves_them_alone():
    """On a CPU, the int8 copy of the tower swaps in its own int8 weights: the float tower keeps the same
    parameter objects with the same values (no copy of its weights is made), and the copy computes
    nearly what it computes."""
    vision = tiny_loaded().vision
    before = {k: (p, p.detach().clone()) for k, p in vision.named_parameters()}
    int8 = fx.quantized(vision)
    if isinstance(int8, str):
        pytest.skip(int8)  # this install cannot run int8
    after = dict(vision.named_parameters())
    assert all(after[k] is p and torch.equal(p, v) for k, (p, v) in before.items())
    quantized = [k for k, p in int8.named_parameters() if type(p).__name__ == "Int8Tensor"]
    assert quantized and all(type(after[k]) is torch.nn.Parameter for k in quantized)
    shared = [k for k, p in int8.named_parameters() if p is after.get(k)]
    assert shared  # layer norms, embeddings: the same tensors, not copies
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = vision(x).last_hidden_state, int8(x).last_hidden_state
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_the_int8_tower_is_made_once_after_measuring_starts(tmp_path, monkeypatch):
    """The int8 copy (a second of work for ViT-B on a small CPU) is made once, when its configuration's
    turn first comes, after the "measuring" line; a copy this install cannot make gives a row saying
    why instead of figures."""
    no_rapl(monkeypatch, tmp_path)
    events = []
    monkeypatch.setattr(fx, "print", lambda *a, **k: events.append(str(a[0]).split()[0]) if a else None,
                        raising=False)  # the "measuring" line: vwt.efficiency.run's
    monkeypatch.setattr(fx, "quantized", lambda vision: events.append("int8") or "not run: no int8 here")
    table = eff.main(["--methods", "int8,tome+int8", "--batch", "1", "2", "--metric", "time", "--protocol",
                      "standard", "--out", str(tmp_path)] + FAST, loaded=tiny_loaded())
    assert events.count("int8") == 1 and events.index("measuring") < events.index("int8")
    skipped = table[table["method"] != "base"]
    assert len(skipped) == 4 and (skipped["note"] == "not run: no int8 here").all()
    assert skipped["latency_ms_median"].isna().all()


@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch16", "Salesforce/blip-image-captioning-base"])
def test_vision_only_random_weights_keep_the_vision_tower_whole(name):
    """eff.py's random fallback builds the named vision tower, parameter for parameter, and only a
    one-layer text tower (it times nothing else)."""
    cpu = torch.device("cpu")
    full = models.load_model(name, cpu, random_weights=True)
    small = models.load_model(name, cpu, random_weights=True, vision_only=True)
    shapes = lambda m: [(k, tuple(p.shape)) for k, p in m.named_parameters()]  # noqa: E731
    assert shapes(small.vision) == shapes(full.vision)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small.model) - count(small.vision) < (count(full.model) - count(full.vision)) / 10


def test_default_threads_leave_room_for_a_second_run(monkeypatch):
    for cores, want in ((1, 1), (2, 1), (3, 1), (16, 8)):
        monkeypatch.setattr(vwt.bench, "usable_cores", lambda: cores)
        assert vwt.bench.measuring_threads(None, "cpu") == want
        assert vwt.bench.measuring_threads(3, "cpu") == 3  # asked for: given


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["closed port", "silent server"])
def test_unreachable_hub_is_found_out_at_once(monkeypatch, kind):
    """A refused connection, or a server that accepts and never answers (a firewall that drops): no
    answer within models.HUB_TIMEOUT, the hub clients go offline; under HF_HUB_OFFLINE nothing is asked."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1] if kind == "silent server" else closed_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(models, "_hub_answered", None)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    try:
        t = time.perf_counter()
        assert models.hub_reachable() is False
        assert time.perf_counter() - t < models.HUB_TIMEOUT + 0.5
    finally:
        silent.close()
    assert hub_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert models.hub_reachable() is False  # found out once: not asked again
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_answers", lambda *a: pytest.fail("HF_HUB_OFFLINE set: the hub is not asked"))
    monkeypatch.setattr(models, "_hub_answered", None)
    assert models.hub_reachable() is False


def test_load_model_falls_back_to_random_weights_with_one_note(monkeypatch, capsys):
    asked = []

    def fake_load(name, random_weights, vision_only=False):
        asked.append(random_weights)
        if not random_weights:
            raise cli.UserError(f"cannot load model {name!r}: no connection")
        return tiny_loaded()

    monkeypatch.setattr(models, "_load", fake_load)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(cli.UserError, match="no connection"):
        models.load_model("some/model", torch.device("cpu"))
    loaded = models.load_model("some/model", torch.device("cpu"), fallback_random=True)
    out = capsys.readouterr().out.splitlines()
    assert asked == [False, False, True] and not loaded.pretrained and "no connection" in loaded.note
    assert len(out) == 1 and out[0].startswith("note: some/model: ") and "random weights" in out[0]


def test_fast_random_weights_are_finite_seeded_and_not_constant():
    a, b = models.fill_random(hf_clip()), models.fill_random(hf_clip())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
        assert p.numel() == 1 or p.std() > 0.01, name


def time_to_measuring(tmp_path, env: dict) -> tuple[float, str]:
    """Seconds from starting `python eff.py` (the default run) to its "measuring" line, less the
    first-use vocabulary learning it reports; and its output up to there."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "eff.py"), "--out", str(tmp_path / "res")], cwd=tmp_path,
                            env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, learning, elapsed = [], 0.0, math.inf
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("learned the vocabulary in "):
                learning = float(line.split()[4])
            if line.startswith("measuring "):
                elapsed = time.perf_counter() - started - learning
                break
    finally:
        proc.kill()
        proc.wait()
    return elapsed, "".join(lines)


def accepted(server: socket.socket) -> int:
    """How many connections reached ``server`` (a listening socket nobody accepted on): drains them."""
    server.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.slow
def test_default_run_goes_offline_at_once_with_the_hub_unreachable(tmp_path):
    """The default `python eff.py`, no offline flag, an empty cache, HF_ENDPOINT on a server that
    accepts connections and never answers (a network that drops packets: the hub clients' own
    timeouts and retries would wait for tens of seconds) or on a closed port: it reaches its first
    measurement with random weights and a one-line note, and the silent server sees exactly one
    connection, the 2 s reachability check: every hub client after it works offline. (Seconds to the
    first measurement are noise on a shared machine; results/benchmarks.md gives them from a quiet one.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        for endpoint, port in (("silent", silent.getsockname()[1]), ("closed", closed_port())):
            elapsed, text = time_to_measuring(tmp_path, dict(env, HF_ENDPOINT=f"http://127.0.0.1:{port}"))
            assert math.isfinite(elapsed), f"{endpoint}: never started measuring:\n{text}"
            notes = [l for l in text.splitlines() if l.startswith("note: ")]
            assert len(notes) == 1 and "random weights" in notes[0], text
            asking = float(re.search(r"of which ([\d.]+) s asking the hub", text).group(1))
            assert asking <= models.HUB_TIMEOUT + 0.5, text  # the one check; no client waits after it
        assert accepted(silent) == 1
    finally:
        silent.close()


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
    assert [f.name.split("__")[:4] for f in written(tmp_path / "res")] == [["eff", "waterbirds", "tiny-clip", "base-intra"]]
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


def spec_of(argv):
    """The RunSpec eff.py makes of a command line."""
    return cli.spec_from_args(eff.parse_args(argv), fx.Measurement)


def test_plan_from_flags_and_methods():
    names = lambda argv: [c.name for c in fx.plan(spec_of(argv))]  # noqa: E731
    assert names([]) == fx.DEFAULT_METHODS.split(",")
    assert names(["--methods", "all"]) == fx.DEFAULT_METHODS.split(",")
    assert names(["--tome", "8"]) == ["base", "tome"]
    assert names(["--vocab-path", "v.pt", "--tome", "13", "--quant"]) == ["base", "inter+tome+int8"]
    assert names(["--vocab-path", "v.pt"]) == fx.DEFAULT_METHODS.split(",")  # a vocabulary, not a choice
    assert names(["--methods", "inter+tome, int8+evit,base"]) == ["inter+tome", "evit+int8", "base"]
    assert names(["--methods", "tome,evit"]) == ["base", "tome", "evit"]  # ratios need base
    s = fx.settings(spec_of(["--methods", "tome", "--tome", "4"]))
    assert s["tome"] == 4 and s["evit"] == fx.PAPER["evit"] and s["top_k"] == fx.PAPER["top_k"]


def test_the_spec_of_a_command_line_holds_what_the_parser_read():
    """eff.py's own flags land in fx.Measurement, whose defaults are the parser's under --full; the spec
    records every flag by its name, as the parsed command line did (results names and hashes stay put)."""
    assert spec_of(["--full"]).options == fx.Measurement()
    argv = ["--full", "--methods", "base,tome", "--tome", "4", "--batch", "1", "4", "--rounds", "3", "--threads", "2",
            "--random-weights", "--data-root", "elsewhere", "--protocol", "standard"]
    spec = spec_of(argv)
    assert spec.options == fx.Measurement(methods="base,tome", rounds=3, threads=2, random_weights=True)
    assert spec.batch == (1, 4) and spec.method.tome == 4 and spec.method.thresh is None
    assert results.config_of(spec) == results.config_of(vars(eff.parse_args(argv)))


def test_the_samples_vocabulary_is_learned_on_every_sample_whatever_the_pool(tmp_path, monkeypatch):
    """The quick default pools 4 samples: too few patches for the default vocabulary, and another pool
    would learn other words; the vocabulary is the twelve samples' whatever --limit says."""
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    per_image = NUM_PATCHES
    words = 3 * per_image  # more words than 2 images have patches, fewer than the 12 samples'
    eff.main(["--methods", "inter", "--batch", "1", "--vocab", str(words), "--metric", "time", "--out", "res"]
             + FAST[:-4] + ["--limit", "2", "--device", "cpu"], loaded=tiny_loaded())
    [vocab] = (tmp_path / "tokenizers" / "samples").glob(f"v{words}*/vocab.pt")
    assert vwt.Vocabulary.load(vocab).meta["patches_seen"] == len(datasets.sample_images()) * per_image


def test_the_quick_default_differs_from_full_as_documented():
    """`python eff.py` is the quick run (fx.QUICK: fewer rounds on a smaller pool, the token pass as the
    warm-up), `--full` the paper-sized one (fx.FULL: the committed reference run's settings, which are
    fx.Measurement's defaults, so a Python run is paper-sized); a sizing flag given beside either wins,
    --full itself is not recorded, and --help and the README say both."""
    quick, full = spec_of([]), spec_of(["--full"])
    sizing = lambda spec: {k: spec.limit if k == "limit" else getattr(spec.options, k) for k in fx.FULL}  # noqa: E731
    assert sizing(full) == fx.FULL and sizing(quick) == fx.QUICK
    assert all(fx.QUICK[k] != fx.FULL[k] for k in fx.FULL) and set(fx.QUICK) == set(fx.FULL)
    assert quick.options.rounds < full.options.rounds and quick.limit < 12  # the samples are 12
    assert quick.options.rounds >= fx.bench.Limits().min_rounds  # the busy flag is still judged
    defaults = {f.name: f.default for f in dataclasses.fields(fx.Measurement)}
    assert all(defaults[k] == v for k, v in fx.FULL.items() if k != "limit") and RunSpec().limit is None
    assert spec_of(["--full", "--rounds", "5"]).options.rounds == 5 and spec_of(["--limit", "6"]).limit == 6
    assert "full" not in results.config_of(full) and "full" not in results.config_of(quick)
    others = {k for k in results.config_of(quick) if results.config_of(quick)[k] != results.config_of(full).get(k)}
    assert others == set(fx.QUICK)
    text = subprocess.run([sys.executable, "eff.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout
    assert "--full" in text and f"--rounds {fx.FULL['rounds']}" in " ".join(text.split())
    readme = (ROOT / "README.md").read_text()
    assert "python eff.py --full" in readme and f"{fx.QUICK['rounds']} rounds" in readme


def test_run_from_python_without_a_command_line(tmp_path, monkeypatch):
    """vwt.efficiency.run takes a RunSpec built in Python: the table and its files, as eff.py's; what
    eff.py prints below the table comes with it."""
    no_rapl(monkeypatch, tmp_path)
    fast = fx.Measurement(methods="base,tome", metric="time", rounds=2, seconds=0.001, min_iters=2, warmup=0,
                          warmup_seconds=0, paper_warmup=1)
    spec = RunSpec(device="cpu", limit=4, batch=(2,), out=tmp_path / "py", method=Recipe(tome=2), options=fast,
                   protocol="standard")
    table = fx.run(spec, loaded=tiny_loaded())
    assert list(table["method"]) == ["base", "tome"] and list(table["config"]) == ["base", "tome2"]
    assert table.loc[1, "tokens_mean"] < table.loc[0, "tokens_mean"] and table["latency_ms_median"].notna().all()
    [csv] = written(tmp_path / "py")
    report = table.attrs["report"]
    assert report["files"][0] == str(csv) and report["weights"] == "random" and len(report["verdicts"]) == 1
    assert "--metric time" in report["energy_note"] and report["power_note"] is None  # no paper power: standard
    assert json.loads(csv.with_suffix(".json").read_text())["args"]["batch"] == [2]


@pytest.mark.parametrize("argv", [["--methods", "bogus"], ["--methods", "intra+inter"], ["--methods", "tome+evit"],
                                  ["--methods", "base+int8"], ["--top_k", "0.5", "--vocab", "10"],
                                  ["--tome", "2", "--evit", "0.5"], ["--methods", "intra", "--top_k", "1.5"]])
def test_bad_configurations_are_user_errors(argv):
    with pytest.raises(cli.UserError):
        fx.plan(spec_of(argv))


def test_bad_numbers_are_user_errors(tmp_path):
    for argv in (["--batch", "0"], ["--interval", "5"], ["--rounds", "0"], ["--limit", "0"], ["--threads", "0"]):
        with pytest.raises(cli.UserError):
            eff.main(argv + ["--out", str(tmp_path)], loaded=tiny_loaded())
    for name in ("seconds", "warmup_seconds"):  # from Python; eff.py's argparse refuses these values first
        for bad in (-1.0, float("nan"), float("inf")) + ((0.0,) if name == "seconds" else ()):
            with pytest.raises(cli.UserError, match="--seconds must be positive"):
                fx.check_numbers(spec_of([]).replace(**{name: bad}))


def test_script_prints_one_line_error():
    r = subprocess.run([sys.executable, "eff.py", "--methods", "bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "bogus" in lines[0] and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# The paper's data side under --protocol paper: each seed's re-split, its vocabulary, the data's transform
# --------------------------------------------------------------------------------------------------
def _paper_side(tmp_path, monkeypatch, extra=()):
    """eff.py --protocol paper on the Waterbirds fixture with one vocabulary per seed (and ImageNet's):
    returns, per call of the paper's measurement of inter-image, (image ids, vocabulary words, transform),
    and the words of every vocabulary written."""
    from fixtures import write_waterbirds

    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    root = write_waterbirds(tmp_path / "data")
    words = {}
    for name, folder in [(f"seed{i}", Path("tokenizers/waterbirds/v8") / f"seed_{i}") for i in (1, 2, 3)] + \
            [("imgnet", Path("tokenizers/imgnet/v8"))]:
        vocab = vwt.Vocabulary(torch.randn(8, 3 * 8 * 8, generator=torch.Generator().manual_seed(len(words))),
                               patch_size=8)
        vocab.save(tmp_path / folder)
        words[name] = vocab.words
    calls = []
    real = fx.paper_fields_of

    def recording(p, b, run, ds):
        if p.config.input == "inter":
            inter = next(r for r in p.reducers if isinstance(r, vwt.InterImage))
            calls.append(([r["image_id"] for r in ds.records], inter.vocab.words, ds.transform))
        return real(p, b, run, ds)

    monkeypatch.setattr(fx, "paper_fields_of", recording)
    argv = ["--data", "waterbirds", "--data-root", str(root), "--batch", "4", "--methods", "base,inter", "--vocab", "8",
            "--metric", "time", "--out", "res"] + WHOLE + list(extra)
    table = eff.main(argv, loaded=tiny_loaded())
    return root, calls, words, table


def test_paper_eff_times_exactly_each_seeds_resplit_test_images(tmp_path, monkeypatch):
    root, calls, _, table = _paper_side(tmp_path, monkeypatch)
    expected = [[r["image_id"] for r in datasets.load("waterbirds", root, None, seed=s, protocol="paper").records]
                for s in (1, 2, 3)]
    fixed = [r["image_id"] for r in datasets.load("waterbirds", root, None, protocol="standard").records]
    assert any(sorted(e) != sorted(fixed) for e in expected)  # the fixture's re-splits move images
    assert [c[0] for c in calls] == expected
    assert {f"time_ms_paper_seed{s}" for s in (1, 2, 3)} <= set(table.columns)
    meta = json.loads(written(tmp_path / "res", ".json")[0].read_text())
    assert meta["paper_seeds"] == [1, 2, 3] and meta["paper_images"] == {"1": 8, "2": 8, "3": 8}


def test_paper_eff_reads_each_seeds_vocabulary_or_imagenets(tmp_path, monkeypatch):
    _, calls, words, _ = _paper_side(tmp_path, monkeypatch)
    assert len(calls) == 3
    for (_, used, _), seed in zip(calls, (1, 2, 3)):
        assert torch.equal(used, words[f"seed{seed}"])
    meta = json.loads(written(tmp_path / "res", ".json")[0].read_text())
    assert meta["paper_vocabularies"] == {str(s): f"tokenizers/waterbirds/v8/seed_{s}/vocab.pt" for s in (1, 2, 3)}

    _, calls, words, table = _paper_side(tmp_path / "imgnet", monkeypatch, ["--imgnet"])
    assert len(calls) == 3 and all(torch.equal(used, words["imgnet"]) for _, used, _ in calls)
    assert (table[table["method"] == "inter"]["config"] == "inter-v8-imgnet-t0.1").all()


def test_paper_eff_uses_the_data_sets_own_transform(tmp_path, monkeypatch):
    _, calls, _, _ = _paper_side(tmp_path, monkeypatch)
    own = datasets.preprocess_for(tiny_loaded().model)
    paper = datasets.transform_for("waterbirds", image_size=own.size, mean=own.mean, std=own.std,
                                   data_preprocessing=True)
    assert isinstance(paper, datasets.PaperPreprocess) and paper != own
    assert all(transform == paper for _, _, transform in calls)


def test_standard_eff_runs_no_paper_measurement_and_one_vocabulary(tmp_path, monkeypatch):
    _, calls, _, table = _paper_side(tmp_path, monkeypatch, ["--protocol", "standard", "--vocab-data", "imgnet"])
    assert calls == [] and table["time_ms_paper"].isna().all()
    assert not any(c.startswith("time_ms_paper_seed") for c in table.columns)


# --------------------------------------------------------------------------------------------------
# What a person sees: the figure (drawn from the table alone) and the printed table
# --------------------------------------------------------------------------------------------------
def _drawn(monkeypatch, argv, busy_at=()):
    """eff.py on the tiny model, the machine called busy at the batch sizes ``busy_at`` (the rounds'
    own judgement replaced), with the Figure it saved as its PNG caught: (table, figure, stdout)."""
    from vwt import efficiency_view as view

    caught, draw = [], view.figure
    monkeypatch.setattr(view, "figure", lambda df: caught.append(draw(df)) or caught[-1])
    monkeypatch.setattr(fx.bench, "busy_reasons", lambda turns, base="base", limits=None:
                        ["a test's busy machine"] if turns[base][0].sizes[0] in busy_at else [])
    table = eff.main(argv + FAST[:-4] + ["--rounds", "3", "--device", "cpu"], loaded=tiny_loaded())
    [fig] = caught
    return table, fig


def _error_bars(ax):
    """{legend label: (bottom, top) of each bar's error bar} of one panel."""
    from matplotlib.container import BarContainer

    return {c.get_label(): [tuple(sorted(seg[:, 1])) for seg in c.errorbar.lines[2][0].get_segments()]
            for c in ax.containers if isinstance(c, BarContainer)}


def flat(pairs) -> list:
    return [v for pair in pairs for v in pair]


def test_the_figure_shows_each_ratio_with_its_iqr_the_busy_flag_and_no_energy(tmp_path, monkeypatch, capsys):
    from vwt import efficiency_view as view

    no_rapl(monkeypatch, tmp_path)
    argv = ["--methods", "base,intra,tome", "--batch", "1", "2", "--out", str(tmp_path / "res")]
    table, fig = _drawn(monkeypatch, argv, busy_at=(1,))
    [ax] = fig.axes  # no energy: one panel, the speed-up
    bars = _error_bars(ax)
    assert set(bars) == {"batch 1 (busy: unreliable)", "batch 2 (quiet)"}  # batch sizes labelled, flag beside
    for label, spans in bars.items():
        rows = table[(table["batch"] == int(label.split()[1])) & (table["method"] != "base")]
        assert flat(spans) == pytest.approx(flat(zip(rows["speedup_q25"], rows["speedup_q75"])))  # each ratio's IQR
        assert (rows["speedup_q25"] <= rows["speedup_median"]).all()
        assert (rows["speedup_median"] <= rows["speedup_q75"]).all()
    assert ax.get_ylim()[0] == 0
    texts = " ".join(t.get_text() for t in fig.texts)
    [busy] = [t.get_text() for t in fig.texts if "BUSY" in t.get_text()]
    assert "batch 1" in busy and "batch 2" not in busy
    assert energy.NOT_MEASURABLE in texts and "NVML" in texts and "RAPL" in texts

    # the same figure from the CSV alone (the PNG of a saved run is redrawn without rerunning it)
    [csv] = written(tmp_path / "res")
    again = view.figure(pd.read_csv(csv))
    redrawn = _error_bars(again.axes[0])
    assert redrawn.keys() == bars.keys() and all(flat(redrawn[k]) == pytest.approx(flat(v)) for k, v in bars.items())
    assert view.redraw(csv) == csv.with_suffix(".png") and csv.with_suffix(".png").stat().st_size > 0

    quiet, fig = _drawn(monkeypatch, argv)
    assert not any("BUSY" in t.get_text() for t in fig.texts)


def test_the_figure_with_energy_has_its_ratio_panel(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: CountingMeter())
    table, fig = _drawn(monkeypatch, ["--methods", "base,tome", "--batch", "1", "--out", str(tmp_path)])
    speed, joules = fig.axes
    tome = table[table["method"] == "tome"]
    [spans] = _error_bars(joules).values()
    assert flat(spans) == pytest.approx(flat(zip(tome["energy_ratio_q25"], tome["energy_ratio_q75"])))
    assert speed.get_ylim()[0] == 0 and joules.get_ylim()[0] == 0
    assert not any(energy.NOT_MEASURABLE in t.get_text() for t in fig.texts)


def test_the_committed_reference_figure_is_drawn_from_its_csv():
    """The committed run's figure is drawn from its CSV alone: from zero, with its busy flags (the batch
    sizes its JSON calls busy), each ratio's error bar its quartiles (a CSV from before the quartile
    columns: the IQR's width centred on the median, and the figure says so)."""
    import importlib.util

    from vwt import efficiency_view as view

    spec = importlib.util.spec_from_file_location("quote_results", ROOT / "benchmarks" / "quote_results.py")
    quote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quote)
    csv = quote.default_run()
    df = pd.read_csv(csv)
    fig = view.figure(df)
    texts = " ".join(t.get_text() for t in fig.texts)
    verdict = json.loads(csv.with_suffix(".json").read_text())["rounds_verdict"]
    lines = [t.get_text() for t in fig.texts if "BUSY" in t.get_text()]  # at most one line names them all
    named = [b for b in verdict if any(f"batch {b}" in line for line in lines)]
    assert named == [b for b, v in verdict.items() if v["busy"]]
    quartiles = "speedup_q25" in df
    assert len(lines) == any(v["busy"] for v in verdict.values())
    assert ("centred on the median" in texts) != quartiles
    assert fig.axes[0].get_ylim()[0] == 0
    for label, spans in _error_bars(fig.axes[0]).items():
        rows = df[(df["batch"] == int(label.split()[1])) & (df["method"] != "base")]
        if quartiles:
            assert flat(spans) == pytest.approx(flat(zip(rows["speedup_q25"], rows["speedup_q75"])))
        else:
            assert [hi - lo for lo, hi in spans] == pytest.approx(list(rows["speedup_iqr"]))


def test_the_printed_table_has_units_no_empty_column_and_closes_on_the_paper_claim(tmp_path, monkeypatch, capsys):
    from vwt import efficiency_view as view

    no_rapl(monkeypatch, tmp_path)
    table, _ = _drawn(monkeypatch, ["--methods", "base,intra", "--batch", "1", "2", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    [header] = [l for l in lines if l.lstrip().startswith(view.HEADERS["config"])]
    empty = [c for c in view.HEADERS if table[c].isna().all()]
    assert set(empty) >= set(view.ENERGY) and "power_w_paper" in empty  # no meter here, no NVML
    assert all((view.HEADERS[c] in header) == (c not in empty) for c in view.HEADERS)
    assert "ms/batch" in view.HEADERS["time_ms_paper"] and "ms/image" in view.HEADERS["latency_ms_median"]
    [missing] = [l for l in lines if l.startswith("not shown (")]
    assert all(view.HEADERS[c] in missing for c in empty) and "NVML" in missing and "RAPL" in missing
    claim = lines[-1]
    assert claim.startswith(view.PAPER_CLAIM) and "batch 1" in claim and "not measurable on this machine" in claim
    assert "intra" in claim

    monkeypatch.setattr(energy, "best_meter", lambda device, interval=0.05: CountingMeter())
    table, _ = _drawn(monkeypatch, ["--methods", "base,intra", "--batch", "1", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    [header] = [l for l in lines if l.lstrip().startswith(view.HEADERS["config"])]
    assert all(view.HEADERS[c] in header for c in view.ENERGY)
    [missing] = [l for l in lines if l.startswith("not shown (")]  # a meter, but not NVML: the paper's power
    assert energy.NOT_MEASURABLE not in missing and "NVML" in missing and view.HEADERS["power_w_paper"] in missing
    ratio = table.loc[table["method"] == "intra", "energy_ratio_median"].item()
    assert lines[-1].endswith(f"energy per image at batch 1 against base: intra {100 * (ratio - 1):+.0f}%")


def test_the_paper_protocol_skips_a_batch_size_its_data_set_cannot_fill(tmp_path, monkeypatch, capsys):
    """4 images fill no batch of 8: the paper's loader would time one batch of 4 under batch 8's name, so
    its protocol runs at batch 1 only, and the rows and one printed line say why (the quick default)."""
    from vwt import efficiency_view as view

    no_rapl(monkeypatch, tmp_path)
    calls = []
    real = fx.bench.paper_runs
    monkeypatch.setattr(fx.bench, "paper_runs", lambda call, loader, *a, **k: calls.append(
        [len(x) for x, _ in loader()]) or real(call, loader, *a, **k))
    table = eff.main(["--methods", "base,tome", "--batch", "1", "8", "--out", str(tmp_path)] + FAST,
                     loaded=tiny_loaded())
    lines = capsys.readouterr().out.splitlines()
    assert calls == [[1, 1, 1, 1]] * 2  # base and ToMe at batch 1; nothing at batch 8
    one, eight = table[table["batch"] == 1], table[table["batch"] == 8]
    assert (one["time_ms_paper"] > 0).all() and eight["time_ms_paper"].isna().all()
    assert (eight["latency_ms_median"] > 0).all()  # the rounds ran at batch 8 (4 images cycled)
    assert eight["note"].str.contains("its data set (4 images) does not fill one batch", regex=False).all()
    assert not one["note"].str.contains(view.PAPER_NOT_RUN, regex=False).any()
    [line] = [l for l in lines if l.startswith("paper's ms/batch")]
    assert line.startswith("paper's ms/batch: not measured at batch 8:") and "--limit 8" in line


def test_the_quick_default_leaves_the_paper_runs_out_and_says_so(tmp_path, monkeypatch, capsys):
    """The quick default runs the rounds only: the paper's own runs (its per-batch timing and power
    outside the rounds) are --full's or --paper-runs', and the printed lines say so apart from energy."""
    from vwt import efficiency_view as view

    no_rapl(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(fx.bench, "paper_runs", lambda *a, **k: calls.append(1) or {})
    quick = [a for a in FAST if a != "--paper-runs"]
    table = eff.main(["--methods", "base,tome", "--batch", "1", "--out", str(tmp_path)] + quick, loaded=tiny_loaded())
    lines = capsys.readouterr().out.splitlines()
    assert calls == [] and table["time_ms_paper"].isna().all() and (table["latency_ms_median"] > 0).all()
    [left_out] = [l for l in lines if l.startswith("not shown (") and view.PAPER_RUNS_LEFT_OUT in l]
    assert view.HEADERS["time_ms_paper"] in left_out and view.HEADERS["power_w_paper"] in left_out
    [energy_line] = [l for l in lines if l.startswith("not shown (") and l != left_out]
    assert view.HEADERS["time_ms_paper"] not in energy_line and "RAPL" in energy_line
    [csv] = written(tmp_path)
    assert json.loads(csv.with_suffix(".json").read_text())["args"]["paper_runs"] is False
    assert not any(l.startswith("power:") for l in lines)  # no NVML remark for a power run not run


@pytest.mark.slow
def test_compile_measures_eager_and_compiled_in_the_same_rounds(tmp_path, monkeypatch, capsys):
    """eff.py --compile: every configuration, base included, eager and compiled in the same rounds;
    compiled rows' speed-ups are to the compiled base, with the speed-up to the eager base beside them
    (so tome's compiled-to-eager-base ratio over its compiled-to-compiled-base one is the compiled
    base's own); the same tokens; compile seconds, graphs, breaks and recompiles recorded; the one
    line on compiling printed; --compile in the recorded configuration."""
    monkeypatch.chdir(tmp_path)
    no_rapl(monkeypatch, tmp_path)
    df = eff.main(["--methods", "base,tome", "--batch", "2", "--out", "res", "--compile", "--protocol", "standard"]
                  + FAST + ["--rounds", "1"], loaded=tiny_loaded())
    out = capsys.readouterr().out
    assert list(df["method"]) == ["base", "tome", "base+compile", "tome+compile"]
    assert list(df["compiled"]) == [False, False, True, True]
    eager, done = df.iloc[:2], df.iloc[2:]
    assert list(done["tokens_mean"]) == list(eager["tokens_mean"])
    assert (done["compile_s"] > 0).all() and (done["graphs"] >= 1).all()
    assert done[["graph_breaks", "recompiles"]].notna().all().all() and eager["compile_s"].isna().all()
    base, tome = done.iloc[0], done.iloc[1]
    assert base["speedup_median"] == 1 and base["speedup_vs_eager_base"] > 0
    assert tome["speedup_vs_eager_base"] / tome["speedup_median"] == pytest.approx(base["speedup_vs_eager_base"])
    assert "torch.compile, default mode" in out and "not timed" in out
    [js] = written(tmp_path / "res", ".json")
    assert json.loads(js.read_text())["args"]["compile"] is True
