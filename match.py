"""match.py: see what a token reducer does to each image.

One PNG per image: the image as the model sees it (its own preprocessing), with
  * VWT inter-image (--vocab / --vocab-path): every patch that matched a visual word tinted with that
    word's colour (a word keeps its colour in every image); unmatched patches left clear;
  * VWT intra-image (--top_k): the dropped patches blanked in solid grey;
  * ToMe / LGTM / EViT (--tome / --lgtm / --evit): the patches each final token holds (merge groups of
    two or more patches) tinted alike; single patches left clear.
The token count is in the title, the colours in the legend. The PNGs go to OUT/figures/match/<method>/
(e.g. results/figures/match/inter-v100-t0.1__1f3a9c2e/astronaut.png: the method, then a digest of the
whole configuration, so runs that differ in model, dtype or vocabulary file never share a folder); a
results file match.json beside them records the configuration, the machine, and for each image its
token counts, the colour key of every patch and where the image lies in the PNG (so the figure can be
checked pixel by pixel).

With no method flag it draws VWT intra-image (--top_k 0.5) and inter-image (--vocab 100 --vocab-data
samples). A samples vocabulary (--vocab SIZE --vocab-data samples) is learned on the sample photographs
on first use and cached in tokenizers/samples/, as eff.py does. Without access to the model hub (or
its cache) VWT figures use random weights of the model's architecture, with a note: they do not
depend on the weights.

VWT matching and dropping happen in pixel space before the first block, so inter/intra figures do not
depend on the model's weights (only on its preprocessing and patch size): --random-weights gives the same
figures. ToMe, LGTM and EViT groups do depend on the weights; their figures say "random weights" when
--random-weights was used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import vwt
from vwt import cli, methods, results, vis
from vwt import datasets
from vwt.datasets import preprocess_for
from vwt.patch import patch_info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--random-weights", action="store_true",
                   help="build the model with random weights (no download). Inter/intra figures are the same "
                        "with any weights; ToMe/LGTM/EViT figures are then labelled 'random weights'")
    cli.add_data_args(p, choices=datasets.NAMES)
    cli.add_method_args(p)
    g = p.add_argument_group("figures")
    g.add_argument("--limit", type=int, default=None, help="draw at most this many images (default all)")
    g.add_argument("--alpha", type=float, default=0.5, help="opacity of the word / group colours (default 0.5)")
    g.add_argument("--scale", type=int, default=2,
                   help="enlarge the image by this integer factor, nearest neighbour (default 2)")
    g.add_argument("--legend", type=int, default=12, help="list at most this many words or groups (default 12)")
    return p.parse_args(argv)


def figure_dir(args, loaded) -> Path:
    """OUT/figures/match/<method>[-random-weights]__<digest of the configuration>."""
    tag = cli.method_name(args)
    if not loaded.pretrained and in_network(args):
        tag += "-random-weights"
    config = {**results.config_of(args), "model": loaded.name, "pretrained": loaded.pretrained}
    return Path(args.out) / "figures" / "match" / results.run_stem([tag], config)


def in_network(args) -> bool:
    return any(getattr(args, m.dest, None) is not None for m in methods.rows("block"))


def method_flags() -> tuple:
    """The flags that choose a reducer (the method table's input and in-network rows, and --vocab-path)."""
    return tuple(m.dest for m in methods.rows() if m.kind != "int8") + ("vocab_path",)
DEFAULTS = (dict(top_k=0.5), dict(vocab=100, vocab_data="samples"))


def learns_samples(args) -> bool:
    """--vocab SIZE --vocab-data samples: the vocabulary is learned on the samples on first use."""
    return args.vocab is not None and args.vocab_path is None and args.vocab_data == "samples"


def load(args, device, dtype):
    """The model; VWT figures do not depend on the weights, so where they cannot be had (offline, no
    cache) random weights of the architecture do, with a note. ToMe/LGTM/EViT groups need them."""
    if args.random_weights or in_network(args):
        return cli.load_model(args.model, device, dtype, random_weights=args.random_weights)
    return cli.load_model(args.model, device, dtype, fallback_random=True)


def run(args, loaded=None) -> dict:
    """Draw the figures; ``loaded`` (a cli.Loaded) replaces --model (tests pass tiny models). With no
    method flag, draws the defaults (intra-image and inter-image on the samples) and returns
    {"runs": [result, result]}."""
    cli.at_least_one(args, "limit", "batch")
    if args.scale < 1:
        raise cli.UserError(f"--scale must be a positive integer; got {args.scale}")
    if not 0 < args.alpha <= 1:
        raise cli.UserError(f"--alpha is an opacity in (0, 1]; got {args.alpha}")
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(Path(args.out) / "figures" / "match")
    if all(getattr(args, k, None) is None for k in method_flags()):
        print("no method flag: drawing VWT intra-image (--top_k 0.5) and inter-image (--vocab 100 --vocab-data "
              "samples)", file=sys.stderr)
        loaded = loaded or load(args, device, dtype)
        return {"runs": [run(argparse.Namespace(**{**vars(args), **d}), loaded) for d in DEFAULTS]}
    args = argparse.Namespace(**vars(args))
    later = learns_samples(args)
    reducers = cli.reducers_from_args(argparse.Namespace(**{**vars(args), "vocab": None}) if later else args)
    if loaded is None:
        loaded = load(args, device, dtype)
    if args.quant:
        cli.quantize(loaded.model)
    pre = preprocess_for(loaded.model)
    out_dir = figure_dir(args, loaded)
    if later:
        args.vocab_path = cli.samples_vocabulary(args.vocab, loaded.vision, pre)[1]
        reducers = cli.reducers_from_args(args)
    full = cli.check_input_reducers(loaded.vision, reducers, pre.size, device, dtype)
    inter = next((r for r in reducers if isinstance(r, vwt.InterImage)), None)
    method = cli.method_name(args)
    weights = "" if loaded.pretrained else " (random weights)" if in_network(args) else ""
    data = datasets.load(args.data, args.data_root, pre, limit=args.limit)
    if len(data) == 0:
        raise cli.UserError(f"{args.data}: no images to draw under {args.data_root}; expected layout: "
                            f"{datasets.layout(args.data)}")
    images = []
    from tqdm import tqdm

    recorder = vis.MatchRecorder(inter) if inter is not None and not in_network(args) else None
    try:
        vwt.patch(loaded.model, *reducers)
        for pixels, records in tqdm(datasets.batches(data, args.batch), desc="match", unit="batch",
                                    total=-(-len(data) // args.batch)):
            with torch.inference_mode():
                loaded.vision(pixels.to(device, dtype))
            st = vwt.stats(loaded.model)
            labels = st["labels"].cpu().numpy()
            counts = st["tokens_per_layer"].cpu().numpy()
            rows, cols = st["grid"]
            prefix = patch_info(loaded.model).last.prefix
            words = recorder.keys() if recorder is not None else None
            for b, rec in enumerate(records):
                name = vis.record_name(rec)
                image = vis.to_uint8(pre.denormalise(pixels[b].float()))
                p = image.shape[0] // rows
                image = image[:rows * p, :cols * (image.shape[1] // cols)]
                dropped = labels[b] < 0
                keys = words[b] if words is not None else vis.group_keys(labels[b]) if in_network(args) else \
                    np.full(rows * cols, -1)
                painted = vis.enlarge(vis.paint(image, (rows, cols), keys, dropped, alpha=args.alpha), args.scale)
                n_in, n_first, n_last = rows * cols + prefix, int(counts[b, 0]), int(counts[b, -1])
                line = f"{n_in} tokens (class token included) \u2192 {n_first} into block 1"
                if in_network(args):
                    line += f" \u2192 {n_last} after block {counts.shape[1] - 1}"
                title = f"{name}: {method}{weights}\n{line}\n{loaded.name}"
                kind = "word" if words is not None else "token" if in_network(args) else "none"
                legend = vis.legend(keys, dropped, kind, args.legend)
                fig, placed = vis.decorate(painted, title, legend)
                path = vis.save_png(out_dir / f"{name}.png", fig)
                images.append({
                    "name": name, "file": path.name, "tokens_in": n_in, "tokens_first_block": n_first,
                    "tokens_last_block": n_last, "grid": [rows, cols], "scale": args.scale,
                    "box": [placed.top, placed.left, placed.height, placed.width],
                    "keys": keys.tolist(), "dropped": np.flatnonzero(dropped).tolist(),
                    "key_kind": kind,
                })
    finally:
        vwt.unpatch(loaded.model)
        if recorder is not None:
            recorder.detach()
    result = {"config": results.config_of(args),
              "method": method, "model": loaded.name, "pretrained": loaded.pretrained,
              "environment": cli.environment(device), "images": images}
    first = float(np.mean([i["tokens_first_block"] for i in images]))
    result["note"] = cli.nothing_merged_note(reducers, full, first, float(np.mean([i["tokens_last_block"] for i in images])))
    cli.save_json(out_dir / "match.json", result)
    print(f"{len(images)} figure{'' if len(images) == 1 else 's'} in {out_dir}"
          + (f"; {result['note']}" if result["note"] else ""))
    return result


if __name__ == "__main__":
    cli.main(lambda: run(parse_args()))
