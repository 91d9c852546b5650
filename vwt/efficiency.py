"""The efficiency experiment eff.py runs, as a library: which configurations (the ``--methods``
language), the images and the inter-image vocabulary, the measurement of every configuration in
interleaved rounds (vwt.bench) with tokens and analytic FLOPs, the paper's own protocol beside it,
the table, the plot and collision-free results files (vwt.results).

A configuration is at most one input reducer (intra, inter), one in-network reducer (tome, evit,
lgtm) and int8; the rule itself is vwt.methods.build_reducers's. The base model is always measured: every
ratio is to it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import bench, datasets, energy, flops, methods, results
from .backends import family_of
from .batching import buckets, bucketing, input_reducer
from .errors import UserError, first_line
from .methods import build_reducers, method_label
from .models import Loaded, load_model
from .patch import patch, stats, token_stats, unpatch
from .protocol import get as get_protocol
from .vocab import Vocabulary
from .vocab_files import read_vocabulary, samples_vocabulary, tokenizer_dir

def paper_settings() -> dict:
    """Each method's setting in the paper (the method table's defaults: what eff.py measures unless a
    flag says otherwise), and the inter-image threshold."""
    return dict({m.dest: m.default for m in methods.rows() if m.kind != "int8"}, thresh=0.1)


def method_names() -> tuple:
    """The words of --methods: base and every row of the method table."""
    return ("base",) + tuple(m.name for m in methods.rows())


def default_methods() -> str:
    """What eff.py measures without --methods: base and every method alone."""
    return ",".join(method_names())


def __getattr__(attr: str):  # the former constants, read from the table when asked (rows may be registered later)
    table = {"PAPER": paper_settings, "METHODS": method_names, "DEFAULT_METHODS": default_methods,
             "INPUT_METHODS": lambda: tuple(m.name for m in methods.rows("input")),
             "BLOCK_METHODS": lambda: tuple(m.name for m in methods.rows("block"))}
    if attr in table:
        return table[attr]()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
COLUMNS = ["model", "weights", "device", "dtype", "data", "protocol", "method", "config", "batch", "bucket", "rounds", "calls",
           "images", "tokens_in", "tokens_mean", "gflops_per_image", "flops_ratio", "latency_ms_median",
           "latency_ms_p90", "batch_ms_median", "throughput_img_s", "speedup_median", "speedup_iqr", "power_w_mean",
           "energy_j_per_image", "energy_ratio_median", "energy_ratio_iqr", "energy_source", "energy_window_s",
           "busy", "time_ms_paper", "power_w_paper", "note"]


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


def settings(args) -> dict:
    """Each method's setting: the flag where given, else the paper's (the method table's default)."""
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else v
            for k, v in paper_settings().items()}


def reducer_settings(names, s: dict) -> dict:
    """vwt.methods.build_reducers's keyword values for the named methods (None for the others; the
    vocabulary, a loaded object, is the caller's)."""
    return {m.dest: (s[m.dest] if m.name in names else None) for m in methods.rows()
            if m.kind != "int8" and m.dest != "vocab"}


def parse_config(text: str, s: dict) -> Config:
    """One '+'-joined item of --methods. Names are checked here; the combination rule (one input + one
    in-network reducer) and the settings by vwt.methods.build_reducers, with a stand-in vocabulary."""
    parts = [t.strip().lower() for t in text.split("+") if t.strip()]
    known = method_names()
    unknown = [t for t in parts if t not in known]
    if not parts or unknown:
        raise UserError(f"unknown method {text!r} in --methods; use {', '.join(known)}, joined with '+'")
    if ("base" in parts and len(parts) > 1) or len(set(parts)) < len(parts):
        raise UserError(f"--methods {text!r}: 'base' stands alone and a method appears once")
    stand_in = Vocabulary(torch.ones(1, 3), space="embed") if "inter" in parts else None
    try:
        build_reducers(**reducer_settings(parts, s), vocab=stand_in, thresh=s["thresh"])
    except UserError as e:
        raise UserError(f"--methods {text!r}: {e}") from None
    kind = {m.name: m.kind for m in methods.rows()}
    return Config(next((t for t in parts if kind.get(t) == "input"), None),
                  next((t for t in parts if kind.get(t) == "block"), None), "int8" in parts)


