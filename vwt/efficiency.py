"""The efficiency experiment eff.py runs, as a library: which configurations (the ``--methods``
language), the images and the inter-image vocabulary, the measurement of every configuration in
interleaved rounds (vwt.bench) with tokens and analytic FLOPs, the paper's own protocol beside it,
the table, the plot and collision-free results files (vwt.results).

A configuration is at most one input reducer (intra, inter), one in-network reducer (tome, evit,
lgtm) and int8; the rule itself is vwt.methods.build_reducers's. The base model is always measured: every
ratio is to it.

From Python: ``run(RunSpec(data="samples", batch=(1, 8), method=Recipe(tome=13),
options=Measurement(methods="base,tome", rounds=3)))`` returns the table eff.py prints and writes.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import bench, compiling, datasets, efficiency_view, energy, flops, methods, models, results
from .backends import family_of
from .batching import buckets, bucketing, input_reducer
from .errors import UserError, first_line
from .methods import build_reducers, method_label
from .models import Loaded, load_model
from .patch import patch, stats, token_stats, unpatch
from .runtime import check_input_reducers, environment, resolve_device, resolve_dtype
from .spec import RunSpec
from .tokenizer import THRESH, InterImage
from .resize import side_for
from .vocab import Vocabulary
from .vocab_files import (HUB, missing_vocab_hint, read_vocabulary, samples_vocabulary, tokenizer_dir, vocab_data,
                          vocab_label, vocab_path)


def paper_settings() -> dict:
    """Each method's setting in the paper (the method table's defaults: what eff.py measures unless a
    flag says otherwise), and the inter-image threshold."""
    return dict({m.dest: m.default for m in methods.rows() if m.kind != "int8"}, thresh=THRESH)


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
           "latency_ms_p90", "batch_ms_median", "throughput_img_s", "speedup_median", "speedup_iqr", "speedup_q25",
           "speedup_q75", "power_w_mean", "energy_j_per_image", "energy_ratio_median", "energy_ratio_iqr",
           "energy_ratio_q25", "energy_ratio_q75", "energy_source", "energy_window_s",
           "busy", "time_ms_paper", "power_w_paper", "note"]
# --compile's columns (only in a run with --compile): whether the row is the compiled variant, the
# seconds of its first calls (the compilation, kept out of the timing), the graphs its first call
# compiled, its graph breaks and recompilations (after the first call), the times torch hit its
# recompile limit (that code then ran eagerly), and its speed-up to the eager base (speedup_* of a
# compiled row is to the compiled base)
COMPILE_COLUMNS = ["compiled", "compile_s", "graphs", "graph_breaks", "recompiles", "recompile_limit_hits",
                   "speedup_vs_eager_base"]
COMPILED = "+compile"  # a compiled variant's method name: the configuration's, then this


# eff.py's two sizes of run, by flag name (README "The main job"). FULL (--full) is the paper-sized
# measurement: every image of the pool (all 12 samples), 7 rounds, warm-ups of at least 3 s and the paper's
# 50 calls; the committed reference run is one, and keeps its results name and hash. QUICK (the default)
# times the same methods at the same batch sizes in honest interleaved rounds (3: the fewest from which
# the busy flag is judged) on the first 4 samples (their inter-image tokens average 112 against the
# twelve's 115), with the pass that counts tokens as the warm-up, and leaves out the paper's own timing
# and power runs (``paper_runs``: per-batch figures outside the rounds, which 4 images cannot give at
# batch 8; with --paper-runs they take no warm-up calls of their own, the rounds having warmed every
# configuration): about 2 min on a 2-core CPU. Other settings of the two agree; a flag given wins.
FULL = dict(limit=None, rounds=7, warmup=2, warmup_seconds=3.0, paper_warmup=bench.PAPER_WARMUP, paper_runs=True)
QUICK = dict(limit=4, rounds=3, warmup=0, warmup_seconds=0.0, paper_warmup=0, paper_runs=False)


@dataclass(frozen=True)
class Measurement:
    """eff.py's own settings, named as its flags (``RunSpec.options``): what to measure (``metric``,
    the ``methods`` language), how long (rounds, turns, warm-up), on how many torch threads, the power
    sampling interval, whether to skip the hub for random weights, and whether to measure every
    configuration compiled too (``compile``: vwt.compiling, beside the eager one). Defaults: ``eff.py --full``'s
    (:data:`FULL`); eff.py's quick default is :data:`QUICK`."""

    metric: str = "all"
    methods: Optional[str] = None
    rounds: int = 7
    seconds: float = 0.5
    min_iters: int = 1
    warmup: int = 2
    warmup_seconds: float = 3.0
    paper_warmup: int = bench.PAPER_WARMUP
    paper_runs: bool = True  # --protocol paper: the paper's own timing and power runs too (paper_fields)
    threads: Optional[int] = None
    interval: float = 0.05
    random_weights: bool = False
    compile: bool = False


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


