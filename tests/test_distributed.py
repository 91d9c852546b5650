"""``torchrun --nproc-per-node 2`` (gloo, CPU) runs of process.py, clip.py, len.py and blip.py write
what one process writes: the same vocabulary, the same per-image records and aggregates, one captions
file per configuration; a blip.py run killed mid-way and resumed loses and doubles no caption. The
one-process references run in this interpreter (one thread, as the torchrun processes). Each torchrun
costs two fresh interpreters (about 15 s on the 2-core CPU)."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import blip as blip_script
import clip as clip_script
import fixtures
import tiny
import len as len_script
import process as process_script
from fixtures import meteor_once, use_meteor  # noqa: F401 (fixtures)
from vwt import distributed

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = 40  # enough rounds for a blip.py run to be killed in the middle


def _more_coco(root: Path, n: int) -> None:
    """The COCO fixture's test split grown to ``n`` different images."""
    ann = root / "coco" / "annotations" / "coco_karpathy_test.json"
    items = json.loads(ann.read_text())
    for i in range(len(items), n):
        image = f"val2014/COCO_val2014_{900000 + i:012d}.jpg"
        fixtures.photo(100 + i, (56, 42)).save(root / "coco" / image)
        items.append({"image": image, "caption": items[i % 4]["caption"]})
    ann.write_text(json.dumps(items))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    fixtures.write_waterbirds(d / "data")
    fixtures.write_coco(d / "data")
    _more_coco(d / "data", COCO_IMAGES)
    clip_dir, blip_dir = fixtures.save_tiny_models(d)
    return {"dir": d, "data": d / "data", "clip": clip_dir, "blip": blip_dir}


@pytest.fixture(scope="module")
def vocab(world):
    """Pixel-space words learned on the Waterbirds train split (one process)."""
    out = world["dir"] / "vocab"
    process_script.main(["--data", "waterbirds", "--vocab", "8", "--batch", "3", "--seeds", "1", "--model",
                         str(world["clip"]), "--data-root", str(world["data"]), "--out", str(out), "--workers", "0",
                         "--device", "cpu"])
    return out / "seed_1" / "vocab.pt"


def torchrun(script: str, argv: list, world, wait: bool = True):
    """``torchrun --standalone --nproc-per-node 2 <script> argv`` with the data root, CPU and no workers;
    with ``wait`` its completed process, else the running one (its own process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / script), *map(str, argv), "--data-root", str(world["data"]), "--workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(cmd, cwd=world["dir"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=world["dir"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def one(script, argv: list, world):
    """The same run in one process (this interpreter)."""
    return script.main([*map(str, argv), "--data-root", str(world["data"]), "--workers", "0", "--device", "cpu"])


def results(folder: Path, out: Path) -> dict:
    """{file name: content} of a results folder; JSON without what differs by machine, time or --out."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # blip.py's lock beside its captions file, temporaries: not results
            continue
        text = p.read_text().replace(str(out), "<out>") if p.suffix in (".json", ".csv", ".jsonl") else p.read_bytes()
        if p.suffix == ".json":
            text = json.loads(text)
            if isinstance(text, dict):
                for k in ("environment", "seconds"):
                    text.pop(k, None)
        files[p.name] = text
    return files


# --------------------------------------------------------------------------------------------------
# The helpers alone (one process) and the sharding rules
# --------------------------------------------------------------------------------------------------
def test_one_process_is_the_identity():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    items = [[0, 1], [2, 3], [4]]
    assert distributed.shard(items) == items and distributed.unshard(items) == items
    assert list(distributed.lockstep(iter("ab"), 2)) == ["a", "b"] and distributed.gather(5) == [5]
    assert distributed.from_main(lambda: 7) == 7 and distributed.seed(3) == 3
    assert distributed.parts(5, 2) == [[0, 1], [2, 3], [4]]


