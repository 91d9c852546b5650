"""Runtime, power and energy of a vision tower, per method and batch size.

For each configuration (base, VWT intra, VWT inter, ToMe, EViT, LGTM, int8 and combinations such as
inter+tome) and each --batch: latency per image (median, p90), throughput, tokens per image, analytic
FLOPs, the speed-up and energy ratio to the base model, and where the machine can measure it energy
per image and mean power.

How it measures (vwt/bench.py, vwt/energy.py): inputs are on the device before timing; every batch
runs once per configuration at the measured shape (which also counts the tokens), then --warmup more
calls of each, round-robin, for at least --warmup-seconds, with --threads torch threads (on a CPU by
default half its cores: a second run or other work beside it then does not oversubscribe them). Then
--rounds interleaved rounds: each round times every configuration, base included, once on the same
batches, in a shuffled order; a turn runs every image of the pool (an input reducer's cost depends
on the image) and lasts at least --seconds and --min-iters calls, with the energy read around it
(NVIDIA GPUs: the NVML total-energy counter and a power trace sampled every --interval seconds;
CPUs: RAPL package counters where readable; elsewhere the results say energy is not measurable, NaN,
never a number). Ratios to base are medians of the per-round ratios, with their interquartile range:
a busy machine slows one turn, not one method. When a ratio's spread is wide or latencies drift over
the rounds, one line says the machine was busy and the results carry the flag (column busy).

--protocol paper (default) also runs the VWT paper's own measurement (its eff.py) on the paper's data
side, as clip.py reads it: on Waterbirds, CelebA and MetaShift seeds 1 2 3, each on its re-split test
images with the data set's own transform and its seed's vocabulary (tokenizers/<data>/v<V>/seed_<i>/;
ImageNet's with --imgnet), other data sets once; the whole split (or --limit images) through a loader,
50 warm-up calls at batch 1 on random inputs, the mean per-batch milliseconds with the host-to-device
copy (CUDA events on a GPU), and, in a separate run, one NVML power reading after each batch, overall
and per group for the data sets with groups (columns time_ms_paper, power_w_paper, *_group<g>: the mean
over the seeds; *_paper_seed<i>*: each seed's). Our interleaved rounds run the first seed's split and
vocabulary with the model's preprocessing. --protocol standard runs ours only, on the fixed split.

The default run (no arguments) is CLIP ViT-B/16's vision tower on the `samples` photographs, every
method at the paper's setting (intra drop 0.5, inter vocabulary 1000 learned on the samples and
cached in tokenizers/samples/, threshold 0.1, ToMe r=13, EViT keep 0.7, LGTM its default, int8, and
the baseline of a smaller image: resize to 176 px, FLOPs nearest inter-image's), batch 1 and 8, with pretrained weights where the hub answers and random weights otherwise (weights do not
change runtime or energy; the output says which). By default it is the quick run (3 rounds on the first
4 samples, the token pass as warm-up, without the paper's own timing runs: about 2 min on a 2-core CPU);
--full is the paper-sized measurement (7 rounds on all 12, warm-ups of 3 s, and the paper's runs with
its 50 warm-up calls: about 13 min).
It prints a table (units in every header, no column left empty, what this machine cannot measure and
what would, and a closing line on the paper's claim: energy per image at batch 1) and writes
runs/eff__<data>__<model>__<methods>__<config hash>.{csv,json,png} (runs/ is ignored by git; the PNG
shows every ratio to base with its IQR and the busy flag; the committed reference run in results/ is
refreshed only by `python eff.py --full --out results`).

    python eff.py                                                 # about 2 min
    python eff.py --full                                          # about 13 min
    python eff.py --methods base,inter,inter+tome,int8 --batch 1 8 32 --seconds 2
    python eff.py --vocab-path published/vocab.pt --tome 13      # base and inter+tome only
    python eff.py --model timm:vit_base_patch16_224 --methods base,tome,evit --random-weights
"""
from __future__ import annotations

import time

_LOADED_AT = time.perf_counter()  # before the heavy imports: "s after start" counts them too

import argparse  # noqa: E402
from pathlib import Path
from typing import Optional

