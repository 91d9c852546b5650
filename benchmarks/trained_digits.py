"""Accuracy of every method on weights that learned something: a small timm ViT trained here, on the CPU,
on scikit-learn's handwritten digits (1,797 8x8 images, upsampled to 32x32; 4x4 patches: 64 patch
tokens + a class token). It is a small model trained in this repository, not the paper's models: it
checks that the reducers keep what a trained ViT computes (a wrongly weighted merge shows up as lost
accuracy, which random weights cannot show), not the paper's numbers.

Training is seeded and cached outside git (~/.cache/vwt/trained_digits/, --cache); the test split is a
stratified quarter (random_state 0). Reported for base, intra, inter (a vocabulary learned on the
training split by process.py's paper recipe, vwt.Vocabulary.learn_paper, with the model's patch size),
ToMe, EViT, LGTM, resize at three strengths each (inter-image: 1000, 100 and 10 words) and int8 (torchao; alone and under a mild ToMe and
intra-image): test accuracy, tokens and analytic FLOPs (vwt.flops), as a CSV, a markdown table and an
accuracy-vs-FLOPs figure.

    python benchmarks/trained_digits.py                           # trains once (a few minutes), then evaluates: runs/
    python benchmarks/trained_digits.py --threads 1 --out results  # the committed results/trained_digits.*
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import cli, results  # noqa: E402
from vwt.flops import dense_flops, dims_of, flops_of_last_forward  # noqa: E402

CACHE = Path.home() / ".cache" / "vwt" / "trained_digits"


@dataclass(frozen=True)
class Recipe:
    """The model and its training: a timm VisionTransformer with a class token (token pooling)."""

    image: int = 32
    patch: int = 4
    dim: int = 32
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    epochs: int = 25
    batch: int = 64
    lr: float = 4e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def digits(image: int = 32):
    """(train x, train y, test x, test y): the digits as (N, 3, image, image) in [-1, 1] (mean 0.5, std
    0.5, grey in all three channels), bilinearly upsampled; a stratified 75/25 split (random_state 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=image, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    tr, te = train_test_split(torch.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    return x[tr], y[tr], x[te], y[te]


def build(r: Recipe):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(r.seed)
    return VisionTransformer(img_size=r.image, patch_size=r.patch, embed_dim=r.dim, depth=r.depth, num_heads=r.heads,
                             mlp_ratio=r.mlp_ratio, num_classes=10, global_pool="token", qkv_bias=True)


def train(r: Recipe, cache: Path | None = CACHE, log=None):
    """The trained model (eval mode) of recipe ``r``: loaded from ``cache`` when trained before (None:
    always train, keep nothing). AdamW, one-cycle learning rate, cross-entropy; seeded (data order and
    initial weights)."""
    model = build(r)
    path = None if cache is None else Path(cache) / f"{r.key()}.pt"
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    x, y, _, _ = digits(r.image)
    g = torch.Generator().manual_seed(r.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.05)
    steps = r.epochs * ((len(y) + r.batch - 1) // r.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=steps)
    model.train()
    for epoch in range(r.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(perm), r.batch):
            idx = perm[i:i + r.batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log is not None:
            log(f"epoch {epoch + 1}/{r.epochs}: loss {loss.item():.3f}")
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        results.atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return model


def vocabulary(r: Recipe, size: int = 1000):
    """process.py's paper recipe on the training split: MiniBatchKMeans over the pixel patches of the
    model's patch size, batches of 1024 images in order, seed 0."""
    x, _, _, _ = digits(r.image)
    return vwt.Vocabulary.learn_paper((x[i:i + 1024] for i in range(0, len(x), 1024)), size=size,
                                      space="pixel", patch_size=r.patch, seed=0)


def evaluate(model, x, y, reducers=(), batch: int = 256) -> dict:
    """Test accuracy of ``model`` patched with ``reducers``, its tokens (entering the first block, mean
    over blocks) and analytic FLOPs per image (vwt.flops); the model is left unpatched."""
    correct, flops, first, mean = 0, [], [], []
    vwt.patch(model, *reducers)
    try:
        with torch.inference_mode():
            for i in range(0, len(y), batch):
                logits = model(x[i:i + batch])
                correct += int((logits.argmax(1) == y[i:i + batch]).sum())
                s = vwt.stats(model)
                flops.append(flops_of_last_forward(model))
                first.append(s["tokens_first_block"])
                mean.append(s["tokens_mean"])
    finally:
        vwt.unpatch(model)
    return {"accuracy": correct / len(y), "tokens_in": float(torch.cat(first).mean()),
            "tokens_mean": float(torch.cat(mean).mean()), "mflops": float(torch.cat(flops).mean()) / 1e6}


def methods(r: Recipe, vocab: list) -> list:
    """(method, setting, reducers, int8) of every configuration measured: three strengths each (inter-image:
    the ``vocab`` vocabularies at the paper's threshold; smaller vocabularies merge more, since only
    the patches of one image that match the same word merge)."""
    n = (r.image // r.patch) ** 2
    rows = [("base", "", [], False)]
    rows += [("intra", f"drop {d:g}", [vwt.IntraImage(d)], False) for d in (0.25, 0.5, 0.75)]
    rows += [("inter", f"v{len(v)} t0.1", [vwt.InterImage(v, thresh=0.1)], False) for v in vocab]
    rows += [("tome", f"r {k}", [vwt.ToMe(r=k)], False) for k in (4, 8, 16)]
    rows += [("evit", f"keep {k:g}", [vwt.EViT(keep=k)], False) for k in (0.9, 0.7, 0.5)]
    rows += [("lgtm", f"r {k}", [vwt.LGTM(r=k)], False) for k in (4, 8, 16)]
    rows += [("resize", f"{s} px ({(s // r.patch) ** 2} of {n} patches)", [vwt.Resize(s)], False)
             for s in (28, 24, 16)]
    rows += [("int8", "", [], True), ("int8", "+ tome r 4", [vwt.ToMe(r=4)], True),
             ("int8", "+ intra drop 0.5", [vwt.IntraImage(0.5)], True)]
    return rows


def run(r: Recipe, cache: Path | None = CACHE, log=print) -> list[dict]:
    """Train (or load) the model and the vocabulary, then evaluate every configuration of :func:`methods`."""
    model = train(r, cache, log)
    vocab = [vocabulary(r, size) for size in (1000, 100, 10)]
    _, _, x, y = digits(r.image)
    q = None
    out = []
    for method, setting, reducers, int8 in methods(r, vocab):
        if int8 and q is None:
            q = vwt.quantize(copy.deepcopy(model), backend="torchao")
        row = {"method": method, "setting": setting, **evaluate(q if int8 else model, x, y, reducers)}
        out.append(row)
        if log is not None:
            log(f"{method:7s} {setting:28s} accuracy {row['accuracy']:.4f}  tokens {row['tokens_mean']:5.1f}  "
                f"{row['mflops']:.1f} MFLOPs")
    dense = dense_flops(dims_of(model)) / 1e6
    for row in out:
        row["flops_ratio"] = row["mflops"] / dense
    return out


def markdown(rows: list[dict], r: Recipe, images: int, seconds: float, cached: bool) -> str:
    base = rows[0]["accuracy"]
    lines = [f"Small timm ViT trained here on scikit-learn's digits (not the paper's models): {r.image}x{r.image} "
             f"images, {r.patch}x{r.patch} patches ({(r.image // r.patch) ** 2} + class token), depth {r.depth}, "
             f"width {r.dim}, {r.epochs} epochs, seed {r.seed}; {images} test images ({seconds:.0f} s, "
             f"{'weights from the cache' if cached else 'training included'}).", "",
             "| method | setting | accuracy | vs base | tokens (mean over blocks) | MFLOPs | FLOPs ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['setting']} | {row['accuracy']:.4f} | {row['accuracy'] - base:+.4f} | "
                     f"{row['tokens_mean']:.1f} | {row['mflops']:.1f} | {row['flops_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    base = rows[0]
    for i, method in enumerate(dict.fromkeys(row["method"] for row in rows[1:])):
        pts = [row for row in rows if row["method"] == method]
        ax.plot([p["mflops"] for p in pts], [100 * p["accuracy"] for p in pts], marker="os^vD<>P"[i % 8],
                label=method, color=f"C{i}", linestyle="-" if method != "int8" else "none")
    ax.scatter([base["mflops"]], [100 * base["accuracy"]], marker="*", s=220, color="black", zorder=5, label="base")
    ax.axhline(100 * base["accuracy"], color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("MFLOPs per image (analytic, vwt.flops)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    results.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=cli.DEFAULT_OUT, help="folder for trained_digits.{csv,md,png} "
                   f"(default {cli.DEFAULT_OUT}/, which git ignores; --out results refreshes the committed ones)")
    p.add_argument("--cache", type=Path, default=CACHE, help=f"trained weights (default {CACHE})")
    p.add_argument("--epochs", type=int, default=Recipe.epochs, help=f"training epochs (default {Recipe.epochs})")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.epochs < 1:
        raise cli.UserError("--epochs must be at least 1")
    return args


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    r = Recipe(epochs=args.epochs, seed=args.seed)
    cached = args.cache is not None and (Path(args.cache) / f"{r.key()}.pt").exists()
    rows = run(r, args.cache, log=lambda line: print(line, flush=True))
    seconds = time.time() - started
    import pandas as pd

    results.writable_dir(args.out)
    stem = args.out / "trained_digits"
    results.atomic_write_text(stem.with_suffix(".csv"), pd.DataFrame(rows).to_csv(index=False))
    images = len(digits(r.image)[3])
    results.atomic_write_text(stem.with_suffix(".md"), markdown(rows, r, images, seconds, cached))
    plot(rows, stem.with_suffix(".png"), f"digits, small ViT trained here (depth {r.depth}, width {r.dim}, "
         f"{(r.image // r.patch) ** 2} patches): accuracy vs FLOPs")
    print(f"wrote {stem}.csv, .md, .png in {seconds:.0f} s")


if __name__ == "__main__":
    cli.main(main)
