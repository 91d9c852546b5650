"""Quote the committed default eff.py run in README.md and results/benchmarks.md.

The figures a reader sees in the documents are rendered from the one committed results CSV, between
the markers ``<!-- eff-default:begin -->`` and ``<!-- eff-default:end -->``, never typed by hand;
tests/test_quoted_results.py fails when a document and the CSV disagree.

A user's `python eff.py` writes to runs/ (ignored by git) and never touches the committed run. To
refresh it (a maintainer's step; a run on another machine or with other settings gets another hash,
so first `git rm` the old run's three files):

    python eff.py --full --out results           # the committed reference run, results/eff__samples__...
    python benchmarks/quote_results.py           # rewrite the quoted tables
    python benchmarks/quote_results.py --check   # exit 1 where a document differs

The run's PNG is drawn from its CSV alone (vwt.efficiency_view); after a change to the figure, redraw
the committed one without rerunning: python -c "from vwt.efficiency_view import redraw; redraw('results/eff__...csv')"
"""
import argparse
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = "eff__samples__openai-clip-vit-base-patch16__base-intra-inter-resize-tome-evit-lgtm-int8__*.csv"
DOCUMENTS = ("README.md", "results/benchmarks.md")
REFRESH = ("--full", "--out", "results")  # eff.py's command line that (re)makes the committed default run
BLOCK = re.compile(r"(<!-- eff-default:begin -->\n)(.*?)(<!-- eff-default:end -->)", re.S)


def default_run(root: Path = ROOT) -> Path:
    """The one committed CSV of the default ``python eff.py`` run."""
    found = sorted((root / "results").glob(DEFAULT_RUN))
    if len(found) != 1:
        raise SystemExit(f"expected one committed default eff.py run ({DEFAULT_RUN}) under results/, found {len(found)}")
    return found[0]


def _speedup(row) -> str:
    return "1" if row["method"] == "base" else f"{row['speedup_median']:.2f} (IQR {row['speedup_iqr']:.2f})"


def render(csv: Path) -> str:
    """The markdown table of a default run: per configuration, tokens, GFLOPs, and per batch size the
    median latency per image and the median per-round speed-up over base."""
    df = pd.read_csv(csv)
    batches = sorted(df["batch"].unique())
    head = ["configuration", "tokens (mean over blocks)", "GFLOPs"]
    head += [f"batch {b}: ms/image" for b in batches] + [f"batch {b}: speed-up" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for config, rows in df.groupby("config", sort=False):
        by_batch = {int(r["batch"]): r for _, r in rows.iterrows()}
        first = next(iter(by_batch.values()))
        cells = [config, f"{first['tokens_mean']:.1f}", f"{first['gflops_per_image']:.1f}"]
        cells += [f"{by_batch[b]['latency_ms_median']:.1f}" for b in batches]
        cells += [_speedup(by_batch[b]) for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    busy = df.groupby("batch")["busy"].any()
    flags = ", ".join(f"batch {b}: {'busy' if busy[b] else 'not busy'}" for b in batches)
    return "\n".join(lines) + f"\n\nFrom `results/{csv.name}` ({flags}).\n"


def quote(text: str, table: str) -> str:
    """``text`` with every marked block replaced by ``table``."""
    return BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report documents that differ (exit 1)")
    args = p.parse_args()
    table, stale = render(default_run()), []
    for name in DOCUMENTS:
        path = ROOT / name
        text = path.read_text()
        if not BLOCK.search(text):
            raise SystemExit(f"{name}: no <!-- eff-default:begin --> ... <!-- eff-default:end --> block")
        new = quote(text, table)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    print(("differ: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
