"""BLIP captioning as blip.py runs it, usable from Python without a command line: :func:`run` takes
a ``vwt.spec.RunSpec`` whose ``options`` are a :class:`Decoding`. Here: the decoding settings each
protocol leaves (:func:`caption_settings`), the run's file names, the captions file (its configuration
header, resume and restart), the beam-search captions of a batch and the one loop over the images
(:func:`caption_images`), the references, the paper's predictions.json, the scores and the report.

    from vwt.spec import RunSpec
    from vwt import captioning
    result = captioning.run(RunSpec(model="Salesforce/blip-image-captioning-base", data="coco",
                                    batch=16, options=captioning.Decoding()))
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import compiling, datasets, distributed, methods, metrics, results, runtime
from .batching import batch_order
from .errors import UserError, first_line
from .methods import method_name
from .models import DEFAULT_BLIP, Loaded, load_model
from .patch import describe_tokens, patch, stats, unpatch
from .spec import RunSpec
from .vocab_files import vocab_path


def data_names() -> tuple:
    """The data sets blip.py captions: the data-set table's rows of task "captions"."""
    return datasets.names("captions")


HEADLINE = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


@dataclass(frozen=True)
class Decoding:
    """blip.py's own settings, named as its flags (so a run's recorded configuration, and the names
    and hashes of its files, are the command line's): the beam search (``max_length`` and ``prompt``
    None: the protocol's, see :func:`caption_settings`), the seed of the random ablations, and what a
    run does (``restart``: caption this configuration over; ``no_score``: captions only; ``summary``:
    gather the results files instead); ``compile``: the patched vision model under torch.compile
    (:func:`vwt.compiling.compiled_module`; ``generate`` and the text decoder stay eager)."""

    beams: int = 3
    max_length: Optional[int] = None
    min_length: int = 5
    penalty: float = 1.0
    prompt: Optional[str] = None
    seed: int = 0
    restart: bool = False
    no_score: bool = False
    summary: bool = False
    compile: bool = False


def caption_settings(spec: RunSpec) -> RunSpec:
    """``spec`` with the decoding settings left to the protocol filled in (a new spec; already filled
    ones stay): the prompt (none under paper: the paper's ``utils/dec.py`` calls ``generate`` without
    input ids, so decoding starts from BOS; 'a picture of ' under standard) and the max length (20, or
    40 with a length penalty above 1, as the paper's). A spec without options gets :class:`Decoding`'s."""
    spec = spec.with_options(Decoding)
    opts = spec.options
    _, _, max_length, penalised = spec.protocol.caption_lengths  # (beams, min length: the flags default to the same)
    changes = {}
    if opts.prompt is None:
        changes["prompt"] = spec.protocol.caption_prompt
    if opts.max_length is None:
        changes["max_length"] = penalised if opts.penalty > 1 else max_length
    return spec.replace(**changes) if changes else spec


def folder(spec: RunSpec) -> Path:
    """Where a run's files go: <out>/blip."""
    return Path(spec.out) / "blip"


def run_name(spec: RunSpec, model_name: str, limit: bool = True) -> str:
    """The file name of a run, <data>__<model>__<method>[__seed<N>][__first<N>]__<hash>. The captions
    file (``limit=False``) hashes what the captions depend on (:func:`run_config`, the header it must
    match) and leaves out --limit, so a limited run's captions are reused by the whole run; the results
    file hashes the whole configuration. Two different configurations never share a file."""
    split = f"-{spec.split}" if spec.split else ""
    seed = f"seed{spec.options.seed}" if spec.method.random else ""
    first = f"first{spec.limit}" if spec.limit and limit else ""
    config = {**results.config_of(spec), "model": model_name} if limit else run_config(spec, model_name)
    return results.run_stem([f"{spec.data}{split}", results.model_label(model_name), method_name(spec), seed, first],
                            config)


def captions_path(spec: RunSpec, model_name: str) -> Path:
    """The captions file of a run: <out>/blip/<run>.captions.jsonl (``--limit`` left out of <run>)."""
    return folder(spec) / f"{run_name(spec, model_name, limit=False)}.captions.jsonl"


