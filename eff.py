"""Runtime, power and energy of a vision tower, per method and batch size.

For each configuration (base, VWT intra, VWT inter, ToMe, EViT, LGTM, int8 and combinations such as
inter+tome) and each --batch: latency per image (median, p90), throughput, tokens per image, analytic
FLOPs, and where the machine can measure it energy per image and mean power. The paper's own figure
(one power reading after each batch) is reported beside them.

How it measures (see vwt/energy.py): inputs are on the device before timing; every batch of the image
set runs once at the measured shape as warm-up (which also counts the tokens), then --warmup more
calls of the forward being timed; each call is timed with CUDA events or a synchronised clock,
looping for at least --seconds and --min-iters calls. Energy is read around that same window: on
NVIDIA GPUs the NVML total-energy counter, with an instant-power trace sampled every --interval
seconds for the mean wattage; on a CPU the RAPL package counters where readable. Elsewhere the results say energy is not measurable on this
machine (NaN in the CSV, with a note), never a number. A configuration without reducers (base, int8)
is timed through the model's own forward; the others through the vwt block loop.

The default run (no arguments) is CLIP ViT-B/16's vision tower on the `samples` photographs, every
method at the paper's setting (intra drop 0.5, inter vocabulary 1000 learned on the samples and
cached in tokenizers/samples/, threshold 0.1, ToMe r=13, EViT keep 0.7, LGTM its default, int8), batch
1 and 8, with pretrained weights where the hub is reachable and random weights otherwise (weights do
not change runtime or energy; the output says which). It prints a table and writes
results/eff_<data>_<model>.{csv,json,png}.

    python eff.py
    python eff.py --methods base,inter,inter+tome,int8 --batch 1 8 32 --seconds 10
    python eff.py --vocab-path published/vocab.pt --tome 13      # base and inter+tome only
    python eff.py --model timm:vit_base_patch16_224 --methods base,tome,evit --random-weights
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import vwt
from vwt import cli, datasets, energy, flops

PAPER = {"top_k": 0.5, "vocab": 1000, "thresh": 0.1, "tome": 13, "evit": 0.7}
INPUT_METHODS = ("intra", "inter")
BLOCK_METHODS = ("tome", "evit", "lgtm")
METHODS = ("base",) + INPUT_METHODS + BLOCK_METHODS + ("int8",)
DEFAULT_METHODS = "base,intra,inter,tome,evit,lgtm,int8"
COLUMNS = ["model", "weights", "device", "dtype", "data", "method", "config", "batch", "calls", "images",
           "tokens_in", "tokens_mean", "gflops_per_image", "flops_ratio", "latency_ms_median",
           "latency_ms_p90", "batch_ms_median", "throughput_img_s", "power_w_mean", "power_w_paper",
           "energy_j_per_image", "energy_source", "energy_window_s", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="samples", help="data set whose images are fed (default samples)")
    g.add_argument("--data-root", default="data", type=Path, help="where data sets live (default data/)")
    g.add_argument("--split", default=None, help="data split (default: the evaluation split)")
    g.add_argument("--limit", type=int, default=None,
                   help="number of images to cycle through (default: all 12 samples, 64 of other data sets)")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    g.add_argument("--out", default="results", type=Path, help="output folder (default results/)")
    g = p.add_argument_group("measurement")
    g.add_argument("--metric", default="all", choices=["watt", "time", "energy", "all"],
                   help="time: latency and throughput; energy: the same window with its energy; watt: the "
                        "paper's figure, one power reading after each batch; all: everything (default)")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated configurations from {', '.join(METHODS)}, joined with '+' to "
                        f"combine (e.g. inter+tome+int8), or 'all' (default {DEFAULT_METHODS}). Without "
                        "--methods, giving --top_k, --vocab, --tome, --evit, --lgtm or --quant measures base "
                        "and the one configuration those flags describe; with --methods, the flags set the "
                        "named methods' settings (defaults: the paper's)")
    g.add_argument("--seconds", type=float, default=3.0,
                   help="minimum length of each timed (and energy) window, looping the workload (default 3; "
                        "use 10 or more on a GPU for energy)")
    g.add_argument("--min-iters", type=int, default=3, help="minimum timed calls per window (default 3)")
    g.add_argument("--warmup", type=int, default=2,
                   help="warm-up calls after the untimed pass over every batch that counts tokens (default 2)")
    g.add_argument("--interval", type=float, default=0.05,
                   help="power sampling interval in seconds for the instant-power trace (default 0.05)")
    g.add_argument("--random-weights", action="store_true",
                   help="random weights without trying the hub (runtime and energy do not depend on weights)")
    cli.add_method_args(p)
    p.set_defaults(vocab_data=None)
    p.set_defaults(thresh=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One configuration: at most one input reducer, one in-network reducer, and int8."""

    input: Optional[str] = None
    block: Optional[str] = None
    quant: bool = False

    @property
    def name(self) -> str:
        parts = [p for p in (self.input, self.block) if p] + (["int8"] if self.quant else [])
        return "+".join(parts) or "base"