def settings(spec: RunSpec) -> dict:
    """Each method's setting: the run's recipe where given, else the paper's (the method table's default)."""
    recipe = spec.method
    return {k: getattr(recipe, k) if getattr(recipe, k) is not None else v for k, v in paper_settings().items()}


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


def plan(spec: RunSpec) -> list[Config]:
    """The configurations to measure, from --methods (``spec.options.methods``) or from the method
    flags (the recipe); base always first (every ratio is to it)."""
    s, chosen = settings(spec), spec.options.methods
    given = {m.name: methods.given(getattr(spec.method, m.dest)) for m in methods.rows()}
    if chosen is None and any(given.values()):  # a --vocab-path alone names a vocabulary, not a choice
        given["inter"] = given.get("inter", False) or spec.method.vocab_path is not None
        text = "base," + "+".join(name for name, on in given.items() if on)
    else:
        text = default_methods() if chosen in (None, "all") else chosen
    configs = []
    for item in text.split(","):
        c = parse_config(item, s) if item.strip() else None
        if c is not None and c not in configs:
            configs.append(c)
    if not configs:
        raise UserError("--methods names no configuration")
    return configs if Config() in configs else [Config()] + configs


def batch_sizes(spec: RunSpec) -> tuple:
    """The run's batch sizes (``spec.batch``: one size or a sequence of them)."""
    return tuple(spec.batch) if isinstance(spec.batch, (list, tuple)) else (spec.batch,)


def check_numbers(spec: RunSpec) -> None:
    """One-line errors for measurement settings out of range."""
    o = spec.options
    if any(b < 1 for b in batch_sizes(spec)):
        raise UserError(f"--batch sizes must be at least 1; got {list(batch_sizes(spec))}")
    if (not 0 < o.seconds < math.inf or o.min_iters < 1 or o.warmup < 0 or o.rounds < 1 or o.paper_warmup < 0
            or not 0 <= o.warmup_seconds < math.inf):  # written so that NaN fails too (it compares false)
        raise UserError("--seconds must be positive, --min-iters and --rounds at least 1, --warmup, "
                        "--warmup-seconds and --paper-warmup at least 0 (seconds: finite numbers)")
    if not 0.01 <= o.interval <= 1:
        raise UserError(f"--interval is the power sampling period, between 0.01 and 1 s; got {o.interval}")
    if spec.limit is not None and spec.limit < 1:
        raise UserError(f"--limit must be at least 1; got {spec.limit}")
    if o.threads is not None and o.threads < 1:
        raise UserError(f"--threads must be at least 1; got {o.threads}")


# --------------------------------------------------------------------------------------------------
# Model, images, vocabulary
# --------------------------------------------------------------------------------------------------
def load(spec: RunSpec, device, dtype) -> tuple[Loaded, str]:
    """The model (random weights where the pretrained ones cannot be had), and a sentence saying which.
    A published vocabulary (--vocab-path hf:...) is fetched, or refused in one line, first."""
    if spec.method.vocab_path is not None:
        vocab_path(spec)
    random_weights = spec.options.random_weights
    loaded = load_model(spec.model or models.DEFAULT_CLIP, device, dtype, random_weights=random_weights,
                        fallback_random=True, vision_only=True, needs="vision")
    if random_weights:
        return loaded, "random (--random-weights)"
    return loaded, "pretrained" if loaded.pretrained else f"random: {loaded.note}"


def dataset(spec: RunSpec, preprocess, limit: Optional[int], seed: Optional[int] = None):
    """The data set's evaluation split under the run's protocol (``seed``'s re-split where the protocol
    re-splits it; its first ``limit`` images), preprocessed on the fly."""
    ds = datasets.load(spec.data, spec.root, preprocess, split=spec.split, seed=seed, protocol=spec.protocol,
                       limit=limit)
    if len(ds) == 0:
        raise UserError(f"{spec.data}: no images found")
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


