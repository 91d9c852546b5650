"""Nothing lost, nothing silently wrong (issue #23, items 1-4), against the real scripts as
tests/test_bad_input.py runs them (each script forked as ``python <script> ...``; a refusal is one
`error: ...` line on stderr and exit code 2; the files earlier runs wrote stay byte for byte):

1. blip.py never resumes captions of other images: the captions file's header records the data root
   (another root is refused, the file left as it is) and each caption its image file (one that
   changed since is captioned again); a header from before (no data root) is adopted for this run's
   root and records it from then on.
2. A checkpoint that lacks the weights of a part the run uses is refused in one line, before any
   image (clip.py: the text tower and projections; blip.py: the text decoder), without transformers'
   missing-weights table; a run that uses the vision tower alone (eff.py) takes such a checkpoint.
3. High-bit-depth images are scaled to 8 bits, never clipped to white: a 16-bit image gives the
   same results as the 8-bit image it holds.
4. Every image a run will read is checked (its header) before the model work starts: an image missing
   from seed 3's re-split ends clip.py (or process.py, or blip.py) before seed 1 is scored, not
   after seeds 1 and 2; once it is back, the run completes.
"""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
from test_bad_input import _lines, refused, script, snapshot
from vwt import datasets as D
from vwt import models
from vwt.errors import UserError

CPU = torch.device("cpu")


def _strip(src: Path, dest: Path, drop: tuple) -> Path:
    """A copy of the checkpoint folder ``src`` whose weights lack every tensor under the prefixes ``drop``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(drop)}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return dest


class World:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World()
    w.dir = tmp_path_factory.mktemp("reliability")
    w.clip, w.blip = fixtures.save_tiny_models(w.dir / "models")
    w.vision_only_clip = _strip(w.clip, w.dir / "models" / "vision-only-clip",
                                ("text_model.", "text_projection.", "visual_projection.", "logit_scale"))
    w.no_vision_clip = _strip(w.clip, w.dir / "models" / "no-vision-clip", ("vision_model.",))
    w.no_decoder_blip = _strip(w.blip, w.dir / "models" / "no-decoder-blip", ("text_decoder.",))
    w.data = fixtures.write_coco(fixtures.write_waterbirds(w.dir / "data"))
    return w


def _copy_data(world, dest: Path, name: str) -> Path:
    """A private copy of one data set's folder of the shared data root (times kept, as copytree does)."""
    shutil.copytree(world.data / name, dest / name)
    return dest


def _earlier(out: Path) -> dict:
    """An earlier run's file in the results folder, which every case must leave alone; the snapshot."""
    (out / "clip").mkdir(parents=True, exist_ok=True)
    (out / "clip" / "earlier__0123abcd.json").write_text('{"avg": 0.5}\n')
    return snapshot(out)


def _captions(out: Path) -> list[Path]:
    return sorted((out / "blip").glob("*.captions.jsonl"))


# --------------------------------------------------------------------------------------------------
# 1. blip.py: the captions file is the captions of one data root's image files
# --------------------------------------------------------------------------------------------------
def _blip(world, out: Path, root: Path, *extra) -> list:
    return ["--model", world.blip, "--data", "coco", "--data-root", root, "--out", out, "--workers", "0",
            "--device", "cpu", "--no-score", "--batch", "2", *extra]


