"""Writes the disk refuses, and runs that must not write over each other (issue 23, items 5 and 15).

Every results file of every script goes through one writer (``vwt.results.write_files``, whose bytes
all pass ``os.write``; the captions file grows through ``vwt.results.append_whole``). A full disk is
played here by :class:`FullDisk`, a stand-in for ``os.write`` that lets a given number of bytes more
into a folder, then fails with ENOSPC as a real disk does (a short write first). Installed in this
process, the forked script runs inherit it. Where this machine lets a test mount a tmpfs, a real full
file system checks the same (``test_a_real_full_file_system``).

Each case asserts the one-line error and exit code 2, that the files written before are byte for byte
the same, and that nothing finished is lost: every file a run on a roomy disk writes is saved, whole,
under the rescue folder the line names.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import fixtures
import tiny
import vwt
from test_bad_input import _lines, _warm, finish, refused, script, snapshot, start
from vwt import results

FAST_EFF = ["--seconds", "0.001", "--min-iters", "2", "--warmup", "0", "--warmup-seconds", "0", "--rounds", "2",
            "--paper-warmup", "1", "--limit", "4", "--metric", "time"]


class FullDisk:
    """``os.write`` as a disk with ``room`` bytes left under ``folder``: a write there takes what fits
    (a short write) and the next one fails with ENOSPC; writes anywhere else go through."""

    def __init__(self, folder: Path, room: int = 0):
        self.folder, self.room, self.real = os.path.realpath(folder) + os.sep, room, os.write

    def __call__(self, fd: int, data) -> int:
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if not where.startswith(self.folder):
            return self.real(fd, data)
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.real(fd, bytes(memoryview(data)[:self.room]))
        self.room -= n
        return n


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """Tiny CLIP and BLIP in local folders, tiny Waterbirds, COCO and ImageNet, a vocabulary."""
    _warm()
    w = type("Disk", (), {})()
    w.dir = tmp_path_factory.mktemp("disk")
    w.clip, w.blip = fixtures.save_tiny_models(w.dir / "models")
    w.data = w.dir / "data"
    for write in (fixtures.write_waterbirds, fixtures.write_coco, fixtures.write_imagenet):
        write(w.data)
    w.good = vwt.Vocabulary(torch.randn(6, 3 * tiny.PATCH ** 2, generator=torch.Generator().manual_seed(0)),
                            patch_size=tiny.PATCH).save(w.dir / "vocabs" / "good")
    return w


@pytest.fixture
def rescue_tmp(tmp_path, monkeypatch):
    """The temporary-files folder of this test (where refused files are saved), empty."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


RUNS = {  # script -> its command line; each writes several files at the end of its work
    "clip.py": ["--model", "{clip}", "--data", "waterbirds", "--vocab-path", "{good}", "--thresh", "0.9", "--batch", "4",
                "--workers", "0"],
    "len.py": ["--model", "{clip}", "--data", "waterbirds", "--top_k", "0.5", "--workers", "0"],
    "match.py": ["--model", "{clip}", "--top_k", "0.5", "--data", "imgnet", "--limit", "3"],
    "word.py": ["--model", "{clip}", "--vocab-path", "{good}", "--data", "imgnet", "--limit", "2"],
    "eff.py": ["--model", "{clip}", "--methods", "base,tome", "--batch", "1", "--random-weights", *FAST_EFF],
    "process.py": ["--model", "{clip}", "--data", "samples", "--vocab", "6", "--kmeans", "fast", "--workers", "0"],
}


def argv_of(disk, name: str, out: str) -> list:
    fill = {"{clip}": disk.clip, "{blip}": disk.blip, "{good}": disk.good}
    return [fill.get(a, a) for a in RUNS[name]] + ["--data-root", disk.data, "--out", out, "--device", "cpu"]


def ends_in_one_error(run, *says: str) -> str:
    """A run that printed its progress (captions so far, scores) and then ended in exactly one
    ``error: ...`` line naming ``says``, exit code 2, no traceback."""
    assert run.code == 2 and "Traceback" not in run.err, run
    lines = _lines(run.err)
    assert lines[-1].startswith("error: ") and sum(l.startswith("error: ") for l in lines) == 1, run
    for s in says:
        assert s in lines[-1], (s, lines[-1])
    return lines[-1]


def saved_to(line: str) -> Path:
    """The rescue folder or file the one line names."""
    return Path(line.split("saved to ", 1)[1].split(" (at the same paths")[0])


