"""Bad data, found before the model work (issue #23, items 8, 11 and 12), through the real scripts'
``main(argv)`` as the command line runs them (``fixtures.one_line_error``: one ``error: ...`` line, exit
code 2, no traceback), the model loader replaced by one that fails loudly, so each refusal is shown to
come before any model loads:

8. blip.py: references that cannot be scored (a COCO entry with no captions, a NoCaps image without
   captions, a caption that is not text in ``coco_karpathy_test_gt.json``) and no Java on PATH are
   refused before any image is captioned (no captions file is written); --no-score needs no Java.
11. Waterbirds-style metadata (Waterbirds, MetaShift's generated split) and CelebA's CSVs: an empty
    value, a word where a number belongs, a label out of range, a fraction, an image listed twice:
    one line naming the file, the line, the image, the column and the value, in every script that
    reads them (one validator in the readers).
12. An image over PIL's decompression-bomb limit (clip.py, len.py, process.py, the loader), an empty or
    repeating OpenImages ``taglist.txt``, a symbolic-link loop (or two names of one folder) among
    ImageNet's class folders.
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging

import blip as blip_script
import clip as clip_script
import fixtures
import process as process_script
import tiny
from vwt import captioning, cli, learning, models
from vwt import datasets as D
from vwt.errors import UserError

len_script = importlib.import_module("len")
# transformers' log handler keeps the sys.stderr it first sees: let that be the session's, not one
# test's capsys stream (closed when that test ends, so a later warning would print a logging error).
transformers_logging.get_logger("transformers")
SCRIPTS = {"clip.py": clip_script, "len.py": len_script, "process.py": process_script, "blip.py": blip_script}


@pytest.fixture
def no_model(monkeypatch):
    """Every model loader the scripts call fails loudly: a refusal must come before any of them."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(captioning, "load_model", refuse)


@pytest.fixture
def java_on_path(tmp_path, monkeypatch):
    """A stand-in ``java`` first on PATH, so the reference checks run (and are reached) on a machine
    without Java too; nothing here gets as far as running it."""
    folder = tmp_path / "fake-java"
    folder.mkdir()
    (folder / "java").write_text("#!/bin/sh\nexit 1\n")
    (folder / "java").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


def refused(capsys, script: str, argv, *says: str) -> str:
    """``script``'s main(argv) ends in one error line saying each of ``says``, exit code 2."""
    argv = [str(a) for a in argv] + ["--workers", "0", "--device", "cpu"]
    line = fixtures.one_line_error(capsys, lambda: SCRIPTS[script].main(argv))
    for s in says:
        assert s in line, (s, line)
    return line


def script_args(script: str, data: str, root: Path, out: Path) -> list:
    method = {"len.py": ["--top_k", "0.5"], "process.py": ["--vocab", "2", "--kmeans", "fast"]}.get(script, [])
    return ["--data", data, "--data-root", root, "--out", out, *method]


