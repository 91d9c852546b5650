"""Measuring methods against each other on a machine that may be busy, and the VWT paper's protocol.

Interleaved rounds (:func:`interleave`): after a shared warm-up, every method (base included) is timed
once per round on the same batches, in an order shuffled each round. Whatever else the machine does
lands on one turn of one method, not on one method's whole figure: the median of the per-round ratios
to base ignores it, and the rounds show it happened (:func:`busy_reasons`: a wide spread of a ratio,
one round far off its median, or latencies drifting from the first rounds to the last).
:func:`summarise` gives per method the median latency and energy per image and the median ratios to
base (speed-up, energy ratio) with their interquartile range.

The paper's protocol (:func:`paper_figures`, eff.py of wearepal/visual-word-tokenizer, branch
tmlr2025): 50 warm-up calls at batch 1 on random inputs, then the data through a loader, each batch
timed with its host-to-device copy (CUDA events on a GPU); in a separate run, one NVML power reading
after each batch; each image carries its batch's figure, averaged overall and per group.

The timer (:class:`vwt.energy.Stopwatch`, with its clock) and the energy meter are passed in, so tests
run all of this on a fake clock and meter.
"""
from __future__ import annotations

import math
import os
import random
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from . import energy


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measuring_threads(requested: Optional[int], device) -> int:
    """Torch threads to measure with: ``requested``; by default, on a CPU, half the usable cores (at
    least 1), so that a second run or other work beside this one does not oversubscribe the cores.
    With more threads than free cores every parallel operator waits for a descheduled thread, a cost
    that grows with the number of small operators rather than with FLOPs (ToMe, the tokenizer and int8
    suffer most), so ratios to base would depend on what else runs. On a GPU: torch's own count (the
    host threads only launch kernels)."""
    if requested is not None:
        return requested
    if torch.device(device).type == "cpu":
        return max(1, usable_cores() // 2)
    return torch.get_num_threads()


# glibc's malloc hands freed memory back to the system, and maps big blocks afresh, by thresholds that
# it moves as the process runs; a configuration whose calls allocate big temporaries (torchao's int8
# on a CPU) then takes thousands of page faults a call in one process (up to 40,000 and 30% slower
# measured here) and none in the next, and its ratio to base changes from run to run. Fixed thresholds
# keep freed memory in the process (benchmarks/bench_allocator.py).
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # give memory back to the system only above 1 GiB free at the heap's top
STEADY_ALLOCATOR = "glibc malloc with fixed thresholds (mmap 32 MiB, trim 1 GiB)"


def steady_allocator() -> str:
    """Fix glibc's malloc thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for the rest of the
    process, so that no configuration's calls page-fault for memory freed by its previous call; returns
    what the process allocates with, as the results record it. Elsewhere than glibc: nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "the system's malloc, as it is (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 and mallopt(m_trim_threshold, TRIM_THRESHOLD) == 1:
        return STEADY_ALLOCATOR
    return "glibc malloc, as it is (mallopt refused)"


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _nothing() -> None:
    return None


@dataclass
class Method:
    """One thing to time. ``call(x)`` runs it on one batch; ``enter``/``leave`` run around each turn,
    untimed (e.g. vwt.patch / vwt.unpatch); ``inputs`` replaces the shared batches (same images, e.g.
    in the dtype this method computes in)."""

    name: str
    call: Callable[[Any], Any]
    enter: Callable[[], Any] = _nothing
    leave: Callable[[], Any] = _nothing
    inputs: Optional[Sequence] = None


@dataclass
class Turn:
    """One method's timed window in one round: seconds and images of each call, the meter's reading."""

    round: int
    position: int
    seconds: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    reading: Optional[energy.Reading] = None

    @property
    def images(self) -> int:
        return sum(self.sizes)

    @property
    def per_image(self) -> float:
        """Seconds per image over the turn (timed calls only)."""
        return sum(self.seconds) / self.images

    @property
    def joules_per_image(self) -> Optional[float]:
        r = self.reading
        return r.joules / self.images if r is not None and r.joules is not None else None


@dataclass(frozen=True)
class Limits:
    """When the rounds say the machine was busy: a ratio's IQR above ``spread`` of its median, one
    round's ratio more than ``outlier`` off the median, or a method's median latency moving by more
    than ``drift`` from the first half of the rounds to the second. Judged from ``min_rounds`` on."""

    spread: float = 0.10
    outlier: float = 0.25
    drift: float = 0.15
    min_rounds: int = 3


def size_of(x) -> int:
    """Images in a batch."""
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)


# --------------------------------------------------------------------------------------------------
# Interleaved rounds
# --------------------------------------------------------------------------------------------------
def warm_up(methods: Sequence[Method], batches: Sequence, calls: int, stopwatch: energy.Stopwatch,
            min_seconds: float = 0.0) -> float:
    """The shared warm-up: round-robin passes, one call of every method per pass (cycling its batches),
    until each method had ``calls`` calls and the passes lasted ``min_seconds``. A fresh process runs
    its first calls slowly (memory touched for the first time, kernels chosen); a warm-up shorter than
    that shows up as latencies drifting over the rounds. Returns the median seconds of one call in the
    last pass, from which :func:`interleave` sizes its turns."""
    last: list = []
    spent, done = 0.0, 0  # seconds by the stopwatch's clock (a test's fake clock included)
    while done < calls or spent < min_seconds:
        last = []
        for m in methods:
            xs = m.inputs if m.inputs is not None else batches
            m.enter()
            try:
                last.append(stopwatch(lambda x=xs[done % len(xs)]: m.call(x)))
            finally:
                m.leave()
        done, spent = done + 1, spent + sum(last)
    return statistics.median(last) if last else 0.0


def run_turn(m: Method, indices: Sequence[int], batches: Sequence, rnd: int, position: int,
             stopwatch: energy.Stopwatch, meter: Optional[energy.Meter]) -> Turn:
    """One timed window of one method over the batches ``indices``, the meter read around it."""
    xs = m.inputs if m.inputs is not None else batches
    turn = Turn(rnd, position)
    m.enter()
    try:
        if meter is not None:
            meter.start()
        for i in indices:
            x = xs[i]
            turn.seconds.append(stopwatch(lambda: m.call(x)))
            turn.sizes.append(size_of(x))
        if meter is not None:
            turn.reading = meter.stop()
    finally:
        m.leave()
    return turn


def interleave(methods: Sequence[Method], batches: Sequence, rounds: int = 7, min_seconds: float = 0.0,
               min_calls: int = 1, cover: int = 1, warmup: int = 1, warmup_seconds: float = 0.0,
               meter: Optional[energy.Meter] = None,
               stopwatch: Optional[energy.Stopwatch] = None, seed: int = 0,
               progress: Optional[Callable[[int], Any]] = None) -> dict[str, list[Turn]]:
    """Time every method once per round, in an order shuffled each round, after the shared warm-up
    (``warmup`` calls of each, round-robin, for at least ``warmup_seconds``). Every turn of a round
    runs the same batches: ``min_calls`` calls, or more so that a turn lasts about ``min_seconds``
    (sized from the warm-up's median call), rounded up to a multiple of ``cover`` (``len(batches)``:
    every turn runs every batch, where a method's cost depends on the images or its batches hold the
    same images grouped differently); successive rounds move on through the batches. ``progress(round)`` is called after
    each round. Returns each method's turns, in round order."""
    if not methods or not batches or rounds < 1:
        raise ValueError("interleave needs methods, batches and at least one round")
    stopwatch = stopwatch or energy.Stopwatch()
    per_call = warm_up(methods, batches, warmup, stopwatch, warmup_seconds)  # 0.0 when there is none
    calls = max(min_calls, math.ceil(min_seconds / per_call) if per_call > 0 else 1)
    calls = cover * math.ceil(calls / cover)
    rng = random.Random(seed)
    order = list(range(len(methods)))
    turns: dict[str, list[Turn]] = {m.name: [] for m in methods}
    start = 0
    for r in range(rounds):
        rng.shuffle(order)
        indices = [(start + k) % len(batches) for k in range(calls)]
        for position, j in enumerate(order):
            turns[methods[j].name].append(run_turn(methods[j], indices, batches, r, position, stopwatch, meter))
        start = (start + calls) % len(batches)
        if progress is not None:
            progress(r)
    return turns


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); NaNs for no values."""
    return energy.percentile(values, 25), energy.percentile(values, 50), energy.percentile(values, 75)


def speedups(turns: Sequence[Turn], base: Sequence[Turn]) -> list[float]:
    """Per round: base seconds per image / the method's."""
    return [b.per_image / t.per_image for t, b in zip(turns, base)]