def results_path(spec: RunSpec, model_name: str) -> Path:
    """The results file of a run: <out>/blip/<run>.json."""
    return folder(spec) / f"{run_name(spec, model_name)}.json"


def run_config(spec: RunSpec, model_name: str) -> dict:
    """The settings the captions depend on, which name the captions file (:func:`run_name`); its keys
    and values stay as they are, so captions files written before keep their names. The file's header
    adds the data root (:func:`captions_header`)."""
    keys = ("data", "split", "beams", "max_length", "min_length", "penalty", "prompt", "protocol", "dtype", "top_k",
            "vocab", "vocab_path", "vocab_data", "imgnet", "thresh", "random", "prop_attn", "tome", "evit", "lgtm",
            "quant")  # the order of the header's keys; a method row added later is appended
    keys += tuple(m.dest for m in methods.rows() if m.dest not in keys)
    every = spec.replace(names=()).config()  # every setting, whatever the command line named
    cfg = results.config_of({k: every.get(k) for k in keys})
    vocab_file = vocab_path(spec)  # the file --vocab resolves to (in-domain or ImageNet's)
    cfg.update(model=model_name, method=method_name(spec), seed=spec.options.seed if spec.method.random else None,
               vocab_file=None if vocab_file is None else str(vocab_file))
    return cfg


IMAGE_KEYS = ("data_root",)  # what a captions header records of the images, besides data and split


def file_facts(path, root) -> Optional[list]:
    """What a caption records of its image file, to tell whether the file changed since: its path under
    the data root ``root``, its size and its modification time (whole seconds); None where it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [os.path.relpath(path, root), st.st_size, int(st.st_mtime)]


def captions_header(spec: RunSpec, model_name: str) -> dict:
    """The captions file's first line, which a resumed run must match: :func:`run_config` and the data
    root, resolved (captions of the images under another root are never reused; each caption also
    records its image file, :func:`file_facts`, see :func:`changed_since`)."""
    return {**run_config(spec, model_name), "data_root": str(Path(spec.root).resolve())}


def changed_since(spec: RunSpec, ds, done: dict) -> set:
    """The images of ``ds`` whose caption in ``done`` was made from a file that has changed since (other
    size, time or path): they are captioned again. Captions written before captions recorded their
    file (no "file") are taken as they are."""
    return {r["image_id"] for r in ds.records if r["image_id"] in done and "file" in done[r["image_id"]]
            and done[r["image_id"]]["file"] != file_facts(r["path"], spec.root)}


def _differences(header: dict, config: dict) -> str:
    """How a captions file's header differs from this run's, as the refusals say it (the data root is
    not counted where a header written before did not record it: its other settings differ)."""
    said = []
    for k in sorted(k for k in set(header) | set(config) if header.get(k) != config.get(k)):
        if k in IMAGE_KEYS and k not in header:
            continue
        if k == "data_root":
            said.append(f"data_root: its captions are of the images under {header.get(k)}, this run's are under "
                        f"{config.get(k)}")
        else:
            said.append(k)
    return ", ".join(said)


def adopt_old_header(path: Path, config: dict) -> None:
    """A captions file written before headers recorded the data root whose other settings are this
    run's is taken to hold captions of the images under this run's root: its header is rewritten
    (atomically, captions kept byte for byte) to record it, with a note, so that it resumes now and a
    run on another root is refused from then on. Any other file is left as it is."""
    if not path.exists():
        return
    header = read_header(path)
    old = {k: v for k, v in config.items() if k not in IMAGE_KEYS}
    if header is None or header != old:
        return
    body = path.read_bytes().split(b"\n", 1)[1]
    try:  # read back at once: rewritten in place or not at all, never a copy elsewhere
        results.atomic_write(path, lambda f: f.write(json.dumps({"config": config}).encode() + b"\n" + body), rescue=False)
    except OSError as e:
        raise UserError(f"cannot record the data root in {path} ({first_line(e)}); free some space and rerun") from None
    print(f"note: {path} was written before captions files recorded their data root; its captions are taken to "
          f"be of the images under {config['data_root']}, and its header now records it", file=sys.stderr)


def _move_aside(path: Path) -> str:
    return f"mv {path} {path.with_name(path.name + '.old')}"


def read_header(path: Path):
    """The configuration on the captions file's first line; None for an empty file. A first line that
    is not a whole configuration header means the file cannot be trusted: one-line UserError."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first:
        return None
    try:
        item = json.loads(first)
    except ValueError:
        item = None
    if not first.endswith(b"\n") or not isinstance(item, dict) or set(item) != {"config"} \
            or not isinstance(item["config"], dict):
        raise UserError(f"cannot resume {path}: its first line is not a whole configuration header (damaged or not "
                        f"a captions file); move it aside with: {_move_aside(path)}")
    return item["config"]


