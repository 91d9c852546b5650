"""Energy accounting of vwt.energy against stand-ins: an NVML module whose counter and power readings
the test controls, and a RAPL sysfs tree written in tmp_path."""
import math
import time

import pytest
import torch

from vwt import energy


class FakeNVML:
    """Just enough of pynvml: the energy counter returns ``energy`` readings in turn (mJ; None: the GPU
    has no counter), the power reading is ``watts(call number)`` (W, reported in mW like NVML)."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, energy=None, watts=lambda i: 150.0, limit_w=300.0, error=None):
        self.energy = list(energy) if energy is not None else None
        self.watts, self.limit_w, self.error = watts, limit_w, error
        self.power_calls = 0
        self.initialised = self.shut = False

    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise self.NVMLError(13)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.error is not None:
            raise self.NVMLError(self.error)
        if self.energy is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.energy.pop(0) if len(self.energy) > 1 else self.energy[0]

    def nvmlDeviceGetPowerUsage(self, handle):
        self.power_calls += 1
        return int(round(self.watts(self.power_calls) * 1000))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return int(self.limit_w * 1000)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlSystemGetDriverVersion(self):
        return "555.55"

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {1: 1410, 2: 1215}[kind]

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 41


def window(meter, seconds=0.12):
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def span(trace):
    return trace[-1][0] - trace[0][0]


# ----------------------------------------------------------------------------------------------- NVML
def test_nvml_counter_delta_is_the_energy():
    # first reading: the support check at construction; then the window's start and stop
    fake = FakeNVML(energy=[1, 5_000, 12_250])
    meter = energy.NvmlMeter(nvml=fake, interval=0.01)
    r = window(meter)
    assert r.source == "nvml-energy-counter"
    assert r.joules == pytest.approx((12_250 - 5_000) / 1e3)
    assert r.mean_watts == pytest.approx(150.0)
    assert r.samples >= 3  # start, at least one from the thread, stop
    assert r.seconds > 0.1


def test_nvml_counter_wraps_at_2_to_the_64():
    fake = FakeNVML(energy=[0, 2 ** 64 - 500, 700])
    r = window(energy.NvmlMeter(nvml=fake, interval=0.01), 0.02)
    assert r.source == "nvml-energy-counter"
    assert r.joules == pytest.approx((700 + 500) / 1e3)


def test_nvml_counter_reset_falls_back_to_the_power_trace():
    fake = FakeNVML(energy=[0, 10 ** 9, 300], watts=lambda i: 200.0)
    meter = energy.NvmlMeter(nvml=fake, interval=0.01)
    r = window(meter)
    assert r.source == "nvml-power-trace"
    assert "reset" in r.note
    assert r.joules == pytest.approx(200.0 * span(meter.sampler.trace))


def test_gpu_without_energy_counter_integrates_the_trace():
    # power alternates 100 W / 300 W between samples: the integral is the trapezoid rule over the trace
    fake = FakeNVML(energy=None, watts=lambda i: 100.0 if i % 2 else 300.0)
    meter = energy.NvmlMeter(nvml=fake, interval=0.01)
    assert not meter.has_counter
    r = window(meter)
    trace = meter.sampler.trace
    assert r.source == "nvml-power-trace"
    assert "no energy counter" in r.note
    assert r.samples == len(trace) >= 3
    expected = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(trace, trace[1:]))
    assert r.joules == pytest.approx(expected)
    assert 100.0 <= r.mean_watts <= 300.0
    assert {w for _, w in trace} == {100.0, 300.0}


def test_nvml_errors_other_than_not_supported_are_raised():
    with pytest.raises(FakeNVML.NVMLError):
        energy.NvmlMeter(nvml=FakeNVML(energy=[0], error=999))


def test_nvml_power_is_watts_and_info_records_the_device():
    fake = FakeNVML(energy=[0], watts=lambda i: 87.5)
    meter = energy.NvmlMeter(nvml=fake)
    assert meter.power() == pytest.approx(87.5)
    info = meter.info()
    assert info["gpu"] == "Fake GPU" and info["driver"] == "555.55"
    assert info["sm_clock_mhz"] == 1410 and info["mem_clock_mhz"] == 1215
    assert info["power_limit_w"] == pytest.approx(300.0) and info["temperature_c"] == 41
    assert info["energy_counter"] is True
    meter.close()
    assert fake.initialised and fake.shut


def test_best_meter_for_cuda_uses_nvml_by_index_when_the_uuid_is_unknown():
    meter = energy.best_meter(torch.device("cuda:0"), nvml=FakeNVML(energy=[0]))
    assert isinstance(meter, energy.NvmlMeter) and meter.handle == ("gpu", 0)


# ----------------------------------------------------------------------------------------------- RAPL
def make_zone(root, name, zone, energy_uj, max_uj=262_143_328_850):
    d = root / name
    d.mkdir()
    (d / "name").write_text(zone + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def set_energy(zone, value):
    (zone / "energy_uj").write_text(f"{value}\n")


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    max_uj = 1_000_000_000
    p0 = make_zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 2_000_000, max_uj)
    p1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 10_000_000, max_uj)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 5)        # part of package 0: not added
    psys = make_zone(tmp_path, "intel-rapl:2", "psys", 7)           # whole SoC: would double-count
    meter = energy.RaplMeter(tmp_path)
    assert [n for n, _ in meter.zones] == ["package-0", "package-1"]
    meter.start()
    set_energy(p0, 3_000_000)  # wrapped past max_uj
    set_energy(p1, 14_000_000)
    set_energy(core, 10 ** 9)
    set_energy(psys, 10 ** 9)
    r = meter.stop()
    assert r.source == "rapl"
    assert r.joules == pytest.approx(((max_uj - (max_uj - 2_000_000) + 3_000_000) + 4_000_000) / 1e6)
    assert r.mean_watts == pytest.approx(r.joules / r.seconds)


def test_rapl_power_is_energy_since_the_last_reading(tmp_path):
    times = iter([0.0, 2.0, 4.0])
    z = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    meter = energy.RaplMeter(tmp_path, clock=lambda: next(times))
    meter.start()
    set_energy(z, 30_000_000)  # 30 J in 2 s
    assert meter.power() == pytest.approx(15.0)
    set_energy(z, 50_000_000)  # 20 J in 2 s
    assert meter.power() == pytest.approx(10.0)


def test_rapl_uses_psys_only_without_packages_and_skips_unreadable_zones(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "psys", 0)
    bad = tmp_path / "intel-rapl:1"
    bad.mkdir()
    (bad / "name").write_text("package-0\n")
    (bad / "energy_uj").mkdir()  # unreadable as a file, like a root-only counter
    (bad / "max_energy_range_uj").write_text("100\n")
    assert [n for n, _ in energy.RaplMeter.find_zones(tmp_path)] == ["psys"]


def test_cpu_without_rapl_is_not_measurable(tmp_path):
    meter = energy.best_meter(torch.device("cpu"), rapl_root=tmp_path / "missing")
    assert isinstance(meter, energy.NullMeter) and not meter.measurable
    r = window(meter, 0.01)
    assert r.joules is None and r.mean_watts is None and r.source == "none"
    assert energy.NOT_MEASURABLE in r.note
    assert meter.power() is None


def test_cpu_with_rapl_gets_the_rapl_meter(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    assert isinstance(energy.best_meter(torch.device("cpu"), rapl_root=tmp_path), energy.RaplMeter)


# ----------------------------------------------------------------------------------------------- helpers
def test_integrate_and_trace_mean_on_a_constructed_trace():
    trace = [(0.0, 100.0), (1.0, 100.0), (3.0, 200.0)]
    assert energy.integrate(trace) == pytest.approx(1.0 * 100 + 2.0 * 150)
    assert energy.trace_mean(trace) == pytest.approx(energy.integrate(trace) / 3.0)
    assert energy.trace_mean([(5.0, 42.0)]) == 42.0
    assert energy.trace_mean([]) is None


def test_percentile_matches_torch_quantile():
    values = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0, 50, 90, 100):
        ref = torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()
        assert energy.percentile(values, q) == pytest.approx(ref)
    assert math.isnan(energy.percentile([], 50))


def test_stopwatch_times_the_call():
    watch = energy.Stopwatch(torch.device("cpu"))
    t = time.perf_counter()
    seconds = watch(lambda: time.sleep(0.02))
    assert 0.02 <= seconds <= time.perf_counter() - t


def test_power_sampler_rejects_silly_intervals():
    with pytest.raises(ValueError):
        energy.PowerSampler(lambda: 1.0, interval=0)
