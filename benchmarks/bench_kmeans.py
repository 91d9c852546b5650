"""vwt's mini-batch k-means against scikit-learn's ``MiniBatchKMeans.partial_fit`` on the same patches.

Patches: 16x16 pixel patches (768 values, CLIP normalisation) of random crops of the ``samples``
photographs. Both learn the same number of words from the same patches, in the same batches and order,
for the same number of mini-batch passes; ours then makes its --refine Lloyd passes (vwt's default, 2;
each one more pass over the patches). Each run is timed whole (initialisation included) and the final
inertia of both is computed the same way, on all the patches. Runs alternate (ours, sklearn, ours, ...);
medians printed. patches/s = patches learned from per second of wall time. Target: ours at least as
fast, at no worse inertia. (--refine 0 compares the plain mini-batch passes alone.)

    python benchmarks/bench_kmeans.py [--patches 200000] [--words 1000] [--batch 6272] [--passes 1] [--refine 2] [--repeats 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, sample_images  # noqa: E402
from vwt.tokenizer import pixel_patches  # noqa: E402
from vwt.vocab import MiniBatchKMeans, inertia  # noqa: E402


def patches(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 768) patches of random crops (scale 0.1-1) of the sample photographs, shuffled."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    crop = RandomResizedCrop(224, scale=(0.1, 1.0))
    prep = Preprocess(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    photos = [im for _, im in sample_images()]
    out, have, i = [], 0, 0
    while have < n:
        x = prep(crop(photos[i % len(photos)]))[None]
        out.append(pixel_patches(x, 16)[0])
        have += out[-1].shape[0]
        i += 1
    x = torch.cat(out)[:n]
    return x[torch.randperm(n)].contiguous()


def run_ours(x, words, batch, passes, refine, seed, device):
    km = MiniBatchKMeans(words, seed=seed, device=device)
    xd = x.to(device)
    t = time.perf_counter()
    km.fit(xd, batch=batch, passes=passes, refine=refine)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, km.centres.cpu()


def run_sklearn(xn, words, batch, passes, seed):
    from sklearn.cluster import MiniBatchKMeans as SK

    km = SK(n_clusters=words, random_state=seed, n_init=1, batch_size=batch)
    t = time.perf_counter()
    for _ in range(passes):
        for s in range(0, len(xn), batch):
            km.partial_fit(xn[s:s + batch])
    return time.perf_counter() - t, torch.from_numpy(km.cluster_centers_).float()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=200_000, help="number of patches (default 200000)")
    p.add_argument("--words", type=int, default=1000, help="number of centres (default 1000)")
    p.add_argument("--batch", type=int, default=6272, help="patches per update (default 6272 = 32 images of 196)")
    p.add_argument("--passes", type=int, default=1, help="mini-batch passes over the patches (default 1)")
    p.add_argument("--refine", type=int, default=2, help="then Lloyd passes of ours (default 2, vwt's default)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each (default 3)")
    p.add_argument("--device", default="cpu", help="device of ours (sklearn is CPU only; default cpu)")
    args = p.parse_args()
    device = torch.device(args.device)

    x = patches(args.patches)
    xn = x.numpy().astype(np.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tuple(x.shape)} patches, "
          f"{args.words} words, batches of {args.batch}, {args.passes} mini-batch pass(es), ours + {args.refine} "
          f"Lloyd pass(es); ours on {device}")
    times = {"vwt": [], "sklearn": []}
    inert = {"vwt": [], "sklearn": []}
    for r in range(args.repeats):
        runs = [("vwt", lambda: run_ours(x, args.words, args.batch, args.passes, args.refine, r, device)),
                ("sklearn", lambda: run_sklearn(xn, args.words, args.batch, args.passes, r))]
        for name, fn in (runs if r % 2 == 0 else runs[::-1]):
            t, centres = fn()
            times[name].append(t)
            inert[name].append(inertia(x, centres))
            print(f"  run {r} {name:8s} {t:7.2f} s  inertia {inert[name][-1]:.6g}", flush=True)
    n = args.patches
    print("impl      seconds  patches/s   inertia (median over seeds)")
    for name in times:
        ts = statistics.median(times[name])
        print(f"{name:8s} {ts:8.2f}  {n / ts:9.0f}   {statistics.median(inert[name]):.6g}")
    print(f"speed ratio vwt/sklearn (patches/s): {statistics.median(times['sklearn']) / statistics.median(times['vwt']):.2f}; "
          f"inertia ratio vwt/sklearn: {statistics.median(inert['vwt']) / statistics.median(inert['sklearn']):.4f}")


if __name__ == "__main__":
    main()
