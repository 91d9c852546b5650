"""word.py: a vocabulary's visual words drawn as image patches, and images' patches beside their words.

Writes, under OUT/figures/word/<data>-v<size>__<digest of the configuration>/ (runs that differ in
vocabulary file, model or flags never share a folder):
  words.png   every visual word (a k-means centre of normalised pixel patches) de-normalised with the
              vocabulary's own normalisation and drawn as a P x P patch, row-major by word index;
  NAME.png    for each chosen image, every patch that matched a word (cosine distance <= --thresh)
              beside that word: "patch | word" pairs ordered by word index;
  word.json   the configuration, the machine, and the geometry of every grid (where each cell lies in
              the PNG and which word / patch it shows).

The images are matched the way the model would see them: the model's preprocessing and patch size,
through vwt.InterImage itself. Matching happens in pixel space before any block, so the weights do not
matter: --random-weights gives the same figures, and without access to the model hub (or its cache)
random weights of the model's architecture are used, with a note. Only pixel-space vocabularies can be
drawn. With no vocabulary flag it draws --vocab 100 --vocab-data samples; a samples vocabulary is
learned on the sample photographs on first use and cached in tokenizers/samples/, as eff.py does.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

import vwt
from vwt import cli, datasets, results, vis
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, preprocess_for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the model with random weights (no download); the figures do not depend on them")
    cli.add_data_args(p, choices=datasets.NAMES)
    g = p.add_argument_group("vocabulary")
    g.add_argument("--vocab", type=int, default=None, metavar="SIZE",
                   help="vocabulary size, read from tokenizers/<vocab-data>/v<SIZE>/vocab.pt (default 100 on the "
                        "samples, learned on first use)")
    g.add_argument("--vocab-path", type=Path, default=None, help="a vocab.pt (ours or the published ones)")
    g.add_argument("--vocab-data", default="samples", help="data set the --vocab vocabulary was learned on")
    g.add_argument("--thresh", type=float, default=0.1, help="cosine-distance threshold for a match (default 0.1)")
    g = p.add_argument_group("figures")
    g.add_argument("--images", nargs="*", default=None, metavar="NAME",
                   help="images to show beside their words, by name (default: the first --limit images)")
    g.add_argument("--limit", type=int, default=3, help="how many images when --images is not given (default 3)")
    g.add_argument("--pairs", type=int, default=64, help="at most this many patch | word pairs per image (default 64)")
    g.add_argument("--cols", type=int, default=None, help="cells per row of the word grid (default: square)")
    g.add_argument("--scale", type=int, default=None,
                   help="enlarge the grids by this integer factor (default: so the word grid is about 600 px wide)")
    p.set_defaults(random=False, prop_attn=False)  # what cli.reducers_from_args reads for InterImage
    return p.parse_args(argv)


def vocab_tag(vocab) -> str:
    return f"{vocab.meta.get('data') or 'vocab'}-v{len(vocab)}"


def word_grid(vocab, cols, scale):
    """The words drawn as (V, P, P, 3) tiles with the vocabulary's own normalisation, and laid out in a
    grid; returns (tiles, array, Grid)."""
    pre = Preprocess(int(vocab.meta.get("image_size") or 224), tuple(vocab.meta.get("mean") or OPENAI_CLIP_MEAN),
                     tuple(vocab.meta.get("std") or OPENAI_CLIP_STD))
    tiles = vis.word_tiles(vocab.words, vocab.patch_size, pre.denormalise)
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    if scale is None:
        scale = max(1, min(4, round(600 / (cols * (vocab.patch_size + 1) + 1))))
    arr, grid = vis.tile_grid(tiles, cols=cols, scale=scale)
    return tiles, arr, grid


def load(args, device, dtype):
    """The model: its weights do not change the figures, so where they cannot be had (offline, no cache)
    random weights of its architecture do, with a note."""
    if args.random_weights:
        return cli.load_model(args.model, device, dtype, random_weights=True)
    return cli.load_model(args.model, device, dtype, fallback_random=True)


def run(args, loaded=None) -> dict:
    """Draw the figures; ``loaded`` (a cli.Loaded) replaces --model (tests pass tiny models)."""
    cli.at_least_one(args, "pairs", "limit", "batch")
    if args.scale is not None and args.scale < 1:
        raise cli.UserError(f"--scale must be a positive integer; got {args.scale}")
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(Path(args.out) / "figures" / "word")
    args = argparse.Namespace(**vars(args))
    if cli.vocab_path(args) is None:
        print("no vocabulary flag: drawing --vocab 100 --vocab-data samples", file=sys.stderr)
        args.vocab, args.vocab_data = 100, "samples"
    config = {**results.config_of(args)}
    learn = args.vocab_path is None and args.vocab_data == "samples"
    if learn and loaded is None:
        loaded = load(args, device, dtype)
    if learn:
        args.vocab_path = cli.samples_vocabulary(args.vocab, loaded.vision, preprocess_for(loaded.model))[1]
    inter = cli.reducers_from_args(args)[0]
    vocab = inter.vocab
    if vocab.space != "pixel":
        raise cli.UserError(f"{cli.vocab_path(args)} is an {vocab.space}-space vocabulary: only pixel-space words "
                            "can be drawn as image patches")
    if loaded is None:
        loaded = load(args, device, dtype)
    pre = preprocess_for(loaded.model)
    cli.check_input_reducers(loaded.vision, [inter], pre.size, device, dtype)
    config.update(model=loaded.name)
    out_dir = Path(args.out) / "figures" / "word" / results.run_stem([vocab_tag(vocab)], config)
    source = str(cli.vocab_path(args))

    data = datasets.load(args.data, args.data_root, pre)
    names = [vis.record_name(r) for r in data.records]
    if not names:
        raise cli.UserError(f"{args.data}: no images to draw under {args.data_root}; expected layout: "
                            f"{datasets.layout(args.data)}")
    chosen = args.images if args.images else names[:args.limit]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise cli.UserError(f"unknown image(s) {', '.join(unknown)}; the {args.data} images are: {shown}")
    data = torch.utils.data.Subset(data, [names.index(n) for n in chosen])

    tiles, arr, grid = word_grid(vocab, args.cols, args.scale)
    title = (f"{len(vocab)} visual words of {source}\n"
             f"learned on {vocab.meta.get('data', 'unknown data')}, {vocab.patch_size}x{vocab.patch_size} pixel "
             f"patches; word index = row x {grid.cols} + column")
    fig, placed = vis.decorate(arr, title)
    vis.save_png(out_dir / "words.png", fig)
    result = {"config": results.config_of(args),
              "vocab": {"path": source, "size": len(vocab), "patch_size": vocab.patch_size,
                        **{k: vocab.meta.get(k) for k in ("data", "image_size", "mean", "std")}},
              "words": {"file": "words.png", "box": [placed.top, placed.left, placed.height, placed.width],
                        "cols": grid.cols, "tile": list(grid.tile), "gap": grid.gap, "scale": grid.scale,
                        "count": grid.count},
              "images": []}

    scale = grid.scale
    from tqdm import tqdm

    recorder = vis.MatchRecorder(inter)
    try:
        vwt.patch(loaded.model, inter)
        for pixels, records in tqdm(datasets.batches(data, args.batch), desc="word", unit="batch",
                                    total=-(-len(data) // args.batch)):
            with torch.inference_mode():
                loaded.vision(pixels.to(device, dtype))
            rows, cols = vwt.stats(loaded.model)["grid"]
            keys = recorder.keys()
            for b, rec in enumerate(records):
                name = vis.record_name(rec)
                image = vis.to_uint8(pre.denormalise(pixels[b].float()))
                p = vocab.patch_size
                patches = vis.image_patches(image[:rows * p, :cols * p], (rows, cols))
                matched = np.flatnonzero(keys[b] >= 0)
                matched = matched[np.lexsort((matched, keys[b][matched]))]  # by word, then patch order
                shown = matched[:args.pairs]
                entry = {"name": name, "file": f"{name}.png", "matched": int(len(matched)),
                         "patches": int(rows * cols), "pairs": [[int(i), int(keys[b][i])] for i in shown]}
                title = (f"{name}: {len(matched)} of {rows * cols} patches matched a word "
                         f"(cosine distance <= {args.thresh:g})\n"
                         f"each pair: image patch | its visual word of {source}"
                         + (f"; the first {len(shown)} by word index" if len(shown) < len(matched) else ""))
                if len(shown):
                    pairs = vis.side_by_side(patches[shown], tiles[keys[b][shown]])
                    arr, pgrid = vis.tile_grid(pairs, cols=min(8, len(shown)), gap=4, scale=scale)
                    fig, placed = vis.decorate(arr, title)
                    entry.update(box=[placed.top, placed.left, placed.height, placed.width], cols=pgrid.cols,
                                 tile=list(pgrid.tile), gap=pgrid.gap, scale=pgrid.scale, sep=1)
                else:
                    fig, _ = vis.decorate(np.full((8, 8, 3), vis.BACKGROUND, np.uint8), title + "\nno patch matched")
                vis.save_png(out_dir / entry["file"], fig)
                result["images"].append(entry)
    finally:
        vwt.unpatch(loaded.model)
        recorder.detach()
    result.update(model=loaded.name, pretrained=loaded.pretrained, environment=cli.environment(device))
    cli.save_json(out_dir / "word.json", result)
    print(f"words and {len(result['images'])} image figures in {out_dir}")
    return result


if __name__ == "__main__":
    cli.main(lambda: run(parse_args()))
