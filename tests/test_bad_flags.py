"""Bad flags and vocabulary files against the real scripts (issue #23, items 9, 10, 13 and 14): every
case ends in one line ``error: ...`` on stderr, exit code 2, no traceback, before any long work, and the
files earlier runs wrote are left byte for byte.

  9   values no run can use (``--penalty nan``, ``--seconds inf``, ``--workers -1``, seeds outside
      0..2^32-1, ``--scale 100000``, ``--cols -3``): refused by argparse itself (``argument --X: ...``);
      blip.py's ``--max-length`` that leaves no room after [BOS] or the prompt; a huge
      ``--max-points-per-centroid`` simply samples every patch
  10  clip.py ``--prompt`` without ``{}`` or with other fields, repeated ``--labels``, ``--vocab-path``
      fields other than ``{seed}``
  13  sidecars with a bad ``mean``/``std``/``image_size``, or a normalisation other than the model's
      (refused alike by every script that reads a vocabulary), a 0-d tensor with a sidecar,
      ``--summary`` over JSON files that are not results
  14  process.py refuses to keep a vocabulary learned otherwise than the run asks (k-means, its settings,
      patch size, protocol, ...), naming the difference

The scripts run forked, as tests/test_bad_input.py runs them (its helpers are reused).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fixtures
import tiny
import vwt
from test_bad_input import PATCH_DIM, _vocab_pair, _warm, refused, script, snapshot

SCRIPTS = ("clip.py", "blip.py", "len.py", "match.py", "word.py", "eff.py", "process.py")


def _patch16_clip(folder: Path) -> Path:
    """A tiny CLIP as fixtures.save_tiny_models saves one, with 16-pixel patches (a 2x2 grid)."""
    return fixtures.save_tiny_clip(folder, "clip-p16", patch_size=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, tiny data sets, vocabularies with odd sidecars, and earlier runs' files in ``out``:
    a process.py vocabulary (samples, 6 words, --kmeans fast) and blip.py captions of two images."""
    _warm()
    w = type("World", (), {})()
    w.dir = tmp_path_factory.mktemp("flags")
    w.clip, w.blip = fixtures.save_tiny_models(w.dir / "models")
    w.clip16 = _patch16_clip(w.dir / "models")
    w.data = w.dir / "data"
    fixtures.write_waterbirds(w.data)
    fixtures.write_coco(w.data)
    g = torch.Generator().manual_seed(0)
    v = w.dir / "vocabs"

    def words():
        return torch.randn(6, PATCH_DIM, generator=g)

    w.vocabs = {
        "bad-mean": _vocab_pair(v / "bad-mean", words(), {"mean": [0.5, "x", 0.5]}),
        "short-mean": _vocab_pair(v / "short-mean", words(), {"mean": [0.5, 0.5]}),
        "nan-std": _vocab_pair(v / "nan-std", words(), '{"std": [0.3, NaN, 0.3]}'),
        "zero-std": _vocab_pair(v / "zero-std", words(), {"std": [0.3, 0.0, 0.3]}),
        "bad-size": _vocab_pair(v / "bad-size", words(), {"image_size": "224"}),
        "negative-size": _vocab_pair(v / "negative-size", words(), {"image_size": -32}),
    }
    w.other_norm = _vocab_pair(v / "other-norm", words(), {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    w.zero_d = _vocab_pair(v / "zero-d", torch.tensor(3.0), {"size": 1})
    w.out = w.dir / "out"
    common = ["--workers", "0", "--device", "cpu"]
    w.tok = w.out / "tok"
    w.process_args = ["--model", w.clip, "--data", "samples", "--vocab", "6", "--out", w.tok, *common]
    for name, argv in (("process.py", [*w.process_args, "--kmeans", "fast"]),
                       ("blip.py", ["--model", w.blip, "--data", "coco", "--data-root", w.data, "--limit", "2",
                                    "--no-score", "--out", w.out, *common])):
        done = script(name, *argv, cwd=w.dir)
        assert done.code == 0, done
    w.before = snapshot(w.out)
    assert any(p.suffix == ".jsonl" for p in w.before) and (Path("tok") / "vocab.json") in w.before
    return w


@pytest.fixture
def intact(world):
    """Every case must leave the earlier runs' files byte for byte (and add none)."""
    yield
    assert snapshot(world.out) == world.before


BASE = {"clip.py": ["--model", "{clip}", "--data", "waterbirds"], "blip.py": ["--model", "{blip}", "--data", "coco"],
        "len.py": ["--model", "{clip}", "--data", "waterbirds"], "match.py": ["--model", "{clip}", "--limit", "1"],
        "word.py": ["--model", "{clip}", "--limit", "1"],
        "eff.py": ["--model", "{clip}", "--methods", "inter", "--batch", "1", "--limit", "1", "--rounds", "1",
                   "--seconds", "0.01", "--warmup-seconds", "0", "--protocol", "standard"],
        "process.py": ["--model", "{clip}", "--data", "samples", "--vocab", "6"]}


def _argv(world, name: str, extra) -> list[str]:
    """The script's base command line, ``extra``, and what keeps a case on this machine and these files."""
    names = {"clip": world.clip, "blip": world.blip, "dir": world.dir, "other_norm": world.other_norm,
             "zero_d": world.zero_d, **{k.replace("-", "_"): p for k, p in world.vocabs.items()}}
    argv = []
    for a in BASE[name] + list(extra):  # the world's placeholders only: other braces are the case's own
        for k, v in names.items():
            a = a.replace(f"{{{k}}}", str(v))
        argv.append(a)
    argv += ["--out", str(world.tok if name == "process.py" else world.out), "--device", "cpu"]
    if name != "process.py":
        argv += ["--data-root", str(world.data)]
    if name in ("clip.py", "blip.py", "len.py", "process.py") and "--workers" not in argv:
        argv += ["--workers", "0"]
    return argv


# --------------------------------------------------------------------------------------------------
# Items 9 and 10: values refused by argparse itself, before anything loads
# --------------------------------------------------------------------------------------------------
def _flag_cases():
    C = []

    def add(id_, name, extra, *says):
        C.append(pytest.param(name, extra, says, id=id_))

    for v in ("nan", "inf", "-inf"):
        add(f"penalty-{v}", "blip.py", [f"--penalty={v}"], "argument --penalty", "finite")
    for v in ("nan", "inf"):
        add(f"seconds-{v}", "eff.py", ["--seconds", v], "argument --seconds", "finite")
        add(f"warmup-seconds-{v}", "eff.py", ["--warmup-seconds", v], "argument --warmup-seconds", "finite")
    add("seconds-0", "eff.py", ["--seconds", "0"], "argument --seconds", "above 0")
    add("warmup-seconds-negative", "eff.py", ["--warmup-seconds", "-1"], "argument --warmup-seconds", "at least 0")
    for s in ("clip.py", "blip.py", "len.py", "process.py"):
        add(f"workers-negative-{s}", s, ["--workers", "-1"], "argument --workers", "at least 0")
    for s, flag in (("clip.py", "--seeds"), ("len.py", "--seed"), ("blip.py", "--seed"), ("process.py", "--seeds")):
        for v in ("-1", str(2 ** 32)):
            add(f"seed{v}-{s}", s, [flag, v], f"argument {flag}", "0 to 4294967295")
    add("max-points-0", "process.py", ["--kmeans", "fast", "--max-points-per-centroid", "0"],
        "argument --max-points-per-centroid")
    for s in ("match.py", "word.py"):
        add(f"scale-huge-{s}", s, (["--top_k", "0.5"] if s == "match.py" else []) + ["--scale", "100000"],
            "argument --scale", "1 to 32")
    add("cols-negative", "word.py", ["--cols", "-3"], "argument --cols", "at least 1")
    # item 10: prompts, labels, vocabulary path templates
    for id_, prompt, says in (("no-field", "a photo", "has no {}"), ("two-fields", "{0} and {1}", "field {1}"),
                              ("named-field", "a {label}", "field {label}"), ("unclosed", "a photo of a {", "Single '{'"),
                              ("stray-close", "a } photo of a {}", "Single '}'"),
                              ("mixed-numbering", "{} and {0}", "cannot switch")):
        add(f"prompt-{id_}", "clip.py", ["--prompt", prompt], "argument --prompt", says)
    add("labels-repeated", "clip.py", ["--labels", "bird,bird"], "argument --labels", "'bird' more than once")
    add("labels-empty", "clip.py", ["--labels", "bird,"], "argument --labels", "empty class name")
    for s in ("clip.py", "blip.py", "len.py", "match.py", "word.py", "eff.py"):
        add(f"vocab-path-field-{s}", s, ["--vocab-path", "{dir}/{data}/vocab.pt"], "argument --vocab-path",
            "field {data}", "{seed}")
    add("vocab-path-unclosed", "clip.py", ["--vocab-path", "{dir}/{seed/vocab.pt"], "argument --vocab-path", "{seed}")
    return C


@pytest.mark.parametrize("name, extra, says", _flag_cases())
def test_bad_values_are_refused_by_argparse(world, intact, name, extra, says):
    line = refused(script(name, *_argv(world, name, extra), cwd=world.dir), *says)
    assert line.endswith(f"(see {name} --help)")  # argparse's own line, so nothing ran before it


def test_help_still_shows_the_defaults(world):
    for name, shown in (("blip.py", "default 1.0"), ("eff.py", "default 0.5"), ("clip.py", "'a photo of a {}'"),
                        ("match.py", "(default 2)"), ("process.py", "(default 256")):
        done = script(name, "--help", cwd=world.dir)
        assert done.code == 0 and shown in " ".join(done.out.split()), (name, done)


# --------------------------------------------------------------------------------------------------
# Item 9: checks that need two flags or the model, made before any image is captioned or measured
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (["--max-length", "1", "--min-length", "0"], ("--max-length 1 leaves no room", "[BOS]", "--max-length 2")),
    (["--prompt", "a picture of a very long prompt indeed", "--max-length", "6", "--min-length", "0"],
     ("--max-length 6 leaves no room", "--prompt", "a shorter --prompt")),
], ids=["max-length-1", "prompt-longer-than-max-length"])
def test_caption_lengths_that_leave_no_caption(world, intact, extra, says):
    refused(script("blip.py", *_argv(world, "blip.py", extra), cwd=world.dir), *says)


