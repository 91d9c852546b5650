"""The paper's vocabulary recipe under two scikit-learn versions, on the same patches: how much the
installed scikit-learn (1.3 and later seed k-means++ differently) moves inter-image token counts
against the paper's 1.2.2.

Three steps, so that the k-means can run in a venv with only NumPy and scikit-learn 1.2.2:

  patches  (this project's venv) the pixel patches of random crops of the ``samples`` photographs,
           ``--images`` images of 196 patches each (the paper's loader batch: 1024), to a .npy file
  learn    (any venv with NumPy and scikit-learn) the paper's recipe on them for each size: NumPy
           seeded 0, ``MiniBatchKMeans(V, n_init="auto", batch_size=1024)`` (as ``vwt.vocab.paper_kmeans``,
           written out here because this step runs without torch), one ``partial_fit`` per 1024 images;
           the words to ``<out>/v<V>.npy`` with the scikit-learn version in ``<out>/versions.txt``
  tokens   (this project's venv) tokens per image (class token included, of 197) of VWT inter-image at
           threshold 0.1 on the 12 sample photographs for each folder's words, and how the folders differ

    python benchmarks/sklearn_versions.py patches /tmp/vwt-patches.npy
    /tmp/sk122/bin/python benchmarks/sklearn_versions.py learn /tmp/vwt-patches.npy /tmp/words-1.2.2
    python benchmarks/sklearn_versions.py learn /tmp/vwt-patches.npy /tmp/words-installed
    python benchmarks/sklearn_versions.py tokens /tmp/words-1.2.2 /tmp/words-installed
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PER_IMAGE = 196
BATCH_IMAGES = 1024  # the paper's loader batch: one partial_fit per 1024 images


def save_patches(out: Path, images: int) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_kmeans import patches

    x = patches(images * PER_IMAGE, seed=0).numpy().astype(np.float32)
    np.save(out, x)
    print(f"{x.shape[0]} patches ({images} images of {PER_IMAGE}) -> {out}")


def learn(patches_file: Path, out: Path, sizes) -> None:
    import sklearn
    from sklearn.cluster import MiniBatchKMeans

    x = np.load(patches_file, mmap_mode="r")
    out.mkdir(parents=True, exist_ok=True)
    for v in sizes:
        km = MiniBatchKMeans(n_clusters=v, n_init="auto", batch_size=1024, random_state=np.random.RandomState(0))
        step = BATCH_IMAGES * PER_IMAGE
        for s in range(0, x.shape[0], step):
            km.partial_fit(np.ascontiguousarray(x[s:s + step]))
        np.save(out / f"v{v}.npy", km.cluster_centers_.astype(np.float32))
        print(f"scikit-learn {sklearn.__version__}: {v} words -> {out / f'v{v}.npy'}")
    (out / "versions.txt").write_text(f"scikit-learn {sklearn.__version__}\nnumpy {np.__version__}\n")


def tokens(folders) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    sys.path.insert(0, str(REPO))
    import vwt
    from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, sample_images
    from vwt.tokenizer import tokenize

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    prep = Preprocess(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    photos = torch.stack([prep(im) for _, im in sample_images()])
    words = {f: {p.stem: torch.from_numpy(np.load(p)) for p in sorted(Path(f).glob("v*.npy"))} for f in folders}
    print("folder  " + "  ".join(f"{Path(f).name} ({(Path(f) / 'versions.txt').read_text().splitlines()[0]})"
                                 for f in folders))
    for name in words[folders[0]]:
        counts = []
        for f in folders:
            state, _ = tokenize(model, vwt.InterImage(words[f][name], thresh=0.1), photos)
            counts.append(state.real_counts().float().mean().item())
        same = [torch.equal(words[f][name], words[folders[0]][name]) for f in folders[1:]]
        print(f"{name}: tokens per image " + " vs ".join(f"{c:.2f}" for c in counts)
              + f" ({100 * (counts[-1] - counts[0]) / counts[0]:+.1f}%); words identical: {same}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("patches")
    a.add_argument("out", type=Path)
    a.add_argument("--images", type=int, default=BATCH_IMAGES, help=f"images of patches (default {BATCH_IMAGES})")
    b = sub.add_parser("learn")
    b.add_argument("patches", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="vocabulary sizes (default 100 1000)")
    c = sub.add_parser("tokens")
    c.add_argument("folders", nargs="+")
    args = p.parse_args()
    if args.step == "patches":
        save_patches(args.out, args.images)
    elif args.step == "learn":
        learn(args.patches, args.out, args.sizes)
    else:
        tokens(args.folders)


if __name__ == "__main__":
    main()