def paper_seeds(spec: RunSpec) -> list:
    """The seeds of the paper's data side (a protocol with ``paper_measurement``): the protocol's for the
    data set, as clip.py's (paper: 1 2 3 on Waterbirds, CelebA and MetaShift, each its own re-split and
    vocabulary; 0 on the others); [None] without the paper's measurement (one fixed split, one vocabulary)."""
    if not spec.protocol.paper_measurement:
        return [None]
    return spec.protocol.seeds_for(datasets.row(spec.data).resplit)


def paper_datasets(spec: RunSpec, own) -> dict:
    """{seed: the images the paper's measurement runs}: the evaluation split (--split), that seed's
    re-split where the protocol re-splits the data set, with the data set's own transform where the
    protocol says so (the paper's loaders; at the model's size and normalisation), else the model's
    own preprocessing ``own``; its first --limit images (default all, as the paper's eff.py)."""
    rules, data = spec.protocol, spec.data
    pre = (datasets.transform_for(data, image_size=own.size, mean=own.mean, std=own.std, data_preprocessing=True)
           if rules.data_preprocessing else own)
    out = {}
    for seed in paper_seeds(spec):
        out[seed] = datasets.load(data, spec.root, pre, split=spec.split, seed=seed, protocol=rules, limit=spec.limit)
        if len(out[seed]) == 0:
            raise UserError(f"{data}: no images in split {spec.split or 'default'}" +
                            (f" of seed {seed}'s re-split" if seed else ""))
    return out


def _paper_vocabulary_file(spec: RunSpec, s: dict, seed: Optional[int]) -> tuple[Optional[Path], str, str]:
    """Under the paper's data side: the vocabulary file --vocab names for ``seed`` as clip.py reads it
    (in-domain ``tokenizers/<data>/v<V>/seed_<i>/vocab.pt``, ImageNet's with --imgnet, --vocab-data), its
    short name and the hint for a missing file; (None, name, "") for the samples (learned on first use).
    Only without --vocab-path (which :func:`vocabulary` reads first)."""
    flags = spec.replace(vocab=s["vocab"])  # the size measured: the flag's, or the paper's
    source = vocab_data(flags)
    name = f"v{s['vocab']}" + ("" if source == spec.data else f"-{source}")
    if source == "samples":
        return None, name, ""
    return vocab_path(flags, seed), name, missing_vocab_hint(flags)


def vocabulary(spec: RunSpec, s: dict, images: torch.Tensor, vision, preprocess,
               seed: Optional[int] = None) -> tuple[Vocabulary, str, Path]:
    """The inter-image vocabulary, its short name and its file: --vocab-path ('{seed}' in it picks the
    seed's); else under the paper's data side (``seed`` given, see :func:`paper_seeds`) the one clip.py
    reads for that seed; otherwise process.py's tokenizers/<vocab-data or data>/v<size>/vocab.pt; for the
    samples, learned on them and cached in tokenizers/samples/ (``vocab_files.samples_vocabulary``; its
    lines on stdout, as eff.py's others)."""
    patch_size = flops.dims_of(vision).patch_size
    if spec.method.vocab_path is not None:
        path = vocab_path(spec, seed)  # '{seed}' in it picks the seed's
        name = vocab_label(spec.method.vocab_path) if str(spec.method.vocab_path).startswith(HUB) else None
        return _fitting(read_vocabulary(path), patch_size, path), name or path.parent.name or path.stem, path
    data, name = spec.method.vocab_data or spec.data, f"v{s['vocab']}"
    if seed is not None:
        path, name, hint = _paper_vocabulary_file(spec, s, seed)
        if path is not None:
            return _fitting(read_vocabulary(path, hint), patch_size, path), name, path
        data = "samples"
    if data != "samples":
        path = tokenizer_dir(data, s["vocab"]) / "vocab.pt"
        hint = (f"; learn it with `python process.py --data {data} --vocab {s['vocab']}`, or pass --vocab-path "
                "(e.g. a published ImageNet vocab.pt)")
        return _fitting(read_vocabulary(path, hint), patch_size, path), name, path
    whole = images if spec.limit is None else None  # learned on every sample, whatever --limit pools
    vocab, path = samples_vocabulary(s["vocab"], vision, preprocess, whole, stream=sys.stdout)
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


