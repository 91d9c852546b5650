"""What eff.py shows a person of its results table: the printed table (units in every header; no
column this run left empty, with one line on why and what would measure it), one closing line that
relates the run to the VWT paper's claim, and the figure (every ratio to base with its interquartile
range, the busy flag, axes from zero). Everything is drawn from the table alone, as the CSV saves it,
so a committed run's figure is redrawn without rerunning it (:func:`redraw`).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional

from . import energy, results

# The printed table: each column eff.py shows, by its CSV name, and its printed header with its unit.
HEADERS = {
    "config": "configuration", "batch": "batch (images)", "tokens_mean": "tokens/image",
    "gflops_per_image": "GFLOPs/image", "latency_ms_median": "ms/image median", "latency_ms_p90": "ms/image p90",
    "speedup_median": "speed-up (x base, median)", "speedup_iqr": "speed-up IQR (x base)",
    "energy_j_per_image": "J/image", "energy_ratio_median": "energy/image (x base, median)",
    "power_w_mean": "power W (mean)", "time_ms_paper": "paper's ms/batch", "power_w_paper": "paper's W after a batch",
}
# a run with --compile shows these too (vwt.efficiency.COMPILE_COLUMNS)
COMPILE_HEADERS = {"speedup_vs_eager_base": "speed-up (x eager base)", "compile_s": "compile s (untimed)",
                   "graph_breaks": "graph breaks", "recompiles": "recompiles",
                   "recompile_limit_hits": "recompile limit hits"}
ENERGY = ("energy_j_per_image", "energy_ratio_median", "power_w_mean")
WHAT_MEASURES = ("an NVIDIA GPU (NVML energy counter) or a CPU with readable RAPL counters "
                 "(/sys/class/powercap) would measure energy")
NOT_ASKED = "energy not measured in this run (--metric time)"
PAPER_CLAIM = ("the VWT paper's claim is energy per image at batch 1 (online inference): VWT cuts it "
               "(up to 19% of wattage in its v1, up to 47% of energy in its v4)")


def _flag(values) -> bool:
    """Any true value of a busy column (bools, or the strings a CSV gives back; NaN for a skipped row)."""
    return any(str(v).strip().lower() in ("true", "1", "1.0") for v in values)


def printable(df):
    """The shown columns with unit headers, without those empty in every row; and the CSV names of the
    columns left out."""
    headers = {**HEADERS, **COMPILE_HEADERS}
    shown = [c for c in headers if c in df.columns]
    empty = [c for c in shown if df[c].isna().all()]
    return df[[c for c in shown if c not in empty]].rename(columns=headers), empty


PAPER_COLUMNS = ("time_ms_paper", "power_w_paper")
PAPER_RUNS_LEFT_OUT = "the paper's own runs were left out (the quick default; --full or --paper-runs runs them)"


def missing_line(empty: list, energy_note: Optional[str] = None) -> Optional[str]:
    """One line: which columns this run left empty, why, and what would measure them (None: none)."""
    if not empty:
        return None
    names = ", ".join({**HEADERS, **COMPILE_HEADERS}[c] for c in empty)
    if any(c in ENERGY for c in empty):
        why = energy_note or energy.NOT_MEASURABLE
        if "--metric time" in why:
            return f"not shown ({names}): not measured (--metric time); columns empty (NaN) in the CSV"
        return f"not shown ({names}): {why}; {WHAT_MEASURES}; columns empty (NaN) in the CSV"
    if "power_w_paper" in empty:
        return (f"not shown ({names}): the paper's power is one NVML reading after a batch, which only an NVIDIA GPU "
                "gives (with --metric watt or all); columns empty (NaN) in the CSV")
    return f"not shown ({names}): not measured in this run (--protocol standard or --metric); empty (NaN) in the CSV"


PAPER_NOT_RUN = "paper's protocol not run at batch"


def unshown_lines(empty: list, energy_note: Optional[str], paper_runs_note: Optional[str]) -> list:
    """The lines on the columns this run left empty: :func:`missing_line`'s and, where the paper's own
    runs were left out (``paper_runs_note``: why; None: they ran), one apart for the paper's columns."""
    paper = [c for c in PAPER_COLUMNS if c in empty] if paper_runs_note else []
    lines = [missing_line([c for c in empty if c not in paper], energy_note)]
    if paper:
        lines.append(f"not shown ({', '.join(HEADERS[c] for c in paper)}): {paper_runs_note}; empty (NaN) in the CSV")
    return [line for line in lines if line]


