"""Overhead of the vwt block loop with no reducer: patched / unpatched runtime of the CLIP ViT-B/16
vision tower (random weights: weights do not change runtime), measured side by side, interleaved.

    python benchmarks/bench_loop.py [--batch 1 8] [--rounds 15]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402


def timed(fn, x):
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


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
    print("batch  unpatched_ms  patched_ms  ratio(median of per-round ratios)")
    for b in args.batch:
        x = torch.randn(b, 3, 224, 224)
        with torch.inference_mode():
            for _ in range(3):
                base(pixel_values=x), patched(pixel_values=x)
            ratios, tb, tp = [], [], []
            for i in range(args.rounds):
                order = [(base, tb), (patched, tp)] if i % 2 == 0 else [(patched, tp), (base, tb)]
                for m, acc in order:
                    acc.append(timed(lambda v: m(pixel_values=v), x))
                ratios.append(tp[-1] / tb[-1])
        print(f"{b:5d}  {1e3 * statistics.median(tb):12.1f}  {1e3 * statistics.median(tp):10.1f}  "
              f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