def prepare(configs: list[Config], spec: RunSpec, s: dict, vision, vocab, vocab_name: str) -> list[Prepared]:
    """Reducers (built by vwt.methods.build_reducers, so ``--protocol paper`` times the paper's ToMe on the
    families it ran) and towers of every configuration."""
    out, family = [], family_of(vision).name
    int8 = functools.lru_cache(maxsize=1)(lambda: quantized(vision))  # one int8 tower, made on first use
    for cfg in configs:
        names = [n for n in (cfg.input, cfg.block) if n]
        chosen = reducer_settings(names, s)
        if cfg.input == "resize" and spec.method.resize is None:  # the default side, scaled to this model
            chosen["resize"] = side_for(datasets.preprocess_for(vision).size, flops.dims_of(vision).patch_size)
        inter = dict(thresh=s["thresh"], random=spec.method.random)
        label = method_label(**chosen, **inter, vocab=vocab_name if cfg.input == "inter" else None, quant=cfg.quant)
        try:
            reducers = build_reducers(**chosen, **inter, vocab=vocab if cfg.input == "inter" else None,
                                      prop_attn=spec.method.prop_attn, protocol=spec.protocol, family=family)
        except UserError as e:
            raise UserError(f"{cfg.name}: {e}") from None
        rebuild = None
        if cfg.input == "inter":  # the paper's data side: each seed's own vocabulary
            rebuild = functools.partial(lambda chosen, v: build_reducers(
                **chosen, **inter, vocab=v, prop_attn=spec.method.prop_attn, protocol=spec.protocol, family=family),
                chosen)
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


