"""Measured speed-up of ToMe, EViT and DFE + LGTM beside their analytic FLOPs ratio (vwt/flops.py).

CLIP ViT-B/16 vision tower (transformers CLIPVisionModel, random weights: weights do not change the
runtime) on this machine's CPU. Every method and the unpatched base model run in interleaved rounds
(vwt.bench: each round times each once, in a shuffled order); the speed-up is the median of the
per-round ratios base / method, and a busy machine is flagged. A method "passes" when its speed-up
reaches --target (default 0.8) of its FLOPs ratio.

    python benchmarks/bench_reducers.py                    # batch 32, 5 rounds (slow on 2 cores)
    python benchmarks/bench_reducers.py --batch 2 --rounds 2
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import bench, cli  # noqa: E402
from vwt.flops import dense_flops, dims_of, flops_of_last_forward  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per forward (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per method (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards of each model first (default 1)")
    p.add_argument("--tome", type=int, default=13, help="ToMe r (default 13)")
    p.add_argument("--evit", type=float, default=0.7, help="EViT keep rate (default 0.7)")
    p.add_argument("--lgtm", type=int, default=vwt.LGTM().r, help=f"LGTM r (default {vwt.LGTM().r}, its default)")
    p.add_argument("--target", type=float, default=0.8, help="speed-up / FLOPs-ratio to pass (default 0.8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=cli.DEFAULT_OUT / "bench_reducers.json",
                   help=f"results JSON file (default {cli.DEFAULT_OUT / 'bench_reducers.json'}; results/bench_reducers.json is the committed one)")
    args = p.parse_args()
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0:
        raise cli.UserError("--batch and --rounds must be at least 1, --warmup at least 0")
    return args


def run():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(patch_size=16, image_size=224)
    model = CLIPVisionModel(config).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    dims = dims_of(model)
    reducers = {f"tome{args.tome}": vwt.ToMe(r=args.tome), f"evit{args.evit:g}": vwt.EViT(keep=args.evit),
                f"lgtm{args.lgtm}": vwt.LGTM(r=args.lgtm)}

    print(f"CLIP ViT-B/16 vision tower, random weights, batch {args.batch}, {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    counts = {}
    with torch.inference_mode():
        for name, reducer in reducers.items():  # one patched forward each: FLOPs and final tokens
            vwt.patch(model, reducer)
            model(pixel_values=x)
            counts[name] = (dense_flops(dims) / flops_of_last_forward(model).mean().item(),
                            vwt.stats(model)["tokens_per_layer"][:, -1].float().mean().item())
            vwt.unpatch(model)
        methods = [bench.Method("base", lambda v: model(pixel_values=v))]
        methods += [bench.Method(name, lambda v: model(pixel_values=v), enter=lambda r=r: vwt.patch(model, r),
                                 leave=lambda: vwt.unpatch(model)) for name, r in reducers.items()]
        summary = bench.summarise(bench.interleave(methods, [x], rounds=args.rounds, warmup=args.warmup))
    base_s = summary.figures["base"]["batch_ms_median"] / 1e3
    rows = []
    for name, reducer in reducers.items():
        f, (flops_ratio, final_tokens) = summary.figures[name], counts[name]
        rows.append(dict(method=name, reducer=repr(reducer), final_tokens=final_tokens, base_s=base_s,
                         method_s=f["batch_ms_median"] / 1e3, speedup=f["speedup_median"], speedup_iqr=f["speedup_iqr"],
                         flops_ratio=flops_ratio, fraction=f["speedup_median"] / flops_ratio,
                         passed=f["speedup_median"] >= args.target * flops_ratio))

    print(f"{'method':10s} {'tokens@end':>10s} {'base_s':>8s} {'method_s':>8s} {'speed-up':>8s} "
          f"{'FLOPs ratio':>11s} {'fraction':>8s}  pass(>={args.target:g})")
    for r in rows:
        print(f"{r['method']:10s} {r['final_tokens']:10.1f} {r['base_s']:8.3f} {r['method_s']:8.3f} "
              f"{r['speedup']:8.3f} {r['flops_ratio']:11.3f} {r['fraction']:8.3f}  {'yes' if r['passed'] else 'NO'}")
    print(summary.line())
    cli.write_json(args.out, dict(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                  model="CLIPVisionModel(CLIPVisionConfig(patch_size=16)), random weights",
                                  busy=summary.busy, busy_reasons=summary.reasons,
                                  environment=cli.environment(), results=rows))
    print(f"results: {args.out}")


if __name__ == "__main__":
    cli.main(run)