def energy_ratios(turns: Sequence[Turn], base: Sequence[Turn]) -> list[float]:
    """Per round: the method's joules per image / base's (empty where energy was not measured)."""
    pairs = [(t.joules_per_image, b.joules_per_image) for t, b in zip(turns, base)]
    return [t / b for t, b in pairs if t is not None and b]


def _nan_median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else math.nan


def figures(turns: Sequence[Turn], base: Sequence[Turn]) -> dict:
    """One method's figures over its turns: latency per image (median and p90 over calls), median batch
    time, throughput, energy per image and mean power (medians over turns), and the median per-round
    speed-up and energy ratio to base with their interquartile range (its width, and its ends for
    the figure's error bars)."""
    per_image = [s / n for t in turns for s, n in zip(t.seconds, t.sizes)]
    seconds = [s for t in turns for s in t.seconds]
    images = sum(t.images for t in turns)
    readings = [t.reading for t in turns if t.reading is not None]
    s25, s50, s75 = quartiles(speedups(turns, base))
    e25, e50, e75 = quartiles(energy_ratios(turns, base))
    return dict(rounds=len(turns), calls=len(seconds), images=images,
                latency_ms_median=1e3 * statistics.median(per_image),
                latency_ms_p90=1e3 * energy.percentile(per_image, 90),
                batch_ms_median=1e3 * statistics.median(seconds), throughput_img_s=images / sum(seconds),
                speedup_median=s50, speedup_iqr=s75 - s25, speedup_q25=s25, speedup_q75=s75,
                energy_ratio_median=e50, energy_ratio_iqr=e75 - e25, energy_ratio_q25=e25, energy_ratio_q75=e75,
                energy_j_per_image=_nan_median(t.joules_per_image for t in turns),
                power_w_mean=_nan_median(r.mean_watts for r in readings),
                energy_source=readings[0].source if readings else "",
                energy_window_s=sum(r.seconds for r in readings) if readings else math.nan)