def bucket_on(p: Prepared, bucket: Optional[bool], b: int) -> bool:
    """--bucket (``bucket``; None: on by default) for a configuration with an input reducer at batch > 1
    (at batch 1 there is nothing to regroup)."""
    return b > 1 and bucketing(bucket, input_reducer(p.reducers), b)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the measurement needs besides the configurations."""

    spec: RunSpec
    device: torch.device
    meter: energy.Meter
    images: torch.Tensor
    dense_flops: float
    paper_data: Optional[dict] = None  # {seed: the data set the paper's protocol runs through its loader}
    paper_vocabs: dict = field(default_factory=dict)  # {seed: its vocabulary} where inter-image is measured


def measure_batch_size(preps: list[Prepared], b: int, run: Run) -> tuple[dict, bench.Summary]:
    """Token pass, then interleaved rounds of every runnable configuration at batch ``b`` (with
    --compile, its compiled variant too): a row per configuration and variant and the rounds'
    summary (figures and busy flag)."""
    from tqdm import tqdm

    o, by_dtype, rows, methods = run.spec.options, {}, {}, []
    for p in preps:
        if p.ready().skip:
            rows[p.name] = dict(note=p.skip)
            continue
        dtype = float_dtype(p.tower)
        if dtype not in by_dtype:
            by_dtype[dtype] = make_batches(run.images, b, run.device, dtype)
        rows[p.name], first_block = tokens_and_flops(p, by_dtype[dtype], len(run.images))
        bucket = bucket_on(p, run.spec.bucket, b)
        rows[p.name].update(flops_ratio=rows[p.name]["gflops_per_image"] * 1e9 / run.dense_flops,
                            dtype=str(dtype).replace("torch.", ""), bucket=bucket)
        inputs = bucketed(by_dtype[dtype], first_block) if bucket else by_dtype[dtype]
        methods.append(bench.Method(p.name, p.call, p.enter, p.leave, inputs=inputs))
    if o.compile:
        methods += compiled_variants([p for p in preps if not p.skip], methods, rows)
    meter = run.meter if o.metric != "time" and run.meter.measurable else None
    bar = tqdm(total=o.rounds, desc=f"rounds, batch {b}", leave=False)
    # every turn runs the whole pool: an input reducer's cost depends on the image (inter-image keeps
    # 42 to 197 tokens of the samples), so turns over different images would spread the per-round
    # ratios for what they hold, not for how busy the machine was; and bucketed batches regroup it
    turns = bench.interleave(methods, methods[0].inputs, rounds=o.rounds, min_seconds=o.seconds,
                             min_calls=o.min_iters, cover=len(methods[0].inputs), warmup=o.warmup,
                             warmup_seconds=o.warmup_seconds, meter=meter,
                             stopwatch=energy.Stopwatch(run.device), progress=lambda r: bar.update())
    bar.close()
    summary = summarise_rounds(turns)
    for name, f in summary.figures.items():
        rows[name].update(f, busy=summary.busy)
    return rows, summary


def compiled_method(p: Prepared, inputs: list) -> tuple[Optional[bench.Method], dict]:
    """The configuration under torch.compile (vwt.compiling), and its row's compile fields. Its tower
    is a shallow copy of the measured one (the same weights) patched once with the configuration's
    reducers, so the compiled code never sees the patching that every eager turn does. Its first
    calls, on every batch, compile it: timed apart (``compile_s``), with its graphs, graph breaks and
    recompilations counted. A compilation that fails gives no method and a note saying so."""
    tower = copy.copy(p.tower)
    if p.reducers:
        patch(tower, *p.reducers)
    fn = compiling.compiled(tower, dynamic=compiling.dynamic_for(p.reducers))

    def call(x) -> None:
        with torch.inference_mode():
            fn(x)

    try:
        report = compiling.first_calls(call, inputs)
    except Exception as e:  # the compiler's own errors: said in the results, never run eagerly instead
        return None, dict(compiled=True, note=f"did not compile: {type(e).__name__}: {first_line(e, 200)}")
    return bench.Method(p.name + COMPILED, call, inputs=inputs), dict(
        compiled=True, compile_s=report.seconds, graphs=report.graphs, graph_breaks=report.graph_breaks,
        recompiles=report.recompiles, recompile_limit_hits=report.limit_hits, note=report.note)


def compiled_variants(preps: list[Prepared], eager: list[bench.Method], rows: dict) -> list[bench.Method]:
    """--compile: the compiled variant of every runnable configuration (``eager``: their methods, in
    the same order, base first), on the same batches; each row takes the eager row's tokens and FLOPs.
    Without a compiled base no compiled variant is timed (no base to compare with): the rows say so."""
    out = []
    for p, m in zip(preps, eager):
        rows[p.name]["compiled"] = False
        method, fields = compiled_method(p, m.inputs)
        same = {k: rows[p.name][k] for k in ("tokens_in", "tokens_mean", "gflops_per_image", "flops_ratio", "dtype",
                                             "bucket")}
        rows[p.name + COMPILED] = dict(same, **fields)
        if method is not None and (out or p.name == "base"):
            out.append(method)
        elif method is not None:
            rows[p.name + COMPILED]["note"] = "not timed: the base did not compile, so there is no compiled base"
    return out


def summarise_rounds(turns: dict) -> bench.Summary:
    """The rounds' figures: eager configurations against the eager base, compiled variants against
    the compiled base, and each compiled variant's speed-up to the eager base (the compiled base's:
    what compiling alone gives); the busy flag from both."""
    eager = {k: v for k, v in turns.items() if not k.endswith(COMPILED)}
    summary = bench.summarise(eager, base="base")
    done = {k: v for k, v in turns.items() if k.endswith(COMPILED)}
    if not done:
        return summary
    other = bench.summarise(done, base="base" + COMPILED)
    for name, ts in done.items():
        other.figures[name]["speedup_vs_eager_base"] = bench.quartiles(bench.speedups(ts, turns["base"]))[1]
    return bench.Summary({**summary.figures, **other.figures}, summary.reasons + other.reasons, summary.rounds,
                         summary.judged)


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
    o = run.spec.options
    groups = sorted({r["group"] for r in ds.records if r.get("group") is not None})
    out = {f"{k}_paper{suffix}": math.nan for k in ("time_ms", "power_w") for suffix in [""] + [f"_group{g}" for g in groups]}
    if len(ds) < b:  # its loader would time one smaller batch under this batch size's name
        return dict(out, note=f"{efficiency_view.PAPER_NOT_RUN} {b}: its data set ({len(ds)} images) does not fill "
                              f"one batch (--full, or --limit {b} or more)")
    power, reason = bench.paper_power_reader(run.meter) if o.metric in ("watt", "all") else (None, "")
    loader = lambda: datasets.batches(ds, b)  # noqa: E731
    dtype = float_dtype(p.tower)
    p.enter()
    try:
        runs = bench.paper_runs(p.call, loader, run.device, dtype, tuple(run.images.shape[1:]),
                                energy.Stopwatch(run.device), power, warmup=o.paper_warmup,
                                measure_time=o.metric in ("time", "all"))
    finally:
        p.leave()
    for key, per_batch in runs.items():
        mean, by_group = bench.paper_means(per_batch)
        out[f"{key}_paper"] = mean
        out.update({f"{key}_paper_group{g}": v for g, v in by_group.items()})
    if reason:
        out["note"] = reason
    return out


def paper_runs(spec: RunSpec) -> bool:
    """Whether the run also times the paper's way (its protocol's measurement, and --paper-runs)."""
    return spec.protocol.paper_measurement and spec.options.paper_runs


def measure(preps: list[Prepared], run: Run, common: dict) -> tuple[list[dict], dict]:
    """Every configuration at every --batch: rows in (configuration, batch) order, and per batch size
    the rounds' one-line verdict and every reason they gave for calling the machine busy."""
    spec, by_batch, verdicts = run.spec, {}, {}
    for b in batch_sizes(spec):
        rows, summary = measure_batch_size(preps, b, run)
        verdicts[b] = dict(line=f"batch {b}: {summary.line()}", busy=summary.busy, reasons=summary.reasons)
        if paper_runs(spec):
            for p in preps:
                if not p.skip:
                    rows[p.name].update(paper_fields(p, b, run))
        by_batch[b] = rows
    out = []
    for suffix in ("", COMPILED):  # the eager configurations, then (--compile) their compiled variants
        for p in preps:
            out += [_row(p, suffix, b, by_batch[b], common, run) for b in batch_sizes(spec)
                    if p.name + suffix in by_batch[b]]
    return out, verdicts


