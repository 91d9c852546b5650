"""The data-set loaders read the public layouts (written by tests/fixtures.py) and fail with one clear
line naming the missing or unreadable file and the expected layout."""
import csv
import json

import pytest
import torch

import fixtures
from vwt import datasets as D
from vwt.cli import UserError

TF = D.Preprocess(32, D.OPENAI_CLIP_MEAN, D.OPENAI_CLIP_STD)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    for write in set(fixtures.WRITERS.values()):
        write(r)
    return r


def test_every_name_loads_and_yields_pixels_and_records(root):
    for name in D.NAMES:
        ds = D.load(name, root, TF)
        assert len(ds) > 0, name
        x, rec = ds[len(ds) - 1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert "image_id" in rec


def test_waterbirds_reads_metadata_split_and_groups(root):
    base = root / "waterbirds" / "waterbird_complete95_forest2water2"
    rows = list(csv.DictReader(open(base / "metadata.csv")))
    for split, code in (("train", "0"), ("val", "1"), ("test", "2")):
        ds = D.load("waterbirds", root, TF, split=split)
        want = [r for r in rows if r["split"] == code]
        assert [r["image_id"] for r in ds.records] == [r["img_filename"] for r in want]
        assert [(r["label"], r["place"]) for r in ds.records] == [(int(r["y"]), int(r["place"])) for r in want]
        assert [r["group"] for r in ds.records] == [2 * int(r["y"]) + int(r["place"]) for r in want]
    assert D.load("waterbirds", root, TF).records == D.load("waterbirds", root, TF, split="test").records
    assert ds.group_names[2 * 1 + 0] == "waterbird on land"


def test_waterbirds_tarball_directly_under_the_root(root, tmp_path):
    (tmp_path / "waterbird_complete95_forest2water2").symlink_to(root / "waterbirds" / "waterbird_complete95_forest2water2")
    assert D.load("waterbirds", tmp_path, TF).records[0]["image_id"] == D.load("waterbirds", root, TF).records[0]["image_id"]


def test_celeba_maps_minus_one_one_attributes_to_label_and_group(root):
    attrs = {r["image_id"]: r for r in csv.DictReader(open(root / "celeba" / "list_attr_celeba.csv"))}
    parts = {r["image_id"]: r["partition"] for r in csv.DictReader(open(root / "celeba" / "list_eval_partition.csv"))}
    ds = D.load("celeba", root, TF)
    assert [r["image_id"] for r in ds.records] == [i for i, p in parts.items() if p == "2"]
    for r in ds.records:
        a = attrs[r["image_id"]]
        assert r["label"] == (a["Blond_Hair"] == "1") and r["male"] == (a["Male"] == "1")
        assert r["group"] == 2 * r["label"] + r["male"]
    assert sorted(r["group"] for r in ds.records) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_celeba_kaggle_nested_image_folder(root, tmp_path):
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    (base / "img_align_celeba" / "img_align_celeba").symlink_to(root / "celeba" / "img_align_celeba")
    for f in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        (base / f).symlink_to(root / "celeba" / f)
    x, _ = D.load("celeba", tmp_path, TF)[0]
    assert torch.equal(x, D.load("celeba", root, TF)[0][0])


def test_metashift_folders_give_label_context_and_group(root):
    ds = D.load("meta", root, TF, protocol="standard")
    got = sorted((r["image_id"].split("/")[2], r["label"], r["context"], r["group"]) for r in ds.records)
    assert got == sorted([("cat(indoor)", 0, 0, 0)] * 2 + [("cat(outdoor)", 0, 1, 1)] * 2
                         + [("dog(indoor)", 1, 0, 2)] * 2 + [("dog(outdoor)", 1, 1, 3)] * 2)
    assert {r["group"] for r in D.load("meta", root, TF, split="test", protocol="standard").records} == {1, 2}
    assert ds.classes == ["cat", "dog"]


def test_openimages_labels_index_the_tag_list(root):
    for subset in ("common", "rare"):
        tags, annots = fixtures.OPENIMAGES[subset]
        ds = D.load(f"openimages-{subset}", root, TF)
        assert ds.classes == tags
        assert [(r["image_id"], [ds.classes[i] for i in r["labels"]]) for r in ds.records] == annots


def test_openimages_falls_back_to_the_shipped_tag_lists(root, tmp_path):
    (tmp_path / "openimages").mkdir()
    (tmp_path / "openimages" / "test").symlink_to(root / "openimages" / "test")
    ds = D.load("openimages-common", tmp_path, None)
    shipped = (D.REPO_DATA / "openimages" / "common" / "taglist.txt").read_text().split("\n")
    assert ds.classes == [t for t in shipped if t] and len(ds.classes) == 214
    first = (D.REPO_DATA / "openimages" / "common" / "annots.txt").open().readline().strip().split(",")
    assert ds.records[0]["image_id"] == first[0].split("/")[1]
    assert [ds.classes[i] for i in ds.records[0]["labels"]] == first[1:]


def test_coco_blip_and_karpathy_files_give_the_same_test_split(root, tmp_path):
    fixtures.write_coco(tmp_path, fmt="karpathy")
    blip = D.load("coco", root, TF).records
    karpathy = D.load("coco", tmp_path, TF).records
    assert [(r["image_id"], r["captions"]) for r in blip] == [(r["image_id"], r["captions"]) for r in karpathy]
    assert [r["image_id"] for r in blip] == [42, 73, 74, 133]
    assert len(D.load("coco", tmp_path, TF, split="train")) == 2


def test_nocaps_groups_captions_by_image(root):
    data = json.loads((root / "nocaps" / "nocaps_val_4500_captions.json").read_text())
    ds = D.load("nocaps", root, TF)
    assert [r["image_id"] for r in ds.records] == [im["id"] for im in data["images"]]
    for r in ds.records:
        assert r["captions"] == [a["caption"] for a in data["annotations"] if a["image_id"] == r["image_id"]]
    assert [r["domain"] for r in ds.records] == ["in-domain", "near-domain", "out-domain"]


def test_imagenet_labels_are_sorted_synset_indices(root):
    ds = D.load("imgnet", root, TF)
    assert ds.classes == fixtures.IMAGENET_SYNSETS
    assert [r["label"] for r in ds.records] == [0, 0, 1, 1, 2, 2]
    assert all(r["synset"] == ds.classes[r["label"]] for r in ds.records)


def test_limit_and_batches_keep_order(root):
    ds = D.load("coco", root, TF, limit=3)
    ids = [rec["image_id"] for _, recs in D.batches(ds, 2) for rec in recs]
    assert ids == [42, 73, 74]


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name, missing", [
    ("waterbirds", "waterbirds/waterbird_complete95_forest2water2/metadata.csv"),
    ("celeba", "celeba/list_attr_celeba.csv"),
    ("meta", "metashift/MetaShift-Cat-Dog-indoor-outdoor"),
    ("openimages-rare", "openimages/test"),
    ("coco", "coco/annotations/coco_karpathy_test.json"),
    ("nocaps", "nocaps/nocaps_val_4500_captions.json"),
    ("imgnet", "imagenet/val"),
])
def test_missing_data_set_names_the_file_and_the_layout(tmp_path, name, missing):
    with pytest.raises(UserError) as e:
        D.load(name, tmp_path, TF)
    msg = _one_line(e)
    assert str(tmp_path / missing) in msg and "expected layout: " + D.layout(name) in msg


