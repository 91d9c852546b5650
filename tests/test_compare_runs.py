"""benchmarks/compare_runs.py: the table results/benchmarks.md shows for runs made at once."""
import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def run(tmp_path, name, tome, busy=False):
    rows = [dict(method="base", config="base", batch=1, speedup_median=1.0, speedup_iqr=0.0, latency_ms_median=300.0,
                 busy=busy),
            dict(method="tome", config="tome13", batch=1, speedup_median=tome, speedup_iqr=0.02,
                 latency_ms_median=300.0 / tome, busy=busy)]
    path = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_each_run_against_the_reference(tmp_path):
    text = compare_runs.table(run(tmp_path, "idle", 1.5), [run(tmp_path, "a", 1.35, busy=True), run(tmp_path, "b", 1.53)])
    lines = text.splitlines()
    assert lines[0] == "| method | batch | reference | run a | run b | a / reference | b / reference |"
    assert lines[2] == "| tome13 | 1 | 1.500 (0.020) | 1.350 (0.020) | 1.530 (0.020) | -10.0% | +2.0% |"
    assert "reference: quiet; a: busy; b: quiet" in text and "reference: 300.0" in text
