"""BLIP captioning as blip.py runs it: the decoding settings each protocol leaves, the run's file
names, the captions file (its configuration header, resume and restart), the beam-search captions
of a batch and the one loop over the images (``caption_images``), the references, the paper's
predictions.json, the scores and the report."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import datasets, distributed, methods, metrics, results
from .batching import batch_order
from .errors import UserError
from .methods import method_name
from .patch import describe_tokens, stats
from .protocol import get as get_protocol
from .spec import from_namespace  # TRANSITION
from .vocab_files import vocab_path



def data_names() -> tuple:
    """The data sets blip.py captions: the data-set table's rows of task "captions"."""
    return datasets.names("captions")
HEADLINE = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def caption_settings(args):
    """Fill in the decoding settings left to the protocol: the prompt (none under paper: the paper's
    ``utils/dec.py`` calls ``generate`` without input ids, so decoding starts from BOS; 'a picture of '
    under standard) and the max length (20, or 40 with a length penalty above 1, as the paper's)."""
    protocol = get_protocol(args.protocol)
    _, _, max_length, penalised = protocol.caption_lengths  # (beams, min length: the flags default to the same)
    if args.prompt is None:
        args.prompt = protocol.caption_prompt
    if args.max_length is None:
        args.max_length = penalised if args.penalty > 1 else max_length
    return args


def run_name(args, model_name: str, limit: bool = True) -> str:
    """The file name of a run, <data>__<model>__<method>[__seed<N>][__first<N>]__<hash>. The captions
    file (``limit=False``) hashes what the captions depend on (:func:`run_config`, the header it must
    match) and leaves out --limit, so a limited run's captions are reused by the whole run; the results
    file hashes the whole configuration. Two different configurations never share a file."""
    split = f"-{args.split}" if args.split else ""
    seed = f"seed{args.seed}" if args.random else ""
    first = f"first{args.limit}" if args.limit and limit else ""
    config = {**results.config_of(args), "model": model_name} if limit else run_config(args, model_name)
    return results.run_stem([f"{args.data}{split}", results.model_label(model_name), method_name(args), seed, first],
                            config)


def run_config(args, model_name: str) -> dict:
    """What the captions depend on: a resumed run must match it."""
    keys = ("data", "split", "beams", "max_length", "min_length", "penalty", "prompt", "protocol", "dtype", "top_k",
            "vocab", "vocab_path", "vocab_data", "imgnet", "thresh", "random", "prop_attn", "tome", "evit", "lgtm",
            "quant")  # the order of the header's keys; a method row added later is appended
    keys += tuple(m.dest for m in methods.rows() if m.dest not in keys)
    cfg = results.config_of({k: getattr(args, k, None) for k in keys})
    vocab_file = vocab_path(from_namespace(args))  # the file --vocab resolves to (in-domain or ImageNet's)
    cfg.update(model=model_name, method=method_name(args), seed=args.seed if args.random else None,
               vocab_file=None if vocab_file is None else str(vocab_file))
    return cfg


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
        diff = sorted(k for k in set(header) | set(config) if header.get(k) != config.get(k))
        raise UserError(f"cannot resume {path}: it holds captions of another configuration (differs in "
                        f"{', '.join(diff)}); move it aside with: {_move_aside(path)}")
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
    """Appends one JSON line per caption; each batch goes to the file in one unbuffered write and is
    synced, so a stopped run loses at most a batch and leaves whole lines."""

    def __init__(self, path: Path, config: dict):
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "ab", buffering=0)
        self.pending: list[str] = []
        if fresh:
            self.write({"config": config})
        elif not path.read_bytes().endswith(b"\n"):
            self.pending.append("")  # after a torn line, start a clean one
        self.flush()

    def write(self, item: dict) -> None:
        self.pending.append(json.dumps(item))

    def flush(self) -> None:
        if self.pending:
            self.f.write(("\n".join(self.pending) + "\n").encode())
            self.pending = []
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def text_tokenizer(loaded):
    """The text tokenizer that decodes captions (a one-line error where the model has none)."""
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.name}: no tokenizer could be loaded to decode captions")
    return getattr(loaded.tokenizer, "tokenizer", loaded.tokenizer)


def caption_batch(args, loaded, pixels: torch.Tensor, prompt_ids) -> list[str]:
    """Beam-search captions of a batch, the prompt cut off as BLIP does."""
    tok = text_tokenizer(loaded)
    kw = dict(num_beams=args.beams, max_length=args.max_length, min_length=args.min_length,
              length_penalty=args.penalty, do_sample=False)
    with torch.inference_mode():
        if prompt_ids is not None:
            ids = loaded.model.generate(pixel_values=pixels, input_ids=prompt_ids.expand(len(pixels), -1).clone(), **kw)
        else:
            ids = loaded.model.generate(pixel_values=pixels, **kw)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    prompt = args.prompt.strip().lower()
    out = []
    for t in texts:
        t = t.strip()
        if prompt and t.lower().startswith(prompt):
            t = t[len(prompt):].strip()
        out.append(t)
    return out