def test_blip_never_resumes_captions_of_other_images(world, tmp_path):
    mine = _copy_data(world, tmp_path / "mine", "coco")
    other = fixtures.write_coco(tmp_path / "other")  # the same image ids, other pictures
    for i, rec in enumerate(D.load("coco", other, None).records):
        fixtures.photo(60 + i, size=(56, 42)).save(rec["path"])
    out = tmp_path / "out"
    done = script("blip.py", *_blip(world, out, mine), cwd=world.dir)
    assert done.code == 0, done
    [path] = _captions(out)
    kept = snapshot(out)
    # other images under the same ids: refused (not "4 of 4 images already captioned"), file untouched
    line = refused(script("blip.py", *_blip(world, out, other), cwd=world.dir), f"cannot resume {path}",
                   f"captions are of the images under {mine.resolve()}", f"under {other.resolve()}", f"mv {path} ")
    assert "already captioned" not in line and snapshot(out) == kept
    refused(script("blip.py", *_blip(world, out, other, "--restart"), cwd=world.dir), "another configuration",
            "left alone")
    assert snapshot(out) == kept
    lines = [json.loads(l) for l in path.read_bytes().splitlines()]  # the header's root, each caption's file
    assert lines[0]["config"]["data_root"] == str(mine.resolve())
    assert [l["file"][0] for l in lines[1:]] == [str(Path(r["path"]).relative_to(mine))
                                                  for r in D.load("coco", mine, None).records]
    # the same root, one image file replaced since: that image alone is captioned again (its new caption
    # last, the earlier lines byte for byte)
    image = D.load("coco", mine, None).records[2]
    size = Path(image["path"]).stat().st_size
    fixtures.photo(77, size=(56, 42)).save(image["path"])
    assert Path(image["path"]).stat().st_size != size
    again = script("blip.py", *_blip(world, out, mine), cwd=world.dir)
    assert again.code == 0 and "3 of 4 images already captioned" in again.err, again
    assert f"note: 1 image file(s) changed since they were captioned (e.g. image {image['image_id']})" in again.err
    grown = path.read_bytes()
    assert grown.startswith(kept[path.relative_to(out)])
    last = json.loads(grown.splitlines()[-1])
    assert last["image_id"] == image["image_id"] and last["file"][1] == Path(image["path"]).stat().st_size
    assert "already captioned" in script("blip.py", *_blip(world, out, mine), cwd=world.dir).err
    assert path.read_bytes() == grown  # nothing changed since: nothing captioned again
    # moved aside as the refusal says, the other root is captioned afresh; the first captions are whole
    path.rename(path.with_name(path.name + ".old"))
    fresh = script("blip.py", *_blip(world, out, other), cwd=world.dir)
    assert fresh.code == 0 and "0 of 4 images already captioned" in fresh.err, fresh
    assert json.loads(path.read_bytes().splitlines()[0])["config"]["data_root"] == str(other.resolve())
    assert path.with_name(path.name + ".old").read_bytes() == grown


def test_a_captions_file_from_before_is_adopted_for_its_own_root_only(world, tmp_path):
    """A header without data_root, captions without their file (written before they were recorded),
    whose settings are the run's: resumed, its header records this run's root from then on (captions
    byte for byte); a run on another root is then refused."""
    root = _copy_data(world, tmp_path / "mine", "coco")
    out = tmp_path / "out"
    assert script("blip.py", *_blip(world, out, root, "--limit", "2"), cwd=world.dir).code == 0
    [path] = _captions(out)
    first, body = path.read_bytes().split(b"\n", 1)
    new = json.loads(first)
    old = {"config": {k: v for k, v in new["config"].items() if k != "data_root"}}
    body = b"".join(json.dumps({k: v for k, v in json.loads(l).items() if k != "file"}).encode() + b"\n"
                    for l in body.splitlines())
    path.write_bytes(json.dumps(old).encode() + b"\n" + body)
    done = script("blip.py", *_blip(world, out, root), cwd=world.dir)
    assert done.code == 0, done
    assert "was written before captions files recorded their data root" in done.err
    assert "2 of 4 images already captioned" in done.err
    head, rest = path.read_bytes().split(b"\n", 1)
    assert json.loads(head) == new and rest.startswith(body)  # the earlier captions, then the two new ones
    assert len(rest.splitlines()) == 4
    kept = path.read_bytes()
    other = fixtures.write_coco(tmp_path / "other")
    refused(script("blip.py", *_blip(world, out, other), cwd=world.dir), "data_root", f"mv {path} ")
    assert path.read_bytes() == kept