def _ratio_reasons(name: str, what: str, ratios: Sequence[float], limits: Limits) -> list[str]:
    q25, med, q75 = quartiles(ratios)
    if not ratios or not med > 0:
        return []
    out = []
    if (q75 - q25) / med > limits.spread:
        out.append(f"{name} {what} spread (IQR) {100 * (q75 - q25) / med:.0f}% of its median")
    worst = max(abs(r / med - 1) for r in ratios)
    if worst > limits.outlier:
        out.append(f"{name} {what} {100 * worst:.0f}% off its median in one round")
    return out


def busy_reasons(turns: dict[str, list[Turn]], base: str = "base", limits: Limits = Limits()) -> list[str]:
    """Why the rounds say the machine was busy (empty: it looked quiet; see :class:`Limits`)."""
    if len(turns[base]) < limits.min_rounds:
        return []
    reasons = []
    for name, ts in turns.items():
        if name != base:
            reasons += _ratio_reasons(name, "speed-up", speedups(ts, turns[base]), limits)
            reasons += _ratio_reasons(name, "energy ratio", energy_ratios(ts, turns[base]), limits)
        lat = [t.per_image for t in ts]
        half = len(lat) // 2
        first, last = statistics.median(lat[:half]), statistics.median(lat[-half:])
        if abs(last / first - 1) > limits.drift:
            reasons.append(f"{name} latency drifted {100 * (last / first - 1):+.0f}% from the first rounds to the last")
    return reasons


