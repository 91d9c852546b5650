"""Why eff.py holds glibc's malloc steady (vwt.bench.steady_allocator): int8's batch-1 time, and its page
faults, in fresh processes with glibc's malloc as it is and with its thresholds fixed.

Each process builds CLIP ViT-B/16's vision tower (random weights) and its int8 copy (torchao, as eff.py
on a CPU), warms both up, then times them alternately at batch 1 on one torch thread, counting the
minor page faults of every call. The two kinds of process alternate in a shuffled order, so a busy
spell of the machine lands on both. Prints one line per process and, per kind, the median int8/base
ratio with its range over the processes and how many processes page-faulted (median over their int8
calls above 1,000 faults).

    python benchmarks/bench_allocator.py                      # 6 processes of each kind, about 3 min
    python benchmarks/bench_allocator.py --processes 2 --calls 3
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("as it is", "steady")


def one_process(steady: bool, calls: int) -> dict:
    """In this process: the per-call times (s) and minor page faults of base and int8 at batch 1."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from vwt import bench
    from vwt.efficiency import quantized
    from vwt.models import load_model

    torch.set_num_threads(1)
    allocator = bench.steady_allocator() if steady else "glibc malloc, as it is"
    loaded = load_model("openai/clip-vit-base-patch16", torch.device("cpu"), random_weights=True, vision_only=True)
    base, int8 = loaded.vision, quantized(loaded.vision)
    x = torch.rand(1, 3, 224, 224)

    def timed(model) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    with torch.inference_mode():
        for model in (base, int8, base, int8):  # warm-up
            timed(model)
        pairs = [(timed(base), timed(int8)) for _ in range(calls)]
    return dict(allocator=allocator, base=[b for b, _ in pairs], int8=[q for _, q in pairs])


def summary(result: dict) -> dict:
    """One process's medians: base and int8 ms, int8's faults per call, the per-call ratio base/int8."""
    base, int8 = result["base"], result["int8"]
    return dict(base_ms=1e3 * statistics.median(t for t, _ in base), int8_ms=1e3 * statistics.median(t for t, _ in int8),
                base_faults=statistics.median(f for _, f in base), int8_faults=statistics.median(f for _, f in int8),
                ratio=statistics.median(b / q for (b, _), (q, _) in zip(base, int8)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=6, help="fresh processes of each kind (default 6)")
    p.add_argument("--calls", type=int, default=10, help="timed calls of each model per process (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the processes' order (default 0)")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.child == "steady", args.calls)))
        return
    order = [k for k in KINDS for _ in range(args.processes)]
    random.Random(args.seed).shuffle(order)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = {k: [] for k in KINDS}
    for i, kind in enumerate(order):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--calls", str(args.calls)], env=env,
                             capture_output=True, text=True, check=True).stdout
        s = summary(json.loads(out.strip().splitlines()[-1]))
        done[kind].append(s)
        print(f"process {i + 1:2d} ({kind:9s}): base {s['base_ms']:.0f} ms ({s['base_faults']:.0f} faults), "
              f"int8 {s['int8_ms']:.0f} ms ({s['int8_faults']:.0f} faults), ratio {s['ratio']:.2f}", flush=True)
    for kind, rows in done.items():
        ratios = [r["ratio"] for r in rows]
        faulting = sum(r["int8_faults"] > 1000 for r in rows)
        print(f"{kind}: int8 speed-up over base at batch 1, median {statistics.median(ratios):.2f} "
              f"(processes: {min(ratios):.2f} to {max(ratios):.2f}); processes whose int8 calls page-faulted "
              f"(median above 1,000 a call): {faulting} of {len(rows)}")


if __name__ == "__main__":
    main()