def _rescue_root(tmp: Path) -> Path:
    [root] = tmp.glob("vwt-rescue-*")
    return root


def _same_content(mine: Path, theirs: Path) -> None:
    """Whole files of the same kind and shape (timings and clocks aside)."""
    if mine.suffix == ".json":
        a, b = json.loads(mine.read_text()), json.loads(theirs.read_text())
        assert set(a) == set(b), mine
    elif mine.suffix == ".png":
        from PIL import Image

        with Image.open(mine) as a, Image.open(theirs) as b:
            a.load()
            assert a.size == b.size, mine
    elif mine.suffix == ".csv":
        a, b = mine.read_text().splitlines(), theirs.read_text().splitlines()
        assert a[0] == b[0] and len(a) == len(b), mine
    elif mine.suffix == ".pt":
        assert torch.load(mine, weights_only=True).shape == torch.load(theirs, weights_only=True).shape
    else:
        assert mine.read_bytes() == theirs.read_bytes(), mine


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_full_disk_is_one_line_and_every_result_is_saved(disk, tmp_path, rescue_tmp, monkeypatch, name):
    """The whole run is done; every file it writes is refused. One line, exit 2, the earlier file in
    --out byte for byte, and every file a roomy run writes saved whole under the rescue folder."""
    work = tmp_path / "work"
    work.mkdir()
    done = script(name, *argv_of(disk, name, "roomy"), cwd=work)
    assert done.code == 0, done
    wrote = {p.relative_to(work / "roomy") for p in (work / "roomy").rglob("*") if p.is_file()}
    assert len(wrote) >= 2  # the case is about several files
    (work / "runs").mkdir()
    (work / "runs" / "earlier.json").write_text('{"kept": true}\n')
    before = snapshot(work / "runs")

    monkeypatch.setattr(os, "write", FullDisk(work / "runs"))
    run = script(name, *argv_of(disk, name, "runs"), cwd=work)
    line = refused(run, "no space left on device writing", "saved to")
    assert snapshot(work / "runs") == before  # nothing new, nothing changed, no temporary left
    root = _rescue_root(rescue_tmp)
    assert saved_to(line).is_relative_to(root) and saved_to(line).exists()
    saved = {p.relative_to(root / "runs") for p in (root / "runs").rglob("*") if p.is_file()}
    assert saved == wrote, line
    for rel in wrote:
        _same_content(root / "runs" / rel, work / "roomy" / rel)


def test_a_full_disk_mid_captions_keeps_whole_lines_and_resumes(disk, tmp_path, rescue_tmp, monkeypatch):
    """blip.py appends each batch's captions as it makes them: the disk fills in the middle of the
    second batch. The file keeps the header and the first batch, whole (no torn line); a rerun with
    room captions only what is missing, and every image ends with one caption."""
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--model", disk.blip, "--data", "coco", "--batch", "2", "--limit", "4", "--no-score",
            "--data-root", disk.data, "--workers", "0", "--device", "cpu"]
    done = script("blip.py", *argv, "--out", "roomy", cwd=work)
    assert done.code == 0, done
    [roomy] = (work / "roomy" / "blip").glob("*.captions.jsonl")
    lines = roomy.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5  # the header and four captions
    first = b"".join(lines[:3])  # the header and the first batch: two flushes

    monkeypatch.setattr(os, "write", FullDisk(work / "runs", room=len(first) + 10))  # 10 bytes of the next line
    run = script("blip.py", *argv, "--out", "runs", cwd=work)
    ends_in_one_error(run, "no space left on device writing", "captions.jsonl", "kept, whole")
    [path] = (work / "runs" / "blip").glob("*.captions.jsonl")
    assert path.name == roomy.name
    assert path.read_bytes() == first

    monkeypatch.undo()
    again = script("blip.py", *argv, "--out", "runs", cwd=work)
    assert again.code == 0 and "2 of 4 images already captioned" in again.err, again
    ids = [json.loads(l)["image_id"] for l in path.read_bytes().splitlines()[1:]]
    assert sorted(ids) == sorted(json.loads(l)["image_id"] for l in lines[1:])


