"""Inter-image at batch > 1: packed against padded execution, with and without length bucketing.

CLIP ViT-B/16 vision tower (random weights: weights do not change runtime; --model takes a local CLIP
folder instead), the 12 sample photographs cycled to fill the batches, a 1000-word vocabulary learned on
them and cached in tokenizers/samples/ (the one eff.py uses), threshold 0.1, on --device.
Every configuration and the unpatched base model time the same pool of images once per round,
round-robin in a shuffled order; the speed-up is the median of the per-round ratios base / method,
beside the analytic FLOPs ratio (dense / inter-image; pads cost no FLOPs), so "fraction" is how much
of what the FLOPs allow a configuration reaches.

    python benchmarks/bench_packed.py                      # batch 8 and 32, 5 rounds
    python benchmarks/bench_packed.py --batch 8 --rounds 2 --batches 2
    python benchmarks/bench_packed.py --device cuda --batch 8 32 128     # benchmarks/gpu_check.sh
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import bench, cli, datasets, energy, models, vocab_files  # noqa: E402
from vwt.flops import dense_flops, dims_of, flops_of_last_forward  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="batch sizes (default 8 32)")
    p.add_argument("--batches", type=int, default=3, help="batches per pool of images (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    p.add_argument("--vocab", type=int, default=1000, help="words (default 1000)")
    p.add_argument("--thresh", type=float, default=0.1, help="inter-image threshold (default 0.1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--model", default=None,
                   help="a local CLIP folder (default: CLIP ViT-B/16's configuration with random weights)")
    p.add_argument("--out", type=Path, default=cli.DEFAULT_OUT / "bench_packed.json",
                   help=f"results JSON file (default {cli.DEFAULT_OUT / 'bench_packed.json'}; results/bench_packed.json is the committed one)")
    return p.parse_args()


def measure(base, inter, reducer, pool, b: int, rounds: int) -> list[dict]:
    """Base, padded and packed inter-image, each with and without bucketing, over the whole pool once
    per round (interleaved); one row per inter-image configuration."""
    vwt.patch(inter, reducer, packing="off")
    inter(pixel_values=pool)
    counts = vwt.stats(inter)["tokens_per_layer"][:, 0]
    flops_ratio = dense_flops(dims_of(inter)) / flops_of_last_forward(inter).mean().item()
    plain = [pool[i:i + b] for i in range(0, len(pool), b)]
    bucketed = [pool[idx] for idx in vwt.buckets(counts, b)]
    methods = [bench.Method("base", lambda x: base(pixel_values=x))]
    for name, packing, batches in (("padded", "off", plain), ("padded+bucket", "off", bucketed),
                                   ("packed", "on", plain), ("packed+bucket", "on", bucketed)):
        methods.append(bench.Method(name, lambda x: inter(pixel_values=x), inputs=batches,
                                    enter=lambda p=packing: vwt.patch(inter, reducer, packing=p)))
    summary = bench.summarise(bench.interleave(methods, plain, rounds=rounds, min_calls=len(plain), seed=b,
                                               stopwatch=energy.Stopwatch(pool.device)))
    print(f"batch {b}: {summary.line()}")
    base_ms = summary.figures["base"]["latency_ms_median"]
    return [dict(batch=b, config=m.name, images=len(pool), tokens_mean=counts.float().mean().item(),
                 tokens_min=int(counts.min()), tokens_max=int(counts.max()), base_ms_per_image=base_ms,
                 ms_per_image=summary.figures[m.name]["latency_ms_median"],
                 speedup=summary.figures[m.name]["speedup_median"], speedup_iqr=summary.figures[m.name]["speedup_iqr"],
                 flops_ratio=flops_ratio, fraction=summary.figures[m.name]["speedup_median"] / flops_ratio,
                 busy=summary.busy) for m in methods[1:]]


def vision_towers(model, device):
    """Two vision towers with the same weights (one stays unpatched) on ``device``: CLIP ViT-B/16's
    configuration with random weights, or the vision tower of the local CLIP folder ``model``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if model:
        return tuple(models.load_model(model, device).vision.eval() for _ in range(2))
    torch.manual_seed(0)
    base = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    inter = CLIPVisionModel(base.config).eval()
    inter.load_state_dict(base.state_dict())
    return base.to(device), inter.to(device)


def main():
    args = parse()
    device = cli.resolve_device(args.device)
    base, inter = vision_towers(args.model, device)
    prep = datasets.preprocess_for(base)
    samples = datasets.Samples(prep)
    photos = torch.stack([samples[i][0] for i in range(len(samples))])
    vocab, _ = vocab_files.samples_vocabulary(args.vocab, base, prep, photos)
    reducer = vwt.InterImage(vocab, thresh=args.thresh)
    photos = photos.to(device)
    name = args.model or "CLIP ViT-B/16 vision tower, random weights"
    print(f"{name}, {len(photos)} sample photographs, {args.vocab} words, threshold {args.thresh:g}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with torch.inference_mode():
        for b in args.batch:
            pool = photos[torch.arange(b * args.batches) % len(photos)]
            rows += measure(base, inter, reducer, pool, b, args.rounds)
    print(f"{'batch':>5s} {'config':14s} {'base ms/img':>11s} {'ms/img':>7s} {'speed-up':>8s} {'IQR':>6s} "
          f"{'FLOPs ratio':>11s} {'fraction':>8s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['config']:14s} {r['base_ms_per_image']:11.1f} {r['ms_per_image']:7.1f} "
              f"{r['speedup']:8.3f} {r['speedup_iqr']:6.3f} {r['flops_ratio']:11.3f} {r['fraction']:8.3f}")
    cli.write_json(args.out, dict(config=vars(args), environment=cli.environment(), rows=rows))
    print(f"results: {args.out}")


if __name__ == "__main__":
    cli.main(main)
