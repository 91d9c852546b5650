"""The paper's int8 on a CPU: how much slower bitsandbytes LLM.int8 (float16 activations) runs there.

CLIP ViT-B/16 (random weights: weights do not change runtime), image features of random 224 px images.
Four models, timed in interleaved rounds (one call each per round and batch size, in an order shuffled
every round): float32, float16, torchao int8 of the vision tower (``--protocol standard``'s --quant on
a CPU) and the paper's whole-model LLM.int8 (``vwt.quant.quantize_whole_model``, ``--protocol paper``'s
--quant). Prints each model's time relative to float32 as the median (and IQR) of the per-round ratios
(a busy machine slows a round, not a model), and its median ms per image.

    python benchmarks/bench_int8_cpu.py                  # 1 thread, 5 rounds
    python benchmarks/bench_int8_cpu.py --threads 2 --rounds 3
"""
import argparse
import copy
import random
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
        order = random.Random(0)
        for _ in range(args.rounds):
            for b, x in xs.items():
                for k in order.sample(list(ms), len(ms)):  # shuffled every round
                    t = time.perf_counter()
                    ms[k].get_image_features(pixel_values=x)
                    times[k][b].append((time.perf_counter() - t) * 1000 / b)
    print(f"CLIP ViT-B/16 image features on the CPU, {args.threads} thread(s), {args.rounds} rounds: time relative "
          "to float32, median (IQR) of the per-round ratios; median ms per image")
    for k, t in times.items():
        cells = []
        for b, v in t.items():
            ratios = [mine / base for mine, base in zip(v, times["float32"][b])]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            cells.append(f"batch {b}: {statistics.median(ratios):5.2f}x (IQR {q3 - q1:4.2f}), "
                         f"{statistics.median(v):5.0f} ms")
        print(f"{k:30s}" + "  ".join(cells))


if __name__ == "__main__":
    main()