# --------------------------------------------------------------------------------------------------
# 2. A checkpoint without the weights of a part the run uses
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, model, says", [
    ("clip.py", "vision_only_clip", ("text_model", "text_projection", "visual_projection")),
    ("blip.py", "no_decoder_blip", ("text_decoder",)),
])
def test_a_checkpoint_without_the_weights_a_run_uses_is_refused(world, tmp_path, name, model, says):
    out = tmp_path / "out"
    before = _earlier(out)
    data = "waterbirds" if name == "clip.py" else "coco"
    run = script(name, "--model", getattr(world, model), "--data", data, "--data-root", world.data, "--out", out,
                 "--workers", "0", "--device", "cpu", cwd=world.dir)
    line = refused(run, f"{getattr(world, model)} has no weights (or weights of another shape) for", *says,
                   "pass a checkpoint that holds them")
    assert "LOAD REPORT" not in run.err and "MISSING" not in run.err, line
    assert snapshot(out) == before  # no results, and nothing that says "pretrained": true


def test_a_run_of_the_vision_tower_alone_takes_a_vision_only_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    run = script("eff.py", "--model", world.vision_only_clip, "--methods", "base", "--batch", "1", "--out", out,
                 "--seconds", "0.001", "--min-iters", "2", "--warmup", "0", "--warmup-seconds", "0", "--rounds", "1",
                 "--limit", "1", "--metric", "time", "--device", "cpu", cwd=world.dir)
    assert run.code == 0 and "LOAD REPORT" not in run.err, run
    [saved] = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    assert "weights: pretrained" in run.out and json.dumps(saved).count('"pretrained"') >= 1, run


def test_load_model_knows_which_part_it_lacks(world):
    """``needs`` says which part the run uses; a lacking part is refused, or with ``fallback_random``
    becomes random weights with a note (recorded as random, never as pretrained)."""
    whole = models.load_model(str(world.vision_only_clip), CPU, needs="vision")
    assert whole.pretrained and whole.missing and not models.lacking(whole, "vision")
    assert all(k.startswith(("text_", "visual_projection", "logit_scale")) for k in whole.missing)
    with pytest.raises(UserError, match=r"shape\) for logit_scale, text_model, text_projection, visual_projection "
                                        r"\(39 tensors"):
        models.load_model(str(world.vision_only_clip), CPU)
    with pytest.raises(UserError, match=r"shape\) for vision_model \(\d+ tensors.*uses \(the vision tower\)"):
        models.load_model(str(world.no_vision_clip), CPU, needs="vision")
    fallen = models.load_model(str(world.no_vision_clip), CPU, needs="vision", fallback_random=True)
    assert not fallen.pretrained and "shape) for vision_model" in fallen.note
    misshapen = _strip(world.clip, world.dir / "models" / "misshapen-clip", ())  # a projection of another shape
    from safetensors.torch import load_file, save_file
    weights = load_file(misshapen / "model.safetensors")
    weights["text_projection.weight"] = torch.zeros(5, 5)
    save_file(weights, misshapen / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"shape\) for text_projection \(1 tensors, e.g. text_projection.weight\)"):
        models.load_model(str(misshapen), CPU)
    assert models.load_model(str(misshapen), CPU, needs="vision").missing == ("text_projection.weight",)
    full = models.load_model(str(world.clip), CPU)
    assert full.pretrained and full.missing == ()