def _row(p: Prepared, suffix: str, b: int, rows: dict, common: dict, run: Run) -> dict:
    """One row of the table: configuration ``p`` (compiled where ``suffix`` says) at batch ``b``."""
    row = dict(common, method=p.name + suffix, config=p.label + (", torch.compile" if suffix else ""), batch=b, note="")
    row.update(rows[p.name + suffix])
    notes = [row["note"]] if row["note"] else []
    if not p.skip and run.spec.options.metric != "time" and not run.meter.measurable:
        notes.insert(0, run.meter.note)
    row["note"] = "; ".join(notes)
    return row


def table(rows: list[dict]):
    """The results as a DataFrame: the standard columns, then any per-group columns of the paper."""
    import pandas as pd

    present = [c for c in COMPILE_COLUMNS if any(c in r for r in rows)]
    extra = sorted({k for r in rows for k in r if k not in COLUMNS and k not in COMPILE_COLUMNS})
    return pd.DataFrame(rows).reindex(columns=COLUMNS + present + extra)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def stem(spec: RunSpec, model: str, configs: list[Config], config: dict) -> str:
    """``eff__<data>__<model>__<methods>__<hash of the whole configuration>``: runs that differ in
    anything (dtype, vocabulary file, protocol, batch, limit, weights, --bucket, ...) never share a name
    (--bucket changes only the order of other scripts' work, but what eff.py times)."""
    timing = [k for k in results.NOT_CONFIG if k != "bucket"]
    return results.run_stem(["eff", spec.data, model, "-".join(c.name for c in configs)], config, ignore=timing)


def run_config(spec: RunSpec, device, weights: str, threads: int, vocab_file) -> dict:
    """The configuration a run records (the JSON's ``args``) and is named by: every setting by its
    command-line name (``results.config_of``), and what the run settled: the device, the weights
    (pretrained or random), the torch threads and the vocabulary file."""
    return dict(results.config_of(spec), device=str(device), weights=weights, threads=threads,
                vocabulary_file=str(vocab_file) if vocab_file else None)


