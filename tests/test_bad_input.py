"""Bad input and faults against the real scripts (issue #14): every case ends in one line `error: ...`
on stderr, exit code 2, no traceback, and the files earlier runs wrote are left exactly as they were;
legal settings that merge nothing say so; results and vocabularies never share a name across
configurations and are never left half-written, even by SIGKILL.

The scripts run as a user runs them, each in its own process: ``script(...)`` forks this test process
(torch, transformers and vwt already imported, so a case costs only its own work) and runs the script
file as ``__main__`` with its command line, stdout and stderr captured and its exit code returned;
``real(...)`` starts a fresh Python where the start-up itself is under test (offline fresh clone).
Models are tiny random CLIP and BLIP saved to local folders (``--model /path``), data sets tiny
fixtures in their real layouts, all built once for the module.
"""
from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

import fixtures
import tiny
import vwt
from vwt import cli
from vwt import datasets as D

REPO = Path(__file__).resolve().parents[1]
PATCH_DIM = 3 * tiny.PATCH ** 2  # a pixel patch of the tiny models: 192 values


# --------------------------------------------------------------------------------------------------
# Running the scripts
# --------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"Run(code={self.code}, out={self.out[-600:]!r}, err={self.err[-1500:]!r})"


def _own_tqdm_locks() -> None:
    """tqdm's write lock is a multiprocessing lock, shared with the parent across fork: a child killed
    while holding it would leave the parent's progress bars waiting forever. The child takes its own."""
    import threading

    import tqdm.std

    classes = [tqdm.std.tqdm]
    while classes:
        c = classes.pop()
        classes += c.__subclasses__()
        if c is tqdm.std.tqdm or "_lock" in vars(c):
            c.set_lock(threading.RLock())


def _log_to_own_stderr() -> None:
    """Point every logging handler that writes to a stream at this child's stderr: the parent's
    handlers (transformers' own, set up by whichever test first logged) may hold a stream an earlier
    test's capture has closed, which would print '--- Logging error ---' tracebacks into the child."""
    import logging

    for logger in [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                           if isinstance(l, logging.Logger)]:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed


def _child(script: str, argv, cwd: Path, out, err) -> None:
    """In the forked child: run ``script`` as __main__ with ``argv``; never returns."""
    code = 1
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        try:  # anything that fails from here on is printed into the run's stderr, never lost
            _own_tqdm_locks()
            torch.set_num_threads(1)  # as the parent: tiny models, a shared 2-core machine
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            _log_to_own_stderr()
            os.chdir(cwd)
            sys.argv = [str(REPO / script), *map(str, argv)]
            runpy.run_path(str(REPO / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def start(script: str, *argv, cwd: Path):
    """Fork a process running ``script``; returns (pid, stdout file, stderr file)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(script, argv, cwd, out, err)
    return pid, out, err


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def finish(pid: int, out, err, timeout: float = 300) -> Run:
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"timed out: {_read(err)[-2000:]}")
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    return Run(code, _read(out), _read(err))


def script(name: str, *argv, cwd: Path) -> Run:
    """Run ``python <name> argv...`` (forked from this process; see the module docstring)."""
    return finish(*start(name, *argv, cwd=cwd))


def real(name: str, *argv, cwd: Path, env: dict, timeout: float = 600) -> Run:
    """Run ``python <name> argv...`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, name, *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


def _lines(err: str) -> list[str]:
    """stderr's lines, progress-bar redraws reduced to what stays on screen; progress bars and the
    libraries' model-loading bars dropped."""
    lines = [l.split("\r")[-1].strip() for l in err.splitlines()]
    return [l for l in lines if l and not ("|" in l and ("it/s]" in l or "/s]" in l or "?it" in l))]


def refused(run: Run, *says: str) -> str:
    """The run ended in exactly one `error: ...` line naming ``says``, exit code 2, no traceback."""
    assert run.code == 2, run
    assert "Traceback" not in run.err, run
    lines = _lines(run.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), run
    for s in says:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# The world: tiny models in local folders, tiny data sets, vocabularies, and earlier runs' results
# --------------------------------------------------------------------------------------------------


def _vocab_pair(folder: Path, words, sidecar=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(words, folder / "vocab.pt")
    if sidecar is not None:
        (folder / "vocab.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return folder / "vocab.pt"


def _grow(root: Path, waterbirds: int, coco: int) -> Path:
    """More images in the Waterbirds and COCO fixtures (copies under new names), so a run lasts long
    enough to be killed in the middle."""
    base = root / "waterbirds" / D.WATERBIRDS_DIR
    meta = (base / "metadata.csv").read_text().splitlines()
    rows = [r for r in meta[1:] if r.split(",")[3] == "2"]
    for i in range(waterbirds):
        cells = rows[i % len(rows)].split(",")
        cells[0], cells[1] = str(1000 + i), cells[1].replace(".jpg", f"_copy{i}.jpg")
        shutil.copy(base / rows[i % len(rows)].split(",")[1], base / cells[1])
        meta.append(",".join(cells))
    (base / "metadata.csv").write_text("\n".join(meta) + "\n")
    ann = root / "coco" / "annotations" / "coco_karpathy_test.json"
    items = json.loads(ann.read_text())
    for i in range(coco):
        src = items[i % 4]
        image = f"val2014/COCO_val2014_{900000 + i:012d}.jpg"
        shutil.copy(root / "coco" / src["image"], root / "coco" / image)
        items.append({"image": image, "caption": src["caption"]})
    ann.write_text(json.dumps(items))
    return root


class World:
    pass


def _warm() -> None:
    """What every forked run would otherwise load again: matplotlib (len.py's figure) and the decoded
    sample photographs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    D.sample_images()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    _warm()
    w = World()
    w.dir = tmp_path_factory.mktemp("world")
    w.clip, w.blip = fixtures.save_tiny_models(w.dir / "models")
    w.data = w.dir / "data"
    fixtures.write_waterbirds(w.data)
    fixtures.write_coco(w.data)
    fixtures.write_nocaps(w.data)
    fixtures.write_imagenet(w.data)
    w.big = _grow(fixtures.write_coco(fixtures.write_waterbirds(w.dir / "big")), waterbirds=400, coco=40)
    v = w.dir / "vocabs"
    g = torch.Generator().manual_seed(0)
    w.good = vwt.Vocabulary(torch.randn(6, PATCH_DIM, generator=g), patch_size=tiny.PATCH).save(v / "good")
    w.good_twin = vwt.Vocabulary(torch.randn(6, PATCH_DIM, generator=g), patch_size=tiny.PATCH).save(v / "b" / "good")
    w.p16 = _vocab_pair(v / "p16", torch.randn(100, 768, generator=g))  # a published-style patch-16 vocabulary
    w.embed = _vocab_pair(v / "embed", torch.randn(6, PATCH_DIM, generator=g),
                          {"size": 6, "dim": PATCH_DIM, "space": "embed", "patch_size": None})
    w.json_list = _vocab_pair(v / "json-list", torch.randn(6, PATCH_DIM, generator=g), "[6, 192]")
    w.zeros = _vocab_pair(v / "zeros", torch.zeros(4, PATCH_DIM))
    w.nan = _vocab_pair(v / "nan", torch.full((4, PATCH_DIM), float("nan")))
    w.garbage = v / "garbage" / "vocab.pt"
    w.garbage.parent.mkdir()
    w.garbage.write_bytes(b"not a torch file")
    w.a_file = w.dir / "a-file"
    w.a_file.write_text("not a folder\n")
    # Earlier runs whose files every refused run must leave alone.
    w.out = w.dir / "out"
    common = ["--data-root", w.data, "--out", w.out, "--workers", "0", "--device", "cpu"]
    w.clip_args = ["--model", w.clip, "--data", "waterbirds", "--batch", "4", *common]
    w.blip_args = ["--model", w.blip, "--data", "coco", "--batch", "2", "--no-score", *common]
    w.len_args = ["--model", w.clip, "--data", "waterbirds", "--top_k", "0.5", *common]
    for name, argv in (("clip.py", w.clip_args + ["--vocab-path", w.good, "--thresh", "0.9"]),
                       ("blip.py", w.blip_args + ["--limit", "2"]), ("len.py", w.len_args),
                       ("process.py", ["--model", w.clip, "--data", "samples", "--vocab", "6", "--kmeans", "fast",
                                       "--workers", "0", "--device", "cpu", "--out", w.out / "tok"])):
        done = script(name, *argv, cwd=w.dir)
        assert done.code == 0, done
    w.before = snapshot(w.out)
    return w


@pytest.fixture
def intact(world):
    """Every case must leave the earlier runs' files byte for byte (and add none)."""
    yield
    assert snapshot(world.out) == world.before


# --------------------------------------------------------------------------------------------------
# The table of issue #14, one case per row and script, and the cases that already behaved
# --------------------------------------------------------------------------------------------------
def _cases():
    """(id, script, argv with {placeholders}, what the line must say)."""
    C = []

    def add(id_, name, argv, *says):
        C.append(pytest.param(name, argv, says, id=id_))

    base = {"clip.py": ["--model", "{clip}", "--data", "waterbirds"], "blip.py": ["--model", "{blip}", "--data", "coco"],
            "len.py": ["--model", "{clip}", "--data", "waterbirds"], "match.py": ["--model", "{clip}"], "word.py": ["--model", "{clip}"],
            "eff.py": ["--model", "{clip}", "--methods", "inter", "--batch", "1"],
            "process.py": ["--model", "{clip}", "--data", "samples", "--vocab", "6"]}
    # a vocabulary of another patch size, or whose sidecar says embed space
    for s in ("clip.py", "blip.py", "len.py", "match.py", "word.py"):
        add(f"p16-vocab-{s}", s, base[s] + ["--vocab-path", "{p16}"], "(100, 768)", "does not fit")
    for s in ("clip.py", "blip.py", "len.py", "match.py", "eff.py"):
        add(f"embed-sidecar-{s}", s, base[s] + ["--vocab-path", "{embed}"], "embed space", "does not fit")
    add("embed-sidecar-word.py", "word.py", base["word.py"] + ["--vocab-path", "{embed}"], "embed-space vocabulary")
    # a sidecar that is a JSON list
    for s in ("clip.py", "blip.py", "len.py", "match.py", "word.py", "eff.py"):
        add(f"json-list-sidecar-{s}", s, base[s] + ["--vocab-path", "{json_list}"], "JSON list", "vocab.json")
    # devices
    for s in ("clip.py", "blip.py", "len.py", "match.py", "word.py", "process.py", "eff.py"):
        method = ["--top_k", "0.5"] if s == "len.py" else []
        add(f"device-nonsense-{s}", s, base[s] + method + ["--device", "nonsense"], "'nonsense' is not a device")
    if not torch.backends.mps.is_available():
        for s in ("clip.py", "len.py", "process.py", "eff.py"):
            add(f"device-mps-{s}", s, base[s] + (["--top_k", "0.5"] if s == "len.py" else []) + ["--device", "mps"],
                "no MPS")
    if not torch.cuda.is_available():
        add("device-cuda", "clip.py", base["clip.py"] + ["--device", "cuda:1"], "no CUDA device")
    # annotation files of the wrong structure
    add("coco-structure-blip", "blip.py", base["blip.py"] + ["--data-root", "{bad_coco}"], "does not have the expected structure",
        "coco_karpathy_test.json")
    add("coco-structure-len", "len.py", ["--model", "{clip}", "--data", "coco", "--top_k", "0.5", "--data-root", "{bad_coco}"],
        "does not have the expected structure")
    add("karpathy-structure-process", "process.py", ["--model", "{clip}", "--data", "coco", "--vocab", "4",
                                                     "--data-root", "{bad_karpathy}"], "dataset_coco.json", "expected structure")
    add("nocaps-structure-blip", "blip.py", ["--model", "{blip}", "--data", "nocaps", "--data-root", "{bad_nocaps}"],
        "nocaps_val_4500_captions.json", "expected structure")
    # caption lengths
    add("max-length-beyond-model", "blip.py", base["blip.py"] + ["--max-length", "100000"], "--max-length 100000", "32")
    add("min-length-negative", "blip.py", base["blip.py"] + ["--min-length", "-1"], "--min-length")
    add("min-length-above-max", "blip.py", base["blip.py"] + ["--min-length", "30", "--max-length", "20"], "--min-length")
    # --out: an existing file, or a folder under a file
    for s in ("clip.py", "blip.py", "len.py", "match.py", "word.py", "process.py", "eff.py"):
        method = ["--top_k", "0.5"] if s in ("clip.py", "len.py", "match.py") else []
        add(f"out-is-a-file-{s}", s, base[s] + method + ["--out", "{a_file}"], "is a file, not a folder")
        add(f"out-under-a-file-{s}", s, base[s] + method + ["--out", "{a_file}/sub"], "is a file, not a folder")
    # degenerate method settings
    for s in ("clip.py", "len.py", "match.py"):
        for t in ("nan", "-1", "2.5"):
            add(f"thresh-{t}-{s}", s, base[s] + ["--vocab-path", "{good}", "--thresh", t], "thresh is a cosine distance")
        add(f"all-zero-vocab-{s}", s, base[s] + ["--vocab-path", "{zeros}"], "all-zero word")
        add(f"nan-vocab-{s}", s, base[s] + ["--vocab-path", "{nan}"], "non-finite")
        add(f"top_k-keeps-nothing-{s}", s, base[s] + ["--top_k", "0.999"], "keeps", "0 of the 16 patches")
    for s, flag in (("clip.py", "--limit"), ("blip.py", "--limit"), ("match.py", "--limit"), ("word.py", "--limit"),
                    ("len.py", "--max-images"), ("eff.py", "--limit")):
        method = ["--top_k", "0.5"] if s in ("clip.py", "len.py", "match.py") else []
        for n in ("-1", "0"):
            add(f"limit{n}-{s}", s, base[s] + method + [flag, n], f"{flag} must be at least 1")
    # layouts with no images
    add("no-images-match", "match.py", ["--model", "{clip}", "--top_k", "0.5", "--data", "imgnet", "--data-root", "{empty}"],
        "no images")
    add("no-images-word", "word.py", ["--model", "{clip}", "--vocab-path", "{good}", "--data", "imgnet",
                                      "--data-root", "{empty}"], "no images")
    # --summary with nothing to summarise
    for s in ("clip.py", "blip.py"):
        add(f"summary-missing-{s}", s, ["--summary", "--out", "{dir}/nowhere"], "no ", "results", "to summarise")
    # a vocabulary that is not there
    for s in ("clip.py", "len.py", "match.py", "word.py"):
        add(f"vocab-path-missing-{s}", s, base[s] + ["--vocab-path", "{dir}/none/vocab.pt"], "not found", "check the path")
    # cases that already behaved (kept so they stay so)
    add("unknown-data", "clip.py", ["--data", "mnist"], "invalid choice")
    add("not-an-int", "blip.py", ["--beams", "three"], "invalid int value")
    add("unknown-flag", "len.py", ["--frobnicate"], "unrecognized arguments")
    add("batch-0", "clip.py", base["clip.py"] + ["--batch", "0"], "--batch must be at least 1")
    add("beams-0", "blip.py", base["blip.py"] + ["--beams", "0"], "--beams must be at least 1")
    add("top_k-1.5", "clip.py", base["clip.py"] + ["--top_k", "1.5"], "--top_k")
    add("two-input-reducers", "clip.py", base["clip.py"] + ["--top_k", "0.5", "--vocab-path", "{good}"], "one input reducer")
    add("two-in-network", "blip.py", base["blip.py"] + ["--tome", "2", "--evit", "0.5"], "one in-network reducer")
    add("evit-0", "clip.py", base["clip.py"] + ["--evit", "0"], "keep must be in (0, 1]")
    add("tome-negative", "len.py", base["len.py"] + ["--tome", "-1"], "len.py counts")
    add("tome-negative-clip", "clip.py", base["clip.py"] + ["--tome", "-1"], "non-negative")
    add("vocab-not-torch", "clip.py", base["clip.py"] + ["--vocab-path", "{garbage}"], "not a vocabulary file")
    add("missing-data-set", "clip.py", ["--model", "{clip}", "--data", "celeba"], "celeba", "expected layout")
    add("missing-coco", "blip.py", ["--model", "{blip}", "--data", "coco", "--data-root", "{empty}"], "expected layout")
    add("labels-count", "clip.py", base["clip.py"] + ["--labels", "a,b,c"], "--labels gives 3 names")
    add("clip-on-blip", "clip.py", ["--model", "{blip}", "--data", "waterbirds"], "needs a CLIP model")
    add("blip-on-clip", "blip.py", ["--model", "{clip}", "--data", "coco"], "Hugging Face BLIP")
    add("imgnet-needs-timm", "clip.py", ["--model", "{clip}", "--data", "imgnet"], "timm classifier")
    add("len-no-tokenizer", "len.py", base["len.py"], "choose a tokenizer")
    add("process-vocab-0", "process.py", base["process.py"] + ["--vocab", "0"], "--vocab must be at least 1")
    add("process-engine-fast", "process.py", base["process.py"] + ["--kmeans", "fast", "--engine", "torch"],
        "--engine belongs to --kmeans paper")
    add("process-too-many-words", "process.py", ["--model", "{clip}", "--data", "samples", "--vocab", "100000",
                                                 "--overwrite"], "fewer than --vocab 100000")
    add("process-other-size-in-out", "process.py", ["--model", "{clip}", "--data", "samples", "--vocab", "7"],
        "holds 6 pixel-space words", "--overwrite")
    add("match-alpha-0", "match.py", base["match.py"] + ["--top_k", "0.5", "--alpha", "0"], "--alpha")
    add("match-scale-0", "match.py", base["match.py"] + ["--top_k", "0.5", "--scale", "0"], "--scale")
    add("word-unknown-image", "word.py", base["word.py"] + ["--vocab-path", "{good}", "--images", "nope"], "unknown image")
    add("model-not-found", "clip.py", ["--model", "{dir}/no-such-model", "--data", "waterbirds"], "cannot load model")
    add("eff-bogus-method", "eff.py", ["--methods", "bogus"], "bogus")
    return C


def _fill(argv, world) -> list[str]:
    names = {k: str(v) for k, v in vars(world).items() if isinstance(v, Path)}
    names.update(dir=str(world.dir))
    return [a.format(**names) for a in argv]


@pytest.fixture(scope="module")
def bad_roots(world):
    """Data roots whose annotation files have the wrong structure, and one with no images."""
    r = world.dir / "bad"
    fixtures.write_coco(r / "coco-blip")
    (r / "coco-blip" / "coco" / "annotations" / "coco_karpathy_test.json").write_text(
        json.dumps({"images": ["val2014/COCO_val2014_000000000042.jpg"]}))
    fixtures.write_coco(r / "coco-karpathy", fmt="karpathy")
    (r / "coco-karpathy" / "coco" / "dataset_coco.json").write_text(json.dumps({"images": [{"file": "x.jpg"}]}))
    fixtures.write_nocaps(r / "nocaps")
    (r / "nocaps" / "nocaps" / "nocaps_val_4500_captions.json").write_text(json.dumps({"annotations": []}))
    (r / "empty" / "imagenet" / "val" / "n01440764").mkdir(parents=True)
    world.bad_coco, world.bad_karpathy = r / "coco-blip", r / "coco-karpathy"
    world.bad_nocaps, world.empty = r / "nocaps", r / "empty"
    return r


@pytest.mark.parametrize("name, argv, says", _cases())
def test_bad_input_is_one_line_and_loses_nothing(world, bad_roots, intact, name, argv, says):
    argv = _fill(argv, world)
    if "--out" not in argv and "--summary" not in argv:
        argv += ["--out", str(world.out / ("tok" if name == "process.py" else ""))]
    if "--data-root" not in argv and name != "process.py":
        argv += ["--data-root", str(world.data)]
    if name in ("clip.py", "blip.py", "len.py", "process.py"):
        argv += ["--workers", "0"]
    if name in ("match.py", "word.py", "eff.py") and "--limit" not in argv:
        argv += ["--limit", "1"]
    if "--device" not in argv:  # never CUDA in a forked child (the parent may have initialised it)
        argv += ["--device", "cpu"]
    refused(script(name, *argv, cwd=world.dir), *says)


# --------------------------------------------------------------------------------------------------
# Rows that need more than one run
# --------------------------------------------------------------------------------------------------
def _results(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def test_runs_differing_in_dtype_or_vocabulary_file_never_share_a_results_file(world, tmp_path):
    """Same method label (inter-vgood-t0.5), a different dtype (clip.py) or a different vocab.pt in a
    folder of the same name (len.py): every run keeps its own file; the same run again reuses its name."""
    out = tmp_path / "out"
    common = ["--model", world.clip, "--data", "waterbirds", "--data-root", world.data, "--out", out, "--workers", "0",
              "--device", "cpu", "--thresh", "0.5", "--vocab-path"]
    for name, extra in (("clip.py", [world.good]), ("clip.py", [world.good, "--dtype", "bfloat16"]),
                        ("len.py", [world.good]), ("len.py", [world.good_twin])):
        done = script(name, *common, *extra, cwd=world.dir)
        assert done.code == 0, done
    clip_files = _results(out / "clip", "waterbirds__tiny-clip__inter-vgood-t0.5__*.json")
    len_files = _results(out / "len", "waterbirds__tiny-clip__inter-vgood-t0.5__*.json")
    assert len(clip_files) == 2 and len(len_files) == 2
    assert {json.loads(p.read_text())["config"]["dtype"] for p in clip_files} == {"float32", "bfloat16"}
    assert {json.loads(p.read_text())["config"]["vocab_path"] for p in len_files} == {str(world.good), str(world.good_twin)}
    kept = snapshot(out)
    assert script("len.py", *common, world.good, cwd=world.dir).code == 0
    assert set(snapshot(out)) == set(kept)  # the same configuration again: the same names, nothing new


def test_blip_resume_header_is_strict_and_restart_removes_only_its_own_configuration(world, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", world.blip, "--data", "coco", "--data-root", world.data, "--out", out, "--workers", "0",
            "--device", "cpu", "--no-score", "--limit", "2", "--batch", "2"]
    assert script("blip.py", *argv, cwd=world.dir).code == 0
    [path] = _results(out / "blip", "*.captions.jsonl")
    good = path.read_bytes()
    # a header cut short by a crash: refused, never reused; the file is left as it is
    header, rest = good.split(b"\n", 1)
    for damaged in (header[:25] + b"\n" + rest, b'{"config": [1, 2]}\n' + rest, header[:25]):
        path.write_bytes(damaged)
        line = refused(script("blip.py", *argv, cwd=world.dir), "cannot resume", f"mv {path} ")
        assert path.read_bytes() == damaged and line.endswith(".old")
        line = refused(script("blip.py", *argv, "--restart", cwd=world.dir), "cannot resume", "mv ")
        assert path.read_bytes() == damaged
    # another configuration's captions under this name: refused, and --restart leaves them alone
    other = json.loads(header)
    other["config"]["beams"] = 1
    stranger = json.dumps(other).encode() + b"\n" + rest
    path.write_bytes(stranger)
    refused(script("blip.py", *argv, cwd=world.dir), "another configuration (differs in beams)", "mv ")
    refused(script("blip.py", *argv, "--restart", cwd=world.dir), "another configuration", "left alone")
    assert path.read_bytes() == stranger
    # its own captions: --restart starts over, in the same file
    path.write_bytes(good)
    assert script("blip.py", *argv, "--restart", cwd=world.dir).code == 0
    assert [json.loads(l) for l in path.read_bytes().splitlines()][0] == json.loads(header)
    assert _results(out / "blip", "*.captions.jsonl") == [path]


def test_settings_that_merge_nothing_say_so(world, tmp_path):
    """thresh 0 is legal (only identical directions match), but on these images nothing matches: the
    summary line says the run equals the unreduced model; the earlier run at 0.9, which merged, does not."""
    common = ["--model", world.clip, "--data", "waterbirds", "--data-root", world.data, "--out", tmp_path,
              "--workers", "0", "--device", "cpu", "--vocab-path", world.good, "--thresh", "0"]
    for name in ("clip.py", "len.py"):
        none = script(name, *common, cwd=world.dir)
        assert none.code == 0 and "removed no token" in none.out and "raise --thresh" in none.out, none
    [saved] = [json.loads(p.read_text()) for p in _results(tmp_path / "clip", "*-t0__*.json")]
    assert "removed no token" in saved["note"]
    [merged] = [json.loads(p.read_text()) for p in _results(world.out / "clip", "*-t0.9__*.json")]
    assert merged["note"] is None and merged["metrics"]["tokens_first_block"]["mean"] < 1 + tiny.NUM_PATCHES


def test_a_late_write_failure_keeps_the_finished_results(tmp_path, monkeypatch):
    """Where the results folder goes away after the start-up check, the finished results are written
    to the temporary-files folder and the one-line error says where."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the rescue folder goes there
    blocked = tmp_path / "gone"
    blocked.write_text("a file where the results folder was")
    with pytest.raises(cli.UserError, match="saved to") as e:
        cli.save_json(blocked / "clip" / "r__0123abcd.json", {"avg": 0.5})
    rescue = Path(str(e.value).rsplit("saved to ", 1)[1])
    try:
        assert json.loads(rescue.read_text()) == {"avg": 0.5}
    finally:
        rescue.unlink()


def test_process_keeps_the_learned_words_when_the_folder_fails_late(tmp_path, monkeypatch):
    from vwt import learning

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the rescue folder goes there

    vocab = vwt.Vocabulary(torch.randn(3, PATCH_DIM), patch_size=tiny.PATCH)
    blocked = tmp_path / "a-file"
    blocked.write_text("where the vocabulary folder was")
    with pytest.raises(cli.UserError, match="saved to") as e:
        learning.save(vocab, blocked / "v3")
    rescue = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    try:
        assert torch.equal(vwt.Vocabulary.load(rescue).words, vocab.words)
    finally:
        shutil.rmtree(rescue)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_refused_at_the_start(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(script("len.py", *world.len_args[:-6], "--out", locked, "--device", "cpu", cwd=world.dir),
                "is not writable")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------------
# Vocabularies: a pair written atomically, a pair that does not match refused
# --------------------------------------------------------------------------------------------------
def test_vocabulary_pair_is_written_atomically_and_checked(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    old = vwt.Vocabulary(torch.randn(5, PATCH_DIM, generator=g), patch_size=tiny.PATCH, data="old")
    new = vwt.Vocabulary(torch.randn(5, PATCH_DIM, generator=g), patch_size=tiny.PATCH, data="new")
    old.save(tmp_path / "v")
    # a crash between the two renames (sidecar in place, tensor not): the mismatch is refused
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "v")
    monkeypatch.undo()
    assert Path(calls[0]).name == "vocab.json" and Path(calls[1]).name == "vocab.pt"
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["vocab.json", "vocab.pt"]  # no temporaries left
    with pytest.raises(ValueError, match="other words"):
        vwt.Vocabulary.load(tmp_path / "v")
    with pytest.raises(cli.UserError, match="move vocab.json aside"):
        cli.read_vocabulary(tmp_path / "v" / "vocab.pt")
    # a finished save is a matching pair again
    new.save(tmp_path / "v")
    back = vwt.Vocabulary.load(tmp_path / "v")
    assert torch.equal(back.words, new.words) and back.meta["data"] == "new"


@pytest.mark.parametrize("sidecar, says", [("[1, 2]", "JSON list"), ("{", "not valid JSON"), ('"text"', "JSON str"),
                                           ('{"space": "colour"}', "space must be one of"),
                                           ('{"patch_size": "16"}', "patch_size must be a positive integer"),
                                           ('{"size": 7}', "not a pair")])
def test_damaged_sidecars_are_one_line(tmp_path, sidecar, says):
    path = _vocab_pair(tmp_path, torch.randn(5, PATCH_DIM), sidecar)
    with pytest.raises(cli.UserError, match=says.replace("(", r"\(")):
        cli.read_vocabulary(path)


def test_degenerate_reducer_settings_are_refused_in_the_api():
    words = vwt.Vocabulary(torch.randn(3, PATCH_DIM), patch_size=tiny.PATCH)
    for t in (float("nan"), -0.01, 2.01, float("inf")):
        with pytest.raises(ValueError, match="thresh"):
            vwt.InterImage(words, thresh=t)
    for t in (0.0, 2.0):
        vwt.InterImage(words, thresh=t)
    with pytest.raises(ValueError, match="all-zero"):
        vwt.Vocabulary(torch.cat([torch.randn(2, PATCH_DIM), torch.zeros(1, PATCH_DIM)]))
    with pytest.raises(ValueError, match="non-finite"):
        vwt.Vocabulary(torch.full((2, PATCH_DIM), float("inf")))
    model = tiny.hf_clip_vision()
    vwt.patch(model, vwt.IntraImage(drop=1 - 1 / tiny.NUM_PATCHES))  # keeps exactly one patch
    with torch.no_grad():
        model(pixel_values=tiny.images(1))
    assert int(vwt.stats(model)["tokens_per_layer"][0, 0]) == 2
    vwt.patch(model, vwt.IntraImage(drop=0.95))
    with pytest.raises(ValueError, match="0 of the 16 patches"), torch.no_grad():
        model(pixel_values=tiny.images(1))


def test_device_names(monkeypatch):
    assert cli.resolve_device("cpu") == torch.device("cpu")
    for name, says in (("nonsense", "not a device name"), ("cuda:x", "not a device name"), ("meta", "cpu, cuda")):
        with pytest.raises(cli.UserError, match=says):
            cli.resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(cli.UserError, match="1 CUDA device"):
        cli.resolve_device("cuda:3")


# --------------------------------------------------------------------------------------------------
# The README's commands on a fresh clone, offline and without a model cache
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # CLIP ViT-B/16 with random weights in a fresh interpreter: about 15 s of CPU
def test_readme_figure_commands_work_on_a_fresh_clone_offline(tmp_path):
    """`python match.py --vocab 100 --vocab-data samples`, then `python word.py --vocab 100 --vocab-data
    samples`, as the README gives them, in a fresh copy with no tokenizers/ and no model cache, offline:
    the samples vocabulary is learned on first use and reused, the default model falls back to random
    weights with one note, and the figures are written. (--limit 1 keeps the ViT-B/16 work short; the
    vocabulary is still learned on all the samples. match.py with no method flag: tests/test_vis.py.)"""
    clone = fixtures.fresh_clone(tmp_path / "clone")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    first = real("match.py", "--vocab", "100", "--vocab-data", "samples", "--limit", "1", cwd=clone, env=env)
    assert first.code == 0, first
    assert "random weights" in first.out + first.err and "learning a 100-word vocabulary" in first.err
    learned = vwt.Vocabulary.load(clone / "tokenizers" / "samples" / "v100" / "vocab.pt")
    assert len(learned) == 100 and learned.patch_size == 16 and learned.meta["data"] == "samples"
    assert len(list((clone / "runs" / "figures" / "match").glob("inter-v100-t0.1__*/astronaut.png"))) == 1
    second = script("word.py", "--vocab", "100", "--vocab-data", "samples", "--limit", "1", "--device", "cpu", cwd=clone)
    assert second.code == 0 and "learning" not in second.err, second  # the cached vocabulary is reused
    assert len(list((clone / "runs" / "figures" / "word").glob("samples-v100__*/words.png"))) == 1


# --------------------------------------------------------------------------------------------------
# SIGKILL at a random point mid-run leaves no truncated results or vocabulary file
# --------------------------------------------------------------------------------------------------
def _parses(path: Path) -> None:
    """Every file a reader would take for a result must parse whole."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        for line in path.read_bytes().splitlines():
            json.loads(line)
    elif path.suffix == ".csv":
        import pandas as pd

        pd.read_csv(path)
    elif path.suffix == ".pt":
        vwt.Vocabulary.load(path)  # the tensor, and its sidecar as a matching pair
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".md":
        path.read_text()
    else:
        raise AssertionError(f"unexpected file {path}")


def _progressed(err_file, bar: str) -> bool:
    """The script's own progress bar ``bar`` has counted at least one finished step."""
    return any(bar in l and "/s]" in l and "?" not in l.split("|")[-1] for l in _read(err_file).split("\r"))


@pytest.mark.parametrize("name", ["clip.py", "blip.py", "len.py", "process.py"])
def test_sigkill_mid_run_leaves_only_whole_files(world, tmp_path, name):
    out = tmp_path / "out"
    shutil.copytree(world.out, out)  # earlier results and a vocabulary pair in the folders the run writes to
    before = dict(world.before)
    if name == "blip.py":  # the earlier captions are of the images under world.data: a run on world.big refuses
        for p in _results(out / "blip", "*.captions.jsonl"):  # to resume them (issue #23); moved aside as it says
            del before[p.relative_to(out)]
            p.rename(tmp_path / p.name)
    rng = random.Random()
    common = ["--data-root", world.big, "--workers", "0", "--device", "cpu", "--batch", "1"]
    argv = {"clip.py": ["--model", world.clip, "--data", "waterbirds", "--random", "--top_k", "0.5", "--seeds", "0", "1",
                        "--out", out, *common],
            "blip.py": ["--model", world.blip, "--data", "coco", "--out", out, "--no-score", *common],
            "len.py": ["--model", world.clip, "--data", "waterbirds", "--vocab-path", world.good, "--out", out, *common],
            "process.py": ["--model", world.clip, "--data", "waterbirds", "--split", "test", "--vocab", "6",
                           "--kmeans", "fast", "--out", out / "tok", *common]}[name]
    bar = {"clip.py": "waterbirds seed", "blip.py": "coco captions", "len.py": "len waterbirds",
           "process.py": "k-means waterbirds"}[name]
    pid, o, e = start(name, *argv, cwd=world.dir)
    deadline = time.time() + 120
    while not _progressed(e, bar) and time.time() < deadline:  # the work has started: kill it somewhere inside
        if os.waitpid(pid, os.WNOHANG)[0]:
            raise AssertionError(f"{name} ended before it could be killed: {_read(e)[-2000:]}")
        time.sleep(0.005)
    delay = rng.uniform(0, 0.3)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status), f"{name} finished before the kill at +{delay:.3f} s: {_read(e)[-1000:]}"
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            try:
                _parses(path)
            except Exception as err:  # noqa: BLE001 (any failure to parse is the defect)
                raise AssertionError(f"{path} does not parse after SIGKILL at +{delay:.3f} s: {err}") from None
        elif path.is_file():
            assert path.name.endswith((".tmp", ".lock")), path  # a temporary or blip.py's lock: hidden, never read
    for old, data in before.items():  # earlier files are whole: unchanged, or replaced by whole ones
        if not (out / old).exists():
            raise AssertionError(f"{old} was lost")
    if name == "blip.py":  # the run resumes and captions every image exactly once
        done = script("blip.py", *argv, cwd=world.dir)
        assert done.code == 0, done
        [path] = _results(out / "blip", "*.captions.jsonl")  # the killed run's file, resumed (same configuration)
        ids = [json.loads(l)["image_id"] for l in path.read_bytes().splitlines()[1:] if l.endswith(b"}")]
        assert sorted(set(ids)) == sorted(r["image_id"] for r in D.load("coco", world.big, None).records)