def parse_config(text: str) -> Config:
    parts = [t.strip().lower() for t in text.split("+") if t.strip()]
    unknown = [t for t in parts if t not in METHODS]
    if not parts or unknown:
        raise cli.UserError(f"unknown method {text!r} in --methods; use {', '.join(METHODS)}, joined with '+'")
    inputs = [t for t in parts if t in INPUT_METHODS]
    blocks = [t for t in parts if t in BLOCK_METHODS]
    if len(inputs) > 1 or len(blocks) > 1 or ("base" in parts and len(parts) > 1) or len(set(parts)) < len(parts):
        raise cli.UserError(f"--methods {text!r}: combine at most one of {'/'.join(INPUT_METHODS)}, one of "
                            f"{'/'.join(BLOCK_METHODS)} and int8 ('base' stands alone)")
    return Config(inputs[0] if inputs else None, blocks[0] if blocks else None, "int8" in parts)


def plan(args) -> list[Config]:
    """The configurations to measure, from --methods or from the method flags."""
    picked = {"intra": args.top_k is not None,
              "inter": args.vocab is not None or args.vocab_path is not None,
              "tome": args.tome is not None, "evit": args.evit is not None, "lgtm": args.lgtm is not None}
    if args.methods is None and (any(picked[k] for k in ("intra", "tome", "evit", "lgtm"))
                                 or args.vocab is not None or args.quant):
        if picked["intra"] and picked["inter"]:
            raise cli.UserError("choose one input reducer: --top_k (intra-image) or --vocab/--vocab-path (inter-image)")
        if sum(picked[k] for k in BLOCK_METHODS) > 1:
            raise cli.UserError("choose one in-network reducer: --tome, --evit or --lgtm")
        custom = Config(next((k for k in INPUT_METHODS if picked[k]), None),
                        next((k for k in BLOCK_METHODS if picked[k]), None), args.quant)
        return [Config()] + ([custom] if custom != Config() else [])
    text = DEFAULT_METHODS if args.methods in (None, "all") else args.methods
    configs = []
    for item in text.split(","):
        if item.strip():
            c = parse_config(item)
            if c not in configs:
                configs.append(c)
    if not configs:
        raise cli.UserError("--methods names no configuration")
    return configs


def settings(args) -> dict:
    """Each method's setting: the flag where given, else the paper's."""
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PAPER.items()}
    s["lgtm"] = args.lgtm if args.lgtm is not None else vwt.LGTM().r
    return s


def method_settings(cfg: Config, s: dict) -> dict:
    """The settings of the methods a configuration uses, as vwt.cli's method_label / build_reducers
    take them (None for the methods it does not use)."""
    return dict(top_k=s["top_k"] if cfg.input == "intra" else None,
                tome=s["tome"] if cfg.block == "tome" else None,
                evit=s["evit"] if cfg.block == "evit" else None,
                lgtm=s["lgtm"] if cfg.block == "lgtm" else None)


# --------------------------------------------------------------------------------------------------
# Model, images, vocabulary
# --------------------------------------------------------------------------------------------------
def load(args, device, dtype) -> tuple[cli.Loaded, str]:
    """The model, and a sentence saying which weights it has."""
    if args.random_weights:
        return cli.load_model(args.model, device, dtype, random_weights=True), "random (--random-weights)"
    try:
        return cli.load_model(args.model, device, dtype), "pretrained"
    except cli.UserError as e:
        loaded = cli.load_model(args.model, device, dtype, random_weights=True)
        return loaded, f"random: pretrained weights unavailable ({str(e)[:160]})"


