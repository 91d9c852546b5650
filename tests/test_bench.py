"""vwt.bench on a fake machine: a fake clock that the fake methods advance, a fake energy meter that
integrates the fake power, and a fake NVML for the paper's one-reading-per-batch protocol. The true
ratios are known by construction, so the tests check what the interleaved rounds report against them."""
import random

import pytest
import torch

from test_energy import FakeNVML
from vwt import bench, energy


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeMeter(energy.Meter):
    """Energy counter of the fake machine: joules accumulate as the methods run."""

    name, measurable, has_power, note = "fake", True, True, "fake meter"

    def __init__(self, clock):
        self.clock, self.joules = clock, 0.0

    def start(self):
        self._t0, self._j0 = self.clock(), self.joules

    def stop(self):
        s, j = self.clock() - self._t0, self.joules - self._j0
        return energy.Reading(seconds=s, joules=j, source="fake", mean_watts=j / s if s else None)


class FakeMachine:
    """Methods whose calls cost ``cost[name]`` seconds per image at ``watts[name]``, with +-1% jitter.
    ``burst = (name, turn)`` makes that method's turn-th turn four times slower (other work on the
    machine: time and energy both grow); ``drift`` slows every call by that fraction per round."""

    def __init__(self, cost, watts, burst=None, drift=0.0, seed=0):
        self.clock, self.cost, self.watts, self.burst, self.drift = FakeClock(), cost, watts, burst, drift
        self.meter = FakeMeter(self.clock)
        self.turns = {name: -1 - WARMUP for name in cost}  # the warm-up enters once per pass: round r is turn r
        self.rounds = 0
        self.rng = random.Random(seed)

    def method(self, name):
        def enter():
            self.turns[name] += 1

        def call(x):
            slow = 4.0 if self.burst == (name, self.turns[name]) else 1.0
            slow *= 1 + self.drift * max(self.turns[name], 0)
            seconds = self.cost[name] * len(x) * slow * (1 + self.rng.uniform(-0.01, 0.01))
            self.clock.t += seconds
            self.meter.joules += seconds * self.watts[name]

        return bench.Method(name, call, enter=enter)

    def run(self, rounds=9, batch=2):
        methods = [self.method(n) for n in self.cost]
        batches = [torch.zeros(batch, 1)] * 3
        stopwatch = energy.Stopwatch(torch.device("cpu"), clock=self.clock)
        turns = bench.interleave(methods, batches, rounds=rounds, min_calls=3, warmup=WARMUP, meter=self.meter,
                                 stopwatch=stopwatch, seed=1)
        return turns, bench.summarise(turns)


WARMUP = 2
COST = {"base": 0.010, "tome": 0.006, "intra": 0.005}
WATTS = {"base": 20.0, "tome": 22.0, "intra": 21.0}
TRUE_SPEEDUP = {m: COST["base"] / COST[m] for m in COST}
TRUE_ENERGY = {m: COST[m] * WATTS[m] / (COST["base"] * WATTS["base"]) for m in COST}


@pytest.mark.parametrize("victim", ["tome", "base"])
def test_a_burst_on_one_turn_leaves_the_ratios_and_raises_the_flag(victim):
    turns, summary = FakeMachine(COST, WATTS, burst=(victim, 4)).run()
    for m in ("tome", "intra"):
        f = summary.figures[m]
        assert f["speedup_median"] == pytest.approx(TRUE_SPEEDUP[m], rel=0.03)
        assert f["energy_ratio_median"] == pytest.approx(TRUE_ENERGY[m], rel=0.03)
    # the burst really happened: measured alone in that window, the method's figure would be 4x off
    hit = turns[victim][4]
    assert hit.per_image == pytest.approx(4 * COST[victim], rel=0.05)
    named = ["tome"] if victim == "tome" else ["tome", "intra"]  # a slow base turn skews every ratio of its round
    assert summary.busy and all(any(m in r for r in summary.reasons) for m in named)
    assert summary.line().startswith("busy machine") and "\n" not in summary.line()
    assert summary.line().count(";") <= 3  # at most three reasons on the console, all in the results


def test_without_a_burst_the_flag_stays_down():
    turns, summary = FakeMachine(COST, WATTS).run()
    assert not summary.busy and summary.reasons == []
    for m in COST:
        f = summary.figures[m]
        assert f["speedup_median"] == pytest.approx(TRUE_SPEEDUP[m], rel=0.03)
        assert f["energy_ratio_median"] == pytest.approx(TRUE_ENERGY[m], rel=0.03)
        assert f["latency_ms_median"] == pytest.approx(1e3 * COST[m], rel=0.02)
        assert f["energy_j_per_image"] == pytest.approx(COST[m] * WATTS[m], rel=0.02)
        assert f["power_w_mean"] == pytest.approx(WATTS[m], rel=1e-6)
    assert summary.figures["base"]["speedup_median"] == 1.0 and summary.figures["base"]["speedup_iqr"] == 0.0


def test_a_machine_slowing_down_keeps_the_ratios_and_flags_the_drift():
    turns, summary = FakeMachine(COST, WATTS, drift=0.08).run()
    assert summary.figures["tome"]["speedup_median"] == pytest.approx(TRUE_SPEEDUP["tome"], rel=0.03)
    assert summary.busy and any("drifted" in r for r in summary.reasons)


def test_rounds_shuffle_the_order_and_share_the_batches():
    machine = FakeMachine(COST, WATTS)
    turns, _ = machine.run(rounds=6)
    orders = {tuple(sorted(COST, key=lambda m: turns[m][r].position)) for r in range(6)}
    assert len(orders) > 1  # the order changes between rounds
    for r in range(6):
        sizes = {tuple(turns[m][r].sizes) for m in COST}
        assert len(sizes) == 1 and turns["base"][r].round == r
    assert all(len(turns[m]) == 6 and len(turns[m][0].seconds) == 3 for m in COST)