@pytest.mark.skipif(shutil.which("java") is None, reason="caption scores need java")
def test_a_full_disk_at_blip_scores_keeps_the_captions_and_saves_the_scores(disk, tmp_path, rescue_tmp,
                                                                             monkeypatch):
    """Every caption made; the disk is full when the predictions and the scores are written: both are
    saved under the rescue folder (one line naming it), the captions file is left as it was."""
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--model", disk.blip, "--data", "coco", "--batch", "2", "--limit", "2", "--data-root", disk.data,
            "--workers", "0", "--device", "cpu", "--out", "runs"]
    done = script("blip.py", *argv, "--no-score", cwd=work)
    assert done.code == 0, done
    before = snapshot(work / "runs")
    monkeypatch.setattr(os, "write", FullDisk(work / "runs"))
    line = ends_in_one_error(script("blip.py", *argv, cwd=work), "no space left on device writing 2 files", "saved to")
    assert snapshot(work / "runs") == before
    saved = sorted(p.name for p in saved_to(line).iterdir())
    assert len(saved) == 2 and saved[0].endswith(".json") and saved[1].endswith(".predictions.json")
    scores = json.loads((saved_to(line) / saved[0]).read_text())
    assert scores["images"] == 2 and "CIDEr" in scores["metrics"]


# --------------------------------------------------------------------------------------------------
# The one writer and the captions appender, called directly
# --------------------------------------------------------------------------------------------------
def test_the_writer_keeps_the_earlier_file_and_saves_the_new_one(tmp_path, rescue_tmp, monkeypatch):
    path = tmp_path / "out" / "r.json"
    results.write_json(path, {"a": 1})
    earlier = path.read_bytes()
    monkeypatch.setattr(os, "write", FullDisk(tmp_path / "out", room=3))  # a short write, then ENOSPC
    with pytest.raises(results.UserError) as e:
        results.write_json(path, {"a": 2})
    line = str(e.value)
    assert line == f"no space left on device writing {path}; saved to {saved_to(line)}" and "\n" not in line
    assert path.read_bytes() == earlier and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    assert json.loads(saved_to(line).read_text()) == {"a": 2}


def test_inside_a_script_the_run_goes_on_and_names_every_saved_file_once(tmp_path, rescue_tmp, monkeypatch):
    monkeypatch.setattr(os, "write", FullDisk(tmp_path / "out"))
    written = []
    with pytest.raises(results.UserError) as e:
        with results.saving_what_it_can():
            written.append(results.atomic_write_text(tmp_path / "out" / "a.csv", "x\n"))
            written.append(results.write_json(tmp_path / "out" / "a.json", {"b": 1}))
    line = str(e.value)
    assert line.startswith(f"no space left on device writing 2 files in {tmp_path / 'out'}; saved to ")
    assert [p.parent for p in written] == [saved_to(line)] * 2
    assert written[0].read_text() == "x\n" and json.loads(written[1].read_text()) == {"b": 1}
    assert not any((tmp_path / "out").iterdir())


def test_no_room_for_the_copy_either_is_one_line(tmp_path, rescue_tmp, monkeypatch):
    monkeypatch.setattr(os, "write", FullDisk(tmp_path))  # the rescue folder is full too
    with pytest.raises(results.UserError, match=r"no space left on device writing .*r\.json, nor a copy in .*"
                                                r"free some space"):
        results.write_json(tmp_path / "out" / "r.json", {"a": 1})


def test_append_whole_never_leaves_a_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"config": 1}\n')
    with open(path, "ab", buffering=0) as f:
        monkeypatch.setattr(os, "write", FullDisk(tmp_path, room=5))
        with pytest.raises(results.UserError, match="no space left on device writing .*c.jsonl; everything"):
            results.append_whole(f, b'{"image_id": 1}\n{"image_id": 2}\n')
        assert path.read_bytes() == b'{"config": 1}\n'

        def interrupted(fd, data):
            os.ftruncate(fd, os.fstat(fd).st_size + 3)  # three bytes land, then Ctrl-C
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            results.append_whole(f, b'{"image_id": 1}\n')
        assert path.read_bytes() == b'{"config": 1}\n'
        monkeypatch.undo()
        results.append_whole(f, b'{"image_id": 1}\n')
    assert path.read_bytes() == b'{"config": 1}\n{"image_id": 1}\n'


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path):
    """A captions file that an older version (or a power cut) left with a torn last line: the reader
    skips it, and the writer cuts it off before it appends, so the file holds whole lines only."""
    from vwt import captioning

    path = tmp_path / "c.captions.jsonl"
    whole = json.dumps({"config": {"a": 1}}).encode() + b"\n" + json.dumps({"image_id": 7, "caption": "a dog"}).encode() + b"\n"
    path.write_bytes(whole + b'{"image_id": 8, "capt')
    assert set(captioning.read_captions(path, {"a": 1})) == {7}
    writer = captioning.CaptionWriter(path, {"a": 1})
    assert path.read_bytes() == whole
    writer.write({"image_id": 8, "caption": "a cat"})
    writer.flush()
    writer.close()
    assert set(captioning.read_captions(path, {"a": 1})) == {7, 8}
    assert all(json.loads(l) for l in path.read_bytes().splitlines())