# --------------------------------------------------------------------------------------------------
# 3. High-bit-depth images
# --------------------------------------------------------------------------------------------------
def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (PIL writes no 16-bit colour PNG): grey, grey+alpha, RGB or RGBA."""
    values = np.asarray(values, ">u2")
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[1 if values.ndim == 2 else values.shape[2]]
    raw = b"".join(b"\0" + row.tobytes() for row in values)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", values.shape[1], values.shape[0],
                                                                       16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    import tifffile

    grey = np.full((4, 5), 32768, np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    Image.fromarray(grey).save(tmp_path / "grey16.tif")
    tifffile.imwrite(tmp_path / "signed16.tif", np.full((4, 5), 16384, np.int16))
    tifffile.imwrite(tmp_path / "unsigned32.tif", np.full((4, 5), 2 ** 31 + 5, np.uint32))
    (tmp_path / "grey16.pgm").write_bytes(b"P5\n5 4\n1023\n" + np.full(20, 512, ">u2").tobytes())
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 32768, 65535, 2570
    _png16(tmp_path / "rgb16.png", rgb)
    expected = {"grey16.png": (128,) * 3, "grey16.tif": (128,) * 3, "signed16.tif": (128,) * 3,
                "unsigned32.tif": (128,) * 3, "grey16.pgm": (128,) * 3, "rgb16.png": (128, 255, 10)}
    for name, pixel in expected.items():
        image = D.read_image(tmp_path / name, "x")
        assert image.mode == "RGB" and image.size == (5, 4), name
        assert tuple(np.asarray(image)[0, 0]) == pixel, (name, np.asarray(image)[0, 0])
    full = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # every 8-bit level, as 16 bits
    Image.fromarray(full).save(tmp_path / "levels16.png")
    assert np.array_equal(np.asarray(D.read_image(tmp_path / "levels16.png"))[..., 0], (full // 257).astype(np.uint8))
    for name in ("astronaut", "coins"):  # 8-bit images: as PIL converts them
        photo = dict(D.sample_images())[name]
        photo.save(tmp_path / f"{name}.png")
        assert np.array_equal(np.asarray(D.read_image(tmp_path / f"{name}.png")), np.asarray(photo.convert("RGB")))
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match=r"^x: cannot read image .*float.tif: floating-point pixels have no fixed "
                                        r"range; convert it to an 8- or 16-bit PNG$"):
        D.read_image(tmp_path / "float.tif", "x")


def _grey_root(world, dest: Path, bits: int) -> Path:
    """Waterbirds with every image replaced by a greyscale PNG (under the same file name) of 8 or 16 bits."""
    root = _copy_data(world, dest, "waterbirds")
    for rec in D.load("waterbirds", root, None).records:
        with Image.open(rec["path"]) as im:
            grey = np.asarray(im.convert("L"))
        image = Image.fromarray(grey) if bits == 8 else Image.fromarray(grey.astype(np.uint16) * 257)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        Path(rec["path"]).write_bytes(buf.getvalue())
    return root


def test_clip_on_16_bit_images_equals_the_8_bit_images_they_hold(world, tmp_path):
    results = {}
    for bits in (8, 16):
        root = _grey_root(world, tmp_path / f"grey{bits}", bits)
        with Image.open(D.load("waterbirds", root, None).records[0]["path"]) as im:
            assert im.mode == ("L" if bits == 8 else "I;16")
        out = tmp_path / f"out{bits}"
        run = script("clip.py", "--model", world.clip, "--data", "waterbirds", "--data-root", root, "--out", out,
                     "--seeds", "1", "--workers", "0", "--device", "cpu", cwd=world.dir)
        assert run.code == 0, run
        [path] = out.glob("clip/*.json")
        results[bits] = json.loads(path.read_text())
        results[bits]["predictions"] = [p.read_text() for p in sorted(out.glob("clip/*.predictions.csv"))]
    assert results[16]["metrics"] == results[8]["metrics"]
    assert results[16]["predictions"] == results[8]["predictions"]


# --------------------------------------------------------------------------------------------------
# 4. Every image a run reads is checked before the work starts
# --------------------------------------------------------------------------------------------------
def _only_in_seed_3(root: Path, split: str) -> Path:
    """An image of ``split`` in seed 3's re-split of Waterbirds, in neither seed 1's nor seed 2's."""
    paths = {s: {r["path"] for r in D.load("waterbirds", root, None, split=split, seed=s, protocol="paper").records}
             for s in (1, 2, 3)}
    return Path(sorted(paths[3] - paths[1] - paths[2])[0])


