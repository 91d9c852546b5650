"""torch.compile of patched models (vwt.compiling, what eff.py --compile times): a compiled patched
model gives the eager patched model's outputs, for every reducer on hf_clip (ToMe and inter-image on timm), including
inter-image on images that keep different token counts (dynamic shapes); and first_calls counts what
the compiler did (graphs, graph breaks, recompilations) and its seconds."""
import pytest
import torch

import tiny
import vwt
from test_input_reference import inter_case
from vwt import compiling

REDUCERS = {
    "base": lambda words: [],
    "intra": lambda words: [vwt.IntraImage(0.5)],
    "inter": lambda words: [vwt.InterImage(vwt.Vocabulary(words), thresh=0.1)],
    "tome": lambda words: [vwt.ToMe(r=2)],
    "evit": lambda words: [vwt.EViT(keep=0.7)],
    "lgtm": lambda words: [vwt.LGTM(r=2)],
    "inter+tome": lambda words: [vwt.InterImage(vwt.Vocabulary(words), thresh=0.1), vwt.ToMe(r=2)],
}


# every reducer on Hugging Face CLIP (the paper's family); on timm the two that share no code path with
# it beyond the block loop (each compile costs 20-70 s on the 2-core CPU, so CI keeps to these 9)
CASES = [("hf_clip.vision", m) for m in REDUCERS] + [("timm.token", "tome"), ("timm.token", "inter")]


@pytest.mark.slow
@pytest.mark.parametrize("family,method", CASES)
def test_a_compiled_patched_model_gives_the_eager_outputs(family, method):
    build, entry = tiny.ENTRIES[family]
    model = build(depth=2)
    words, x = inter_case(3)  # images that keep different token counts under inter-image
    reducers = REDUCERS[method](words)
    vwt.patch(model, *reducers)
    batches = [x[:1], x[1:2], x]  # two single images (other token counts: a new shape) and a batch
    with torch.inference_mode():
        eager = [entry(model, b) for b in batches]
        counts = [vwt.stats(model)["tokens_first_block"].tolist()]
        fn = compiling.compiled(model, dynamic=method in ("intra", "inter", "inter+tome"))
        report = compiling.first_calls(lambda b: entry(fn, b), batches, passes=1)
        done = [entry(fn, b) for b in batches]
    for e, c in zip(eager, done):
        assert e.shape == c.shape
        torch.testing.assert_close(c, e, rtol=0, atol=1e-5)
    if method.startswith("inter"):
        assert len(set(counts[0])) > 1  # the case does vary the token count per image
    assert report.seconds > 0 and report.graphs >= 1
    assert report.limit_hits == 0  # no function hit torch's recompile limit: nothing fell back to eager


def test_first_calls_counts_graphs_breaks_and_recompiles():
    """A function with a graph break compiles two graphs on its first call; a new shape under static
    shapes compiles again (a recompile), and the note says both; a dynamic one does not recompile;
    more shapes than torch's recompile limit are counted as limit hits (torch then runs eagerly)."""
    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch._dynamo.reset()
    static = compiling.compiled(broken, dynamic=False)
    report = compiling.first_calls(static, [torch.ones(2), torch.ones(3)], passes=1)
    assert report.graphs == 2 and report.graph_breaks >= 1 and report.recompiles >= 1
    assert "graph break" in report.note and "recompilation" in report.note
    torch._dynamo.reset()
    dynamic = compiling.compiled(lambda x: x.sin() * 2, dynamic=True)
    report = compiling.first_calls(dynamic, [torch.ones(2), torch.ones(3), torch.ones(5)], passes=1)
    assert (report.graphs, report.graph_breaks, report.recompiles, report.limit_hits, report.note) == (1, 0, 0, 0, "")
    torch._dynamo.reset()  # a recompile per shape beyond torch's limit: counted, and said, never silent
    static = compiling.compiled(lambda x: x.cos() + 1, dynamic=False)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # every shape its own compilation
        report = compiling.first_calls(static, [torch.ones(n) for n in range(1, compiling.recompile_limit() + 3)],
                                       passes=1)
    assert report.limit_hits >= 1 and "recompile limit" in report.note
