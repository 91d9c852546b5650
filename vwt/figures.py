"""The figure experiments of match.py and word.py, usable from Python: :func:`match` draws what a
reducer does to each image (matched visual words tinted, dropped patches blanked, merge groups of the
in-network reducers), :func:`words` a vocabulary's words as image patches and images' patches beside
the words they matched. The drawing itself is vwt.vis's."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import datasets, methods, models, results, vis
from .datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, preprocess_for
from .errors import UserError
from .patch import patch, patch_info, stats, unpatch
from .runtime import (at_least_one, check_input_reducers, environment, nothing_merged_note, resolve_device,
                      resolve_dtype, save_json)
from .spec import RunSpec
from .vocab_files import samples_vocabulary, vocab_path


@dataclass(frozen=True)
class MatchFigures:
    """match.py's own settings."""

    random_weights: bool = False
    alpha: float = 0.5
    scale: int = 2
    legend: int = 12


@dataclass(frozen=True)
class WordFigures:
    """word.py's own settings."""

    random_weights: bool = False
    images: Optional[tuple] = None
    pairs: int = 64
    cols: Optional[int] = None
    scale: Optional[int] = None


MATCH_DEFAULTS = (dict(top_k=0.5), dict(vocab=100, vocab_data="samples"))  # drawn with no method flag


def load(spec: RunSpec, device, dtype, need_weights: bool = False):
    """The model. VWT figures do not depend on the weights, so where they cannot be had (offline, no
    cache) random weights of its architecture do, with a note; in-network merge groups (``need_weights``)
    need them."""
    if spec.options.random_weights or need_weights:
        return models.load_model(spec.model, device, dtype, random_weights=spec.options.random_weights, needs="vision")
    return models.load_model(spec.model, device, dtype, fallback_random=True, needs="vision")


# --------------------------------------------------------------------------------------------------
# match.py
# --------------------------------------------------------------------------------------------------
def in_network(spec: RunSpec) -> bool:
    return any(methods.given(getattr(spec.method, m.dest)) for m in methods.rows("block"))


def method_flags(spec: RunSpec) -> bool:
    """Whether any flag chooses a reducer (the method table's input and in-network rows, --vocab-path)."""
    return spec.method.vocab_path is not None or any(
        getattr(spec.method, m.dest) is not None for m in methods.rows() if m.kind != "int8")


def figure_dir(spec: RunSpec, loaded) -> Path:
    """OUT/figures/match/<method>[-random-weights]__<digest of the configuration>."""
    tag = methods.method_name(spec)
    if not loaded.pretrained and in_network(spec):
        tag += "-random-weights"
    config = {**results.config_of(spec), "model": loaded.name, "pretrained": loaded.pretrained}
    return Path(spec.out) / "figures" / "match" / results.run_stem([tag], config)


def learns_samples(spec: RunSpec) -> bool:
    """--vocab SIZE --vocab-data samples: the vocabulary is learned on the samples on first use."""
    r = spec.method
    return r.vocab is not None and r.vocab_path is None and r.vocab_data == "samples"


