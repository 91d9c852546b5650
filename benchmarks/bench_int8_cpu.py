"""The paper's int8 on a CPU: how much slower bitsandbytes LLM.int8 (float16 activations) runs there.

CLIP ViT-B/16 (random weights: weights do not change runtime), image features of random 224 px images.
Four models, timed in interleaved rounds (one call each per round, batch 1 then batch 8): float32,
float16, torchao int8 of the vision tower (``--protocol standard``'s --quant on a CPU) and the paper's
whole-model LLM.int8 (``vwt.quant.quantize_whole_model``, ``--protocol paper``'s --quant). Prints the
median and the fastest ms per image of each.

    python benchmarks/bench_int8_cpu.py                  # 1 thread, 5 rounds
    python benchmarks/bench_int8_cpu.py --threads 2 --rounds 3
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vwt.quant import quantize_whole_model, quantized_copy  # noqa: E402


def models() -> dict:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig(vision_config=dict(patch_size=16, image_size=224))).eval()
    return {"float32": base, "float16": copy.deepcopy(base).half(),
            "torchao int8 (standard)": quantized_copy(base, "torchao"),
            "LLM.int8 whole model (paper)": quantize_whole_model(copy.deepcopy(base))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ms = models()
    xs = {b: torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b)) for b in (1, 8)}
    times = {k: {b: [] for b in xs} for k in ms}
    with torch.inference_mode():
        for m in ms.values():  # warm-up
            m.get_image_features(pixel_values=xs[1])
        for _ in range(args.rounds):
            for b, x in xs.items():
                for k, m in ms.items():
                    t = time.perf_counter()
                    m.get_image_features(pixel_values=x)
                    times[k][b].append((time.perf_counter() - t) * 1000 / b)
    print(f"CLIP ViT-B/16 image features on the CPU, {args.threads} thread(s), {args.rounds} rounds: ms per image")
    for k, t in times.items():
        print(f"{k:30s}" + "  ".join(f"batch {b}: {statistics.median(v):6.0f} (fastest {min(v):5.0f})"
                                     for b, v in t.items()))


if __name__ == "__main__":
    main()