def test_turns_last_about_min_seconds():
    machine = FakeMachine({"base": 0.01}, {"base": 1.0})
    stopwatch = energy.Stopwatch(torch.device("cpu"), clock=machine.clock)
    turns = bench.interleave([machine.method("base")], [torch.zeros(1, 1)], rounds=2, min_seconds=0.1,
                             warmup=1, stopwatch=stopwatch)
    assert len(turns["base"][0].seconds) == pytest.approx(10, abs=1)
    summary = bench.summarise(turns)
    assert not summary.judged and not summary.busy and "too few" in summary.line()
    with pytest.raises(ValueError, match="base"):
        bench.summarise({"tome": turns["base"]})


def test_warm_up_is_round_robin_and_lasts_warmup_seconds():
    machine, log = FakeMachine({"base": 0.01, "tome": 0.006}, {"base": 1.0, "tome": 1.0}), []
    methods = [machine.method(n) for n in ("base", "tome")]
    for m in methods:
        call = m.call
        m.call = lambda x, call=call, name=m.name: (log.append(name), call(x))
    stopwatch = energy.Stopwatch(torch.device("cpu"), clock=machine.clock)
    per_call = bench.warm_up(methods, [torch.zeros(1, 1)], 1, stopwatch, min_seconds=0.5)
    assert log[:4] == ["base", "tome", "base", "tome"]  # one call of each per pass, not all of one first
    assert len(log) == 2 * 32  # passes of 16 ms until 0.5 s passed by the stopwatch's clock: 32 passes
    assert per_call == pytest.approx(0.008, rel=0.02)  # median of the last pass
    log.clear()
    bench.warm_up(methods, [torch.zeros(1, 1)], 3, stopwatch)  # no time floor: the calls alone
    assert log == ["base", "tome"] * 3


def loader(groups=((0, 1), (1, 1), (3,))):
    """Three batches of constant images with their records (group per image)."""
    def batches():
        for gs in groups:
            yield torch.ones(len(gs), 3, 4, 4), [{"group": g} for g in gs]
    return batches


def test_paper_runs_one_nvml_reading_per_batch_and_group_means():
    nvml = FakeNVML(energy=[1000], watts=lambda i: 100.0 + 10 * i)
    meter = energy.NvmlMeter(nvml=nvml)
    power, reason = bench.paper_power_reader(meter)
    assert reason == ""
    clock = FakeClock()
    calls = []

    def call(x):
        calls.append(x.shape[0])
        clock.t += 0.001 * x.shape[0]

    runs = bench.paper_runs(call, loader(), torch.device("cpu"), torch.float32, (3, 4, 4),
                            energy.Stopwatch(clock=clock), power=power, warmup=5)
    assert nvml.power_calls == 3  # one reading after each of the three batches, none elsewhere
    assert calls == [1] * 5 + [2, 2, 1] + [1] * 5 + [2, 2, 1]  # warm-up at batch 1 before each run
    assert [v for v, _ in runs["power_w"]] == [110.0, 120.0, 130.0]
    mean, groups = bench.paper_means(runs["power_w"])
    assert mean == pytest.approx((110 * 2 + 120 * 2 + 130) / 5)  # every image carries its batch's reading
    assert groups == pytest.approx({0: 110.0, 1: (110 + 120 * 2) / 3, 3: 130.0})
    ms, by_group = bench.paper_means(runs["time_ms"])
    assert [v for v, _ in runs["time_ms"]] == pytest.approx([2.0, 2.0, 1.0])
    assert by_group[3] == pytest.approx(1.0) and ms == pytest.approx((2 * 2 + 2 * 2 + 1) / 5)


def test_paper_power_is_empty_with_a_reason_without_nvml(tmp_path):
    power, reason = bench.paper_power_reader(energy.best_meter(torch.device("cpu"), rapl_root=tmp_path))
    assert power is None and reason.startswith("power: ") and "NVML" in reason and "\n" not in reason
    runs = bench.paper_runs(lambda x: None, loader(), torch.device("cpu"), torch.float32, (3, 4, 4),
                            energy.Stopwatch(), power=power, warmup=1)
    assert set(runs) == {"time_ms"}


def test_paper_time_on_cuda_brackets_the_copy_and_the_forward_with_events(monkeypatch):
    """No GPU here: stand-in CUDA events and a stand-in batch record the order of things. Each batch's
    time is the events' elapsed time, and the events enclose the host-to-device copy and the call; in
    the power run the reading comes after the device has finished the batch."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, other):
            return 7.0  # ms

    class Batch:
        def __len__(self):
            return 2

        def to(self, device, dtype):
            log.append(f"copy to {device}")
            return self

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(energy, "synchronize", lambda device: log.append(f"sync {device}"))
    runs = bench.paper_runs(lambda x: log.append("forward"), lambda: iter([(Batch(), [{"group": 1}] * 2)]),
                            torch.device("cuda"), torch.float16, (3, 4, 4), energy.Stopwatch(torch.device("cuda")),
                            power=lambda: log.append("power") or 90.0, warmup=0)
    assert runs["time_ms"] == [(pytest.approx(7.0), [1, 1])] and runs["power_w"] == [(90.0, [1, 1])]
    assert log == ["sync cuda", "record", "copy to cuda", "forward", "record", "wait",  # time run
                   "sync cuda", "copy to cuda", "forward", "sync cuda", "power"]  # power run: read when done