def paper_gap_line(df) -> Optional[str]:
    """One line for the batch sizes at which the paper's protocol did not run while it ran at others
    (its data set fills no batch of that size; vwt.efficiency.paper_fields_of), from the rows' notes."""
    if "time_ms_paper" not in df or df["time_ms_paper"].isna().all():
        return None  # the whole column is missing: missing_line says why
    notes = [n for n in df["note"].fillna("") if PAPER_NOT_RUN in str(n)]
    if not notes:
        return None
    note = notes[0][notes[0].index(PAPER_NOT_RUN):].split(";")[0]
    return note.replace(PAPER_NOT_RUN, "paper's ms/batch: not measured at batch", 1)


def _compiled(df):
    """Which rows are --compile's compiled variants (all False in a run without it)."""
    if "compiled" not in df.columns:
        return df["method"].astype(bool) & False
    return df["compiled"].map(lambda v: _flag([v]))


def compile_line(df) -> Optional[str]:
    """--compile: one line on compiling (None without it): the mode, the first calls' seconds (not
    timed), what each compiled row's ratios are to, and every configuration that broke its graph,
    recompiled or did not compile."""
    done = df[_compiled(df)]
    if done.empty:
        return None
    def listed(column: str) -> str:
        worst = done[done[column].fillna(0) > 0].groupby("method", sort=False)[column].max()
        return ", ".join(f"{m.removesuffix('+compile')} {int(v)}" for m, v in worst.items()) or "none"
    failed = sorted({m.removesuffix("+compile") for m, n in zip(done["method"], done["note"].fillna(""))
                     if str(n).startswith(("did not compile", "not timed"))})
    return (f"torch.compile, default mode, dynamic shapes with an input reducer: first calls (compiling) took "
            f"{done['compile_s'].sum():.0f} s in all, not timed; a +compile row's speed-up is to the compiled base, "
            f"speed-up (x eager base) to the eager one; graph breaks: {listed('graph_breaks')}; recompiles after "
            f"the first call: {listed('recompiles')}; recompile limit hit (code run eagerly): "
            f"{listed('recompile_limit_hits') if 'recompile_limit_hits' in done else 'not counted'}"
            + (f"; did not compile: {', '.join(failed)}" if failed else ""))


def claim_line(df) -> str:
    """The closing line: the paper's claim, and what this run says of it at batch 1 (energy per image
    relative to base where measured; where not, that it is not measurable here, and latency instead)."""
    df = df[~_compiled(df)]  # the claim is the eager models'
    one = df[(df["batch"] == 1) & (df["method"] != "base")]
    if one.empty:
        return f"{PAPER_CLAIM}; this run has no batch 1"
    busy = " (batch 1 flagged busy: unreliable)" if _flag(df.loc[df["batch"] == 1, "busy"]) else ""
    energy_at = one[one["energy_ratio_median"].notna()] if "energy_ratio_median" in one else one.iloc[:0]
    if not energy_at.empty:
        change = ", ".join(f"{r['method']} {100 * (r['energy_ratio_median'] - 1):+.0f}%"
                           for _, r in energy_at.iterrows())
        return f"{PAPER_CLAIM}; here, energy per image at batch 1 against base: {change}{busy}"
    timed = one[one["speedup_median"].notna()]
    change = ", ".join(f"{r['method']} {100 * (1 / r['speedup_median'] - 1):+.0f}%" for _, r in timed.iterrows())
    why = "was not measured in this run" if energy_note_of(df) == NOT_ASKED else "is not measurable on this machine"
    return (f"{PAPER_CLAIM}; here energy per image {why}, so the claim is not tested; "
            f"latency per image at batch 1 against base (not energy; negative: less): {change}{busy}")


def energy_note_of(df) -> Optional[str]:
    """Why energy is missing, from the table's notes (None where some row has energy)."""
    if "energy_ratio_median" in df and df["energy_ratio_median"].notna().any():
        return None
    notes = [n for n in df.get("note", []) if isinstance(n, str) and energy.NOT_MEASURABLE in n]
    if not notes:  # no row says the machine cannot: energy was not asked for
        return NOT_ASKED
    note = notes[0][notes[0].index(energy.NOT_MEASURABLE):]
    depth, end = 0, len(note)
    for i, ch in enumerate(note):  # up to the ';' outside brackets that ends the meter's note
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            end = i
            break
    return note[:end].strip()


def _bounds(part, what: str):
    """Medians and their error bars' lengths below and above: the quartiles where the table has them,
    else the IQR's width centred on the median (a table saved before the quartiles were); and whether
    centred."""
    med = part[f"{what}_median"].astype(float)
    if f"{what}_q25" in part and part[f"{what}_q25"].notna().any():
        return med, [(med - part[f"{what}_q25"]).clip(lower=0), (part[f"{what}_q75"] - med).clip(lower=0)], False
    half = part[f"{what}_iqr"].astype(float) / 2
    return med, [half, half], True