def edit_csv(path: Path, line: int, column: str, value: str) -> str:
    """Set ``column`` on ``line`` (1-based, the header is line 1) of a CSV; returns that line's first
    cell's old value in the column named 'img_filename' or 'image_id' (the image it names)."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    key = "img_filename" if "img_filename" in header else "image_id"
    image = cells[header.index(key)]
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return image


def captions_written(out: Path) -> list:
    return sorted((out / "blip").glob("*.captions.jsonl")) if (out / "blip").exists() else []


# --------------------------------------------------------------------------------------------------
# 8. blip.py: references and the caption tools, before captioning
# --------------------------------------------------------------------------------------------------
def _coco_root(tmp_path: Path) -> tuple[Path, Path]:
    root = fixtures.write_coco(tmp_path / "data")
    return root, root / "coco" / "annotations" / "coco_karpathy_test.json"


def test_a_coco_entry_with_no_captions_is_refused_before_captioning(tmp_path, capsys, no_model, java_on_path):
    root, ann = _coco_root(tmp_path)
    items = json.loads(ann.read_text())
    items[1]["caption"] = []
    ann.write_text(json.dumps(items))
    refused(capsys, "blip.py", ["--data-root", root, "--out", tmp_path / "out"],
            f"coco: {ann} gives image 73 no reference caption")
    assert captions_written(tmp_path / "out") == []


def test_a_nocaps_image_without_captions_is_refused_before_captioning(tmp_path, capsys, no_model, java_on_path):
    root = fixtures.write_nocaps(tmp_path / "data")
    ann = root / "nocaps" / "nocaps_val_4500_captions.json"
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    ann.write_text(json.dumps(data))
    refused(capsys, "blip.py", ["--data", "nocaps", "--data-root", root, "--out", tmp_path / "out"],
            f"nocaps: {ann} gives image 1 no reference caption")
    assert captions_written(tmp_path / "out") == []


def _gt(root: Path, caption_of) -> Path:
    """BLIP's coco_karpathy_test_gt.json for the fixture's test images; ``caption_of(image_id, k)``
    gives each caption."""
    ids = [r["image_id"] for r in D.load("coco", root, None).records]
    path = root / "coco" / "annotations" / "coco_karpathy_test_gt.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in ids], "annotations": [
        {"image_id": i, "id": 10 * i + k, "caption": caption_of(i, k)} for i in ids for k in range(2)]}))
    return path


@pytest.mark.parametrize("bad, says", [(7, "a caption that is not text (7)"), ("  ", "an empty caption"),
                                       (None, "a caption that is not text (None)")])
def test_a_gt_caption_that_is_not_text_is_refused_before_captioning(tmp_path, capsys, no_model, java_on_path, bad,
                                                                      says):
    root, _ = _coco_root(tmp_path)
    gt = _gt(root, lambda i, k: bad if (i, k) == (133, 1) else f"a photo number {i}")
    refused(capsys, "blip.py", ["--data-root", root, "--out", tmp_path / "out"], f"coco: {gt} gives image 133 {says}")
    assert captions_written(tmp_path / "out") == []


def test_no_java_is_refused_before_captioning_and_no_score_needs_none(tmp_path, capsys, monkeypatch, no_model):
    root, _ = _coco_root(tmp_path)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a PATH with no java on it
    refused(capsys, "blip.py", ["--data-root", root, "--out", tmp_path / "out"], "caption metrics need Java",
            "no java is on PATH", "--no-score")
    assert captions_written(tmp_path / "out") == []
    loaded = cli.Loaded(tiny.hf_blip(), "hf_blip", "tiny-blip", False, fixtures.word_bert_tokenizer(tmp_path / "tok"))
    argv = ["--data-root", root, "--out", tmp_path / "out", "--limit", "1", "--no-score", "--workers", "0",
            "--device", "cpu"]
    assert blip_script.main([str(a) for a in argv], loaded) is None  # captions only: Java is not needed
    [path] = captions_written(tmp_path / "out")
    assert len(path.read_text().splitlines()) == 2  # the header and one caption


def test_references_are_checked_only_for_the_images_a_run_scores(tmp_path, java_on_path):
    """--limit 1 scores image 42 alone: a defect in another image's references does not refuse it."""
    root, ann = _coco_root(tmp_path)
    items = json.loads(ann.read_text())
    items[1]["caption"] = []
    ann.write_text(json.dumps(items))
    spec = cli.spec_from_args(blip_script.parse_args(["--data-root", str(root), "--limit", "1"]), captioning.Decoding)
    spec = captioning.caption_settings(spec)
    captioning.check_scoring(spec, D.load("coco", root, None, limit=1))
    with pytest.raises(UserError, match="gives image 73 no reference caption"):
        captioning.check_scoring(spec, D.load("coco", root, None))


