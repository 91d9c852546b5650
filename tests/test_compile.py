"""torch.compile of patched models (vwt.compiling, what eff.py --compile times): a compiled patched
model gives the eager patched model's outputs, for every reducer on hf_clip (ToMe and inter-image on timm), including
inter-image on images that keep different token counts (dynamic shapes); and first_calls counts what
the compiler did (graphs, graph breaks, recompilations) and its seconds; clip.py and blip.py --compile
give the eager predictions, scores and captions, record what the compiler did, and leave the model as
it was."""
import json

import pytest
import torch

import blip as blip_script
import clip as clip_script
import fixtures
import tiny
import vwt
from test_input_reference import inter_case
from vwt import cli, compiling
from vwt.patch import patch_info

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


# --------------------------------------------------------------------------------------------------
# clip.py and blip.py --compile: the patched vision tower compiled in place, the same outputs as eager
# (one compiled run per test: each compile costs about a minute on the 2-core CPU; depth-2 towers)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fixtures.write_waterbirds(root)
    return root, fixtures.char_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_clip(tok):
    from transformers import CLIPModel

    cfg = tiny.hf_clip_config(depth=2)
    cfg.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    return cli.Loaded(CLIPModel(cfg).eval(), "hf_clip", "tiny-hf-clip", False, tok)


CLIP_CASES = {  # base and ToMe under either protocol; inter-image with a token count that varies per image
    "base": ["--protocol", "standard"],
    "tome": ["--tome", "2", "--protocol", "paper", "--seeds", "1"],
    "inter": ["--vocab-path", "{vocab}", "--thresh", "2", "--protocol", "standard"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CLIP_CASES))
def test_clip_script_compiled_gives_the_eager_predictions_and_scores(clip_data, tmp_path, method):
    root, tok = clip_data
    words = torch.randn(16, 192, generator=torch.Generator().manual_seed(16))  # 16 words: 2 to 17 tokens per image
    vocab = vwt.Vocabulary(words, space="pixel", patch_size=8).save(tmp_path / "v16")
    flags = [f.format(vocab=vocab) for f in CLIP_CASES[method]] + ["--data", "waterbirds", "--batch", "8"]
    argv = flags + ["--data-root", str(root), "--out", str(tmp_path), "--workers", "0", "--device", "cpu"]
    loaded = tiny_clip(tok)
    eager = clip_script.main(argv, loaded)
    done = clip_script.main(argv + ["--compile"], loaded)
    assert done["method"] == eager["method"] and done["config"]["compile"] is True and "compile" not in eager["config"]
    for key in ("avg", "worst", "loss", "tokens_first_block", "tokens_mean"):  # loss: the scores themselves
        assert done["metrics"][key]["mean"] == pytest.approx(eager["metrics"][key]["mean"], rel=0, abs=1e-5), key
    read = [open(r["predictions"]).read() for r in (eager["runs"][0], done["runs"][0])]
    assert read[0] == read[1] and eager["runs"][0]["predictions"] != done["runs"][0]["predictions"]
    c = done["compile"]
    assert c["compiled"] == "vision tower" and c["compile_s"] > 0 and c["graphs"] >= 1
    assert c["dynamic"] == (method == "inter") and c == done["runs"][0]["compile"] | dict(compilations=1)
    if method == "inter":
        assert 2 < done["metrics"]["tokens_first_block"]["mean"] < 17  # the token count did vary
    assert loaded.vision._compiled_call_impl is None and patch_info(loaded.model) is None  # left as it was


@pytest.mark.slow
def test_blip_script_compiled_gives_the_eager_captions(tmp_path):
    root = tmp_path / "data"
    fixtures.write_coco(root)
    tok = fixtures.word_bert_tokenizer(tmp_path / "tok")
    loaded = cli.Loaded(tiny.hf_blip(depth=2), "hf_blip", "tiny-blip", False, tok)
    argv = ["--data", "coco", "--no-score", "--tome", "2", "--batch", "4", "--data-root", str(root), "--workers", "0",
            "--device", "cpu"]
    got = {}
    for extra in ([], ["--compile"]):
        out = tmp_path / ("compiled" if extra else "eager")
        assert blip_script.main(argv + ["--out", str(out)] + extra, loaded) is None
        [path] = (out / "blip").glob("*.captions.jsonl")
        got[bool(extra)] = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    strip = lambda lines: [{k: v for k, v in l.items() if k != "file"} for l in lines]  # noqa: E731
    assert strip(got[True]) == strip(got[False]) and len(got[True]) == 4  # captions and token counts alike
    assert loaded.vision._compiled_call_impl is None and patch_info(loaded.model) is None