def _panel(ax, df, what: str, label: str, names: list, batches: list) -> bool:
    """Grouped bars of one ratio (median over rounds, IQR error bars) per configuration and batch
    size, base's 1 as a line, the analytic FLOPs ratio as a tick; True where the IQR is centred."""
    width, centred = 0.8 / len(batches), False
    for k, b in enumerate(batches):
        part = df[df["batch"] == b].set_index("method").reindex(names)
        med, err, c = _bounds(part, what)
        centred |= c
        xs = [i + (k - (len(batches) - 1) / 2) * width for i in range(len(names))]
        busy = "busy: unreliable" if _flag(df.loc[df["batch"] == b, "busy"]) else "quiet"
        ax.bar(xs, med.fillna(0), width * 0.9, yerr=[e.fillna(0) for e in err], capsize=3,
               label=f"batch {b} ({busy})", color=f"C{k}", error_kw=dict(elinewidth=1))
        for x, m, up in zip(xs, med, err[1].fillna(0)):
            ax.annotate("not run" if math.isnan(m) else f"{m:.2f}", (x, 0 if math.isnan(m) else m + up),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6)
        if what == "speedup":
            ax.scatter(xs, 1 / part["flops_ratio"], marker="_", s=120, color="black", zorder=3,
                       label="1 / FLOPs ratio (analytic)" if k == 0 else None)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    configs = df.drop_duplicates("method").set_index("method")["config"]
    ax.set_xticks(range(len(names)), [configs.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    return centred


def figure(df):
    """The figure of an eff.py table (a DataFrame, or the CSV read back): speed-up over base and, where
    measured, energy per image relative to base, per configuration and batch size, medians of the
    per-round ratios with interquartile error bars; the busy flag and what could not be measured are
    written on it. Returns the matplotlib Figure (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in dict.fromkeys(df["method"]) if m != "base"] or ["base"]
    batches = sorted(int(b) for b in df["batch"].unique())
    has_energy = energy_note_of(df) is None
    fig, axes = plt.subplots(1, 2 if has_energy else 1, figsize=(11 if has_energy else 7.5, 5), squeeze=False)
    centred = _panel(axes[0][0], df, "speedup", "speed-up over base (x)\nmedian of the rounds' ratios, bars: IQR",
                     names, batches)
    if has_energy:
        centred |= _panel(axes[0][1], df, "energy_ratio", "energy per image (x base's)\nmedian of the rounds' "
                          "ratios, bars: IQR", names, batches)
    axes[0][0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=3, frameon=False)
    first = df.iloc[0]
    rounds = int(df["rounds"].max()) if df["rounds"].notna().any() else 0
    base = df[(df["method"] == "base") & df["latency_ms_median"].notna()]
    base_ms = ", ".join(f"{r['latency_ms_median']:.1f} at batch {int(r['batch'])}" for _, r in base.iterrows())
    fig.suptitle(f"{first['model']} ({first['weights']} weights), {first['data']}, {first['device']} "
                 f"{first['dtype']}, protocol {first['protocol']}: {rounds} interleaved rounds\n"
                 f"base: {base_ms} ms/image (median)", fontsize=9)
    lines = []
    busy = [f"batch {b}" for b in batches if _flag(df.loc[df["batch"] == b, "busy"])]
    if busy:
        lines.append(f"BUSY MACHINE at {', '.join(busy)}: the rounds disagreed, these ratios are unreliable")
    if not has_energy:
        why = energy_note_of(df)
        lines.append(f"energy per image: {why}" + ("" if why == NOT_ASKED else f"; {WHAT_MEASURES}"))
    if centred:
        lines.append("bars: the IQR's width centred on the median (this table has no quartiles)")
    wrapped = [(part, "red" if line.startswith("BUSY") else "black")
               for line in lines for part in textwrap.wrap(line, 170 if has_energy else 120)]
    step = 0.14 / fig.get_figheight()  # one 7-point line, in figure fractions
    for i, (text, color) in enumerate(wrapped):
        fig.text(0.01, 0.01 + step * (len(wrapped) - 1 - i), text, fontsize=7, color=color)
    fig.tight_layout(rect=(0, step * len(wrapped) + 0.01, 1, 0.97))
    return fig


def save(df, path: Path) -> Path:
    """Draw :func:`figure` and write it as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = figure(df)
    try:
        return results.atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def redraw(csv: Path) -> Path:
    """Redraw the PNG beside a saved eff.py CSV from the CSV alone (no rerun)."""
    import pandas as pd

    csv = Path(csv)
    return save(pd.read_csv(csv), csv.with_suffix(".png"))