def plan(args) -> list[Config]:
    """The configurations to measure, from --methods or from the method flags; base always first
    (every ratio is to it)."""
    s = settings(args)
    given = {m.name: methods.given(getattr(args, m.dest, None)) for m in methods.rows()}
    if args.methods is None and any(given.values()):  # a --vocab-path alone names a vocabulary, not a choice
        given["inter"] = given.get("inter", False) or args.vocab_path is not None
        text = "base," + "+".join(name for name, on in given.items() if on)
    else:
        text = default_methods() if args.methods in (None, "all") else args.methods
    configs = []
    for item in text.split(","):
        c = parse_config(item, s) if item.strip() else None
        if c is not None and c not in configs:
            configs.append(c)
    if not configs:
        raise UserError("--methods names no configuration")
    return configs if Config() in configs else [Config()] + configs


def check_numbers(args) -> None:
    """One-line errors for measurement settings out of range."""
    if any(b < 1 for b in args.batch):
        raise UserError(f"--batch sizes must be at least 1; got {args.batch}")
    if (args.seconds <= 0 or args.min_iters < 1 or args.warmup < 0 or args.rounds < 1 or args.paper_warmup < 0
            or args.warmup_seconds < 0):
        raise UserError("--seconds must be positive, --min-iters and --rounds at least 1, --warmup, "
                        "--warmup-seconds and --paper-warmup at least 0")
    if not 0.01 <= args.interval <= 1:
        raise UserError(f"--interval is the power sampling period, between 0.01 and 1 s; got {args.interval}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1; got {args.limit}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1; got {args.threads}")


# --------------------------------------------------------------------------------------------------
# Model, images, vocabulary
# --------------------------------------------------------------------------------------------------
def load(args, device, dtype) -> tuple[Loaded, str]:
    """The model (random weights where the pretrained ones cannot be had), and a sentence saying which."""
    loaded = load_model(args.model, device, dtype, random_weights=args.random_weights, fallback_random=True,
                        vision_only=True)
    if args.random_weights:
        return loaded, "random (--random-weights)"
    return loaded, "pretrained" if loaded.pretrained else f"random: {loaded.note}"


def dataset(args, preprocess, limit: Optional[int], seed: Optional[int] = None):
    """The data set's evaluation split under the run's protocol (``seed``'s re-split where the protocol
    re-splits it; its first ``limit`` images), preprocessed on the fly."""
    if args.data == "samples":
        ds = datasets.Samples(preprocess, limit=limit)
    else:
        ds = datasets.load(args.data, args.data_root, preprocess, split=args.split, seed=seed, protocol=args.protocol,
                           limit=limit)
    if len(ds) == 0:
        raise UserError(f"{args.data}: no images found")
    return ds


def load_images(ds) -> torch.Tensor:
    """(N, 3, H, W) preprocessed images, on the CPU."""
    from tqdm import tqdm

    return torch.stack([ds[i][0] for i in tqdm(range(len(ds)), desc=f"loading {ds.name}", leave=False)])


def _fitting(vocab, patch_size: int, path: Path):
    """Refuse a pixel-space vocabulary made for another patch size, before any forward."""
    if vocab.space == "pixel" and vocab.patch_size != patch_size:
        raise UserError(f"vocabulary {path} holds {vocab.patch_size}x{vocab.patch_size} pixel patches; the "
                            f"model's patches are {patch_size}x{patch_size}")
    return vocab


def paper_seeds(args) -> list:
    """The seeds of the paper's data side (a protocol with ``paper_measurement``): the protocol's for the
    data set, as clip.py's (paper: 1 2 3 on Waterbirds, CelebA and MetaShift, each its own re-split and
    vocabulary; 0 on the others); [None] without the paper's measurement (one fixed split, one vocabulary)."""
    rules = get_protocol(args.protocol)
    if not rules.paper_measurement:
        return [None]
    return rules.seeds_for(datasets.row(args.data).resplit)