def test_clip_checks_every_seeds_images_before_scoring_any(world, tmp_path):
    root = _copy_data(world, tmp_path / "data", "waterbirds")
    image = _only_in_seed_3(root, "test")
    hidden = image.with_name(image.name + ".away")
    image.rename(hidden)
    out = tmp_path / "out"
    before = _earlier(out)
    argv = ["--model", world.clip, "--data", "waterbirds", "--data-root", root, "--out", out, "--workers", "0",
            "--device", "cpu", "--batch", "2"]
    run = script("clip.py", *argv, cwd=world.dir)
    refused(run, f"waterbirds: image {image} not found", "expected layout")
    assert "waterbirds seed" not in run.err  # no seed was scored: nothing finished to lose
    assert snapshot(out) == before  # no seed 1 or 2 predictions written for a run that did not end
    hidden.rename(image)
    done = script("clip.py", *argv, cwd=world.dir)
    assert done.code == 0, done
    [path] = out.glob("clip/waterbirds__*.json")
    saved = json.loads(path.read_text())
    assert saved["seeds"] == [1, 2, 3] and len(list(out.glob("clip/*.predictions.csv"))) == 3


def test_process_checks_every_seeds_images_before_learning_any(world, tmp_path):
    root = _copy_data(world, tmp_path / "data", "waterbirds")
    image = _only_in_seed_3(root, "train")
    image.unlink()
    out = tmp_path / "tok"
    out.mkdir()
    run = script("process.py", "--model", world.clip, "--data", "waterbirds", "--data-root", root, "--vocab", "6",
                 "--out", out, "--workers", "0", "--device", "cpu", cwd=world.dir)
    refused(run, f"waterbirds: image {image} not found")
    assert "k-means" not in run.err and not list(out.rglob("*"))  # neither seed 1's nor seed 2's vocabulary


def test_blip_checks_the_images_left_to_caption_before_captioning(world, tmp_path):
    root = _copy_data(world, tmp_path / "data", "coco")
    out = tmp_path / "out"
    argv = _blip(world, out, root)
    assert script("blip.py", *argv, "--limit", "2", cwd=world.dir).code == 0
    kept = snapshot(out)
    image = Path(D.load("coco", root, None).records[3]["path"])
    data = image.read_bytes()
    image.write_bytes(b"\x89PNG damaged")
    run = script("blip.py", *argv, "--batch", "1", cwd=world.dir)
    refused(run, f"coco: cannot read image {image}")
    assert "coco captions" not in run.err and snapshot(out) == kept  # the third image was not captioned either
    image.write_bytes(data)
    done = script("blip.py", *argv, cwd=world.dir)
    assert done.code == 0 and "2 of 4 images already captioned" in done.err, done
    assert path_bytes(out).startswith(kept[_captions(out)[0].relative_to(out)])


def path_bytes(out: Path) -> bytes:
    [path] = _captions(out)
    return path.read_bytes()


def test_check_images_reads_headers_only_and_counts_the_bad(tmp_path):
    good = fixtures.photo(1)
    good.save(tmp_path / "a.jpg")
    good.save(tmp_path / "b.png")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:-200])  # pixels cut short: header fine
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    records = [{"path": str(tmp_path / n)} for n in ("a.jpg", "b.png", "cut.jpg", "a.jpg")]
    ds = D.ImageRecords("waterbirds", records, None)
    assert D.check_images(ds) == 3  # each path once
    assert D.check_images(D.Samples(None, limit=2)) == 0  # nothing to read from files
    bad = D.ImageRecords("coco", records + [{"path": str(tmp_path / n)} for n in ("text.jpg", "gone.jpg", "float.tif")],
                         None)
    with pytest.raises(UserError) as e:
        D.check_images(bad)
    line = str(e.value)
    assert line.startswith(f"coco: cannot read image {tmp_path / 'text.jpg'}: ") and "\n" not in line
    assert "(and 2 more of the 6 images this run reads)" in line and "expected layout" in line
    assert D.check_images(torch.utils.data.Subset(bad, [0, 1])) == 2  # a Subset: only its images