def test_a_vocabulary_path_with_only_seed_still_works(world, tmp_path):
    """{seed} stays the one field of --vocab-path (and a doubled brace a literal one)."""
    vocab = vwt.Vocabulary(torch.randn(6, PATCH_DIM, generator=torch.Generator().manual_seed(3)),
                           patch_size=tiny.PATCH)
    vocab.save(tmp_path / "v{b}" / "seed_0")
    argv = ["--model", world.clip, "--data", "waterbirds", "--data-root", world.data, "--protocol", "standard",
            "--vocab-path", tmp_path / "v{{b}}" / "seed_{seed}" / "vocab.pt", "--thresh", "0.5",
            "--out", tmp_path / "out", "--workers", "0", "--device", "cpu"]
    done = script("len.py", *argv, cwd=world.dir)
    assert done.code == 0, done
    [saved] = (tmp_path / "out" / "len").glob("*.json")
    assert json.loads(saved.read_text())["config"]["vocab_path"].endswith("v{{b}}/seed_{seed}/vocab.pt")


def test_a_huge_sample_cap_samples_every_patch(world, tmp_path):
    """--max-points-per-centroid far beyond the data: the sample is every patch (a pass over the data
    either way), held in memory as it comes, not allocated for the cap."""
    argv = ["--model", world.clip, "--data", "samples", "--vocab", "6", "--kmeans", "fast",
            "--max-points-per-centroid", 10 ** 15, "--out", tmp_path / "v", "--workers", "0", "--device", "cpu"]
    done = script("process.py", *argv, cwd=world.dir)
    assert done.code == 0, done
    vocab = vwt.Vocabulary.load(tmp_path / "v" / "vocab.pt")
    assert vocab.meta["sample"] == vocab.meta["patches_seen"] == 12 * tiny.NUM_PATCHES
    assert vocab.meta["max_points_per_centroid"] == 10 ** 15


