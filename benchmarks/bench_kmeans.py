"""Vocabulary learning on the same patches: the paper's recipe (process.py --kmeans paper), the fast path
(--kmeans fast: FAISS) and, for comparison, vwt's former own k-means loaded from a git revision.

Patches: 16x16 pixel patches (768 values, CLIP normalisation) of random crops of the ``samples``
photographs, shuffled. Contenders, each learning the same number of words from the same patches:

  paper      scikit-learn ``MiniBatchKMeans(V, batch_size=B, n_init="auto")`` seeded as the paper, one
             ``partial_fit`` per batch of B images (B·196 patches; the paper's B is 1024)
  faiss-I-nN the fast path as process.py runs it: the patches streamed in 32-image blocks through the
             seeded bottom-k sample (256 patches per word), then ``faiss.Kmeans`` with niter=N
             (--niter) from first centres I (--init: afk = AFK-MC2 seeding, the default; ran = random)
  ours       with --ours REV: ``MiniBatchKMeans`` of vwt/vocab.py at git revision REV (vwt's own k-means
             before FAISS replaced it), as its --kmeans fast ran: 32-image updates, then 2 Lloyd passes

Rounds are interleaved (each round runs every contender once, in a shuffled order) because the CPU is
shared; each run is timed whole (initialisation and sampling included) and its inertia (sum of squared
distances of all the patches to their nearest word) computed the same way afterwards for every contender.
Printed: per contender the median time and inertia, and the medians over rounds of the per-round ratios
to the paper's recipe (and to ours, with --ours).

    python benchmarks/bench_kmeans.py [--patches 200704] [--words 1000] [--recipe-batch 256] [--rounds 3]
                                      [--niter 3 10] [--init afk-mc2 random] [--ours 7d4ef4f]
"""
import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, sample_images  # noqa: E402
from vwt.tokenizer import pixel_patches  # noqa: E402
from vwt.vocab import INIT, INITS, MAX_POINTS_PER_CENTROID, NITER, bottom_k_sample, faiss_kmeans, inertia, paper_kmeans  # noqa: E402

PER_IMAGE = 196  # 16x16 patches of a 224 px image
BLOCK = 32 * PER_IMAGE  # process.py --kmeans fast reads 32 images at a time


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


def run_faiss(x, words, niter, init):
    t = time.perf_counter()
    sample = bottom_k_sample(((x[s:s + BLOCK], s) for s in range(0, len(x), BLOCK)),
                             words * MAX_POINTS_PER_CENTROID, seed=0)[0]
    centres = faiss_kmeans(sample, words, niter=niter, seed=0, gpu=False, init=init)[0]
    return time.perf_counter() - t, centres


def load_ours(rev: str):
    """vwt/vocab.py as it was at ``rev`` (loaded inside the vwt package, so its relative imports work)."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:vwt/vocab.py"], check=True,
                          capture_output=True, text=True).stdout
    fd, path = tempfile.mkstemp(suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("vwt._vocab_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(path)
    if not hasattr(module, "MiniBatchKMeans"):
        raise SystemExit(f"vwt/vocab.py at {rev} has no MiniBatchKMeans: pass a revision before FAISS replaced it")
    return module.MiniBatchKMeans


def run_ours(cls, x, words):
    km = cls(words, seed=0)
    t = time.perf_counter()
    km.fit(x, batch=BLOCK, passes=1, refine=2)
    return time.perf_counter() - t, km.centres.cpu()


def table(times, inert, base):
    print(f"contender       median s   inertia   time / {base:6s} inertia / {base:6s} (medians of per-round ratios)")
    for name in times:
        tr = statistics.median(a / b for a, b in zip(times[name], times[base]))
        ir = statistics.median(a / b for a, b in zip(inert[name], inert[base]))
        print(f"{name:14s} {statistics.median(times[name]):9.2f}  {statistics.median(inert[name]):9.4g}"
              f"   {tr:12.2f}   {ir:15.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=200_704, help="number of patches (default 200704 = 1024 images)")
    p.add_argument("--words", type=int, default=1000, help="number of words (default 1000)")
    p.add_argument("--recipe-batch", type=int, default=256,
                   help="images per partial_fit of the paper's recipe (default 256: four updates on the default "
                        "patches; the paper's is 1024)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--niter", type=int, nargs="+", default=[NITER],
                   help=f"FAISS iterations, one contender each (default {NITER}, the fast path's default)")
    p.add_argument("--init", nargs="+", default=[INIT], choices=INITS,
                   help=f"FAISS first centres, one contender each per --niter (default {INIT}, the fast path's)")
    p.add_argument("--ours", default=None, metavar="REV",
                   help="also run vwt's former own k-means from this git revision (e.g. 7d4ef4f)")
    args = p.parse_args()

    x = patches(args.patches)
    xn = x.numpy().astype(np.float32)
    contenders = {"paper": lambda: run_paper(xn, args.words, args.recipe_batch)}
    for init in args.init:
        for n in args.niter:
            contenders[f"faiss-{init[:3]}-n{n}"] = lambda n=n, init=init: run_faiss(x, args.words, n, init)
    if args.ours:
        cls = load_ours(args.ours)
        contenders["ours"] = lambda: run_ours(cls, x, args.words)
    import faiss

    print(f"torch {torch.__version__}, faiss {faiss.__version__}, {torch.get_num_threads()} threads (a shared CPU: "
          f"other work may run beside; load average {os.getloadavg()[0]:.1f}); {tuple(x.shape)} patches, {args.words} "
          f"words, paper recipe: partial_fit per {args.recipe_batch} images" + (f"; ours from {args.ours}" if args.ours else ""))
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
            print(f"  round {r} {name:14s} {t:7.2f} s  inertia {inert[name][-1]:.4g}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    table(times, inert, "paper")
    if args.ours:
        table(times, inert, "ours")


if __name__ == "__main__":
    main()