def test_sharding_rules(monkeypatch):
    """Whole batches round-robin (batch b on rank b % world), padded to the same number of rounds; each
    batch cut in contiguous parts (the first ones longer), some maybe empty."""
    monkeypatch.setattr(distributed, "world", lambda: 2)
    got = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        got[r] = (distributed.shard(list("abcde")), distributed.parts(7, 3), distributed.seed(3),
                  list(distributed.lockstep(iter(distributed.shard(list("abc"))), 3)))
    assert got[0] == (list("ace"), [[0, 1], [3, 4], [6]], 3, ["a", "c"])
    assert got[1] == (list("bd"), [[2], [5], []], 3 + 1_000_003, ["b", None])


# --------------------------------------------------------------------------------------------------
# Two processes write what one writes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space,kmeans", [("pixel", "paper"), ("embed", "fast")])
def test_process_learns_the_same_vocabulary(world, tmp_path, space, kmeans):
    """The paper's scikit-learn recipe (its partial_fit order matters) over two seeds and batches of 3
    of 4 images (a part left empty), and the fast k-means (FAISS on a bottom-k sample) in embed space."""
    argv = ["--data", "waterbirds", "--vocab", "8", "--batch", "3", "--seeds", "1", "2", "--space", space,
            "--kmeans", kmeans, "--model", world["clip"]] + (["--engine", "sklearn"] if kmeans == "paper" else [])
    ref = one(process_script, argv + ["--out", tmp_path / "one"], world)
    torchrun("process.py", argv + ["--out", tmp_path / "two"], world)
    for seed, vocab in ref.items():
        sub = f"seed_{seed}" + ("/clip" if space == "embed" else "")
        words = torch.load(tmp_path / "two" / sub / "vocab.pt")
        assert torch.equal(words, vocab.words), seed
        meta = json.loads((tmp_path / "two" / sub / "vocab.json").read_text())
        assert meta["patches_seen"] == vocab.meta["patches_seen"]
        if space == "pixel":
            assert meta["inertia"] == vocab.meta["inertia"]
        else:  # the same words from the same features (checked bit for bit); the recorded inertia, a float
            assert meta["inertia"] == pytest.approx(vocab.meta["inertia"], rel=1e-7)  # sum, may differ in its last bits


@pytest.mark.parametrize("kmeans", ["paper", "fast"])
def test_processes_share_the_fit_and_send_statistics_not_pixels(world, tmp_path, kmeans):
    """Each process reads only its part of every batch of the 40 COCO test images. The paper recipe in
    torch: every step one all-reduce of per-word sums and counts, the words one process's within
    float32 rounding. The fast recipe: each process's own bottom-k sample travels, the words identical.
    Rank 1 reads half the images and sends a small fraction of their pixels' bytes (counted as it
    hands tensors and pickles to the collectives)."""
    from vwt.kmeans import TOLERANCE

    argv = ["--data", "coco", "--split", "test", "--protocol", "standard", "--vocab", "2", "--batch", "8",
            "--kmeans", kmeans, "--model", world["clip"]]
    argv += ["--engine", "torch"] if kmeans == "paper" else ["--max-points-per-centroid", "4"]
    ref = one(process_script, argv + ["--out", tmp_path / "one"], world)[0]
    out = torchrun("process.py", argv + ["--out", tmp_path / "two"], world).stdout
    words = torch.load(tmp_path / "two" / "vocab.pt")
    if kmeans == "paper":
        assert (words - ref.words).abs().max() <= TOLERANCE * ref.words.abs().max()
        assert json.loads((tmp_path / "two" / "vocab.json").read_text())["processes"] == 2
    else:
        assert torch.equal(words, ref.words)
    sent, images = map(int, re.search(r"rank 1: sent (\d+) bytes for the k-means \((\d+) images read\)", out).groups())
    pixels = images * 3 * tiny.IMAGE ** 2 * 4  # float32, as loaded
    assert images == COCO_IMAGES // 2 and sent < pixels / 5, (sent, pixels)


