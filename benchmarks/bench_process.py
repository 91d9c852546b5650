"""process.py's cost, reading apart from fitting, per recipe and vocabulary size, and a cost model
extrapolated to ImageNet-1k's train split (1,281,167 images, 196 patches of 768 values at 224 px / 16).

Measured on this machine (one process; torch and BLAS as configured):

  read       ms per image: JPEG decode (the sample photographs saved at ~0.18 MP), the paper's
             preprocessing to 224 px, patchify (vwt.datasets.Preprocess, vwt.tokenizer.pixel_patches)
  step       seconds per partial_fit row x word for the paper recipe's step on ``--rows`` patches:
             sklearn-labels (scikit-learn's default, compute_labels=True: the step before this change),
             sklearn (compute_labels=False, process.py's default on a CPU), torch (vwt.kmeans on the CPU,
             and on CUDA where there is one); the same centres checked (max difference printed)
  seeding    k-means++ on init_size = 3 x max(1024, V) rows: float64 distance work 2 (2 + ln V) init_size D
             per centre, its rate measured at ``--seed-words``
  faiss      the fast recipe's fit: seconds per niter x sample x V x D (sample = 256 V), measured at
             ``--faiss-words``

Model (one row x word x value costs the same at any size, which the measurements at 100, 1,000 and
10,000 words check): fit = steps x rows x V x step_rate + seeding; fast = FAISS + bottom-k bookkeeping;
wall = read on ``--read-cores`` cores overlapped with the paper recipe's fit (loader workers; the fast
recipe fits after reading), or read + fit in series.
Peak memory, modelled: paper = (2 + workers) x one batch of float32 pixels (the batch, its patches,
one prefetched batch per worker) + (V, D + 2) float64 sums + 64 MB distance block; fast (vwt.vocab's
_Sample and faiss_kmeans) = reading: the uint8 sample + a quarter of it for the buffer of rows waiting
for a merge (an eighth of the sample and one block, grown by half at a time) + one prefetched batch of
32 images per worker + 6 such batches of float32 patches (the batch, its patches, the codec's
temporaries); fitting: the uint8 sample, 32 bytes per row (its key, FAISS's assignment and distance,
AFK-MC2's proposal distribution), 2 blocks of 32,768 decoded rows and the reading's 6 batches of
temporaries (the allocator keeps them). ``--memory`` measures the peak (VmRSS, sampled every 50 ms)
of each phase of Vocabulary.learn on synthetic 8-bit pixels.

    python benchmarks/bench_process.py --quick        # a few minutes on a 2-core machine
    python benchmarks/bench_process.py                # larger batches
    python benchmarks/bench_process.py --tolerance    # torch vs scikit-learn centres over 3 batches
    python benchmarks/bench_process.py --memory 100 --points 25600 --images 19600   # the 10,000-word sample
"""
import argparse
import io
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vwt import kmeans  # noqa: E402
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PaperPreprocess, sample_images  # noqa: E402
from vwt.tokenizer import pixel_patches  # noqa: E402
from vwt.vocab import MAX_POINTS_PER_CENTROID, NITER, PixelCodec, faiss_kmeans, paper_kmeans  # noqa: E402

IMAGENET, PER_IMAGE, D, BATCH = 1_281_167, 196, 768, 1024
WORDS = (100, 1000, 10_000)