def paper_datasets(args, own) -> dict:
    """{seed: the images the paper's measurement runs}: the evaluation split (--split), that seed's
    re-split where the protocol re-splits the data set, with the data set's own transform where the
    protocol says so (the paper's loaders; at the model's size and normalisation), else the model's
    own preprocessing ``own``; its first --limit images (default all, as the paper's eff.py)."""
    rules = get_protocol(args.protocol)
    pre = (datasets.transform_for(args.data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)
           if rules.data_preprocessing else own)
    out = {}
    for seed in paper_seeds(args):
        out[seed] = datasets.load(args.data, args.data_root, pre, split=args.split, seed=seed, protocol=rules,
                                  limit=args.limit)
        if len(out[seed]) == 0:
            raise UserError(f"{args.data}: no images in split {args.split or 'default'}" +
                            (f" of seed {seed}'s re-split" if seed else ""))
    return out


def _paper_vocabulary_file(args, s: dict, seed: Optional[int]) -> tuple[Optional[Path], str, str]:
    """Under the paper's data side: the vocabulary file --vocab names for ``seed`` as clip.py reads it
    (in-domain ``tokenizers/<data>/v<V>/seed_<i>/vocab.pt``, ImageNet's with --imgnet, --vocab-data), its
    short name and the hint for a missing file; (None, name, "") for the samples (learned on first use)."""
    from .spec import Recipe, RunSpec
    from .vocab_files import missing_vocab_hint, vocab_data, vocab_path

    flags = RunSpec(data=args.data, protocol=args.protocol,
                    method=Recipe(vocab=s["vocab"], vocab_data=args.vocab_data, imgnet=args.imgnet))
    source = vocab_data(flags)
    name = f"v{s['vocab']}" + ("" if source == args.data else f"-{source}")
    if source == "samples":
        return None, name, ""
    return vocab_path(flags, seed), name, missing_vocab_hint(flags)


def vocabulary(args, s: dict, images: torch.Tensor, vision, preprocess,
               seed: Optional[int] = None) -> tuple[Vocabulary, str, Path]:
    """The inter-image vocabulary, its short name and its file: --vocab-path ('{seed}' in it picks the
    seed's); else under the paper's data side (``seed`` given, see :func:`paper_seeds`) the one clip.py
    reads for that seed; otherwise process.py's tokenizers/<vocab-data or data>/v<size>/vocab.pt; for the
    samples, learned on them and cached in tokenizers/samples/ (``vocab_files.samples_vocabulary``; its
    lines on stdout, as eff.py's others)."""
    patch_size = flops.dims_of(vision).patch_size
    if args.vocab_path is not None:
        text = str(args.vocab_path)
        path = Path(text.format(seed=seed or 0) if "{seed}" in text else text)
        return _fitting(read_vocabulary(path), patch_size, path), path.parent.name or path.stem, path
    data, name = args.vocab_data or args.data, f"v{s['vocab']}"
    if seed is not None:
        path, name, hint = _paper_vocabulary_file(args, s, seed)
        if path is not None:
            return _fitting(read_vocabulary(path, hint), patch_size, path), name, path
        data = "samples"
    if data != "samples":
        path = tokenizer_dir(data, s["vocab"]) / "vocab.pt"
        hint = (f"; learn it with `python process.py --data {data} --vocab {s['vocab']}`, or pass --vocab-path "
                "(e.g. a published ImageNet vocab.pt)")
        return _fitting(read_vocabulary(path, hint), patch_size, path), name, path
    vocab, path = samples_vocabulary(s["vocab"], vision, preprocess, images, stream=sys.stdout)
    if "learned_in_s" in vocab.meta:
        print(f"learned the vocabulary in {vocab.meta['learned_in_s']:.1f} s", flush=True)
    return vocab, name, path