def write(df, meta: dict, out: Path, name: str) -> list[Path]:
    """CSV, JSON (configuration, machine, busy verdicts, every row) and PNG (vwt.efficiency_view: drawn
    from the table alone), each written atomically. Only a run of the very same configuration has the
    same name: replacing its files is said aloud."""
    if (out / f"{name}.csv").exists():
        print(f"replacing the results of an earlier run of the same configuration: {out / name}.*")
    csv = results.atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    js = results.write_json(out / f"{name}.json", dict(meta, results=df.to_dict(orient="records")))
    return [csv, js, efficiency_view.save(df, out / f"{name}.png")]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What the configurations run on: the rounds' images (the first seed's split, the model's
    preprocessing), the paper's data sets by seed (None without the paper's measurement) and the
    inter-image vocabularies by seed ({seed: (vocabulary, short name, file)}; empty without inter)."""

    images: torch.Tensor
    seeds: list
    paper_data: Optional[dict]
    vocabs: dict

    @property
    def vocab(self) -> tuple:
        """The rounds' vocabulary, its short name and file (the first seed's); (None, "", None) without."""
        return self.vocabs[self.seeds[0]] if self.vocabs else (None, "", None)


def run(spec: RunSpec, loaded: Optional[Loaded] = None, *, started: Optional[float] = None):
    """Measure every configuration the run asks for at every batch size, write the results files
    (CSV, JSON, PNG under ``spec.out``) and return the table (a DataFrame). ``loaded`` replaces
    ``spec.model`` (tests pass a tiny model); ``started``: the ``time.perf_counter()`` the run counts
    its seconds from (eff.py passes its own start, so the imports count). What eff.py prints below the
    table is in ``table.attrs["report"]`` (see :func:`report_of`)."""
    started = time.perf_counter() if started is None else started
    spec = spec.with_options(Measurement)
    check_numbers(spec)
    configs, s = plan(spec), settings(spec)
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    results.writable_dir(spec.out)  # an unwritable --out fails now, not after the measurements
    loaded, weights = _model(spec, loaded, device, dtype)
    inputs = _inputs(spec, s, configs, loaded, device, dtype)
    meter = (energy.best_meter(device, spec.options.interval) if spec.options.metric != "time"
             else energy.NullMeter("--metric time"))
    info = meter.info()
    _announce(spec, loaded, weights, device, inputs, meter)
    vocab, vocab_name, vocab_file = inputs.vocab
    measuring = Run(spec, device, meter, inputs.images, flops.dense_flops(flops.dims_of(loaded.vision)),
                    inputs.paper_data, {seed: v[0] for seed, v in inputs.vocabs.items()})
    threads = bench.measuring_threads(spec.options.threads, device)
    kind = "pretrained" if weights == "pretrained" else "random"
    common = dict(model=loaded.name, weights=kind, device=str(device), dtype=spec.dtype, data=spec.data,
                  protocol=spec.protocol.name)
    preps = prepare(configs, spec, s, loaded.vision, vocab, vocab_name)  # reducers; int8 on first use
    _say_measuring(spec, len(configs), threads, started, vocab)
    measured = dict(_measure(preps, measuring, common, threads), meter=info)

    config = run_config(spec, device, kind, threads, vocab_file)
    name = stem(spec, loaded.name, configs, config)
    wall = time.perf_counter() - started
    df, meta = measured["table"], _meta(config, weights, s, inputs, measured, wall)
    paths = write(df, meta, spec.out, name)
    df.attrs["report"] = report_of(spec, weights, meter, measured["verdicts"], paths, wall)
    return df


def _model(spec: RunSpec, loaded: Optional[Loaded], device, dtype) -> tuple[Loaded, str]:
    """The model to measure (``loaded`` where given, moved to the device and dtype) and which weights."""
    if loaded is None:
        return load(spec, device, dtype)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded, "pretrained" if loaded.pretrained else "random"


def _inputs(spec: RunSpec, s: dict, configs: list[Config], loaded: Loaded, device, dtype) -> Inputs:
    """The images and vocabularies the run measures with: the paper's data side (each seed's split and
    vocabulary) and the rounds' images (the first seed's). Missing images fail before the vocabularies;
    a vocabulary that does not fit the model fails before any measurement."""
    vision, preprocess = loaded.vision, datasets.preprocess_for(loaded.model)
    limit = spec.limit if spec.limit is not None or spec.data == "samples" else 64
    seeds = paper_seeds(spec)
    paper_data = paper_datasets(spec, preprocess) if seeds != [None] else None
    rounds = dataset(spec, preprocess, limit, seeds[0])
    datasets.check_images(rounds, *(paper_data or {}).values())  # before any image is read or measured
    images = load_images(rounds)
    vocabs = ({seed: vocabulary(spec, s, images, vision, preprocess, seed) for seed in seeds}
              if any(c.input == "inter" for c in configs) else {})
    inputs = Inputs(images, seeds, paper_data, vocabs)
    if inputs.vocab[0] is not None:  # every seed's vocabulary, as every script checks one
        check_input_reducers(vision, [InterImage(v[0]) for v in vocabs.values()], images.shape[-1], device, dtype,
                             preprocess=preprocess)
    return inputs


def briefly(weights: str) -> str:
    """The weights as the lines after the model's load name them: why they are random is said once, in
    the load's note (the results JSON keeps it whole)."""
    kind, said, _ = weights.partition(":")
    return f"{kind} (the note at the start says why)" if said else weights