# --------------------------------------------------------------------------------------------------
# 11. Metadata values
# --------------------------------------------------------------------------------------------------
WATERBIRDS_CASES = [  # (line, column, value, what the error says of the value)
    (14, "y", "", "y is empty"), (15, "place", "", "place is empty"), (16, "y", "bird", "y is 'bird'"),
    (11, "split", "test", "split is 'test'"), (17, "y", "2", "y is 2"), (12, "y", "-1", "y is -1"),
    (13, "y", "0.7", "y is 0.7"), (3, "place", "nan", "place is empty")]


@pytest.mark.parametrize("line, column, value, says", WATERBIRDS_CASES, ids=[f"{c[1]}={c[2]!r}" for c in WATERBIRDS_CASES])
def test_waterbirds_metadata_values(tmp_path, capsys, no_model, line, column, value, says):
    root = fixtures.write_waterbirds(tmp_path / "data")
    meta = root / "waterbirds" / D.WATERBIRDS_DIR / "metadata.csv"
    image = edit_csv(meta, line, column, value)
    refused(capsys, "clip.py", script_args("clip.py", "waterbirds", root, tmp_path / "out"),
            f"waterbirds: {meta} line {line} (image {image}): {says}, not one of", "correct or remove that row")


@pytest.mark.parametrize("script", ["clip.py", "len.py", "process.py"])
def test_every_script_reading_metadata_refuses_the_same_way(tmp_path, capsys, no_model, script):
    root = fixtures.write_waterbirds(tmp_path / "data")
    meta = root / "waterbirds" / D.WATERBIRDS_DIR / "metadata.csv"
    edit_csv(meta, 2, "y", "2")  # a train image: clip.py and len.py read it through the paper's re-splits
    refused(capsys, script, script_args(script, "waterbirds", root, tmp_path / "out"), f"{meta} line 2", "y is 2")
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_an_image_listed_twice_or_without_a_name_is_refused(tmp_path, capsys, no_model):
    root = fixtures.write_waterbirds(tmp_path / "data")
    meta = root / "waterbirds" / D.WATERBIRDS_DIR / "metadata.csv"
    first = meta.read_text().splitlines()[1].split(",")[1]
    edit_csv(meta, 15, "img_filename", first)
    refused(capsys, "clip.py", script_args("clip.py", "waterbirds", root, tmp_path / "out"),
            f"{meta} lists image {first} on lines 2 and 15 (in splits 0 and 2)")
    edit_csv(meta, 15, "img_filename", "")
    refused(capsys, "clip.py", script_args("clip.py", "waterbirds", root, tmp_path / "out"),
            f"{meta} line 15: img_filename is empty")


def test_metashift_generated_metadata_is_checked_too(tmp_path, capsys, no_model):
    root = fixtures.write_metashift(tmp_path / "data")
    D.load("meta", root, None)  # generates metadata.csv, as the first run does
    meta = root / "metashift" / D.METASHIFT_DIR / "metadata.csv"
    image = edit_csv(meta, 3, "place", "indoor")
    refused(capsys, "clip.py", script_args("clip.py", "meta", root, tmp_path / "out"),
            f"meta: {meta} line 3 (image {image}): place is 'indoor'")


def test_celeba_values_and_an_image_in_two_partitions(tmp_path, capsys, no_model):
    root = fixtures.write_celeba(tmp_path / "data")
    attrs, parts = root / "celeba" / "list_attr_celeba.csv", root / "celeba" / "list_eval_partition.csv"
    kept = attrs.read_text(), parts.read_text()
    args = script_args("clip.py", "celeba", root, tmp_path / "out")
    for path, line, column, value, says in ((parts, 4, "partition", "test", "partition is 'test'"),
                                            (parts, 5, "partition", "3", "partition is 3"),
                                            (attrs, 6, "Blond_Hair", "2", "Blond_Hair is 2"),
                                            (attrs, 7, "Male", "", "Male is empty"),
                                            (attrs, 8, "Male", "0.5", "Male is 0.5")):
        image = edit_csv(path, line, column, value)
        refused(capsys, "clip.py", args, f"celeba: {path} line {line} (image {image}): {says}")
        attrs.write_text(kept[0])
        parts.write_text(kept[1])
    parts.write_text(kept[1] + "000001.jpg,2\n")  # image 000001.jpg in the train and the test partition
    refused(capsys, "clip.py", args, f"{parts} lists image 000001.jpg on lines 2 and 18 (in partitions 0 and 2)")
    parts.write_text(kept[1])
    attrs.write_text(kept[0] + kept[0].splitlines()[3] + "\n")
    refused(capsys, "clip.py", args, f"{attrs} lists image 000003.jpg on lines 4 and 18")