# --------------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A configuration ready to run: its tower (the int8 copy for int8), reducers and label, or the
    reason it cannot run on this install. ``make`` builds the tower on first use (:meth:`ready`): the
    int8 copy takes about a second on a small CPU, which is spent once measuring has started."""

    config: Config
    label: str
    tower: Optional[torch.nn.Module] = None
    reducers: list = field(default_factory=list)
    skip: str = ""
    make: Optional[Callable[[], object]] = None  # the tower, or a string saying why it cannot be made
    rebuild: Optional[Callable[[object], list]] = None  # inter-image: the reducers with another vocabulary

    @property
    def name(self) -> str:
        return self.config.name

    def ready(self) -> "Prepared":
        if self.make is not None:
            made, self.make = self.make(), None
            if isinstance(made, str):
                self.skip = made
            else:
                self.tower = made
        return self

    def enter(self) -> None:
        if self.reducers:
            patch(self.tower, *self.reducers)

    def leave(self) -> None:
        unpatch(self.tower)

    def call(self, x) -> None:
        with torch.inference_mode():
            self.tower(x)


def float_dtype(module) -> torch.dtype:
    """The floating dtype the tower computes in (its first floating parameter; int8 on CUDA: float16)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def quantized(vision):
    """An int8 copy of the vision tower (on a CPU sharing its float weights), or the reason this install
    cannot make one."""
    from .quant import quantized_copy

    try:
        return quantized_copy(vision)
    except Exception as e:
        return f"not run: {type(e).__name__}: {first_line(e, 200)}"


def prepare(configs: list[Config], args, s: dict, vision, vocab, vocab_name: str) -> list[Prepared]:
    """Reducers (built by vwt.methods.build_reducers, so ``--protocol paper`` times the paper's ToMe on the
    families it ran) and towers of every configuration."""
    out, family = [], family_of(vision).name
    int8 = functools.lru_cache(maxsize=1)(lambda: quantized(vision))  # one int8 tower, made on first use
    for cfg in configs:
        names = [n for n in (cfg.input, cfg.block) if n]
        chosen = reducer_settings(names, s)
        inter = dict(thresh=s["thresh"], random=args.random)
        label = method_label(**chosen, **inter, vocab=vocab_name if cfg.input == "inter" else None, quant=cfg.quant)
        try:
            reducers = build_reducers(**chosen, **inter, vocab=vocab if cfg.input == "inter" else None,
                                          prop_attn=args.prop_attn, protocol=args.protocol, family=family)
        except UserError as e:
            raise UserError(f"{cfg.name}: {e}") from None
        rebuild = None
        if cfg.input == "inter":  # the paper's data side: each seed's own vocabulary
            rebuild = functools.partial(lambda chosen, v: build_reducers(
                **chosen, **inter, vocab=v, prop_attn=args.prop_attn, protocol=args.protocol, family=family), chosen)
        if cfg.quant:  # made when its turn first comes; a string says this install cannot run int8
            out.append(Prepared(cfg, label, reducers=reducers, make=int8, rebuild=rebuild))
        else:
            out.append(Prepared(cfg, label, vision, reducers, rebuild=rebuild))
    return out


def make_batches(images: torch.Tensor, b: int, device, dtype) -> list:
    """Every image once, in batches of ``b`` (cycling the images to fill the last batch), on the device."""
    n = images.shape[0]
    count = max(1, math.ceil(n / b))
    return [images[torch.arange(j * b, (j + 1) * b) % n].to(device=device, dtype=dtype) for j in range(count)]


def tokens_and_flops(p: Prepared, batches: list, images: int) -> tuple[dict, torch.Tensor]:
    """Mean per image over the first ``images`` slots (each image once, whatever the batch size), from
    one patched pass over every batch (which also warms every input shape up): tokens entering the
    first block, tokens entering a block (mean over blocks), analytic FLOPs (vwt.flops). Also the
    tokens each slot of the batches enters the first block with (what --bucket sorts by)."""
    counts, fl = [], []
    patch(p.tower, *p.reducers)
    try:
        with torch.inference_mode():
            for x in batches:
                p.tower(x)
                counts.append(stats(p.tower)["tokens_per_layer"].float().cpu())
                fl.append(flops.flops_of_last_forward(p.tower))
    finally:
        unpatch(p.tower)
    per_slot, fl = token_stats(torch.cat(counts)), torch.cat(fl)[:images]
    first, mean = per_slot["tokens_first_block"], per_slot["tokens_mean"]
    return dict(tokens_in=first[:images].mean().item(), tokens_mean=mean[:images].mean().item(),
                gflops_per_image=fl.mean().item() / 1e9), first


def bucketed(batches: list, first_block: torch.Tensor) -> list:
    """The same slots as ``batches``, regrouped so that each batch holds neighbours in token count
    (``first_block``: each slot's tokens entering the first block; vwt.buckets)."""
    b = batches[0].shape[0]
    slots = torch.cat(batches)  # (S, C, H, W): every slot in order
    return [slots[idx] for idx in buckets(first_block, b)]