def test_the_sample_holds_only_what_it_was_given():
    """A capacity beyond every patch (--max-points-per-centroid 10**15) allocates nothing for it."""
    from vwt.vocab import bottom_k_sample

    blocks = [(torch.arange(i, i + 10, dtype=torch.float32)[:, None].expand(10, 3), i) for i in range(0, 50, 10)]
    sample, keys, seen = bottom_k_sample(iter(blocks), 10 ** 15, seed=0)  # would not fit any memory if allocated
    assert seen == 50 and sorted(sample[:, 0].tolist()) == list(range(50)) and len(keys) == 50
    for cap in (1, 7, 10, 23, 50, 60):
        a, _, _ = bottom_k_sample(iter(blocks), cap, seed=4)
        assert a.shape == (min(cap, 50), 3) and len(set(a[:, 0].tolist())) == min(cap, 50)


# --------------------------------------------------------------------------------------------------
# Item 13: vocabulary sidecars, checked alike by every script that reads a vocabulary
# --------------------------------------------------------------------------------------------------
READERS = ("clip.py", "blip.py", "len.py", "match.py", "word.py", "eff.py")
BAD_SIDECARS = {"bad-mean": "mean must be three finite numbers", "short-mean": "mean must be three finite numbers",
                "nan-std": "std must be three finite numbers", "zero-std": "each above 0",
                "bad-size": "image_size must be a positive integer", "negative-size": "image_size must be a positive"}


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("vocab", sorted(BAD_SIDECARS))
def test_bad_sidecar_values_are_one_line(world, intact, name, vocab):
    path = world.vocabs[vocab]
    refused(script(name, *_argv(world, name, ["--vocab-path", str(path)]), cwd=world.dir),
            str(path.with_suffix(".json")), BAD_SIDECARS[vocab], "move vocab.json aside")