from vwt import bench, cli, efficiency, efficiency_view  # noqa: E402
from vwt.efficiency import default_methods, method_names  # noqa: E402

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_protocol_arg(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="samples", help="data set whose images are fed (default samples)")
    g.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    g.add_argument("--split", default=None, help="data split (default: the evaluation split)")
    g.add_argument("--limit", type=int, default=None,
                   help=f"images to cycle through in the rounds, and the paper's protocol's images (default "
                        f"{efficiency.QUICK['limit']}; --full: all 12 samples, 64 of other data sets in the rounds "
                        "and the whole split in the paper's protocol, which skips a batch size its images do not fill)")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    g.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=None,
                   help="give configurations with an input reducer batches of neighbours in token count (the same "
                        "images, regrouped; every turn then runs the whole pool): on by default at batch > 1")
    g.add_argument("--out", default=cli.DEFAULT_OUT, type=Path, help=cli.OUT_HELP)
    g = p.add_argument_group("measurement")
    g.add_argument("--metric", default="all", choices=["watt", "time", "energy", "all"],
                   help="time: latency only (and the paper's time run); energy: latency and energy per turn; watt: "
                        "latency and energy, and the paper's power run (one NVML reading after each batch); all: "
                        "everything (default)")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated configurations from {', '.join(method_names())}, joined with '+' to "
                        f"combine (e.g. inter+tome+int8), or 'all' (default {default_methods()}). Without "
                        "--methods, giving --top_k, --vocab, --tome, --evit, --lgtm or --quant measures base "
                        "and the one configuration those flags describe; with --methods, the flags set the "
                        "named methods' settings (defaults: the paper's). Base is always measured")
    g.add_argument("--full", action="store_true",
                   help="the paper-sized measurement (the committed reference run's settings: "
                        + _preset(efficiency.FULL)
                        + "; about 13 min on a 2-core CPU) instead of the quick default (" + _preset(efficiency.QUICK)
                        + "; about 2 min). A flag given beside it wins")
    g.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds per batch size (default {efficiency.QUICK['rounds']}; --full "
                        f"{efficiency.FULL['rounds']})")
    g.add_argument("--seconds", type=cli.positive_float, default=0.5,
                   help="minimum length of each turn (one configuration's timed and energy window in a round; "
                        "default 0.5; use 3 or more on a GPU for energy)")
    g.add_argument("--min-iters", type=int, default=1, help="minimum timed calls per turn (default 1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls of each configuration after the untimed pass that counts tokens (default "
                        f"{efficiency.QUICK['warmup']}; --full {efficiency.FULL['warmup']})")
    g.add_argument("--warmup-seconds", type=cli.nonneg_float, default=None,
                   help="keep warming up, round-robin, until this many seconds passed (default "
                        f"{efficiency.QUICK['warmup_seconds']:g}: the pass that counts tokens warms up; --full "
                        f"{efficiency.FULL['warmup_seconds']:g}: a fresh process runs its first seconds slowly, "
                        "which would read as a drift over the rounds)")
    g.add_argument("--paper-warmup", type=int, default=None,
                   help=f"--protocol paper: warm-up calls at batch 1 before each of its runs (default "
                        f"{efficiency.QUICK['paper_warmup']}; --full {bench.PAPER_WARMUP}, the paper's)")
    g.add_argument("--paper-runs", action=argparse.BooleanOptionalAction, default=None,
                   help="--protocol paper: also time the paper's way, outside the rounds (its mean ms per batch over "
                        "its loader after its warm-up calls, and its power run: one NVML reading after each batch) "
                        "(default off; --full on)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads while measuring (default: on a CPU, half the cores this process may use, at "
                        "least 1, so that a second run or other work beside it does not oversubscribe the cores, "
                        "which skews ratios to base; on a GPU, torch's default). Recorded in the results")
    g.add_argument("--interval", type=float, default=0.05,
                   help="power sampling interval in seconds for the instant-power trace (default 0.05)")
    g.add_argument("--compile", action="store_true",
                   help="also measure every configuration, base included, under torch.compile (default mode; "
                        "dynamic shapes where an input reducer varies the token count), interleaved with the eager "
                        "ones: a compiled row's speed-up is to the compiled base, with its speed-up to the eager "
                        "base, its compile seconds (kept out of the timing), graph breaks and recompilations")
    g.add_argument("--random-weights", action="store_true",
                   help="random weights without trying the hub (runtime and energy do not depend on weights)")
    cli.add_method_args(p, measured=True)
    p.set_defaults(vocab_data=None)
    p.set_defaults(thresh=None)
    return sized(p.parse_args(argv))


def _preset(values: dict) -> str:
    """Sizing flags as a command line says them (None: the flag left out)."""
    def said(k: str, v) -> str:
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{flag}" if v else f"--no-{flag}"
        return f"no --{flag}" if v is None else f"--{flag} {v:g}"

    return ", ".join(said(k, v) for k, v in values.items())


def sized(args: argparse.Namespace) -> argparse.Namespace:
    """The run's size: every sizing flag not given takes --full's value or the quick default's; --full
    itself is not recorded (its values are), so `eff.py --full` names its results as the committed
    reference run's."""
    for name, value in (efficiency.FULL if args.full else efficiency.QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    del args.full
    return args


def main(argv=None, loaded: Optional[cli.Loaded] = None):
    """Run the measurements; ``loaded`` replaces --model (tests pass a tiny model). Returns the table."""
    started = _LOADED_AT if __name__ == "__main__" else time.perf_counter()  # the script: since it started
    spec = cli.spec_from_args(parse_args(argv), efficiency.Measurement)
    df = efficiency.run(spec, loaded, started=started)
    show(df)
    return df


def show(df) -> None:
    """The table (units in every header; columns empty in every row left out), then one line for what
    it cannot show here and what would measure it, the paper's power reading where there is no NVML,
    the rounds' verdict on the machine per batch size, the weights, the files written
    (``df.attrs["report"]``, from vwt.efficiency.run), and the closing line on the paper's claim."""
    import pandas as pd

    report = df.attrs["report"]
    shown, empty = efficiency_view.printable(df)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(shown.to_string(index=False))
    for line in (*efficiency_view.unshown_lines(empty, report["energy_note"], report["paper_runs_note"]),
                 efficiency_view.paper_gap_line(df),
                 report["power_note"], *report["verdicts"],
                 efficiency_view.compile_line(df),
                 f"weights: {report['weights']}",
                 f"wrote {', '.join(report['files'])} in {report['wall_seconds']:.0f} s",
                 efficiency_view.claim_line(df)):
        if line:
            print(line)


if __name__ == "__main__":
    cli.main(main)