def bucket_on(p: Prepared, args, b: int) -> bool:
    """--bucket (on by default) for a configuration with an input reducer at batch > 1 (at batch 1
    there is nothing to regroup)."""
    return b > 1 and bucketing(args.bucket, input_reducer(p.reducers), b)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the measurement needs besides the configurations."""

    args: object
    device: torch.device
    meter: energy.Meter
    images: torch.Tensor
    dense_flops: float
    paper_data: Optional[dict] = None  # {seed: the data set the paper's protocol runs through its loader}
    paper_vocabs: dict = field(default_factory=dict)  # {seed: its vocabulary} where inter-image is measured


def measure_batch_size(preps: list[Prepared], b: int, run: Run) -> tuple[dict, bench.Summary]:
    """Token pass, then interleaved rounds of every runnable configuration at batch ``b``: a row per
    configuration and the rounds' summary (figures and busy flag)."""
    from tqdm import tqdm

    args, by_dtype, rows, methods = run.args, {}, {}, []
    for p in preps:
        if p.ready().skip:
            rows[p.name] = dict(note=p.skip)
            continue
        dtype = float_dtype(p.tower)
        if dtype not in by_dtype:
            by_dtype[dtype] = make_batches(run.images, b, run.device, dtype)
        rows[p.name], first_block = tokens_and_flops(p, by_dtype[dtype], len(run.images))
        bucket = bucket_on(p, args, b)
        rows[p.name].update(flops_ratio=rows[p.name]["gflops_per_image"] * 1e9 / run.dense_flops,
                            dtype=str(dtype).replace("torch.", ""), bucket=bucket)
        inputs = bucketed(by_dtype[dtype], first_block) if bucket else by_dtype[dtype]
        methods.append(bench.Method(p.name, p.call, p.enter, p.leave, inputs=inputs))
    meter = run.meter if args.metric != "time" and run.meter.measurable else None
    bar = tqdm(total=args.rounds, desc=f"rounds, batch {b}", leave=False)
    # every turn runs the whole pool: an input reducer's cost depends on the image (inter-image keeps
    # 42 to 197 tokens of the samples), so turns over different images would spread the per-round
    # ratios for what they hold, not for how busy the machine was; and bucketed batches regroup it
    turns = bench.interleave(methods, methods[0].inputs, rounds=args.rounds, min_seconds=args.seconds,
                             min_calls=args.min_iters, cover=len(methods[0].inputs),
                             warmup=args.warmup,
                             warmup_seconds=args.warmup_seconds, meter=meter,
                             stopwatch=energy.Stopwatch(run.device), progress=lambda r: bar.update())
    bar.close()
    summary = bench.summarise(turns, base="base")
    for name, f in summary.figures.items():
        rows[name].update(f, busy=summary.busy)
    return rows, summary


def paper_fields(p: Prepared, b: int, run: Run) -> dict:
    """The paper's figures of one configuration at batch ``b`` (--protocol paper), on every seed's data
    (its eff.py loops the seeds): with one seed the figures of :func:`paper_fields_of`; with several,
    each seed's (columns ``*_paper_seed<i>[_group<g>]``) and their mean over the seeds (``*_paper``,
    ``*_paper_group<g>``). An inter-image configuration runs each seed with that seed's vocabulary."""
    per_seed = {}
    for seed, ds in run.paper_data.items():
        vocab = run.paper_vocabs.get(seed)
        q = p if vocab is None or p.rebuild is None else dataclasses.replace(p, reducers=p.rebuild(vocab))
        per_seed[seed] = paper_fields_of(q, b, run, ds)
    if len(per_seed) == 1:
        return next(iter(per_seed.values()))
    out = {}
    for seed, fields in per_seed.items():
        out.update({k.replace("_paper", f"_paper_seed{seed}", 1): v for k, v in fields.items() if k != "note"})
    for k in sorted({k for f in per_seed.values() for k in f if k != "note"}):
        values = [f[k] for f in per_seed.values() if k in f and not math.isnan(f[k])]
        out[k] = sum(values) / len(values) if values else math.nan
    notes = [f["note"] for f in per_seed.values() if f.get("note")]
    if notes:
        out["note"] = notes[0]
    return out