def _announce(spec: RunSpec, loaded: Loaded, weights: str, device, inputs: Inputs, meter: energy.Meter) -> None:
    """The lines that say what is measured: model, weights, device, data, protocol, the energy meter and
    the paper's data side."""
    print(f"model {loaded.name} ({loaded.family}), weights: {briefly(weights)}; device {device}, {spec.dtype}; "
          f"data {spec.data} ({inputs.images.shape[0]} images); protocol {spec.protocol.name}")
    print(f"energy: {meter.note}")
    seeds, paper_data, vocabs = inputs.seeds, inputs.paper_data, inputs.vocabs
    if paper_data is not None and seeds != [0]:
        print(f"the paper's measurement: seeds {' '.join(map(str, seeds))}, each on its own {spec.data} split "
              f"({', '.join(str(len(d)) for d in paper_data.values())} images)"
              + (f" and vocabulary ({', '.join(str(v[2]) for v in vocabs.values())})" if vocabs else "")
              + f"; the rounds run seed {seeds[0]}'s")


def _say_measuring(spec: RunSpec, configs: int, threads: int, started: float, vocab) -> None:
    """The line that starts the measurements: what, how, and the seconds since the run started (less
    the vocabulary's first-use learning, which the line gives apart, as the hub check)."""
    learning = vocab.meta.get("learned_in_s", 0.0) if vocab is not None else 0.0
    print(f"measuring {configs} configurations at batch {', '.join(map(str, batch_sizes(spec)))} in "
          f"{spec.options.rounds} interleaved rounds with {threads} torch thread{'s' * (threads != 1)} "
          f"({time.perf_counter() - started - learning:.1f} s after start, of which "
          f"{models.HUB_CHECK['seconds']:.1f} s asking the hub, not counting {learning:.1f} s of vocabulary "
          "learning)", flush=True)


def _measure(preps: list[Prepared], measuring: Run, common: dict, threads: int) -> dict:
    """Every configuration measured on ``threads`` torch threads (:func:`measure`), glibc's malloc held
    steady (:func:`vwt.bench.steady_allocator`): the table, the rounds' verdicts, the meter's state
    after, and the environment measured in (the allocator with it). The meter is closed."""
    meter, allocator = measuring.meter, bench.steady_allocator()
    try:
        with bench.torch_threads(threads):
            rows, verdicts = measure(preps, measuring, common)
            env = dict(environment(measuring.device), allocator=allocator)  # torch_threads: the count measured with
    finally:
        info_end = meter.info()  # clocks and temperature after the runs
        meter.close()
    return dict(table=table(rows), verdicts=verdicts, meter_after=info_end, environment=env)


def _meta(config: dict, weights: str, s: dict, inputs: Inputs, measured: dict, wall: float) -> dict:
    """What the results JSON records beside the rows: the configuration (``args``), weights, settings,
    vocabularies, the paper's seeds and images, the busy verdicts, the meter and the environment."""
    paper_data, vocabs, df = inputs.paper_data, inputs.vocabs, measured["table"]
    return {"script": "eff.py", "args": config, "weights": weights, "settings": s,
            "vocabulary": inputs.vocab[1] or None,
            "paper_seeds": None if paper_data is None else list(paper_data),
            "paper_images": None if paper_data is None else {str(k): len(d) for k, d in paper_data.items()},
            "paper_vocabularies": {str(k): str(v[2]) for k, v in vocabs.items()} if paper_data is not None else None,
            "busy": bool(df["busy"].fillna(False).any()), "rounds_verdict": measured["verdicts"],
            "meter": measured["meter"], "meter_after": measured["meter_after"],
            "environment": measured["environment"], "wall_seconds": wall}


def report_of(spec: RunSpec, weights: str, meter: energy.Meter, verdicts: dict, paths: list, wall: float) -> dict:
    """What eff.py prints below the table, as plain data: why the energy columns are empty (None where
    measured), why the paper's power figure is (None where it is read or not asked for), whether the
    paper's own runs were left out (--no-paper-runs: the quick default; None where they ran), the rounds'
    verdict per batch size, the weights, the files written and the run's seconds."""
    reason = bench.paper_power_reader(meter)[1]
    asked = paper_runs(spec) and spec.options.metric in ("watt", "all")
    left_out = spec.protocol.paper_measurement and not spec.options.paper_runs
    return dict(energy_note=None if meter.measurable else meter.note, power_note=reason if asked and reason else None,
                paper_runs_note=efficiency_view.PAPER_RUNS_LEFT_OUT if left_out else None,
                verdicts=[v["line"] for v in verdicts.values()], weights=briefly(weights), files=[str(p) for p in paths],
                wall_seconds=wall)