@pytest.mark.parametrize("name", READERS)
def test_a_sidecar_of_another_normalisation_is_refused_alike(world, intact, name):
    """Words learned on pixels normalised otherwise than the model's preprocessing: the same line from
    every script, after the model loads and before any image is read."""
    refused(script(name, *_argv(world, name, ["--vocab-path", "{other_norm}"]), cwd=world.dir),
            f"{world.other_norm} was learned on pixels normalised with mean (0.5, 0.5, 0.5) and std (0.5, 0.5, 0.5), "
            "but this model's preprocessing uses mean (0.4815, 0.4578, 0.4082)", "python process.py --model")


@pytest.mark.parametrize("name", READERS)
def test_a_0d_tensor_with_a_sidecar_is_one_line(world, intact, name):
    refused(script(name, *_argv(world, name, ["--vocab-path", "{zero_d}"]), cwd=world.dir),
            "holds a tensor of shape ()", "not a (V, D) tensor")


@pytest.mark.parametrize("name", ["clip.py", "blip.py"])
@pytest.mark.parametrize("foreign, says", [
    ({"method": "base", "summary": [1, 2]}, "'summary' must be"),
    ({"method": "base", "summary": {"acc": 1.0}}, "no 'model'"),
    ({"method": "base", "model": "m", "data": "d", "summary": {"acc": "high"}}, "'acc'"),
    (None, "no clip.py results|no blip.py results"),
], ids=["summary-list", "no-model", "text-value", "only-other-json"])
def test_summary_over_foreign_json_is_one_line(world, tmp_path, name, foreign, says):
    task = name[:-3]
    folder = tmp_path / task
    folder.mkdir()
    (folder / "predictions.json").write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))  # not a results file
    if foreign is not None:
        (folder / "other.json").write_text(json.dumps(foreign))
    before = snapshot(tmp_path)
    line = refused(script(name, "--summary", "--out", tmp_path, cwd=world.dir))
    assert any(s in line for s in says.split("|")), line
    assert snapshot(tmp_path) == before  # no summary.md or summary.csv written