def read_captions(path: Path, config: dict) -> dict:
    """{image_id: line} of the captions already made for ``config``. The header must equal ``config``
    exactly; a line cut short by a stopped run is skipped (that image is captioned again); any other
    line that is not a caption means the file is damaged (one-line UserError, never a silent reuse)."""
    if not path.exists():
        return {}
    header = read_header(path)
    if header is None:
        return {}
    if header != config:
        raise UserError(f"cannot resume {path}: it holds captions of another configuration (differs in "
                        f"{_differences(header, config)}); move it aside with: {_move_aside(path)}")
    done = {}
    for n, line in enumerate(path.read_bytes().splitlines()[1:], 2):
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short when a run was killed
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise UserError(f"cannot resume {path}: line {n} is not a caption; move it aside with: {_move_aside(path)}")
        done[item["image_id"]] = item
    return done


def restart(path: Path, config: dict) -> None:
    """--restart: delete this configuration's captions file, and only that: a file whose header names
    another configuration, or that is damaged, is left alone with a one-line error."""
    if not path.exists():
        return
    header = read_header(path)
    if header is not None and header != config:
        raise UserError(f"--restart: {path} holds captions of another configuration, not this one's; it was left "
                        f"alone; move it aside with: {_move_aside(path)}")
    path.unlink()


class CaptionWriter:
    """Appends one JSON line per caption; each batch goes to the file whole or not at all
    (vwt.results.append_whole: a full disk or an interrupt mid-write cuts the file back) and is synced,
    so a stopped run loses at most a batch and never leaves a torn line. A torn last line that an older
    version left is cut off on opening (its image is captioned again)."""

    def __init__(self, path: Path, config: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_bytes() if path.exists() else b""
        self.f = open(path, "ab", buffering=0)
        self.pending: list[str] = []
        whole = old.rfind(b"\n") + 1  # bytes of whole lines
        if whole < len(old):
            os.ftruncate(self.f.fileno(), whole)
        if whole == 0:
            self.write({"config": config})
        self.flush()

    def write(self, item: dict) -> None:
        self.pending.append(json.dumps(item))

    def flush(self) -> None:
        if self.pending:
            results.append_whole(self.f, ("\n".join(self.pending) + "\n").encode())
            self.pending = []

    def close(self) -> None:
        self.f.close()


def text_tokenizer(loaded):
    """The text tokenizer that decodes captions (a one-line error where the model has none)."""
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.name}: no tokenizer could be loaded to decode captions")
    return getattr(loaded.tokenizer, "tokenizer", loaded.tokenizer)


def caption_batch(spec: RunSpec, loaded, pixels: torch.Tensor, prompt_ids) -> list[str]:
    """Beam-search captions of a batch, the prompt cut off as BLIP does, decoded as the protocol says
    (paper: spaces cleaned up, "a man's hand", as transformers 4.28.1 did by default)."""
    tok, opts = text_tokenizer(loaded), spec.options
    kw = dict(num_beams=opts.beams, max_length=opts.max_length, min_length=opts.min_length,
              length_penalty=opts.penalty, do_sample=False)
    with torch.inference_mode():
        if prompt_ids is not None:
            ids = loaded.model.generate(pixel_values=pixels, input_ids=prompt_ids.expand(len(pixels), -1).clone(), **kw)
        else:
            ids = loaded.model.generate(pixel_values=pixels, **kw)
    cleanup = spec.protocol.caption_cleanup  # None: the installed tokenizer's own default
    texts = tok.batch_decode(ids, skip_special_tokens=True,
                             **({} if cleanup is None else {"clean_up_tokenization_spaces": cleanup}))
    prompt = opts.prompt.strip().lower()
    out = []
    for t in texts:
        t = t.strip()
        if prompt and t.lower().startswith(prompt):
            t = t[len(prompt):].strip()
        out.append(t)
    return out