def test_valid_metadata_reads_as_before(tmp_path):
    """The checked columns give the labels and groups the files hold (0/1 and -1/1 codes, fractions
    written as 1.0)."""
    root = fixtures.write_celeba(fixtures.write_waterbirds(tmp_path))
    meta = root / "waterbirds" / D.WATERBIRDS_DIR / "metadata.csv"
    edit_csv(meta, 16, "y", "1.0")
    birds = D.load("waterbirds", root, None, protocol="standard").records
    rows = [l.split(",") for l in meta.read_text().splitlines()[1:]]
    expected = [(r[1], int(float(r[2])), int(r[4])) for r in rows if r[3] == "2"]
    assert [(r["image_id"], r["label"], r["place"]) for r in birds] == expected
    assert all(r["group"] == 2 * r["label"] + r["place"] for r in birds)
    faces = D.load("celeba", root, None, protocol="standard").records
    assert [(r["label"], r["male"]) for r in faces] == [(b, m) for b in (0, 1) for m in (0, 1) for _ in range(2)]


# --------------------------------------------------------------------------------------------------
# 12. Decompression bombs, empty tag lists, symbolic-link loops
# --------------------------------------------------------------------------------------------------
def bomb(path: Path, side: int = 20000) -> None:
    """A PNG header saying side x side pixels (400 million: over twice PIL's MAX_IMAGE_PIXELS), a few
    bytes on disk: PIL refuses to open it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def _bombed_waterbirds(tmp_path: Path) -> tuple[Path, list]:
    """Waterbirds with every image a decompression bomb (so every seed's re-split holds one)."""
    root = fixtures.write_waterbirds(tmp_path / "data")
    base = root / "waterbirds" / D.WATERBIRDS_DIR
    images = [base / l.split(",")[1] for l in (base / "metadata.csv").read_text().splitlines()[1:]]
    for image in images:
        bomb(image)
    return root, images


@pytest.mark.parametrize("script", ["clip.py", "len.py", "process.py"])
def test_a_decompression_bomb_is_one_line_before_the_model_work(tmp_path, capsys, monkeypatch, no_model, script):
    root, images = _bombed_waterbirds(tmp_path)
    argv = script_args(script, "waterbirds", root, tmp_path / "out")
    if script == "process.py":  # it checks the images once it knows which vocabularies it learns: after the model
        monkeypatch.setattr(models, "load_model", lambda *a, **k: cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny", False))
        monkeypatch.setattr(learning, "learn", lambda *a, **k: pytest.fail("the k-means ran before the check"))
    line = refused(capsys, script, argv, "is over PIL's decompression-bomb limit", "400000000 pixels",
                   "shrink the image", "PIL.Image.MAX_IMAGE_PIXELS")
    assert any(f"image {p} " in line for p in images), line
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_the_loader_refuses_a_decompression_bomb_in_one_line(tmp_path):
    bomb(tmp_path / "big.png")
    with pytest.raises(UserError, match=r"^waterbirds: image .*big.png is over PIL's decompression-bomb limit"):
        D.read_image(tmp_path / "big.png", "waterbirds")
    ds = D.ImageRecords("waterbirds", [{"path": str(tmp_path / "big.png"), "image_id": 0}], None)
    with pytest.raises(UserError, match="decompression-bomb limit"):
        D.check_images(ds)
    with pytest.raises(UserError, match="decompression-bomb limit"):
        next(D.batches(ds, 1))


@pytest.mark.parametrize("annots", ["tags", "no tags"])
def test_an_empty_openimages_tag_list_is_one_line(tmp_path, capsys, no_model, annots):
    root = fixtures.write_openimages(tmp_path / "data")
    lists = root / "openimages" / "common"
    (lists / "taglist.txt").write_text("\n\n")
    if annots == "no tags":  # every image listed without tags
        (lists / "annots.txt").write_text("".join(l.split(",")[0] + "\n" for l in (lists / "annots.txt").read_text().splitlines()))
    refused(capsys, "clip.py", script_args("clip.py", "openimages-common", root, tmp_path / "out"),
            f"openimages-common: {lists / 'taglist.txt'} lists no tags")


def test_a_tag_listed_twice_is_one_line(tmp_path, capsys, no_model):
    root = fixtures.write_openimages(tmp_path / "data")
    tags = root / "openimages" / "common" / "taglist.txt"
    tags.write_text(tags.read_text() + "dog\n")
    refused(capsys, "clip.py", script_args("clip.py", "openimages-common", root, tmp_path / "out"),
            f"{tags} lists tag 'dog' twice (tags 3 and 6)")


def test_the_shipped_tag_lists_are_valid():
    for subset in ("common", "rare"):
        path = D.REPO_DATA / "openimages" / subset / "taglist.txt"
        assert len(D._tags("openimages", path)) == {"common": 214, "rare": 200}[subset]


@pytest.mark.parametrize("how", ["two links to each other", "a link to the split folder", "a link to its parent",
                                 "two names of one folder", "a file link to itself"])
def test_a_symlink_loop_among_imagenet_class_folders_is_one_line(tmp_path, capsys, no_model, how):
    root = fixtures.write_imagenet(tmp_path / "data")
    val = root / "imagenet" / "val"
    if how == "two links to each other":
        os.symlink("n09999998", val / "n09999999")
        os.symlink("n09999999", val / "n09999998")
        says = [f"cannot follow {val / 'n09999998'}", "symbolic link loop", "fix or remove the link"]
    elif how == "a link to the split folder":
        os.symlink(".", val / "n09999999")
        says = [f"class folder {val / 'n09999999'} leads to {os.path.realpath(val)}, a folder that holds it"]
    elif how == "a link to its parent":
        os.symlink("..", val / "n09999999")
        says = [f"class folder {val / 'n09999999'} leads to", "symbolic link loop", "remove the link"]
    elif how == "two names of one folder":
        os.symlink(fixtures.IMAGENET_SYNSETS[0], val / "n09999999")
        says = [f"class folders {val / fixtures.IMAGENET_SYNSETS[0]} and {val / 'n09999999'} are one folder",
                "two classes"]
    else:
        os.symlink("x.JPEG", val / fixtures.IMAGENET_SYNSETS[1] / "x.JPEG")
        says = [f"cannot follow {val / fixtures.IMAGENET_SYNSETS[1] / 'x.JPEG'}"]
    refused(capsys, "clip.py", script_args("clip.py", "imgnet", root, tmp_path / "out"), *says)


def test_a_class_folder_linked_from_elsewhere_still_reads(tmp_path):
    root = fixtures.write_imagenet(tmp_path / "data")
    val = root / "imagenet" / "val"
    moved = tmp_path / "elsewhere" / fixtures.IMAGENET_SYNSETS[2]
    moved.parent.mkdir()
    (val / fixtures.IMAGENET_SYNSETS[2]).rename(moved)
    os.symlink(moved, val / fixtures.IMAGENET_SYNSETS[2])
    ds = D.load("imgnet", root, None)
    assert ds.classes == fixtures.IMAGENET_SYNSETS and [r["label"] for r in ds.records] == [0, 0, 1, 1, 2, 2]
