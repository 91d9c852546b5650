"""The paper's k-means recipe (process.py --kmeans paper) against vwt's own (--kmeans fast) on the same patches.

Patches: 16x16 pixel patches (768 values, CLIP normalisation) of random crops of the ``samples``
photographs, shuffled. Contenders, each learning the same number of words from the same patches, one pass:

  paper      scikit-learn ``MiniBatchKMeans(V, batch_size=B, n_init="auto")`` seeded as the paper, one
             ``partial_fit`` per batch of B images (B·196 patches; the paper's B is 1024)
  fast       vwt's k-means as process.py --kmeans fast runs it: 32-image updates, then 2 Lloyd passes
  fast-r0    the same without the Lloyd passes (--refine 0)

Rounds are interleaved (each round runs every contender once, in a shuffled order) because the CPU is
shared; each run is timed whole (initialisation included) and its inertia (sum of squared distances of
all patches to their nearest word) computed the same way afterwards. Printed: per contender the median
time and inertia, and the medians over rounds of the per-round ratios to the paper's recipe.

    python benchmarks/bench_kmeans.py [--patches 200704] [--words 1000] [--recipe-batch 256] [--rounds 3]
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, sample_images  # noqa: E402
from vwt.tokenizer import pixel_patches  # noqa: E402
from vwt.vocab import MiniBatchKMeans, inertia, paper_kmeans  # noqa: E402

PER_IMAGE = 196  # 16x16 patches of a 224 px image


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


def run_paper(xn, words, images):
    km = paper_kmeans(words, batch_size=images, seed=0)
    step = images * PER_IMAGE
    t = time.perf_counter()
    for s in range(0, len(xn), step):
        km.partial_fit(xn[s:s + step])
    return time.perf_counter() - t, torch.from_numpy(km.cluster_centers_).float()


def run_fast(x, words, refine):
    km = MiniBatchKMeans(words, seed=0)
    t = time.perf_counter()
    km.fit(x, batch=32 * PER_IMAGE, passes=1, refine=refine)
    return time.perf_counter() - t, km.centres.cpu()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=200_704, help="number of patches (default 200704 = 1024 images)")
    p.add_argument("--words", type=int, default=1000, help="number of words (default 1000)")
    p.add_argument("--recipe-batch", type=int, default=256,
                   help="images per partial_fit of the paper's recipe (default 256: four updates on the default "
                        "patches; the paper's is 1024)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = p.parse_args()

    x = patches(args.patches)
    xn = x.numpy().astype(np.float32)
    contenders = {"paper": lambda: run_paper(xn, args.words, args.recipe_batch),
                  "fast": lambda: run_fast(x, args.words, 2),
                  "fast-r0": lambda: run_fast(x, args.words, 0)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (a shared CPU: other work may run beside); "
          f"{tuple(x.shape)} patches, {args.words} words, paper recipe: partial_fit per {args.recipe_batch} images")
    times = {k: [] for k in contenders}
    inert = {k: [] for k in contenders}
    order = list(contenders)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            t, centres = contenders[name]()
            times[name].append(t)
            inert[name].append(inertia(x, centres))
            print(f"  round {r} {name:8s} {t:7.2f} s  inertia {inert[name][-1]:.4g}", flush=True)
    print("contender  median s   inertia    time / paper   inertia / paper   (medians of per-round ratios)")
    for name in contenders:
        tr = statistics.median(a / b for a, b in zip(times[name], times["paper"]))
        ir = statistics.median(a / b for a, b in zip(inert[name], inert["paper"]))
        print(f"{name:9s} {statistics.median(times[name]):8.2f}  {statistics.median(inert[name]):9.4g}   "
              f"{tr:12.2f}   {ir:15.4f}")


if __name__ == "__main__":
    main()