@dataclass
class Summary:
    """:func:`summarise`'s answer: figures per method, and whether (and why) the machine looked busy."""

    figures: dict
    reasons: list
    rounds: int = 0
    judged: bool = True  # False: too few rounds to tell

    @property
    def busy(self) -> bool:
        return bool(self.reasons)

    def line(self) -> str:
        """One line for the console."""
        if not self.judged:
            return f"{self.rounds} rounds are too few to tell whether the machine was busy (use 3 or more)"
        if self.busy:
            more = f"; {len(self.reasons) - 3} more in the results" if len(self.reasons) > 3 else ""
            return "busy machine: the figures are unreliable (" + "; ".join(self.reasons[:3]) + more + ")"
        return "machine looked quiet: every ratio to base held steady over the rounds"


def summarise(turns: dict[str, list[Turn]], base: str = "base", limits: Limits = Limits()) -> Summary:
    """Figures of every method against ``base`` (which must be among them), and the busy flag."""
    if base not in turns:
        raise ValueError(f"the interleaved rounds need the base method {base!r} to compute ratios")
    rounds = len(turns[base])
    return Summary({name: figures(ts, turns[base]) for name, ts in turns.items()},
                   busy_reasons(turns, base, limits), rounds, rounds >= limits.min_rounds)


# --------------------------------------------------------------------------------------------------
# The paper's protocol
# --------------------------------------------------------------------------------------------------
PAPER_WARMUP = 50


def paper_power_reader(meter: energy.Meter) -> tuple[Optional[Callable[[], float]], str]:
    """The paper's power figure is one NVML reading after each batch: the reader, or None and why not."""
    if meter.name == "nvml":
        return meter.power, ""
    return None, ("power: the paper's figure is one NVML power reading per batch; no NVIDIA GPU meter here "
                  f"({meter.note})")


def _paper_warm_up(call: Callable, shape: Sequence[int], device, dtype, calls: int) -> None:
    """The paper's warm-up: ``calls`` calls at batch 1 on uniform random inputs."""
    for _ in range(calls):
        call(torch.rand((1, *shape), dtype=dtype, device=device))
    energy.synchronize(device)


def _groups(records, n: int) -> list:
    """The group of each image of a batch (None for data without groups)."""
    if isinstance(records, (list, tuple)) and len(records) == n and all(isinstance(r, dict) for r in records):
        return [r.get("group") for r in records]
    return [None] * n


def paper_runs(call: Callable, loader: Callable[[], Any], device, dtype, shape: Sequence[int],
               stopwatch: energy.Stopwatch, power: Optional[Callable[[], float]] = None,
               warmup: int = PAPER_WARMUP, measure_time: bool = True) -> dict[str, list]:
    """The paper's time run and, given a ``power`` reader, its separate power run. ``loader()`` yields
    ``(pixels, records)`` batches on the CPU. Returns per run a list of (value, groups of its images):
    milliseconds per batch including the host-to-device copy, watts read after each batch."""
    runs: dict[str, list] = {}
    if measure_time:
        _paper_warm_up(call, shape, device, dtype, warmup)
        runs["time_ms"] = [(1e3 * stopwatch(lambda: call(pixels.to(device, dtype))), _groups(records, len(pixels)))
                           for pixels, records in loader()]
    if power is not None:
        _paper_warm_up(call, shape, device, dtype, warmup)
        values = []
        for pixels, records in loader():
            call(pixels.to(device, dtype))
            energy.synchronize(device)
            values.append((power(), _groups(records, len(pixels))))
        runs["power_w"] = values
    return runs


def paper_means(per_batch: Sequence[tuple[float, list]]) -> tuple[float, dict]:
    """Each image carries its batch's value (as the paper's table does): the mean over images, and the
    mean over each group's images."""
    values = [(v, g) for v, groups in per_batch for g in groups]
    overall = statistics.fmean(v for v, _ in values) if values else math.nan
    names = sorted({g for _, g in values if g is not None})
    return overall, {g: statistics.fmean(v for v, h in values if h == g) for g in names}