def paper_fields_of(p: Prepared, b: int, run: Run, ds) -> dict:
    """The paper's figures of one configuration at batch ``b`` on the data set ``ds``: mean per-batch ms
    with the host-to-device copy, and one NVML power reading per batch in a separate run, overall and
    per group; power empty with a one-line reason where there is no NVML."""
    args = run.args
    power, reason = bench.paper_power_reader(run.meter) if args.metric in ("watt", "all") else (None, "")
    loader = lambda: datasets.batches(ds, b)  # noqa: E731
    dtype = float_dtype(p.tower)
    p.enter()
    try:
        runs = bench.paper_runs(p.call, loader, run.device, dtype, tuple(run.images.shape[1:]),
                                energy.Stopwatch(run.device), power, warmup=args.paper_warmup,
                                measure_time=args.metric in ("time", "all"))
    finally:
        p.leave()
    groups = sorted({r["group"] for r in ds.records if r.get("group") is not None})
    out = {f"{k}_paper{suffix}": math.nan for k in ("time_ms", "power_w") for suffix in [""] + [f"_group{g}" for g in groups]}
    for key, per_batch in runs.items():
        mean, by_group = bench.paper_means(per_batch)
        out[f"{key}_paper"] = mean
        out.update({f"{key}_paper_group{g}": v for g, v in by_group.items()})
    if reason:
        out["note"] = reason
    return out


def measure(preps: list[Prepared], run: Run, common: dict) -> tuple[list[dict], dict]:
    """Every configuration at every --batch: rows in (configuration, batch) order, and per batch size
    the rounds' one-line verdict and every reason they gave for calling the machine busy."""
    args, by_batch, verdicts = run.args, {}, {}
    for b in args.batch:
        rows, summary = measure_batch_size(preps, b, run)
        verdicts[b] = dict(line=f"batch {b}: {summary.line()}", busy=summary.busy, reasons=summary.reasons)
        if get_protocol(args.protocol).paper_measurement:
            for p in preps:
                if not p.skip:
                    rows[p.name].update(paper_fields(p, b, run))
        by_batch[b] = rows
    out = []
    for p in preps:
        for b in args.batch:
            row = dict(common, method=p.name, config=p.label, batch=b, note="")
            row.update(by_batch[b][p.name])
            notes = [row["note"]] if row["note"] else []
            if not p.skip and args.metric != "time" and not run.meter.measurable:
                notes.insert(0, run.meter.note)
            row["note"] = "; ".join(notes)
            out.append(row)
    return out, verdicts


def table(rows: list[dict]):
    """The results as a DataFrame: the standard columns, then any per-group columns of the paper."""
    import pandas as pd

    extra = sorted({k for r in rows for k in r if k not in COLUMNS})
    return pd.DataFrame(rows).reindex(columns=COLUMNS + extra)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def stem(args, model: str, configs: list[Config], config: dict) -> str:
    """``eff__<data>__<model>__<methods>__<hash of the whole configuration>``: runs that differ in
    anything (dtype, vocabulary file, protocol, batch, limit, weights, --bucket, ...) never share a name
    (--bucket changes only the order of other scripts' work, but what eff.py times)."""
    timing = [k for k in results.NOT_CONFIG if k != "bucket"]
    return results.run_stem(["eff", args.data, model, "-".join(c.name for c in configs)], config, ignore=timing)


def plot(df, path: Path, title: str) -> Path:
    """Energy (or, where not measurable, latency) per image against tokens per image, one marker per
    batch size, each point labelled with its method."""
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
    try:
        return results.atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def write(df, meta: dict, out: Path, name: str, title: str) -> list[Path]:
    """CSV, JSON (configuration, machine, busy verdicts, every row) and PNG, each written atomically.
    Only a run of the very same configuration has the same name: replacing its files is said aloud."""
    if (out / f"{name}.csv").exists():
        print(f"replacing the results of an earlier run of the same configuration: {out / name}.*")
    csv = results.atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    js = results.write_json(out / f"{name}.json", dict(meta, results=df.to_dict(orient="records")))
    return [csv, js, plot(df, out / f"{name}.png", title)]