def read_ms(n: int) -> float:
    """ms per image to decode a ~0.18 MP JPEG, preprocess it to 224 px and patchify it."""
    from PIL import Image

    pre = PaperPreprocess(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    jpegs = []
    for _, im in sample_images():
        buf = io.BytesIO()
        im.convert("RGB").resize((500, 360)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pixel_patches(pre(Image.open(io.BytesIO(jpegs[0])).convert("RGB"))[None], 16)  # warm
    t = time.perf_counter()
    for i in range(n):
        x = pre(Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB"))
        pixel_patches(x[None], 16)
    return (time.perf_counter() - t) / n * 1e3


def patches(rows: int, seed: int) -> np.ndarray:
    """Pixel-like float32 patches: random photograph crops would cost more to make than to fit."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, D, generator=g)
    x = base[torch.randint(0, 64, (rows,), generator=g)] + 0.5 * torch.randn(rows, D, generator=g)
    return x.numpy()


ENGINES = ("sklearn-labels", "sklearn", "torch")


def step_rates(words: int, rows: int, cuda: bool, rounds: int = 1) -> dict:
    """Seconds per row x word of one partial_fit step from the same first centres (seeding is timed
    apart), per engine: the median over ``rounds`` rounds, the engines in a shuffled order each round;
    each engine's median per-round ratio of its time to the default step's ("ratio"); and each
    engine's centres' largest difference from scikit-learn's, relative to their size ("same"; the step
    includes the first random reassignment: every count is still 0)."""
    start, x = patches(words, 0), patches(rows, 1)  # pixel-like rows, as many as asked
    engines = ENGINES + (("torch-cuda",) if cuda else ())
    times, centres, order = {e: [] for e in engines}, {}, random.Random(words)
    for _ in range(rounds):
        for engine in order.sample(engines, len(engines)):
            seconds, centres[engine] = _step(engine, words, start, x)
            times[engine].append(seconds)
    out = {e: statistics.median(t) / (rows * words) for e, t in times.items()}
    out["ratio"] = {e: statistics.median(a / b for a, b in zip(t, times["sklearn-labels"])) for e, t in times.items()}
    ref = centres["sklearn"]
    out["same"] = {e: float(np.abs(c - ref).max() / np.abs(ref).max()) for e, c in centres.items()}
    return out


def _step(engine: str, words: int, start: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Seconds of one step of ``engine`` on the rows ``x`` from the centres ``start``, and its centres."""
    rows = len(x)
    if engine.startswith("sklearn"):
        km = paper_kmeans(words, BATCH)
        km.set_params(init=start.copy(), n_init=1, compute_labels=engine == "sklearn-labels")
        t = time.perf_counter()
        km.partial_fit(x)
        return time.perf_counter() - t, km.cluster_centers_
    dev = "cuda" if engine == "torch-cuda" else "cpu"
    km = kmeans.MiniBatchKMeans(words, BATCH, seed=0, device=dev)
    km.centres, km.counts = torch.from_numpy(start).to(dev), np.zeros(words, np.float32)
    km._batch, km._since = min(BATCH, rows), 0
    init_size = 3 * words if 3 * km._batch < words else 3 * km._batch
    if init_size < rows:  # scikit-learn draws its seeding rows on the first call even from given centres
        km.random_state.randint(0, rows, init_size)
    xd = torch.from_numpy(x).to(dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    km.partial_fit(xd)
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, km.centres.cpu().numpy()


def seeding_rate(words: int) -> float:
    """Seconds per float64 multiply-add of k-means++ (vwt.kmeans.kmeans_plusplus on the CPU)."""
    m = 3 * max(BATCH, words)
    x = torch.from_numpy(patches(m, 2))
    t = time.perf_counter()
    kmeans.kmeans_plusplus(x, words, np.random.RandomState(0))
    return (time.perf_counter() - t) / seeding_work(words)


def seeding_work(words: int) -> float:
    m = 3 * max(BATCH, words)
    return words * (2 + math.log(words)) * m * D


def faiss_rate(words: int) -> float:
    """Seconds per niter x sample x word x value of FAISS k-means on a sample of 256 patches per word,
    fitted from uint8 rows as process.py --kmeans fast fits them (seeding included)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (words * MAX_POINTS_PER_CENTROID, D), generator=g, dtype=torch.uint8)
    t = time.perf_counter()
    faiss_kmeans(x, words, niter=NITER, seed=0, gpu=False, codec=PixelCodec(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 16))
    return (time.perf_counter() - t) / (NITER * x.shape[0] * words * D)


def tolerance(batches: int = 3, dim: int = 16) -> None:
    """The torch engine against scikit-learn over several batches from k-means++ seeding, at 100,
    1,000 and 10,000 words (small ``dim`` to stay quick): the centres' largest relative difference
    after each batch, scikit-learn's reassignments and whether the running counts agree."""
    from sklearn.cluster import MiniBatchKMeans as SK

    for v in WORDS:
        rng = np.random.default_rng(v)
        xs = [(rng.standard_normal((4 * v, dim)) + 3 * (rng.random((4 * v, 1)) < 0.1)).astype(np.float32)
              for _ in range(batches)]
        sk = SK(n_clusters=v, n_init="auto", batch_size=v // 4, compute_labels=False,
                random_state=np.random.RandomState(0))
        ours, gaps = kmeans.MiniBatchKMeans(v, v // 4, seed=0), []
        for x in xs:
            sk.partial_fit(x)
            ours.partial_fit(torch.from_numpy(x))
            gaps.append(float(np.abs(sk.cluster_centers_ - ours.centres.numpy()).max() / np.abs(sk.cluster_centers_).max()))
        print(f"tolerance V={v} dim={dim}: after each of {batches} batches " + ", ".join(f"{g:.1e}" for g in gaps)
              + f"; counts equal: {np.array_equal(sk._counts, ours.counts)}; torch reassigned {ours.reassigned} words"
              + f" (limit {kmeans.TOLERANCE:.0e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small batches, one repeat: a few minutes")
    p.add_argument("--rows", type=int, default=None, help="patches per timed step (default 8192; --quick 2048)")
    p.add_argument("--read-images", type=int, default=None, help="images timed for reading (default 200; quick 40)")
    p.add_argument("--read-cores", type=int, default=2, help="cores that read while the fit runs (default 2)")
    p.add_argument("--workers", type=int, default=4, help="loader workers for the memory model (default 4)")
    p.add_argument("--words", type=int, nargs="+", default=list(WORDS),
                   help="vocabulary sizes measured and extrapolated (default 100 1000 10000)")
    p.add_argument("--step-rounds", type=int, default=1,
                   help="rounds of the step timing, the engines shuffled in each (medians; default 1)")
    p.add_argument("--seed-words", type=int, default=100)
    p.add_argument("--tolerance", action="store_true",
                   help="only measure the torch engine's centres against scikit-learn's over several batches")
    p.add_argument("--faiss-words", type=int, default=None, help="default 200; quick 100")
    p.add_argument("--memory", type=int, default=None, metavar="WORDS",
                   help="only measure the fast recipe's peak memory, reading and fitting, at WORDS words")
    p.add_argument("--points", type=int, default=MAX_POINTS_PER_CENTROID, help="--memory: sample points per word")
    p.add_argument("--images", type=int, default=2000, help="--memory: synthetic 224 px images read")
    a = p.parse_args(argv)
    if a.tolerance:
        return tolerance()
    if a.memory:
        return memory(a.memory, a.points, a.images)
    rows = a.rows or (2048 if a.quick else 8192)
    cuda = torch.cuda.is_available()
    print(f"torch threads {torch.get_num_threads()}, CUDA: {torch.cuda.get_device_name() if cuda else 'none'}")
    r_ms = read_ms(a.read_images or (40 if a.quick else 200))
    print(f"read: {r_ms:.2f} ms per image (decode, preprocess to 224 px, patchify; one core)")
    rates = {}
    for v in a.words:
        rates[v] = step_rates(v, max(rows, v), cuda, a.step_rounds)  # scikit-learn wants at least V rows
        r = rates[v]
        print(f"step V={v}: " + ", ".join(f"{e} {r[e] * 1e9:.3f} ns/(row x word)" for e in r["ratio"])
              + "; median per-round time / sklearn-labels': " + ", ".join(f"{e} {q:.3f}" for e, q in r["ratio"].items())
              + "; torch vs sklearn centres: " + ", ".join(f"{e} {d:.1e}" for e, d in r["same"].items()))
    s_rate = seeding_rate(a.seed_words)
    f_rate = faiss_rate(a.faiss_words or (100 if a.quick else 200))
    print(f"seeding: {s_rate * 1e9:.3f} ns per float64 multiply-add; faiss: {f_rate * 1e9:.4f} ns per niter x row x word x value")
    report(rates, r_ms, s_rate, f_rate, a.read_cores, a.workers, cuda)


def report(rates, r_ms, s_rate, f_rate, cores, workers, cuda):
    """The ImageNet-1k extrapolation, one row per vocabulary size and recipe."""
    rows = IMAGENET * PER_IMAGE
    read_h = IMAGENET * r_ms / 1e3 / 3600
    batch_mb = BATCH * PER_IMAGE * D * 4 / 2 ** 20
    print(f"\nImageNet-1k extrapolated: read {read_h:.2f} h on one core, {read_h / cores:.2f} h on {cores}")
    print("| words | recipe | engine | fit (h) | wall, read overlapped (h) | wall, in series (h) | peak memory (GB, model) |")
    print("|---|---|---|---|---|---|---|")
    for v in rates:
        seed_h = seeding_work(v) * s_rate / 3600
        paper_mem = ((2 + workers) * batch_mb + v * (D + 2) * 8 / 2 ** 20 + 64) / 1024
        for engine in rates[v]["ratio"]:
            fit = rows * v * rates[v][engine] / 3600 + seed_h
            print(f"| {v:,} | paper | {engine} | {fit:.2f} | {max(fit, read_h / cores):.2f} | {fit + read_h:.2f} | {paper_mem:.1f} |")
        sample = v * MAX_POINTS_PER_CENTROID
        fit = NITER * sample * v * D * f_rate / 3600
        reading, fitting = fast_memory(sample, workers)
        fast_mem = max(reading, fitting) / 2 ** 30
        print(f"| {v:,} | fast | faiss | {fit:.2f} | {fit + read_h / cores:.2f} | {fit + read_h:.2f} | {fast_mem:.1f} |")
    print("\nfast recipe, modelled peak (GiB), reading / fitting: " + "; ".join(
        f"{v:,} words {fast_memory(v * MAX_POINTS_PER_CENTROID, workers)[0] / 2 ** 30:.2f} / "
        f"{fast_memory(v * MAX_POINTS_PER_CENTROID, workers)[1] / 2 ** 30:.2f}" for v in rates))


def fast_memory(sample: int, workers: int) -> tuple[float, float]:
    """Bytes the fast recipe holds at its peak while reading and while fitting (module docstring)."""
    batch = 32 * PER_IMAGE * D * 4  # process.py --kmeans fast reads batches of 32 images
    reading = sample * D * 5 / 4 + (workers + 6) * batch
    fitting = sample * (D + 32) + 2 * 32768 * D * 4 + 6 * batch
    return reading, fitting


def memory(words: int, points: int, images: int) -> None:
    """Peak memory (VmRSS, sampled every 50 ms) of each phase of Vocabulary.learn (the fast recipe) on
    ``images`` synthetic 8-bit images of 224 px in batches of 32, a sample of ``words`` x ``points``
    patches; GiB above the memory after the imports."""
    import threading

    from vwt import vocab

    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 2 ** 20

    phase, peaks, base = ["reading"], {}, rss()

    def watch():
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss() - base)
            time.sleep(0.05)

    def batches():
        mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
        g = torch.Generator().manual_seed(0)
        for s in range(0, images, 32):
            u = torch.randint(0, 256, (min(32, images - s), 3, 224, 224), generator=g, dtype=torch.uint8)
            yield u.float().div_(255).sub_(mean).div_(std)  # as to_tensor and normalize make them

    fit = vocab.faiss_kmeans
    vocab.faiss_kmeans = lambda *a, **k: (phase.__setitem__(0, "fitting"), fit(*a, **k))[1]
    threading.Thread(target=watch, daemon=True).start()
    t = time.perf_counter()
    v = vocab.Vocabulary.learn(batches(), size=words, patch_size=16, max_points_per_centroid=points, seed=0)
    time.sleep(0.2)
    vocab.faiss_kmeans = fit
    sample, fit_from = v.meta["sample"], v.meta.get("fit_from", "a float32 copy (before issue #30 item 4)")
    model = [m / 2 ** 30 for m in fast_memory(sample, 0)]
    print(f"memory: {words} words x {points} points: sample {sample:,} rows ({v.meta['sample_stored']}, "
          f"{sample * D / 2 ** 30:.2f} GiB), FAISS fit from {fit_from}, {time.perf_counter() - t:.0f} s; "
          f"peak above the imports ({base:.2f} GiB): reading {peaks.get('reading', 0):.2f} GiB (model, no workers, "
          f"{model[0]:.2f}), fitting {peaks.get('fitting', 0):.2f} GiB (model {model[1]:.2f})")


if __name__ == "__main__":
    main()
