"""blip.py: caption quality of BLIP with and without token reduction.

Captions the COCO Karpathy test split (--data coco) or NoCaps validation (--data nocaps) with beam
search (beam 3, min length 5, max length 20, or 40 with a --penalty above 1). Under --protocol paper
(default) decoding starts from the BOS token with no text prompt, as the paper's code; under standard
from the prompt "a picture of ", as BLIP's own COCO evaluation (a prompt counts towards the lengths and
is cut from the caption). --protocol also picks the paper's ToMe and int8 (README, "Protocols"). Then
it scores the captions with pycocoevalcap:
BLEU-4, METEOR, ROUGE-L, CIDEr, and SPICE where its Stanford CoreNLP jars are installed (otherwise
"SPICE unavailable", never a number). NoCaps also gets CIDEr per domain (in, near, out).
Each run also writes <run>.predictions.json ([{"image_id", "caption"}]: the paper's file, and the
NoCaps EvalAI server's upload format); COCO under the paper protocol is scored against BLIP's
coco_karpathy_test_gt.json where it is there (data/README.md).

Captions are appended to <out>/blip/<run>.captions.jsonl as they are made, with the configuration on
the first line; <run> ends in a digest of that configuration, so another configuration gets its own
file. A run that stops (even killed) resumes where it stopped (finished images are not redone); a file
whose first line is damaged or names another configuration is refused with the `mv` that moves it
aside, never reused; --restart starts this configuration over and removes nothing else. --no-score
only writes captions (say, on a GPU machine without Java); the same command without it scores them.
A results file per run goes to <out>/blip/; --summary gathers them into summary.md and summary.csv.

Models must have pretrained weights: caption scores of random weights mean nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vwt
from vwt import captioning as cap, cli, datasets, distributed, results
from vwt.cli import UserError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p, default=cli.DEFAULT_BLIP)
    cli.add_data_args(p, default="coco", choices=cap.data_names())
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    g = p.add_argument_group("captioning")
    g.add_argument("--split", default=None, help="data split (default: coco test, nocaps val)")
    g.add_argument("--limit", type=int, default=None, help="caption only the first N images (smoke runs)")
    g.add_argument("--beams", type=int, default=3, help="beam width (default 3)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest caption in tokens, prompt included (default 20, or 40 with --penalty above 1, "
                        "as the paper)")
    g.add_argument("--min-length", type=int, default=5, help="shortest caption in tokens, prompt included (default 5)")
    g.add_argument("--penalty", type=float, default=1.0,
                   help="beam search length penalty (default 1.0; above 1 favours longer captions)")
    g.add_argument("--prompt", default=None, help="text the decoder starts from, cut from the captions (default: "
                                                  "none under --protocol paper, 'a picture of ' under standard)")
    g.add_argument("--seed", type=int, default=0, help="seed (matters for the --random ablations; default 0)")
    g.add_argument("--restart", action="store_true", help="discard this configuration's earlier captions and start over")
    g.add_argument("--no-score", action="store_true", help="write the captions only; score them in a later run")
    cli.add_workers_and_summary(g, "blip", "caption")
    return p.parse_args(argv)


def main(argv=None, loaded: cli.Loaded | None = None) -> dict | None:
    """Run blip.py. ``loaded`` (tests only) is an already-loaded model, used as it is, random weights
    included; the command line always loads pretrained weights."""
    args = cap.caption_settings(parse_args(argv))
    out = Path(args.out) / "blip"
    if args.summary:
        return cli.write_summary(out, "blip.py")
    cli.at_least_one(args, "batch", "beams", "max_length", "limit")
    cap.check_lengths(args, None)
    device, dtype = cli.resolve_device(args.device), cli.resolve_dtype(args.dtype)
    cli.writable_dir(out)
    started = time.time()
    reducers = cli.reducers_from_args(args, family="hf_blip")  # bad flags and missing data fail before the model loads
    ds = datasets.load(args.data, args.data_root, None, split=args.split, limit=args.limit)
    if len(ds) == 0:
        raise UserError(f"{args.data}: no images in split {args.split or 'default'}")
    if loaded is None:
        loaded = cli.load_model(args.model, device, dtype)
        if not loaded.pretrained:
            raise UserError(f"{args.model} has no pretrained weights: caption scores of random weights mean nothing")
    else:
        loaded.model.to(device=device, dtype=dtype).eval()
    if loaded.family != "hf_blip":
        raise UserError(f"blip.py captions with a Hugging Face BLIP model (e.g. {cli.DEFAULT_BLIP}); "
                        f"{loaded.name} is {loaded.family}")
    ds.transform = datasets.preprocess_for(loaded.model)
    cap.check_lengths(args, loaded)
    full = cli.check_input_reducers(loaded.vision, reducers, ds.transform.size, device, dtype)
    name = cap.run_name(args, loaded.name)
    path = out / f"{cap.run_name(args, loaded.name, limit=False)}.captions.jsonl"
    config = cap.run_config(args, loaded.name)
    if args.restart:
        distributed.from_main(lambda: cap.restart(path, config))  # torchrun: the captions file is rank 0's alone
    done = distributed.from_main(lambda: cap.read_captions(path, config))
    todo = ds.subset(lambda r: r["image_id"] not in done)
    if distributed.is_main():
        print(f"{len(ds) - len(todo)} of {len(ds)} images already captioned in {path}", file=sys.stderr)
    if len(todo):
        if not loaded.pretrained:
            print("warning: captioning with random weights (test hook)", file=sys.stderr)
        cap.text_tokenizer(loaded)
        if args.quant:
            cli.quantize(loaded.model, args.protocol, loaded.family)
        cli.seed_everything(args.seed)
        vwt.patch(loaded.model, *reducers)
        try:
            cap.caption_images(args, loaded, todo, path, config, device, dtype)
        finally:
            vwt.unpatch(loaded.model)
        done = cap.read_captions(path, config) if distributed.is_main() else done
    if not distributed.is_main():  # torchrun: the main process scores and writes
        return None
    if args.no_score:
        print(f"captions: {path} (not scored: run again without --no-score)")
        return None

    s = cap.score_captions(args, ds, done, out / f"{name}.predictions.json")
    result = {
        "task": "blip", "model": loaded.name, "pretrained": loaded.pretrained, "method": cli.method_name(args),
        "protocol": args.protocol,
        "data": args.data + (f"-{args.split}" if args.split else "") + (f" (first {args.limit})" if args.limit else ""),
        "split": args.split, "images": len(ds), "captions_file": str(path), "predictions_file": str(s["predictions"]),
        "references": cap.refs_source(args), "metrics": s["scores"], "domains": s["domains"],
        **s["tokens"], "summary": s["summary"],
        "config": results.config_of(args),
        "environment": cli.environment(device), "seconds": time.time() - started,
    }
    result["note"] = cli.nothing_merged_note(reducers, full, s["tokens"]["tokens_first_block"], s["tokens"]["tokens_mean"])
    rpath = cli.save_json(out / f"{name}.json", result)
    print(cap.report(result) + f"\nresults: {rpath}")
    return result


if __name__ == "__main__":
    cli.main(lambda: main())