# --------------------------------------------------------------------------------------------------
# Item 14: an existing vocabulary is kept only where it is the one the run would learn
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    ([], ("kmeans 'fast' there, 'paper' now",)),
    (["--kmeans", "fast", "--niter", "9"], ("niter 4 there, 9 now",)),
    (["--kmeans", "fast", "--init", "random"], ("init 'afk-mc2' there, 'random' now",)),
    (["--kmeans", "fast", "--max-points-per-centroid", "100"], ("max points per centroid 256 there, 100 now",)),
    (["--kmeans", "fast", "--max-images", "5"], ("max images None there, 5 now",)),
    (["--kmeans", "fast", "--protocol", "standard"], ("protocol 'paper' there, 'standard' now",)),
    (["--kmeans", "fast", "--model", "{clip16}"], ("patch size 8 there, 16 now",)),
], ids=["recipe", "niter", "init", "sample", "max-images", "protocol", "patch-size"])
def test_process_refuses_to_keep_a_vocabulary_learned_otherwise(world, intact, extra, says):
    extra = [str(world.clip16) if a == "{clip16}" else a for a in extra]  # a later --model wins
    refused(script("process.py", *_argv(world, "process.py", extra), cwd=world.dir), f"{world.tok / 'vocab.pt'} was learned otherwise", *says,
            "--overwrite", "another --out")


def test_process_keeps_the_same_vocabulary(world, intact):
    done = script("process.py", *_argv(world, "process.py", ["--kmeans", "fast", "--batch", "5"]), cwd=world.dir)
    assert done.code == 0 and "exists; kept" in done.out, done  # --batch is only how the fast k-means reads


def test_process_refuses_before_learning_any_seed(world, tmp_path):
    """Seeds 0 and 1: seed 1's vocabulary exists from another recipe; the run stops before seed 0's k-means."""
    out = tmp_path / "v"
    shutil.copytree(world.tok, out / "seed_1")
    meta = json.loads((out / "seed_1" / "vocab.json").read_text())
    meta.update(seed=1, data_seed=1)
    (out / "seed_1" / "vocab.json").write_text(json.dumps(meta))
    argv = ["--model", world.clip, "--data", "samples", "--vocab", "6", "--seeds", "0", "1", "--kmeans", "fast",
            "--niter", "9", "--out", out, "--workers", "0", "--device", "cpu"]
    refused(script("process.py", *argv, cwd=world.dir), "seed_1", "niter 4 there, 9 now")
    assert sorted(p.name for p in out.iterdir()) == ["seed_1"]  # seed 0 was not learned first


def test_prompts_labels_and_vocabulary_paths_are_checked_from_python_too(tmp_path):
    """The checks argparse runs are the library's own: a RunSpec made in Python meets them in run()."""
    from vwt import cli, zeroshot
    from vwt.spec import RunSpec

    for prompt in ("a photo", "{label}", "a {"):
        spec = RunSpec(model="unused", data="waterbirds", out=tmp_path, options=zeroshot.ZeroShot(prompt=prompt))
        with pytest.raises(cli.UserError, match="^--prompt "):
            zeroshot.run(spec)
    with pytest.raises(ValueError, match="'cat' more than once"):
        zeroshot.check_labels("cat, dog,cat")
    with pytest.raises(cli.UserError, match="^--vocab-path .* has the field {data}"):
        cli.vocab_path(RunSpec(method={"vocab_path": "t/{data}/vocab.pt"}))
    assert cli.vocab_path(RunSpec(method={"vocab_path": "t/{{x}}/seed_{seed}/vocab.pt"}), seed=2) == \
        Path("t/{x}/seed_2/vocab.pt")


def test_seeds_outside_numpys_range_are_refused_from_python_too():
    from vwt import cli

    for seed in (-1, 2 ** 32):
        with pytest.raises(cli.UserError, match="outside 0 to 4294967295"):
            cli.seed_everything(seed)
    cli.seed_everything(2 ** 32 - 1)