def test_compiled_module_compiles_the_module_for_its_callers_and_a_failure_is_one_line(monkeypatch):
    """A module compiled in place: its parent's call runs it through the compiler (one graph; the first
    call timed; a second shape under static shapes is a recompilation, said in the results' lines),
    the module is as it was afterwards, and a compiler that fails is a one-line UserError, never an
    eager run instead. (torch's eager backend: the mechanics, without inductor's minutes.)"""
    from vwt.errors import UserError

    backend = "eager"
    monkeypatch.setattr(compiling, "compiled", lambda fn, dynamic: torch.compile(fn, backend=backend, dynamic=dynamic))
    torch._dynamo.reset()
    inner = torch.nn.Linear(3, 3)
    outer = torch.nn.Sequential(inner, torch.nn.ReLU())
    with compiling.compiled_module(inner, dynamic=False) as watch:
        outer(torch.ones(2, 3))
        y = outer(torch.ones(5, 3))
    assert torch.equal(y, outer(torch.ones(5, 3))) and inner._compiled_call_impl is None
    r = watch.report
    assert (r.graphs, r.graph_breaks, r.recompiles, r.limit_hits) == (1, 0, 1, 0) and r.seconds > 0
    record = compiling.summary(r, False, "vision tower")
    two = compiling.combined([record, dict(record, graph_breaks=2, reasons=["a reason"])])
    assert (two["graph_breaks"], two["recompiles"], two["compilations"], two["compile_s"]) == (2, 2, 2, r.seconds)
    assert compiling.describe(record)[1] == "note: 1 recompilation after the first call"
    assert compiling.describe(two)[1] == ("note: the vision tower did not compile whole: 2 graph breaks (a reason); "
                                          "2 recompilations after the first call")

    def failing(gm, inputs):
        raise RuntimeError("no compiler here\nsecond line")

    # a torch that runs the module without tracing it (torch 2.13 did so with _call_impl compiled directly)
    monkeypatch.setattr(compiling, "compiled", lambda fn, dynamic: fn)
    torch._dynamo.reset()  # no compiled code left from above
    with pytest.raises(UserError, match=r"^torch.compile compiled nothing of the Linear \(torch .* ran it eagerly\); "
                                        r"run without --compile$"):
        with compiling.compiled_module(inner, dynamic=False):
            outer(torch.ones(2, 3))
    assert inner._compiled_call_impl is None
    monkeypatch.setattr(compiling, "compiled", lambda fn, dynamic: torch.compile(fn, backend=backend, dynamic=dynamic))

    backend = failing
    torch._dynamo.reset()
    with pytest.raises(UserError, match=r"^torch.compile could not compile the Linear \(BackendCompilerFailed: RuntimeError: "
                                        r"no compiler here\); run without --compile$"):
        with compiling.compiled_module(inner, dynamic=False):
            outer(torch.ones(2, 3))
    assert inner._compiled_call_impl is None


@pytest.mark.slow  # about 30 s: the paper's ToMe on 12 blocks, with dynamo only (no code generation)
def test_the_block_loop_compiles_whole_and_papers_tome_within_the_recompile_limit():
    """dynamo's view of the block loop (torch.compile's eager backend: its graphs and breaks, without
    inductor's minutes): the patched tower with no reducer is one graph with no break (a family
    without layer scales used to make an nn.Identity per forward, which dynamo cannot wrap: a break
    in every block), and the paper's ToMe on a 12-block tower never reaches torch's recompile limit
    (the token counts were a list, whose length dynamo guards, so the code resumed after its
    data-dependent break compiled again for every block until the limit, then ran eagerly)."""
    from vwt import methods
    from vwt.spec import Recipe, RunSpec

    _, x = inter_case(3)
    for depth, reducers in ((2, []), (12, methods.reducers_for(RunSpec(protocol="paper", method=Recipe(tome=1)),
                                                               family="hf_clip"))):
        model = vwt.patch(tiny.hf_clip_vision(depth=depth), *reducers)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="eager")
        with torch.inference_mode():
            eager = [model(pixel_values=b).last_hidden_state for b in (x[:2], x[2:])]
            report = compiling.first_calls(lambda b: fn(pixel_values=b), [x[:2], x[2:]])
            done = [fn(pixel_values=b).last_hidden_state for b in (x[:2], x[2:])]
        for e, d in zip(eager, done):
            torch.testing.assert_close(d, e, rtol=0, atol=1e-5)
        if not reducers:
            assert (report.graphs, report.graph_breaks) == (1, 0), report.reasons
        assert report.limit_hits == 0, report.note