def match(spec: RunSpec, loaded=None) -> dict:
    """Draw match.py's figures of ``spec``; ``loaded`` (a vwt.models.Loaded) replaces its model. With no
    method flag, draws the defaults (intra-image and inter-image on the samples) and returns
    {"runs": [result, result]}."""
    spec = spec.with_options(MatchFigures)
    at_least_one(spec, "limit", "batch")
    if spec.options.scale < 1:
        raise UserError(f"--scale must be a positive integer; got {spec.options.scale}")
    if not 0 < spec.options.alpha <= 1:
        raise UserError(f"--alpha is an opacity in (0, 1]; got {spec.options.alpha}")
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    results.writable_dir(Path(spec.out) / "figures" / "match")
    if not method_flags(spec):
        print("no method flag: drawing VWT intra-image (--top_k 0.5) and inter-image (--vocab 100 --vocab-data "
              "samples)", file=sys.stderr)
        loaded = loaded or load(spec, device, dtype)
        return {"runs": [match(spec.replace(**d), loaded) for d in MATCH_DEFAULTS]}
    later = learns_samples(spec)
    reducers = methods.reducers_for(spec.replace(vocab=None) if later else spec)
    if loaded is None:
        loaded = load(spec, device, dtype, need_weights=in_network(spec))
    if spec.method.quant:
        methods.quantize(loaded.model)
    pre = preprocess_for(loaded.model)
    out_dir = figure_dir(spec, loaded)
    if later:
        spec = spec.replace(vocab_path=samples_vocabulary(spec.method.vocab, loaded.vision, pre)[1])
        reducers = methods.reducers_for(spec)
    full = check_input_reducers(loaded.vision, reducers, pre.size, device, dtype, preprocess=pre)
    data = datasets.load(spec.data, spec.root, pre, limit=spec.limit)
    if len(data) == 0:
        raise UserError(f"{spec.data}: no images to draw under {spec.root}; expected layout: "
                        f"{datasets.layout(spec.data)}")
    datasets.check_images(data)
    images = draw_matches(spec, loaded, reducers, data, pre, out_dir, device, dtype)
    result = {"config": results.config_of(spec),
              "method": methods.method_name(spec), "model": loaded.name, "pretrained": loaded.pretrained,
              "environment": environment(device), "images": images}
    first = float(np.mean([i["tokens_first_block"] for i in images]))
    last = float(np.mean([i["tokens_last_block"] for i in images]))
    result["note"] = nothing_merged_note(reducers, full, first, last)
    save_json(out_dir / "match.json", result)
    print(f"{len(images)} figure{'' if len(images) == 1 else 's'} in {out_dir}"
          + (f"; {result['note']}" if result["note"] else ""))
    return result


