"""Compare eff.py runs with a reference run: per method and batch size, each run's speed-up over base
(median of the per-round ratios, IQR in brackets) and its difference from the reference's, as a
markdown table (how results/benchmarks.md shows runs made at once against a run on the idle machine).

    python benchmarks/compare_runs.py IDLE.csv A.csv B.csv [--methods intra,tome,evit] [--batch 1]
"""
import argparse
from pathlib import Path

import pandas as pd


def speedups(csv: Path) -> pd.DataFrame:
    """(method, batch) -> speedup_median, speedup_iqr, latency_ms_median, busy, of one run."""
    df = pd.read_csv(csv)
    return df.set_index(["method", "batch"])[["config", "speedup_median", "speedup_iqr", "latency_ms_median", "busy"]]


def table(reference: Path, runs: list[Path], methods=None, batches=None) -> str:
    ref = speedups(reference)
    others = [speedups(r) for r in runs]
    names = [chr(ord("a") + i) for i in range(len(runs))]
    head = ["method", "batch", "reference"] + [f"run {n}" for n in names] + [f"{n} / reference" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (method, batch), row in ref.iterrows():
        if method == "base" or (methods and method not in methods) or (batches and batch not in batches):
            continue
        cells = [row["config"], str(batch), f"{row['speedup_median']:.3f} ({row['speedup_iqr']:.3f})"]
        cells += [f"{o.loc[(method, batch), 'speedup_median']:.3f} ({o.loc[(method, batch), 'speedup_iqr']:.3f})"
                  for o in others]
        cells += [f"{100 * (o.loc[(method, batch), 'speedup_median'] / row['speedup_median'] - 1):+.1f}%"
                  for o in others]
        lines.append("| " + " | ".join(cells) + " |")
    base = [f"{name}: " + " / ".join(f"{d.loc[('base', b), 'latency_ms_median']:.1f}"
                                     for b in sorted({b for m, b in d.index if m == "base"}))
            for name, d in zip(["reference"] + names, [ref] + others)]
    busy = [f"{name}: {'busy' if d['busy'].fillna(False).astype(bool).any() else 'quiet'}"
            for name, d in zip(["reference"] + names, [ref] + others)]
    return ("\n".join(lines) + "\n\nBase ms per image by batch size: " + "; ".join(base)
            + ". Busy flag: " + "; ".join(busy) + ".\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path, help="the run the others are compared with (e.g. on the idle machine)")
    p.add_argument("runs", type=Path, nargs="+", help="the other runs' CSVs")
    p.add_argument("--methods", default=None, help="comma-separated methods to show (default all)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes to show (default all)")
    a = p.parse_args()
    print(table(a.reference, a.runs, a.methods.split(",") if a.methods else None, a.batch))


if __name__ == "__main__":
    main()
