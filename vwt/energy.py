"""Runtime, power and energy meters for eff.py.

* :class:`Stopwatch` times one call: CUDA events on a GPU, ``perf_counter`` around a synchronised call
  elsewhere.
* An energy meter measures a window: ``start()``, run the workload (for several seconds), ``stop()``
  returns a :class:`Reading`. ``power()`` is one instant reading in watts (the VWT paper's figure: one
  reading after each batch), or None where the machine has no such reading.

  - :class:`NvmlMeter` (NVIDIA): the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
    millijoules, unsigned 64 bit) read around the window, and an instant-power trace
    (``nvmlDeviceGetPowerUsage``, milliwatts) sampled in a side thread. GPUs without the counter
    (before Volta) get the trace's integral instead, labelled ``nvml-power-trace``.
  - :class:`RaplMeter` (CPU): the powercap RAPL package counters
    (``/sys/class/powercap/intel-rapl:N/energy_uj``), wrapping at ``max_energy_range_uj``.
  - :class:`NullMeter`: no counter here; every reading says energy is not measurable, never a number.

Both counters cover the whole device (the whole CPU package, the whole GPU): other work running at
the same time is counted too, so measure on an otherwise idle machine. ``best_meter(device)`` picks
the right one. ``pynvml`` (package nvidia-ml-py) is imported only when an
NVIDIA meter is made; tests pass a stand-in module.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

NOT_MEASURABLE = "energy not measurable on this machine"
U64 = 2 ** 64


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, where every op returns when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds taken by one call of ``fn`` on ``device``, the work on the device included: CUDA events
    around the call on a GPU (the device's own clock), else ``clock`` (default ``perf_counter``) read
    around a synchronised call. The project's one timer: eff.py, vwt.bench and benchmarks/ use it;
    tests pass a fake ``clock``."""

    def __init__(self, device: torch.device = torch.device("cpu"), clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.clock = clock

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        synchronize(self.device)
        t = self.clock()
        fn()
        synchronize(self.device)
        return self.clock() - t


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------------
# Readings and power traces
# --------------------------------------------------------------------------------------------------
@dataclass
class Reading:
    """What an energy meter saw over one window.

    joules:     energy over the window, or None where it cannot be measured (never a made-up number).
    source:     where ``joules`` came from: nvml-energy-counter, nvml-power-trace, rapl, or none.
    mean_watts: mean of the instant-power trace where there is one, else joules / seconds, else None.
    samples:    number of instant-power samples in the trace.
    """

    seconds: float
    joules: Optional[float]
    source: str
    mean_watts: Optional[float] = None
    samples: int = 0
    note: str = ""


def integrate(trace: list[tuple[float, float]]) -> float:
    """Trapezoidal integral (joules) of a power trace [(seconds, watts), ...] sorted by time."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(trace, trace[1:]))


def trace_mean(trace: list[tuple[float, float]]) -> Optional[float]:
    """Time-weighted mean watts of a trace (the plain mean for a single sample); None when empty."""
    if not trace:
        return None
    span = trace[-1][0] - trace[0][0]
    if len(trace) < 2 or span <= 0:
        return statistics.fmean(w for _, w in trace)
    return integrate(trace) / span


class PowerSampler:
    """Samples ``read_watts()`` every ``interval`` seconds in a daemon thread, with one sample taken
    at ``start()`` and one at ``stop()`` so the trace spans the whole window."""

    def __init__(self, read_watts: Callable[[], float], interval: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter):
        if not 0.001 <= interval <= 10:
            raise ValueError(f"power sampling interval must be between 1 ms and 10 s; got {interval}")
        self.read_watts, self.interval, self.clock = read_watts, interval, clock
        self.trace: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        self.trace.append((self.clock(), float(self.read_watts())))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self.trace = []
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="vwt-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        return self.trace


# --------------------------------------------------------------------------------------------------
# Meters
# --------------------------------------------------------------------------------------------------
class Meter:
    """An energy meter: ``start()``, the workload, ``stop() -> Reading``; ``power()`` for one reading."""

    name = "none"
    measurable = False  # gives energy in joules
    has_power = False   # gives power() readings
    note = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Reading:
        raise NotImplementedError

    def power(self) -> Optional[float]:
        """One power reading in watts (the paper's per-batch figure), or None where there is none."""
        return None

    def info(self) -> dict:
        """The device state worth recording beside the numbers (model, driver, clocks, limits...)."""
        return {"meter": self.name, "note": self.note}

    def close(self) -> None:
        pass


class NullMeter(Meter):
    """No energy counter on this machine: runtime only; readings carry no number and say why."""

    def __init__(self, reason: str = "", clock: Callable[[], float] = time.perf_counter):
        self.note = NOT_MEASURABLE + (f" ({reason})" if reason else "")
        self.clock = clock
        self._t0: Optional[float] = None

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> Reading:
        seconds = self.clock() - self._t0 if self._t0 is not None else math.nan
        return Reading(seconds=seconds, joules=None, source="none", note=self.note)


def counter_delta(before: int, after: int, modulus: int) -> int:
    """Increase of a counter that wraps to 0 at ``modulus`` (at most one wrap between the reads)."""
    return after - before if after >= before else after + modulus - before


class RaplMeter(Meter):
    """CPU package energy from Linux powercap RAPL: the sum over the package zones (or ``psys`` where
    there is no package zone) of ``energy_uj`` deltas, each wrapping at its ``max_energy_range_uj``
    (one wrap per window at most: tens of minutes at full power). ``power()`` is the mean power since
    the previous ``power()`` (RAPL has no instant reading)."""

    name = "rapl"
    measurable = True
    has_power = True

    def __init__(self, root: Path | str = "/sys/class/powercap", clock: Callable[[], float] = time.perf_counter):
        self.root, self.clock = Path(root), clock
        self.zones = self.find_zones(self.root)
        if not self.zones:
            raise OSError(f"no readable RAPL energy counter under {self.root}")
        self.note = "CPU package energy (RAPL: " + ", ".join(n for n, _ in self.zones) + ")"
        self._start: Optional[tuple[float, list[int]]] = None
        self._last: Optional[tuple[float, list[int]]] = None

    @staticmethod
    def find_zones(root: Path) -> list[tuple[str, Path]]:
        """(name, zone folder) of the top-level zones to sum: packages, else psys; only readable ones."""
        zones = []
        for d in sorted(Path(root).glob("intel-rapl:*")):
            if d.name.count(":") != 1:  # sub-zones (core, uncore, dram) are parts of their package
                continue
            try:
                name = (d / "name").read_text().strip()
                int((d / "energy_uj").read_text())
                int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append((name, d))
        packages = [z for z in zones if z[0].startswith("package")]
        return packages or [z for z in zones if z[0] == "psys"]

    def _read(self) -> tuple[float, list[int]]:
        return self.clock(), [int((d / "energy_uj").read_text()) for _, d in self.zones]

    def _joules(self, a: tuple[float, list[int]], b: tuple[float, list[int]]) -> float:
        total = 0
        for (_, d), e0, e1 in zip(self.zones, a[1], b[1]):
            total += counter_delta(e0, e1, int((d / "max_energy_range_uj").read_text()))
        return total / 1e6

    def start(self) -> None:
        self._start = self._last = self._read()

    def stop(self) -> Reading:
        end = self._read()
        seconds = end[0] - self._start[0]
        joules = self._joules(self._start, end)
        return Reading(seconds=seconds, joules=joules, source="rapl",
                       mean_watts=joules / seconds if seconds > 0 else None, note=self.note)

    def power(self) -> Optional[float]:
        now = self._read()
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return None
        return self._joules(last, now) / (now[0] - last[0])

    def info(self) -> dict:
        return {"meter": self.name, "note": self.note, "zones": [n for n, _ in self.zones]}


class NvmlMeter(Meter):
    """NVIDIA GPU energy and power through NVML.

    The window's energy is the delta of the total-energy counter (mJ, unsigned 64 bit). A decrease is
    taken as a wrap when the wrapped delta is physically possible (below twice the power limit times
    the window), otherwise as a counter reset (driver reload): that window then falls back to the
    power trace's integral and says so. GPUs without the counter always use the trace integral,
    labelled ``nvml-power-trace``. Note that on recent drivers ``nvmlDeviceGetPowerUsage`` may be
    averaged over about a second, so the counter is the number to trust for energy.
    """

    name = "nvml"
    measurable = True
    has_power = True

    def __init__(self, index: int = 0, interval: float = 0.05, nvml=None, uuid: Optional[str] = None,
                 clock: Callable[[], float] = time.perf_counter):
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py; imported only where a GPU is metered
        self.nvml, self.clock = nvml, clock
        nvml.nvmlInit()
        self.handle = None
        if uuid:
            try:
                self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            except nvml.NVMLError:
                self.handle = None
        if self.handle is None:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.has_counter = self._counter() is not None
        self.note = ("GPU energy from the NVML total-energy counter" if self.has_counter else
                     "GPU energy integrated from the NVML power trace (this GPU has no energy counter)")
        self.sampler = PowerSampler(self.power, interval, clock)
        self._e0: Optional[int] = None
        self._t0 = 0.0

    def _counter(self) -> Optional[int]:
        """The total-energy counter in mJ, or None where the GPU does not support it."""
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError as e:
            if getattr(e, "value", None) == self.nvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise

    def power(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3

    def power_limit(self) -> Optional[float]:
        """Enforced power limit in watts, None where NVML cannot say."""
        try:
            return self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1e3
        except Exception:
            return None

    def start(self) -> None:
        self.sampler.start()
        self._t0 = self.clock()
        self._e0 = self._counter() if self.has_counter else None

    def stop(self) -> Reading:
        e1 = self._counter() if self.has_counter else None
        seconds = self.clock() - self._t0
        trace = self.sampler.stop()
        mean_w = trace_mean(trace)
        if e1 is not None and self._e0 is not None:
            mj = counter_delta(self._e0, e1, U64)
            limit = self.power_limit() or 2000.0
            if e1 >= self._e0 or mj <= 2 * limit * max(seconds, 1e-3) * 1e3:
                return Reading(seconds, mj / 1e3, "nvml-energy-counter", mean_w, len(trace), self.note)
            return Reading(seconds, integrate(trace), "nvml-power-trace", mean_w, len(trace),
                           "the NVML energy counter was reset during the window; energy integrated "
                           "from the power trace instead")
        return Reading(seconds, integrate(trace), "nvml-power-trace", mean_w, len(trace), self.note)

    def info(self) -> dict:
        n, h = self.nvml, self.handle

        def get(fn, *a, scale=None):
            try:
                v = getattr(n, fn)(h, *a) if h is not None else getattr(n, fn)()
            except Exception:
                return None
            if isinstance(v, bytes):
                v = v.decode()
            return v / scale if scale and v is not None else v

        return {
            "meter": self.name, "note": self.note, "energy_counter": self.has_counter,
            "gpu": get("nvmlDeviceGetName"),
            "driver": _call(n, "nvmlSystemGetDriverVersion"),
            "sm_clock_mhz": get("nvmlDeviceGetClockInfo", getattr(n, "NVML_CLOCK_SM", 1)),
            "mem_clock_mhz": get("nvmlDeviceGetClockInfo", getattr(n, "NVML_CLOCK_MEM", 2)),
            "max_sm_clock_mhz": get("nvmlDeviceGetMaxClockInfo", getattr(n, "NVML_CLOCK_SM", 1)),
            "power_limit_w": get("nvmlDeviceGetEnforcedPowerLimit", scale=1e3),
            "temperature_c": get("nvmlDeviceGetTemperature", getattr(n, "NVML_TEMPERATURE_GPU", 0)),
            "power_sample_interval_s": self.sampler.interval,
        }

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def _call(module, fn):
    try:
        v = getattr(module, fn)()
    except Exception:
        return None
    return v.decode() if isinstance(v, bytes) else v


def best_meter(device: torch.device, interval: float = 0.05, nvml=None,
               rapl_root: Path | str = "/sys/class/powercap") -> Meter:
    """The best energy meter for ``device``: NVML on an NVIDIA GPU, RAPL on a CPU where readable,
    otherwise a NullMeter that says why energy cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = None
        try:
            uuid = "GPU-" + str(torch.cuda.get_device_properties(index).uuid)  # NVML ignores CUDA_VISIBLE_DEVICES
        except Exception:
            pass
        try:
            return NvmlMeter(index, interval, nvml=nvml, uuid=uuid)
        except Exception as e:
            return NullMeter(f"NVML unavailable: {type(e).__name__}: {e}")
    if device.type == "cpu":
        try:
            return RaplMeter(rapl_root)
        except OSError:
            return NullMeter(f"no readable RAPL counter under {rapl_root}")
    return NullMeter(f"no energy meter for {device.type} devices")