# --------------------------------------------------------------------------------------------------
# A real full file system, where this machine lets a test mount one
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def full_tmpfs(tmp_path):
    """A 256 KiB tmpfs at tmp_path/work/runs, filled to the last byte (skipped where mounting fails)."""
    mnt = tmp_path / "work" / "runs"
    mnt.mkdir(parents=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "earlier.json").write_text('{"kept": true}\n')
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("name", ["clip.py", "len.py", "process.py"])
def test_a_real_full_file_system(disk, full_tmpfs, rescue_tmp, name):
    before = snapshot(full_tmpfs)
    run = script(name, *argv_of(disk, name, "runs"), cwd=full_tmpfs.parent)
    line = refused(run, "no space left on device writing", "saved to")
    assert snapshot(full_tmpfs) == before
    assert any(p.is_file() for p in saved_to(line).parent.rglob("*"))


# --------------------------------------------------------------------------------------------------
# Item 15: runs and figures that must not write over each other
# --------------------------------------------------------------------------------------------------
def test_a_second_blip_run_on_one_captions_file_is_one_line(disk, tmp_path):
    """While one run holds a captions file, a second run of the same configuration on the same --out is
    refused in one line and leaves the file as it was; once the first ends, it runs."""
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--model", disk.blip, "--data", "coco", "--batch", "2", "--no-score", "--data-root", disk.data,
            "--workers", "0", "--device", "cpu", "--out", "runs"]
    assert script("blip.py", *argv, "--limit", "2", cwd=work).code == 0
    [path] = (work / "runs" / "blip").glob("*.captions.jsonl")
    before = path.read_bytes()
    with results.exclusive(path):  # the first run, still captioning
        line = refused(script("blip.py", *argv, "--limit", "4", cwd=work), "another run is writing", str(path.name))
        assert path.read_bytes() == before
    again = script("blip.py", *argv, "--limit", "4", cwd=work)
    assert again.code == 0 and "2 of 4 images already captioned" in again.err, (line, again)


def test_two_blip_runs_at_once_write_each_caption_once(disk, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--model", disk.blip, "--data", "coco", "--batch", "1", "--limit", "4", "--no-score",
            "--data-root", disk.data, "--workers", "0", "--device", "cpu", "--out", "runs"]
    runs = [finish(*p) for p in [start("blip.py", *argv, cwd=work), start("blip.py", *argv, cwd=work)]]
    assert all(r.code in (0, 2) for r in runs) and any(r.code == 0 for r in runs), runs
    for r in runs:
        if r.code == 2:
            refused(r, "another run")
    [path] = (work / "runs" / "blip").glob("*.captions.jsonl")
    ids = [json.loads(l)["image_id"] for l in path.read_bytes().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == 4


def test_match_figures_of_one_file_name_in_two_folders_are_two_files(disk, tmp_path):
    """ImageNet class folders holding images of the same file name: each image gets its own figure."""
    data = tmp_path / "data"
    shutil.copytree(disk.data / "imagenet", data / "imagenet")
    val = data / "imagenet" / "val"
    a, b = sorted(val.iterdir())[:2]
    twin = b / sorted(a.iterdir())[0].name  # the same name as a's first image, another photo
    shutil.copy(sorted(b.iterdir())[0], twin)
    images = sorted(p for p in val.rglob("*.JPEG"))
    run = script("match.py", "--model", disk.clip, "--top_k", "0.5", "--data", "imgnet", "--data-root", data,
                 "--out", tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert run.code == 0, run
    [folder] = (tmp_path / "out" / "figures" / "match").iterdir()
    saved = json.loads((folder / "match.json").read_text())["images"]
    files = [i["file"] for i in saved]
    assert len(files) == len(images) == len(set(files))
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(files)
    assert f"{a.name}_{twin.stem}.png" in files and f"{b.name}_{twin.stem}.png" in files
    assert sum(f.startswith("ILSVRC2012") for f in files) == len(images) - 2  # unique names stay as they were
