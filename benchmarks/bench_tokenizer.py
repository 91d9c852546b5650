"""Cost of the VWT inter-image tokenizer as a fraction of the CLIP ViT-B/16 vision forward it shortens.

Times ``InterImage.reduce_input`` (match every patch to the vocabulary, merge, pad) against the whole
unpatched vision forward (random weights: weights do not change runtime), in interleaved rounds
(vwt.bench: order shuffled every round); prints medians and the median of per-round ratios. Inputs are the real ``samples`` photographs with
CLIP preprocessing; the words are distinct pixel patches of random crops of those photographs (so a
realistic share of patches matches and the merge path runs; real vocabularies are k-means centres).
"search" says which nearest-word search ran: one exhaustive matmul, or for vocabularies of at least
``vwt.vocab.FAST_MIN_WORDS`` words the exact bound-and-refine search; "matched" counts the patches that
match a word and "!=matmul" those of them given another word than the exhaustive float32 matmul's
argmax (the paper's search; near ties: see --float32-ties). Targets: <= 1.5% with 1,000 words, <= 5%
with 10,000.

    python benchmarks/bench_tokenizer.py [--batch 1 32] [--vocab 1000 10000] [--rounds 15] [--thresh 0.1]
                                         [--float32-ties]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import bench  # noqa: E402
from vwt.backends import family_of  # noqa: E402
from vwt.datasets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, sample_images  # noqa: E402
from vwt.vocab import FAST_MIN_WORDS  # noqa: E402
from vwt.encoder import InputContext, initial_state  # noqa: E402
from bench_kmeans import patches as crop_patches  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    p.add_argument("--vocab", type=int, nargs="+", default=[1000, 10000], help="vocabulary sizes (default 1000 10000)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per configuration (default 15)")
    p.add_argument("--thresh", type=float, default=0.1, help="cosine-distance threshold (default 0.1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--float32-ties", action="store_true",
                   help="near ties as the float32 matmul picks them (InterImage(float32_ties=True), --protocol paper)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)).eval()
    tower = family_of(model).tower(model)
    prep = Preprocess(224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    photos = torch.stack([prep(im) for _, im in sample_images()])
    pool = crop_patches(max(args.vocab) * 4, seed=1)  # crops of the same photographs, 16x16 pixel patches
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(photos)} sample photographs"
          + ("; float32 ties" if args.float32_ties else ""))
    print("batch  words  forward_ms  tokenizer_ms  ratio   tokens/image (of 197)  matched  !=matmul  search")
    for v in args.vocab:
        g = torch.Generator().manual_seed(v)
        words = pool[torch.randperm(len(pool), generator=g)[:v]]
        reducer = vwt.InterImage(vwt.Vocabulary(words), thresh=args.thresh, float32_ties=args.float32_ties)
        fast = v >= FAST_MIN_WORDS and args.thresh < 0.5
        search = "bound+refine" if fast else "exhaustive"
        for b in args.batch:
            x = photos[torch.arange(b) % len(photos)]
            with torch.inference_mode():
                emb, patches, grid = tower.embed(x)
                ctx = InputContext(pixel_values=x, patch_size=16, patch_embeds=patches)

                def tokenize():
                    return reducer.reduce_input(initial_state(emb, grid, 1), ctx)

                def forward():
                    return model(pixel_values=x)

                methods = [bench.Method("base", lambda _: forward()), bench.Method("tokenizer", lambda _: tokenize())]
                summary = bench.summarise(bench.interleave(methods, [x], rounds=args.rounds, warmup=2))
                tokens = tokenize().real_counts().float().mean().item()
                matched, differ = against_matmul(reducer, x)
            f, t = summary.figures["base"], summary.figures["tokenizer"]
            print(f"{b:5d}  {v:5d}  {f['batch_ms_median']:10.1f}  {t['batch_ms_median']:12.2f}  "
                  f"{100 / t['speedup_median']:5.2f}%  {tokens:21.1f}  {matched:7d}  {differ:8d}  {search}"
                  + ("  (busy machine)" if summary.busy else ""))


def against_matmul(reducer, x):
    """Matched patches, and how many of them got another word than the exhaustive float32 matmul's
    argmax (the paper's search) gives them."""
    feats = vwt.tokenizer.pixel_patches(x, 16)
    word, dist = reducer.match(feats)
    f = torch.nn.functional.normalize(feats.reshape(-1, feats.shape[-1]).float(), dim=1)
    cos, ref = (f @ reducer.vocab.unit().T).max(1)
    matched = (1 - cos) <= reducer.thresh
    return int(matched.sum()), int((word.flatten() != ref)[matched].sum())


if __name__ == "__main__":
    main()