def caption_images(spec: RunSpec, loaded, todo, path: Path, config: dict, device, dtype) -> None:
    """The one loop over the images: caption the images of ``todo`` (``loaded``: a BLIP
    ``vwt.models.Loaded``), appending each to the captions file as it is made, with its token statistics."""
    prompt_ids = None
    if spec.options.prompt:
        prompt_ids = text_tokenizer(loaded)(spec.options.prompt, return_tensors="pt")["input_ids"].to(device)
    writer = CaptionWriter(path, config) if distributed.is_main() else None  # torchrun: rank 0 writes them all
    try:
        order = batch_order(spec, loaded, todo, device, dtype)  # --bucket: neighbours in token count
        mine = distributed.shard(order)  # torchrun: batch b on rank b % processes, one round at a time
        bar = tqdm(distributed.lockstep(datasets.batches(todo, spec.batch, spec.workers, mine), len(order)),
                   total=distributed.steps(len(order)), desc=f"{spec.data} captions", file=sys.stderr,
                   disable=not distributed.is_main())
        for batch in bar:
            lines = caption_lines(spec, loaded, batch, prompt_ids, device, dtype) if batch is not None else []
            for part in distributed.gather(lines) or []:  # the round's batches in one-process order
                for line in part:
                    writer.write(line)
            if writer is not None:
                writer.flush()
    finally:
        if writer is not None:
            writer.close()


def caption_lines(spec: RunSpec, loaded, batch, prompt_ids, device, dtype) -> list[dict]:
    """The captions file's records of one batch: image id, caption, token statistics and the image file
    it was made from (:func:`file_facts`)."""
    pixels, recs = batch
    texts = caption_batch(spec, loaded, pixels.to(device, dtype), prompt_ids)
    st = stats(loaded.model)
    return [{"image_id": rec["image_id"], "caption": text,
             **{k: float(st[k][i]) for k in ("tokens_first_block", "tokens_mean")},
             "file": file_facts(rec["path"], spec.root)}
            for i, (rec, text) in enumerate(zip(recs, texts))]


def refs_source(spec: RunSpec) -> str:
    """Where the references come from: BLIP's coco_karpathy_<split>_gt.json under paper where present
    (the file the paper scores against), else the data set's own captions."""
    if spec.protocol.coco_blip_references and spec.data == "coco":
        if datasets.coco_gt_references(spec.root, spec.split or "test") is not None:
            return f"coco_karpathy_{spec.split or 'test'}_gt.json"
    return "data set captions"


def references(spec: RunSpec, ds) -> dict:
    """{image_id: reference captions} of the evaluated images (see :func:`refs_source`)."""
    own = {r["image_id"]: r["captions"] for r in ds.records}
    if refs_source(spec) == "data set captions":
        return own
    gt = datasets.coco_gt_references(spec.root, spec.split or "test")
    missing = [i for i in own if i not in gt]
    if missing:
        raise UserError(f"coco: image {missing[0]} has no reference in coco_karpathy_{spec.split or 'test'}_gt.json; "
                        "use the file of the same split as the captions (or --protocol standard)")
    return {i: gt[i] for i in own}


def references_file(spec: RunSpec, ds) -> Path:
    """The file the references of :func:`references` are read from (for errors that name it)."""
    if refs_source(spec) == "data set captions":
        return ds.source or Path(spec.root)
    return datasets.coco_gt_path(spec.root, spec.split or "test")