def test_clip_writes_the_same_results(world, vocab, tmp_path):
    """Three seeds (the paper's re-splits), 8 images in batches of 3, bucketed by token count: the
    per-image predictions files are byte-identical, the results file equal."""
    argv = ["--data", "waterbirds", "--vocab-path", vocab, "--thresh", "0.5", "--batch", "3", "--model", world["clip"]]
    one(clip_script, argv + ["--out", tmp_path / "one"], world)
    torchrun("clip.py", argv + ["--out", tmp_path / "two"], world)
    a, b = results(tmp_path / "one" / "clip", tmp_path / "one"), results(tmp_path / "two" / "clip", tmp_path / "two")
    assert len(a) == 4 and a == b
    res = next(v for k, v in a.items() if k.endswith(".json"))
    assert res["seeds"] == [1, 2, 3] and len(set(res["runs"][0]["predictions"])) > 1


def test_len_writes_the_same_counts(world, vocab, tmp_path):
    argv = ["--data", "waterbirds", "--vocab-path", vocab, "--thresh", "0.5", "--batch", "3", "--model", world["clip"]]
    ref = one(len_script, argv + ["--out", tmp_path / "one"], world)
    torchrun("len.py", argv + ["--out", tmp_path / "two"], world)
    a, b = results(tmp_path / "one" / "len", tmp_path / "one"), results(tmp_path / "two" / "len", tmp_path / "two")
    json_a = {k: v for k, v in a.items() if k.endswith(".json")}
    assert json_a == {k: v for k, v in b.items() if k.endswith(".json")} and len(json_a) == 1
    assert len(set(ref["per_image"])) > 1 and sum(ref["word_counts"]) > 0  # records that tell images apart


def kill_all(agent: int) -> None:
    """SIGKILL a torchrun and its workers (each started in a session of its own, so by their groups)."""
    workers = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in map(int, workers):
        os.killpg(pid, signal.SIGKILL)
    os.killpg(agent, signal.SIGKILL)


def _captions(path: Path) -> list[dict]:
    """The whole caption lines of a captions file (a line cut short by a kill is skipped, as on resume)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap needs Java")
def test_blip_same_captions_and_kill_resume(world, vocab, tmp_path, monkeypatch, meteor_once):
    """Uninterrupted: the captions file is byte-identical to one process's, and so are the scores.
    Killed (SIGKILL to every process) after some captions, then resumed with torchrun: still one
    captions file, every image once, each caption the one-process one."""
    use_meteor(monkeypatch, meteor_once)
    argv = ["--data", "coco", "--vocab-path", vocab, "--thresh", "0.5", "--batch", "2", "--model", world["blip"]]
    one(blip_script, argv + ["--out", tmp_path / "one", "--no-score"], world)
    torchrun("blip.py", argv + ["--out", tmp_path / "two", "--no-score"], world)
    a, b = results(tmp_path / "one" / "blip", tmp_path / "one"), results(tmp_path / "two" / "blip", tmp_path / "two")
    assert len(a) == 1 and a == b
    for out in ("one", "two"):  # scoring is rank 0's alone: the same command without --no-score
        one(blip_script, argv + ["--out", tmp_path / out], world)
    a, b = results(tmp_path / "one" / "blip", tmp_path / "one"), results(tmp_path / "two" / "blip", tmp_path / "two")
    assert len(a) == 3 and a == b
    reference = {c["image_id"]: c for c in _captions(next((tmp_path / "one" / "blip").glob("*.captions.jsonl")))}
    assert len(reference) == COCO_IMAGES and len({c["tokens_first_block"] for c in reference.values()}) > 1

    killed = tmp_path / "killed"
    proc = torchrun("blip.py", argv + ["--out", killed, "--no-score"], world, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        files = list((killed / "blip").glob("*.captions.jsonl")) if (killed / "blip").exists() else []
        if files and len(_captions(files[0])) >= 4:
            kill_all(proc.pid)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill: {proc.stdout.read().decode()[-3000:]}"
    files = list((killed / "blip").glob("*.captions.jsonl"))
    before = _captions(files[0])
    assert 4 <= len(before) < COCO_IMAGES
    torchrun("blip.py", argv + ["--out", killed, "--no-score"], world)
    assert list((killed / "blip").glob("*.captions.jsonl")) == files  # one captions file per configuration
    after = _captions(files[0])
    assert sorted(c["image_id"] for c in after) == sorted(reference)  # none lost, none doubled
    assert {c["image_id"]: c for c in after} == reference
