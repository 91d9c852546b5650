"""Overhead of the vwt block loop with no reducer: patched / unpatched runtime of the CLIP ViT-B/16
vision tower (random weights: weights do not change runtime), in interleaved rounds (vwt.bench: order
shuffled every round, the median of the per-round ratios, a busy-machine flag).

    python benchmarks/bench_loop.py [--batch 1 8] [--rounds 15]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import bench  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per batch size")
    args = p.parse_args()

    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    base = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    patched = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    patched.load_state_dict(base.state_dict())
    vwt.patch(patched)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, attention: {base.config._attn_implementation}")
    print("batch  unpatched_ms  patched_ms  speed-up (median of per-round unpatched/patched)  IQR")
    for b in args.batch:
        x = torch.randn(b, 3, 224, 224)
        with torch.inference_mode():
            methods = [bench.Method("base", lambda v: base(pixel_values=v)),
                       bench.Method("patched", lambda v: patched(pixel_values=v))]
            summary = bench.summarise(bench.interleave(methods, [x], rounds=args.rounds, warmup=3))
        f, p = summary.figures["base"], summary.figures["patched"]
        print(f"{b:5d}  {f['batch_ms_median']:12.1f}  {p['batch_ms_median']:10.1f}  {p['speedup_median']:47.3f}"
              f"  {p['speedup_iqr']:.3f}")
        print(f"       {summary.line()}")


if __name__ == "__main__":
    main()