def check_scoring(spec: RunSpec, ds) -> None:
    """Before the model loads and any image is captioned, what scoring the captions of ``ds`` needs:
    the caption metrics' tools (Java) and a reference caption, as text, for every image (one-line
    UserErrors naming the file and the image). Nothing with --no-score, which never scores."""
    if spec.options.no_score:
        return
    try:
        metrics.check_caption_tools()
    except UserError as e:
        raise UserError(f"{e} (or caption now with --no-score, and score later where it is installed)") from None
    datasets.check_references(spec.data, references_file(spec, ds), references(spec, ds))


def write_predictions(path: Path, ds, captions: dict) -> Path:
    """The captions as the paper's (and the NoCaps EvalAI server's) predictions.json: a list of
    {"image_id", "caption"}, one per image in data order."""
    items = [{"image_id": r["image_id"], "caption": captions[r["image_id"]]} for r in ds.records]
    results.atomic_write_text(path, json.dumps(items))
    return path


def check_lengths(spec: RunSpec, loaded) -> None:
    """A finite --penalty, --min-length within [0, --max-length], and --max-length within what the text
    decoder holds and above the tokens decoding starts from ([BOS], or the prompt without its [SEP]), so a
    caption has room (``loaded`` None: the first checks only, before the model loads)."""
    opts = spec.options
    if not math.isfinite(opts.penalty):  # NaN would also never equal itself in the captions file's header
        raise UserError(f"--penalty must be a finite number; got {opts.penalty}")
    if not 0 <= opts.min_length <= opts.max_length:
        raise UserError(f"--min-length must be between 0 and --max-length ({opts.max_length}); got {opts.min_length}")
    if loaded is None:
        return
    positions = getattr(getattr(loaded.model.config, "text_config", None), "max_position_embeddings", None)
    if positions is not None and opts.max_length > positions:
        raise UserError(f"--max-length {opts.max_length} is beyond what {loaded.name}'s text decoder can hold "
                        f"({positions} tokens); pass at most {positions}")
    if loaded.tokenizer is None:
        return
    start = len(text_tokenizer(loaded)(opts.prompt)["input_ids"]) - 1 if opts.prompt else 1  # BLIP's generate
    if opts.max_length <= start:  # drops the prompt's closing [SEP]; no prompt: [BOS] alone
        what = f"the {start} tokens of [BOS] and --prompt {opts.prompt!r}" if opts.prompt else "the [BOS] token"
        raise UserError(f"--max-length {opts.max_length} leaves no room for a caption: decoding starts from {what}; "
                        f"pass --max-length {start + 1} or more" + (", or a shorter --prompt" if opts.prompt else ""))


def score_captions(spec: RunSpec, ds, done: dict, predictions_path: Path) -> dict:
    """Score the captions ``done`` ({image_id: captions-file line}) of every image of ``ds``: writes
    the predictions.json first; returns its path, the scores, CIDEr per NoCaps domain, the token
    statistics averaged over the images and the table's summary (in percent)."""
    lines = [done[r["image_id"]] for r in ds.records]
    refs = references(spec, ds)
    cands = {r["image_id"]: done[r["image_id"]]["caption"] for r in ds.records}
    predictions = write_predictions(predictions_path, ds, cands)
    scores = metrics.caption_scores(refs, cands)
    domains = {}
    if spec.data == "nocaps":
        for d in sorted({r["domain"] for r in ds.records if r.get("domain")}):
            ids = [r["image_id"] for r in ds.records if r["domain"] == d]
            domains[d] = metrics.caption_scores({i: refs[i] for i in ids}, {i: cands[i] for i in ids}, which=("CIDEr",))
    tokens = {"tokens_first_block": float(np.mean([l["tokens_first_block"] for l in lines])),
              "tokens_mean": float(np.mean([l["tokens_mean"] for l in lines]))}
    summary = {m: (None if scores.get(m) is None else 100 * scores[m]) for m in HEADLINE}
    summary.update({f"CIDEr {d}": 100 * s["CIDEr"] for d, s in domains.items()})
    summary["tokens"] = tokens["tokens_first_block"]
    return dict(predictions=predictions, scores=scores, domains=domains, tokens=tokens, summary=summary)