def load_images(args, preprocess) -> torch.Tensor:
    """(N, 3, H, W) preprocessed images of the data set, on the CPU."""
    from tqdm import tqdm

    limit = args.limit if args.limit is not None else (None if args.data == "samples" else 64)
    if limit is not None and limit < 1:
        raise cli.UserError(f"--limit must be at least 1; got {limit}")
    if args.data == "samples":
        ds = datasets.Samples(preprocess, limit=limit)
    else:
        ds = datasets.load(args.data, args.data_root, preprocess, split=args.split, limit=limit)
    if len(ds) == 0:
        raise cli.UserError(f"{args.data}: no images found")
    return torch.stack([ds[i][0] for i in tqdm(range(len(ds)), desc=f"loading {args.data}", leave=False)])


def vocabulary(args, s: dict, images: torch.Tensor, vision, preprocess):
    """The inter-image vocabulary and its short name: --vocab-path; else process.py's
    tokenizers/<vocab-data or data>/v<size>/vocab.pt; for the samples, learned on them and cached in
    tokenizers/samples/ (relearned when the cache does not fit the model)."""
    patch = flops.dims_of(vision).patch_size
    if args.vocab_path is not None:
        path = Path(args.vocab_path)
        return _fitting(cli.read_vocabulary(path), patch, path), path.parent.name or path.stem
    data = args.vocab_data or args.data
    name = f"v{s['vocab']}"
    if data != "samples":
        path = cli.tokenizer_dir(data, s["vocab"]) / "vocab.pt"
        hint = (f"; learn it with `python process.py --data {data} --vocab {s['vocab']}`, or pass --vocab-path "
                "(e.g. a published ImageNet vocab.pt)")
        return _fitting(cli.read_vocabulary(path, hint), patch, path), name
    size = images.shape[-1]
    cache = cli.tokenizer_dir("samples", s["vocab"])
    path = (cache if (patch, size) == (16, 224) else cache.with_name(f"{name}-p{patch}-{size}px")) / "vocab.pt"
    if path.exists():
        vocab = cli.read_vocabulary(path)
        if (vocab.space, vocab.patch_size, tuple(vocab.meta.get("mean", ())), tuple(vocab.meta.get("std", ()))) == \
                ("pixel", patch, tuple(preprocess.mean), tuple(preprocess.std)):
            return vocab, name
    n = images.shape[0] * (images.shape[-1] // patch) * (images.shape[-2] // patch)
    if n < s["vocab"]:
        raise cli.UserError(f"cannot learn {s['vocab']} visual words from the {n} patches of the samples; use a "
                            "smaller --vocab or pass --vocab-path")
    print(f"learning a {s['vocab']}-word vocabulary on the {images.shape[0]} sample images -> {path}")
    vocab = vwt.Vocabulary.learn([images[i:i + 64] for i in range(0, len(images), 64)], size=s["vocab"],
                                 space="pixel", patch_size=patch, data="samples", image_size=size,
                                 mean=preprocess.mean, std=preprocess.std)
    vocab.save(path.parent)
    return vocab, name


def _fitting(vocab, patch: int, path: Path):
    """Refuse a pixel-space vocabulary made for another patch size, before any forward."""
    if vocab.space == "pixel" and vocab.patch_size != patch:
        raise cli.UserError(f"vocabulary {path} holds {vocab.patch_size}x{vocab.patch_size} pixel patches; the model's "
                            f"patches are {patch}x{patch}")
    return vocab


# --------------------------------------------------------------------------------------------------
# Measuring one configuration at one batch size
# --------------------------------------------------------------------------------------------------
def measure(tower, batches: list, args, meter: energy.Meter, device) -> dict:
    """--warmup calls, then calls timed for at least --seconds / --min-iters (energy read around that
    window), then the paper's per-batch power readings. The caller has already run every batch once
    (the token pass), so every input shape the timing meets has been seen."""
    stopwatch = energy.Stopwatch(device)
    b = batches[0].shape[0]

    def call(x):
        with torch.inference_mode():
            tower(x)

    for i in range(args.warmup):
        call(batches[i % len(batches)])
    energy.synchronize(device)

    out = {}
    want_energy = args.metric in ("energy", "all") and meter.measurable
    if args.metric != "watt":
        times, i = [], 0
        if want_energy:
            meter.start()
        end = time.perf_counter() + args.seconds
        while len(times) < args.min_iters or time.perf_counter() < end:
            x = batches[i % len(batches)]
            times.append(stopwatch(lambda: call(x)))
            i += 1
        reading = meter.stop() if want_energy else None
        per_image = [t / b for t in times]
        out.update(calls=len(times), images=len(times) * b,
                   latency_ms_median=1e3 * statistics.median(per_image),
                   latency_ms_p90=1e3 * energy.percentile(per_image, 90),
                   batch_ms_median=1e3 * statistics.median(times),
                   throughput_img_s=len(times) * b / sum(times))
        if reading is not None:
            out.update(energy_from(reading, len(times) * b))
    if args.metric in ("watt", "all") and meter.has_power:
        watts, i = [], 0
        meter.start()
        end = time.perf_counter() + args.seconds
        while i < args.min_iters or time.perf_counter() < end:
            call(batches[i % len(batches)])
            energy.synchronize(device)
            w = meter.power()  # the paper: one reading after each batch
            if w is not None:
                watts.append(w)
            i += 1
        reading = meter.stop()
        out["power_w_paper"] = statistics.fmean(watts) if watts else math.nan
        if "energy_j_per_image" not in out:
            out.update(energy_from(reading, i * b))
    return out


def energy_from(reading: energy.Reading, images: int) -> dict:
    return {"energy_j_per_image": reading.joules / images if reading.joules is not None else math.nan,
            "power_w_mean": reading.mean_watts if reading.mean_watts is not None else math.nan,
            "energy_source": reading.source, "energy_window_s": reading.seconds,
            "note": reading.note if reading.source == "nvml-power-trace" else ""}


def tokens_and_flops(tower, batches: list, images: int) -> tuple[float, float, float]:
    """Mean per image over the first ``images`` slots (each image once, whatever the batch size), from
    one patched pass over every batch: tokens entering the first block, tokens entering a block (mean
    over blocks), and analytic FLOPs (vwt.flops, from the per-block counts)."""
    counts, fl = [], []
    with torch.inference_mode():
        for x in batches:
            tower(x)
            counts.append(vwt.stats(tower)["tokens_per_layer"].float().cpu())
            fl.append(flops.flops_of_last_forward(tower))
    counts, fl = torch.cat(counts)[:images], torch.cat(fl)[:images]
    return counts[:, 0].mean().item(), counts[:, :-1].mean().item(), fl.mean().item()


def float_dtype(module) -> str:
    """The floating dtype the tower computes in (its first floating parameter)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "?"


def quantized(vision):
    """An int8 copy of the vision tower, or the reason this install cannot make one."""
    try:
        return vwt.quantize(copy.deepcopy(vision))
    except Exception as e:
        return f"not run: {type(e).__name__}: {cli.first_line(e, 200)}"


def run_config(tower, reducers: list, batches: list, images: int, args, meter, device) -> dict:
    """Tokens, FLOPs and the measurements of one configuration at one batch size. Without reducers
    the tower's own forward is timed (the token pass runs patched: same output, same shapes)."""
    out = {}
    vwt.patch(tower, *reducers)
    try:
        out["tokens_in"], out["tokens_mean"], fl = tokens_and_flops(tower, batches, images)
        out["gflops_per_image"] = fl / 1e9
        if not reducers:
            vwt.unpatch(tower)
        out.update(measure(tower, batches, args, meter, device))
    finally:
        vwt.unpatch(tower)
    return out


def make_batches(images: torch.Tensor, b: int, device, dtype) -> list:
    """Every image once, in batches of ``b`` (cycling the images to fill the last batch), on the device."""
    n = images.shape[0]
    count = max(1, math.ceil(n / b))
    return [images[torch.arange(j * b, (j + 1) * b) % n].to(device=device, dtype=dtype) for j in range(count)]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def plot(df, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_energy = df["energy_j_per_image"].notna().any()
    y, ylabel = (("energy_j_per_image", "energy per image (J)") if has_energy else
                 ("latency_ms_median", "latency per image, median (ms)"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>p*"
    for k, (b, part) in enumerate(df.groupby("batch")):
        part = part[part[y].notna()]
        ax.scatter(part["tokens_mean"], part[y], marker=markers[k % len(markers)], label=f"batch {b}")
        for _, r in part.iterrows():
            ax.annotate(r["method"], (r["tokens_mean"], r[y]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("tokens per image (mean over blocks)")
    ax.set_ylabel(ylabel)
    if not has_energy:
        title += "\nenergy not measurable on this machine: latency shown"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None, loaded: Optional[cli.Loaded] = None):
    """Run the measurements; ``loaded`` replaces --model (tests pass a tiny model). Returns the table."""
    import pandas as pd
    from tqdm import tqdm

    args = parse_args(argv)
    if any(b < 1 for b in args.batch):
        raise cli.UserError(f"--batch sizes must be at least 1; got {args.batch}")
    if args.seconds <= 0 or args.min_iters < 1 or args.warmup < 0:
        raise cli.UserError("--seconds must be positive, --min-iters at least 1 and --warmup at least 0")
    if not 0.01 <= args.interval <= 1:
        raise cli.UserError(f"--interval is the power sampling period, between 0.01 and 1 s; got {args.interval}")
    configs = plan(args)
    s = settings(args)
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(args.out)  # an unwritable --out fails now, not after the measurements
    started = time.perf_counter()

    if loaded is None:
        loaded, weights = load(args, device, dtype)
    else:
        weights = "pretrained" if loaded.pretrained else "random"
        loaded.model.to(device=device, dtype=dtype).eval()
    vision = loaded.vision
    preprocess = datasets.preprocess_for(loaded.model)
    images = load_images(args, preprocess)
    vocab, vocab_name = (vocabulary(args, s, images, vision, preprocess) if any(c.input == "inter" for c in configs)
                         else (None, ""))
    if vocab is not None:  # a vocabulary of another space or width than the model's: one line, before timing
        cli.check_input_reducers(vision, [vwt.InterImage(vocab)], images.shape[-1], device, dtype)

    meter = energy.best_meter(device, args.interval) if args.metric != "time" else energy.NullMeter("--metric time")
    info = meter.info()
    print(f"model {loaded.name} ({loaded.family}), weights: {weights}; device {device}, {args.dtype}; "
          f"data {args.data} ({images.shape[0]} images)")
    print(f"energy: {meter.note}")

    common = dict(model=loaded.name, weights="pretrained" if weights == "pretrained" else "random",
                  device=str(device), dtype=args.dtype, data=args.data)
    dense = flops.dense_flops(flops.dims_of(vision))
    rows, int8 = [], None
    bar = tqdm([(c, b) for c in configs for b in args.batch], desc="measuring", unit="run")
    for cfg, b in bar:
        bar.set_postfix_str(f"{cfg.name} b{b}")
        chosen = method_settings(cfg, s)
        inter = dict(thresh=s["thresh"], random=args.random)
        row = dict(common, method=cfg.name, batch=b, note="",
                   config=cli.method_label(**chosen, **inter, vocab=vocab_name if cfg.input == "inter" else None,
                                           quant=cfg.quant))
        try:
            reducers = cli.build_reducers(**chosen, **inter, vocab=vocab if cfg.input == "inter" else None,
                                          prop_attn=args.prop_attn)
        except cli.UserError as e:
            raise cli.UserError(f"{cfg.name}: {e}") from None
        if cfg.quant and int8 is None:
            int8 = quantized(vision)
        if cfg.quant and isinstance(int8, str):  # this install cannot run int8 (e.g. no backend for it)
            row["note"] = int8
            tqdm.write(f"{cfg.name} batch {b}: {int8}")
        else:
            row.update(run_config(int8 if cfg.quant else vision, reducers, make_batches(images, b, device, dtype),
                                  len(images), args, meter, device))
            row["flops_ratio"] = row["gflops_per_image"] * 1e9 / dense
            row["dtype"] = float_dtype(int8 if cfg.quant else vision)  # int8 on CUDA runs in float16
            if not meter.measurable and args.metric != "time":
                row["note"] = meter.note
        rows.append(row)
    info_end = meter.info()  # clocks and temperature after the runs
    meter.close()

    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"eff_{slug(args.data)}_{slug(loaded.name)}"
    csv = args.out / f"{stem}.csv"
    df.to_csv(csv, index=False)
    title = f"{loaded.name} ({weights.split(':')[0]} weights), {args.data}, {device}"
    png = plot(df, args.out / f"{stem}.png", title)
    wall = time.perf_counter() - started
    cli.write_json(args.out / f"{stem}.json", {
        "script": "eff.py", "args": vars(args), "weights": weights, "settings": s,
        "vocabulary": vocab_name or None, "meter": info, "meter_after": info_end, "environment": cli.environment(device),
        "wall_seconds": wall, "results": df.to_dict(orient="records")})

    show = ["config", "batch", "tokens_mean", "gflops_per_image", "latency_ms_median", "latency_ms_p90",
            "throughput_img_s", "power_w_mean", "power_w_paper", "energy_j_per_image"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(df[show].to_string(index=False))
    if not meter.measurable:
        print(f"energy: {meter.note}: energy and power columns are empty (NaN)")
    print(f"weights: {weights}")
    print(f"wrote {csv}, {png} and {csv.with_suffix('.json')} in {wall:.0f} s")
    return df


if __name__ == "__main__":
    cli.main(main)