def test_missing_split_file(root, tmp_path):
    (tmp_path / "celeba").mkdir()
    for f in ("list_attr_celeba.csv", "img_align_celeba"):
        (tmp_path / "celeba" / f).symlink_to(root / "celeba" / f)
    with pytest.raises(UserError) as e:
        D.load("celeba", tmp_path, TF)
    assert str(tmp_path / "celeba" / "list_eval_partition.csv") in _one_line(e)
    with pytest.raises(UserError) as e:
        D.load("coco", root, TF, split="train")  # BLIP's files have no per-image train split
    assert str(root / "coco" / "annotations" / "coco_karpathy_train.json") in _one_line(e)


def test_unknown_split_and_name(root):
    with pytest.raises(UserError, match="unknown split 'dev'.*train, val, test"):
        D.load("waterbirds", root, TF, split="dev")
    with pytest.raises(UserError, match="unknown data set 'cub'"):
        D.load("cub", root, TF)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_and_missing_image_is_one_line(root, tmp_path, workers):
    fixtures.write_waterbirds(tmp_path)
    ds = D.load("waterbirds", tmp_path, TF)
    bad = ds.records[1]["path"]
    open(bad, "wb").write(b"not a jpeg")
    with pytest.raises(UserError) as e:
        list(D.batches(ds, 2, workers))
    msg = _one_line(e)
    assert msg.startswith(f"waterbirds: cannot read image {bad}: ") and "expected layout" in msg
    gone = ds.records[3]["path"]
    import os

    os.remove(gone)
    with pytest.raises(UserError) as e:
        ds[3]
    assert _one_line(e).startswith(f"waterbirds: image {gone} not found; expected layout")
