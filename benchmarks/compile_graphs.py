"""What torch.compile makes of each patched configuration: graphs on the first call, graph breaks,
recompilations after it and hits of torch's recompile limit (vwt.compiling.first_calls, as eff.py
--compile counts them), on a small random Hugging Face CLIP vision tower as deep as ViT-B (12 blocks,
width 64, 32 px images of 8 px patches: 17 tokens), for two batches of 2 and 1 images, twice.

torch.compile runs with the "eager" backend: dynamo's graphs, breaks and recompilations are those
inductor would get, without its code generation (minutes per configuration on a 2-core CPU), so the
counts, not the seconds, are the result. Shapes are static unless an input reducer varies the token
count (``dynamic=True``), as eff.py compiles them.

    python benchmarks/compile_graphs.py [--methods base,intra,inter,tome,tome-paper,evit,lgtm]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vwt  # noqa: E402
from vwt import compiling, methods  # noqa: E402
from vwt.spec import Recipe, RunSpec  # noqa: E402

METHODS = ("base", "intra", "inter", "tome", "tome-paper", "evit", "lgtm")


def reducers(name: str, words: torch.Tensor) -> list:
    """The reducers of ``name`` (ToMe r=1 under either protocol: the paper's resets sizes per block)."""
    if name.startswith("tome"):
        protocol = "paper" if name == "tome-paper" else "standard"
        return methods.reducers_for(RunSpec(protocol=protocol, method=Recipe(tome=1)), family="hf_clip")
    return {"base": [], "intra": [vwt.IntraImage(0.5)], "evit": [vwt.EViT(keep=0.7)], "lgtm": [vwt.LGTM(r=2)],
            "inter": [vwt.InterImage(vwt.Vocabulary(words), thresh=0.95)]}[name]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    args = p.parse_args()

    from transformers import CLIPVisionConfig, CLIPVisionModel

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    words = torch.randn(4, 3 * 8 * 8, generator=g)  # at threshold 0.95: 10, 14 and 9 tokens
    print("method       graphs  breaks  recompiles  limit hits  break reasons")
    for name in args.methods.split(","):
        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                                                 num_attention_heads=4, image_size=32, patch_size=8)).eval()
        red = reducers(name, words)
        vwt.patch(model, *red)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="eager", dynamic=True if any(r.kind == "input" for r in red) else None)

        def call(x):
            with torch.inference_mode():
                fn(pixel_values=x)

        r = compiling.first_calls(call, [images[:2], images[2:]])
        print(f"{name:12s} {r.graphs:6d}  {r.graph_breaks:6d}  {r.recompiles:10d}  {r.limit_hits:10d}  "
              f"{'; '.join(r.reasons)}", flush=True)


if __name__ == "__main__":
    main()