def caption_images(args, loaded, todo, path: Path, config: dict, device, dtype) -> None:
    """The one loop over the images: caption the images of ``todo`` (``loaded``: a BLIP
    ``vwt.models.Loaded``), appending each to the captions file as it is made, with its token statistics."""
    prompt_ids = None
    if args.prompt:
        prompt_ids = text_tokenizer(loaded)(args.prompt, return_tensors="pt")["input_ids"].to(device)
    writer = CaptionWriter(path, config) if distributed.is_main() else None  # torchrun: rank 0 writes them all
    try:
        order = batch_order(args, loaded, todo, device, dtype)  # --bucket: neighbours in token count
        mine = distributed.shard(order)  # torchrun: batch b on rank b % processes, one round at a time
        bar = tqdm(distributed.lockstep(datasets.batches(todo, args.batch, args.workers, mine), len(order)),
                   total=distributed.steps(len(order)), desc=f"{args.data} captions", file=sys.stderr,
                   disable=not distributed.is_main())
        for batch in bar:
            lines = caption_lines(args, loaded, batch, prompt_ids, device, dtype) if batch is not None else []
            for part in distributed.gather(lines) or []:  # the round's batches in one-process order
                for line in part:
                    writer.write(line)
            if writer is not None:
                writer.flush()
    finally:
        if writer is not None:
            writer.close()


def caption_lines(args, loaded, batch, prompt_ids, device, dtype) -> list[dict]:
    """The captions file's records of one batch: image id, caption and token statistics."""
    pixels, recs = batch
    texts = caption_batch(args, loaded, pixels.to(device, dtype), prompt_ids)
    st = stats(loaded.model)
    return [{"image_id": rec["image_id"], "caption": text,
             **{k: float(st[k][i]) for k in ("tokens_first_block", "tokens_mean")}}
            for i, (rec, text) in enumerate(zip(recs, texts))]


def refs_source(args) -> str:
    """Where the references come from: BLIP's coco_karpathy_<split>_gt.json under paper where present
    (the file the paper scores against), else the data set's own captions."""
    if get_protocol(getattr(args, "protocol", None)).coco_blip_references and args.data == "coco":
        if datasets.coco_gt_references(args.data_root, args.split or "test") is not None:
            return f"coco_karpathy_{args.split or 'test'}_gt.json"
    return "data set captions"


def references(args, ds) -> dict:
    """{image_id: reference captions} of the evaluated images (see :func:`refs_source`)."""
    own = {r["image_id"]: r["captions"] for r in ds.records}
    if refs_source(args) == "data set captions":
        return own
    gt = datasets.coco_gt_references(args.data_root, args.split or "test")
    missing = [i for i in own if i not in gt]
    if missing:
        raise UserError(f"coco: image {missing[0]} has no reference in coco_karpathy_{args.split or 'test'}_gt.json; "
                        "use the file of the same split as the captions (or --protocol standard)")
    return {i: gt[i] for i in own}


def write_predictions(path: Path, ds, captions: dict) -> Path:
    """The captions as the paper's (and the NoCaps EvalAI server's) predictions.json: a list of
    {"image_id", "caption"}, one per image in data order."""
    items = [{"image_id": r["image_id"], "caption": captions[r["image_id"]]} for r in ds.records]
    results.atomic_write_text(path, json.dumps(items))
    return path


def check_lengths(args, loaded) -> None:
    """--min-length within [0, --max-length], and --max-length within what the text decoder holds."""
    if not 0 <= args.min_length <= args.max_length:
        raise UserError(f"--min-length must be between 0 and --max-length ({args.max_length}); got {args.min_length}")
    if loaded is None:
        return
    positions = getattr(getattr(loaded.model.config, "text_config", None), "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise UserError(f"--max-length {args.max_length} is beyond what {loaded.name}'s text decoder can hold "
                        f"({positions} tokens); pass at most {positions}")


def score_captions(args, ds, done: dict, predictions_path: Path) -> dict:
    """Score the captions ``done`` ({image_id: captions-file line}) of every image of ``ds``: writes
    the predictions.json first; returns its path, the scores, CIDEr per NoCaps domain, the token
    statistics averaged over the images and the table's summary (in percent)."""
    lines = [done[r["image_id"]] for r in ds.records]
    refs = references(args, ds)
    cands = {r["image_id"]: done[r["image_id"]]["caption"] for r in ds.records}
    predictions = write_predictions(predictions_path, ds, cands)
    scores = metrics.caption_scores(refs, cands)
    domains = {}
    if args.data == "nocaps":
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
    if result.get("note"):
        lines.append(f"  {result['note']}")
    return "\n".join(lines)