def report(result: dict) -> str:
    """The results as blip.py prints them."""
    lines = [f"{result['data']}  {result['model']}  {result['method']}  ({result['images']} images)"]
    for m in metrics.CAPTION_METRICS:
        v = result["metrics"].get(m)
        lines.append(f"  {m:<8} {'n/a' if v is None else f'{100 * v:6.2f}'}")
    if result["metrics"].get("SPICE_note"):
        lines.append(f"  ({result['metrics']['SPICE_note']})")
    for d, s in result["domains"].items():
        lines.append(f"  CIDEr {d}: {100 * s['CIDEr']:.2f}")
    lines.append("  " + describe_tokens(result["tokens_first_block"], result["tokens_mean"]))
    if result.get("compile"):
        lines.extend("  " + line for line in compiling.describe(result["compile"]))
    if result.get("note"):
        lines.append(f"  {result['note']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The run: what blip.py does after reading its command line
# --------------------------------------------------------------------------------------------------
def summarise(spec: RunSpec) -> None:
    """--summary: gather the results files under <out>/blip into summary.md and summary.csv."""
    runtime.write_summary(folder(spec), "blip.py")


def load_captioner(spec: RunSpec, loaded: Optional[Loaded], device, dtype) -> Loaded:
    """The BLIP model of the run, on ``device`` in ``dtype``: ``spec.model`` with pretrained weights
    (caption scores of random weights mean nothing), or ``loaded`` (tests only) as it is, random
    weights included. Another family is a one-line UserError."""
    if loaded is None:
        loaded = load_model(spec.model, device, dtype)
        if not loaded.pretrained:
            raise UserError(f"{spec.model} has no pretrained weights: caption scores of random weights mean nothing")
    else:
        loaded.model.to(device=device, dtype=dtype).eval()
    if loaded.family != "hf_blip":
        raise UserError(f"blip.py captions with a Hugging Face BLIP model (e.g. {DEFAULT_BLIP}); "
                        f"{loaded.name} is {loaded.family}")
    return loaded


def caption_missing(spec: RunSpec, loaded: Loaded, ds, reducers: list, path: Path, config: dict, device,
                    dtype) -> tuple[dict, Optional[dict]]:
    """Caption the images of ``ds`` that the captions file ``path`` does not hold yet (all of them after
    --restart), the model patched with ``reducers``; returns {image_id: captions-file line} of every
    captioned image (under torchrun: rank 0's reading; the other ranks get what they read first) and,
    with --compile, what the compiler did (None where nothing was captioned, so nothing compiled)."""
    distributed.from_main(lambda: adopt_old_header(path, config))
    if spec.options.restart:
        distributed.from_main(lambda: restart(path, config))  # torchrun: the captions file is rank 0's alone
    done = distributed.from_main(lambda: read_captions(path, config))
    changed = changed_since(spec, ds, done)
    todo = ds.subset(lambda r: r["image_id"] not in done or r["image_id"] in changed)
    datasets.check_images(todo)  # an image that cannot be opened fails now, not in the middle of the captions
    if distributed.is_main():
        if changed:
            print(f"note: {len(changed)} image file(s) changed since they were captioned (e.g. image "
                  f"{sorted(changed, key=str)[0]}): captioned again", file=sys.stderr)
        print(f"{len(ds) - len(todo)} of {len(ds)} images already captioned in {path}", file=sys.stderr)
    if not len(todo):
        return done, None
    if not loaded.pretrained:
        print("warning: captioning with random weights (test hook)", file=sys.stderr)
    text_tokenizer(loaded)
    if spec.method.quant:
        methods.quantize(loaded.model, spec.protocol, loaded.family)
    runtime.seed_everything(spec.options.seed)
    patch(loaded.model, *reducers)
    try:
        compiled = caption_compiled(spec, loaded, todo, reducers, path, config, device, dtype)
    finally:
        unpatch(loaded.model)
    return read_captions(path, config) if distributed.is_main() else done, compiled


def caption_compiled(spec: RunSpec, loaded: Loaded, todo, reducers: list, path: Path, config: dict, device,
                     dtype) -> Optional[dict]:
    """:func:`caption_images` on the patched model; with --compile its vision model compiled
    (``dynamic`` where an input reducer varies the token count; ``generate`` stays eager) and what
    the compiler did returned (vwt.compiling), else None."""
    if not spec.options.compile:
        return caption_images(spec, loaded, todo, path, config, device, dtype)
    with compiling.compiled_pass(loaded.vision, reducers, "vision model") as record:
        caption_images(spec, loaded, todo, path, config, device, dtype)
    return record


def data_label(spec: RunSpec) -> str:
    """The data a run captioned, as results show it: coco, coco-val (first 8)."""
    return spec.data + (f"-{spec.split}" if spec.split else "") + (f" (first {spec.limit})" if spec.limit else "")


def scored_result(spec: RunSpec, loaded: Loaded, ds, done: dict, path: Path, device, started: float) -> dict:
    """The results of a run: the scores of the captions ``done`` of ``ds`` (the predictions.json is
    written here), what ran, the configuration and the machine."""
    s = score_captions(spec, ds, done, folder(spec) / f"{run_name(spec, loaded.name)}.predictions.json")
    result = {
        "task": "blip", "model": loaded.name, "pretrained": loaded.pretrained, "method": method_name(spec),
        "protocol": spec.protocol.name, "data": data_label(spec),
        "split": spec.split, "images": len(ds), "captions_file": str(path), "predictions_file": str(s["predictions"]),
        "references": refs_source(spec), "metrics": s["scores"], "domains": s["domains"],
        **s["tokens"], "summary": s["summary"],
        "config": results.config_of(spec),
        "environment": runtime.environment(device), "seconds": time.time() - started,
    }
    return result


def run(spec: RunSpec, loaded: Optional[Loaded] = None) -> Optional[dict]:
    """Caption ``spec.data`` with BLIP (``spec.model``, or ``loaded``: an already-loaded model, tests
    only) and the methods of ``spec.method``, resuming the run's captions file, then score the captions
    and write the results file. Returns the results (as saved); None with ``no_score``, ``summary``, and
    on the ranks but the first under torchrun. Bad settings and data fail before the model loads."""
    spec = caption_settings(spec)
    if spec.options.summary:
        return summarise(spec)
    runtime.at_least_one(spec, "batch", "beams", "max_length", "limit")
    check_lengths(spec, None)
    device, dtype = runtime.resolve_device(spec.device), runtime.resolve_dtype(spec.dtype)
    results.writable_dir(folder(spec))
    started = time.time()
    reducers = methods.reducers_for(spec, family="hf_blip")  # bad flags and missing data fail before the model loads
    ds = datasets.load(spec.data, spec.root, None, split=spec.split, limit=spec.limit)
    if len(ds) == 0:
        raise UserError(f"{spec.data}: no images in split {spec.split or 'default'}")
    check_scoring(spec, ds)  # references and Java: found now, not after every image is captioned
    loaded = load_captioner(spec, loaded, device, dtype)
    ds.transform = datasets.preprocess_for(loaded.model)
    check_lengths(spec, loaded)
    full = runtime.check_input_reducers(loaded.vision, reducers, ds.transform.size, device, dtype,
                                        preprocess=ds.transform)
    path, config = captions_path(spec, loaded.name), captions_header(spec, loaded.name)
    with contextlib.ExitStack() as held:  # one run at a time appends to a captions file (rank 0 writes it)
        distributed.from_main(lambda: held.enter_context(results.exclusive(path)) and None)
        done, compiled = caption_missing(spec, loaded, ds, reducers, path, config, device, dtype)
    if not distributed.is_main():  # torchrun: the main process scores and writes
        return None
    if spec.options.no_score:
        print(f"captions: {path} (not scored: run again without --no-score)")
        for line in compiling.describe(compiled) if compiled else []:
            print(line)
        return None
    result = scored_result(spec, loaded, ds, done, path, device, started)
    result["note"] = runtime.nothing_merged_note(reducers, full, result["tokens_first_block"], result["tokens_mean"])
    if spec.options.compile:  # None: every caption was there already, nothing compiled in this run
        result["compile"] = compiled
    runtime.save_json(results_path(spec, loaded.name), result)
    return result