def draw_matches(spec: RunSpec, loaded, reducers: list, data, pre, out_dir: Path, device, dtype) -> list:
    """One PNG per image of ``data`` with the patched model's matches, drops or merge groups; returns
    each image's record (token counts, colour keys, where the image lies in the PNG)."""
    from tqdm import tqdm

    from .tokenizer import InterImage

    inter = next((r for r in reducers if isinstance(r, InterImage)), None)
    recorder = vis.MatchRecorder(inter) if inter is not None and not in_network(spec) else None
    images, names = [], iter(figure_names(data))
    try:
        patch(loaded.model, *reducers)
        for pixels, records in tqdm(datasets.batches(data, spec.batch), desc="match", unit="batch",
                                    total=-(-len(data) // spec.batch)):
            with torch.inference_mode():
                loaded.vision(pixels.to(device, dtype))
            words = recorder.keys() if recorder is not None else None
            images += [match_figure(spec, loaded, pre, pixels[b], next(names), b, words, out_dir)
                       for b in range(len(records))]
    finally:
        unpatch(loaded.model)
        if recorder is not None:
            recorder.detach()
    return images


def figure_names(data) -> list:
    """The figure name of each image of ``data`` (a data set, or a Subset of one) in order, unique in
    the whole data set (vis.record_names: images of one file name in two folders never share a PNG)."""
    if isinstance(data, torch.utils.data.Subset):
        every = vis.record_names(data.dataset.records)
        return [every[i] for i in data.indices]
    return vis.record_names(data.records)


def match_figure(spec: RunSpec, loaded, pre, pixels, name: str, b: int, words, out_dir: Path) -> dict:
    """The PNG of image ``b`` of the last forward, named ``name``, and its record."""
    st = stats(loaded.model)
    labels, counts = st["labels"].cpu().numpy(), st["tokens_per_layer"].cpu().numpy()
    rows, cols = st["grid"]
    prefix = patch_info(loaded.model).last.prefix
    opts, network = spec.options, in_network(spec)
    image = vis.to_uint8(pre.denormalise(pixels.float()))
    image = image[:rows * (image.shape[0] // rows), :cols * (image.shape[1] // cols)]
    dropped = labels[b] < 0
    keys = words[b] if words is not None else vis.group_keys(labels[b]) if network else np.full(rows * cols, -1)
    painted = vis.enlarge(vis.paint(image, (rows, cols), keys, dropped, alpha=opts.alpha), opts.scale)
    n_in, n_first, n_last = rows * cols + prefix, int(counts[b, 0]), int(counts[b, -1])
    line = f"{n_in} tokens (class token included) \u2192 {n_first} into block 1"
    if network:
        line += f" \u2192 {n_last} after block {counts.shape[1] - 1}"
    weights = "" if loaded.pretrained else " (random weights)" if network else ""
    title = f"{name}: {methods.method_name(spec)}{weights}\n{line}\n{loaded.name}"
    kind = "word" if words is not None else "token" if network else "none"
    fig, placed = vis.decorate(painted, title, vis.legend(keys, dropped, kind, opts.legend))
    path = vis.save_png(out_dir / f"{name}.png", fig)
    return {"name": name, "file": path.name, "tokens_in": n_in, "tokens_first_block": n_first,
            "tokens_last_block": n_last, "grid": [rows, cols], "scale": opts.scale,
            "box": [placed.top, placed.left, placed.height, placed.width],
            "keys": keys.tolist(), "dropped": np.flatnonzero(dropped).tolist(), "key_kind": kind}


# --------------------------------------------------------------------------------------------------
# word.py
# --------------------------------------------------------------------------------------------------
def vocab_tag(vocab) -> str:
    return f"{vocab.meta.get('data') or 'vocab'}-v{len(vocab)}"


def word_grid(vocab, cols, scale):
    """The words drawn as (V, P, P, 3) tiles with the vocabulary's own normalisation, and laid out in a
    grid; returns (tiles, array, Grid)."""
    pre = Preprocess(int(vocab.meta.get("image_size") or 224), tuple(vocab.meta.get("mean") or OPENAI_CLIP_MEAN),
                     tuple(vocab.meta.get("std") or OPENAI_CLIP_STD))
    tiles = vis.word_tiles(vocab.words, vocab.patch_size, pre.denormalise)
    cols = min(cols or math.ceil(math.sqrt(len(tiles))), len(tiles))  # never wider than the words
    if scale is None:
        scale = max(1, min(4, round(600 / (cols * (vocab.patch_size + 1) + 1))))
    arr, grid = vis.tile_grid(tiles, cols=cols, scale=scale)
    return tiles, arr, grid


def word_vocabulary(spec: RunSpec, loaded, device, dtype):
    """The spec with its vocabulary settled (--vocab 100 --vocab-data samples without a vocabulary flag;
    a samples vocabulary learned on first use), the inter-image reducer, the model and the configuration
    the results record (before the learned file is named, as before)."""
    if vocab_path(spec) is None:
        print("no vocabulary flag: drawing --vocab 100 --vocab-data samples", file=sys.stderr)
        spec = spec.replace(vocab=100, vocab_data="samples")
    config = {**results.config_of(spec)}
    if spec.method.vocab_path is None and spec.method.vocab_data == "samples":
        loaded = loaded or load(spec, device, dtype)
        spec = spec.replace(vocab_path=samples_vocabulary(spec.method.vocab, loaded.vision,
                                                          preprocess_for(loaded.model))[1])
    inter = methods.reducers_for(spec)[0]
    if inter.vocab.space != "pixel":
        raise UserError(f"{vocab_path(spec)} is an {inter.vocab.space}-space vocabulary: only pixel-space words "
                        "can be drawn as image patches")
    return spec, inter, loaded or load(spec, device, dtype), config


def chosen_images(spec: RunSpec, pre):
    """The images to show: --images by name, else the first --limit; unknown names are a one-line error."""
    data = datasets.load(spec.data, spec.root, pre)
    names = vis.record_names(data.records)
    if not names:
        raise UserError(f"{spec.data}: no images to draw under {spec.root}; expected layout: "
                        f"{datasets.layout(spec.data)}")
    chosen = list(spec.options.images) if spec.options.images else names[:spec.limit]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(f"unknown image(s) {', '.join(unknown)}; the {spec.data} images are: {shown}")
    chosen = torch.utils.data.Subset(data, [names.index(n) for n in chosen])
    datasets.check_images(chosen)
    return chosen


def words(spec: RunSpec, loaded=None) -> dict:
    """Draw word.py's figures of ``spec``; ``loaded`` (a vwt.models.Loaded) replaces its model."""
    spec = spec.with_options(WordFigures)
    at_least_one(spec, "pairs", "limit", "batch")
    if spec.options.scale is not None and spec.options.scale < 1:
        raise UserError(f"--scale must be a positive integer; got {spec.options.scale}")
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    results.writable_dir(Path(spec.out) / "figures" / "word")
    spec, inter, loaded, config = word_vocabulary(spec, loaded, device, dtype)
    vocab, pre = inter.vocab, preprocess_for(loaded.model)
    check_input_reducers(loaded.vision, [inter], pre.size, device, dtype, preprocess=pre)
    config.update(model=loaded.name)
    out_dir = Path(spec.out) / "figures" / "word" / results.run_stem([vocab_tag(vocab)], config)
    source = str(vocab_path(spec))
    data = chosen_images(spec, pre)
    tiles, arr, grid = word_grid(vocab, spec.options.cols, spec.options.scale)
    title = (f"{len(vocab)} visual words of {source}\n"
             f"learned on {vocab.meta.get('data', 'unknown data')}, {vocab.patch_size}x{vocab.patch_size} pixel "
             f"patches; word index = row x {grid.cols} + column")
    fig, placed = vis.decorate(arr, title)
    vis.save_png(out_dir / "words.png", fig)
    result = {"config": results.config_of(spec),
              "vocab": {"path": source, "size": len(vocab), "patch_size": vocab.patch_size,
                        **{k: vocab.meta.get(k) for k in ("data", "image_size", "mean", "std")}},
              "words": {"file": "words.png", "box": [placed.top, placed.left, placed.height, placed.width],
                        "cols": grid.cols, "tile": list(grid.tile), "gap": grid.gap, "scale": grid.scale,
                        "count": grid.count},
              "images": draw_words(spec, loaded, inter, data, pre, tiles, grid.scale, source, out_dir, device, dtype)}
    result.update(model=loaded.name, pretrained=loaded.pretrained, environment=environment(device))
    save_json(out_dir / "word.json", result)
    print(f"words and {len(result['images'])} image figures in {out_dir}")
    return result


def draw_words(spec: RunSpec, loaded, inter, data, pre, tiles, scale: int, source: str, out_dir: Path,
               device, dtype) -> list:
    """For each image, its matched patches beside their words (one PNG each); returns their records."""
    from tqdm import tqdm

    recorder, out, names = vis.MatchRecorder(inter), [], iter(figure_names(data))
    try:
        patch(loaded.model, inter)
        for pixels, records in tqdm(datasets.batches(data, spec.batch), desc="word", unit="batch",
                                    total=-(-len(data) // spec.batch)):
            with torch.inference_mode():
                loaded.vision(pixels.to(device, dtype))
            grid, keys = stats(loaded.model)["grid"], recorder.keys()
            out += [word_figure(spec, inter.vocab, pre, pixels[b], next(names), keys[b], grid, tiles, scale, source,
                                out_dir) for b in range(len(records))]
    finally:
        unpatch(loaded.model)
        recorder.detach()
    return out


def word_figure(spec: RunSpec, vocab, pre, pixels, name: str, keys, grid, tiles, scale: int, source: str,
                out_dir: Path) -> dict:
    """One image's "patch | word" pairs, ordered by word index, as a PNG named ``name``; returns its record."""
    rows, cols = grid
    image = vis.to_uint8(pre.denormalise(pixels.float()))
    p = vocab.patch_size
    patches = vis.image_patches(image[:rows * p, :cols * p], (rows, cols))
    matched = np.flatnonzero(keys >= 0)
    matched = matched[np.lexsort((matched, keys[matched]))]  # by word, then patch order
    shown = matched[:spec.options.pairs]
    entry = {"name": name, "file": f"{name}.png", "matched": int(len(matched)),
             "patches": int(rows * cols), "pairs": [[int(i), int(keys[i])] for i in shown]}
    title = (f"{name}: {len(matched)} of {rows * cols} patches matched a word "
             f"(cosine distance <= {spec.method.thresh:g})\n"
             f"each pair: image patch | its visual word of {source}"
             + (f"; the first {len(shown)} by word index" if len(shown) < len(matched) else ""))
    if len(shown):
        pairs = vis.side_by_side(patches[shown], tiles[keys[shown]])
        arr, pgrid = vis.tile_grid(pairs, cols=min(8, len(shown)), gap=4, scale=scale)
        fig, placed = vis.decorate(arr, title)
        entry.update(box=[placed.top, placed.left, placed.height, placed.width], cols=pgrid.cols,
                     tile=list(pgrid.tile), gap=pgrid.gap, scale=pgrid.scale, sep=1)
    else:
        fig, _ = vis.decorate(np.full((8, 8, 3), vis.BACKGROUND, np.uint8), title + "\nno patch matched")
    vis.save_png(out_dir / entry["file"], fig)
    return entry
