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


# --------------------------------------------------------------------------------------------------
# The paper's protocol: seeded re-splits, MetaShift's generated split, class names, preprocessing
# --------------------------------------------------------------------------------------------------
import numpy as np
import pandas as pd

import paper_fixtures


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory):
    r = tmp_path_factory.mktemp("paper")
    for write in (paper_fixtures.write_cub, paper_fixtures.write_celeba, paper_fixtures.write_meta):
        write(r)
    return r


def _canonical(root, name):
    """(split codes, groups, file names) of every row, read straight from the release's files."""
    if name == "waterbirds":
        df = pd.read_csv(root / "cub" / "metadata.csv")
        return df["split"].to_numpy(), (2 * df["y"] + df["place"]).to_numpy(), list(df["img_filename"])
    if name == "celeba":
        a = pd.read_csv(root / "celeba" / "list_attr_celeba.csv")
        p = pd.read_csv(root / "celeba" / "list_eval_partition.csv")
        return p["partition"].to_numpy(), (2 * (a["Blond_Hair"] == 1) + (a["Male"] == 1)).to_numpy(), list(a["image_id"])
    D.load("meta", root, None)  # writes metadata.csv
    df = pd.read_csv(root / "meta" / "metadata.csv")
    return df["split"].to_numpy(), (2 * df["y"] + df["place"]).to_numpy(), list(df["img_filename"])


def _reference_split(codes, groups, seed, split):
    """What the paper's loader does for a seed, from its description: seed NumPy's global generator,
    then for train, val, test in turn permute the split column within each group (groups ascending)
    and keep that split's rows of the column as it then is."""
    codes = codes.copy()
    np.random.seed(seed)
    for name in ("train", "val", "test"):
        for g in sorted(set(groups.tolist())):
            codes[groups == g] = np.random.permutation(codes[groups == g])
        if name == split:
            return [i for i in range(len(codes)) if codes[i] == {"train": 0, "val": 1, "test": 2}[split]]


@pytest.mark.parametrize("name", ["waterbirds", "celeba", "meta"])
def test_seeds_resplit_within_groups_as_the_paper(paper_root, name):
    codes, groups, files = _canonical(paper_root, name)
    canonical = D.load(name, paper_root, None)
    assert [r["image_id"] for r in canonical.records] == [files[i] for i in np.flatnonzero(codes == 2)]
    want_counts = np.bincount(groups[codes == 2], minlength=4).tolist()
    tests = {}
    for seed in (1, 2, 3):
        ds = D.load(name, paper_root, None, seed=seed)
        ids = [r["image_id"] for r in ds.records]
        assert ids == [files[i] for i in _reference_split(codes, groups, seed, "test")]
        assert np.bincount([r["group"] for r in ds.records], minlength=4).tolist() == want_counts  # the official counts
        assert ids == [r["image_id"] for r in D.load(name, paper_root, None, seed=seed).records]  # same every run
        train = D.load(name, paper_root, None, split="train", seed=seed)
        assert [r["image_id"] for r in train.records] == [files[i] for i in _reference_split(codes, groups, seed, "train")]
        assert np.bincount([r["group"] for r in train.records], minlength=4).tolist() == \
            np.bincount(groups[codes == 0], minlength=4).tolist()
        tests[seed] = ids
    assert len({tuple(v) for v in tests.values()}) == 3  # every seed its own test images
    assert all(set(v) != {r["image_id"] for r in canonical.records} for v in tests.values())


def test_paper_class_names_and_labels(paper_root):
    assert D.load("celeba", paper_root, None).classes == ["non-blond", "blond"]
    assert D.load("celeba", paper_root, None, protocol="standard").classes == ["non-blond person", "blond person"]
    assert D.load("waterbirds", paper_root, None).classes == ["landbird", "waterbird"]
    meta = D.load("meta", paper_root, None, split="train")
    assert meta.classes == ["dog", "cat"]  # the paper's label order: y = 1 is cat
    for r in meta.records:
        folder = r["image_id"].rsplit("/", 1)[0]
        assert (r["label"], r["place"]) == {"train/cat/cat(indoor)": (1, 1), "train/dog/dog(outdoor)": (0, 0),
                                            "test/cat/cat(outdoor)": (1, 0), "test/dog/dog(indoor)": (0, 1)}[folder]
        assert meta.classes[r["label"]] in folder and r["group"] == 2 * r["label"] + r["place"]


def test_metashift_split_is_generated_once_with_the_official_proportions(paper_root, tmp_path):
    import shutil

    base = tmp_path / "meta"
    shutil.copytree(paper_root / "meta", base, ignore=shutil.ignore_patterns("metadata.csv"))
    assert not (base / "metadata.csv").exists()
    ds = D.load("meta", tmp_path, None)
    df = pd.read_csv(base / "metadata.csv")
    n = sum(paper_fixtures.META_IMAGES.values())
    assert list(df.columns) == ["img_filename", "y", "place", "split"] and len(df) == n  # JPEGs only
    assert (df["split"] == 2).sum() == int(0.25 * n) and (df["split"] == 1).sum() == int(0.1 * n)
    assert sorted(set(2 * df["y"] + df["place"])) == [0, 1, 2, 3]  # all four groups drawn from
    # the reference: RandomState(42) draws the test rows, then the val rows from the others
    rng = np.random.RandomState(42)
    test = rng.choice(np.arange(n), size=int(n * 0.25), replace=False)
    val = rng.choice(np.setdiff1d(np.arange(n), test), size=int(n * 0.1), replace=False)
    assert sorted(np.flatnonzero(df["split"] == 2)) == sorted(test) and sorted(np.flatnonzero(df["split"] == 1)) == sorted(val)
    assert len(ds) == int(0.25 * n)
    written = (base / "metadata.csv").read_text()
    stamp = (base / "metadata.csv").stat().st_mtime_ns
    assert [r["image_id"] for r in D.load("meta", tmp_path, None).records] == [r["image_id"] for r in ds.records]
    assert (base / "metadata.csv").stat().st_mtime_ns == stamp  # reused, not rewritten
    (base / "metadata.csv").unlink()
    D.load("meta", tmp_path, None)
    assert (base / "metadata.csv").read_text() == written  # stable: the same split generated again


def test_metashift_unwritable_folder_is_one_line(paper_root, tmp_path, monkeypatch):
    import shutil

    import vwt.results

    shutil.copytree(paper_root / "meta", tmp_path / "meta", ignore=shutil.ignore_patterns("metadata.csv"))

    def refuse(path, text, **_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(vwt.results, "atomic_write_text", refuse)
    with pytest.raises(UserError) as e:
        D.load("meta", tmp_path, None)
    assert _one_line(e).startswith(f"meta: cannot write the generated split {tmp_path / 'meta' / 'metadata.csv'}")


def test_metashift_release_folder_name_gets_its_metadata_too(root):
    ds = D.load("meta", root, None)  # the fixture's metashift/MetaShift-Cat-Dog-indoor-outdoor/
    assert (root / "metashift" / "MetaShift-Cat-Dog-indoor-outdoor" / "metadata.csv").exists()
    assert len(ds) == int(0.25 * 7) and ds.classes == ["dog", "cat"]


def test_official_paths_are_read_as_they_are(root, tmp_path):
    (tmp_path / "openimages" / "open-images-v6" / "test").mkdir(parents=True)
    (tmp_path / "openimages" / "open-images-v6" / "test" / "data").symlink_to(root / "openimages" / "test")
    for subset in ("common", "rare"):
        (tmp_path / "openimages" / subset).symlink_to(root / "openimages" / subset)
    ours, theirs = D.load("openimages-rare", root, TF), D.load("openimages-rare", tmp_path, TF)
    assert [r["image_id"] for r in ours.records] == [r["image_id"] for r in theirs.records]
    assert torch.equal(ours[0][0], theirs[0][0])
    coco = tmp_path / "coco"  # BLIP's json files directly in data/coco/, as the paper's code downloads them
    coco.mkdir()
    for f in (root / "coco" / "annotations").iterdir():
        (coco / f.name).symlink_to(f)
    (coco / "val2014").symlink_to(root / "coco" / "val2014")
    assert [r["captions"] for r in D.load("coco", tmp_path, TF).records] == [r["captions"] for r in D.load("coco", root, TF).records]


def test_coco_gt_references_and_paper_train_records(tmp_path):
    fixtures.write_coco(tmp_path)
    base = tmp_path / "coco"
    assert D.coco_gt_references(tmp_path) is None
    gt = {"images": [{"id": 42}, {"id": 73}], "annotations": [
        {"image_id": 42, "id": 1, "caption": "a cat"}, {"image_id": 73, "id": 2, "caption": "a dog"},
        {"image_id": 42, "id": 3, "caption": "a small cat"}]}
    (base / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))
    assert D.coco_gt_references(tmp_path) == {42: ["a cat", "a small cat"], 73: ["a dog"]}
    train = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": c, "image_id": "x"} for c in ("one", "two")]
    (base / "coco_karpathy_train.json").write_text(json.dumps(train))
    recs = D.load("coco", tmp_path, None, split="train").records  # one record per caption, as the paper learns from
    assert [(r["image_id"], r["captions"]) for r in recs] == [(42, ["one"]), (42, ["two"])]


def test_seeds_resplit_only_confounder_sets_under_paper(root, paper_root):
    assert D.load("coco", root, None, seed=1).records == D.load("coco", root, None).records  # one fixed split
    fixed = D.load("waterbirds", paper_root, None, protocol="standard").records
    assert D.load("waterbirds", paper_root, None, seed=2, protocol="standard").records == fixed
    assert D.load("waterbirds", paper_root, None, seed=2).records != fixed
    with pytest.raises(UserError, match="unknown protocol"):
        D.load("waterbirds", root, None, protocol="paperish")


def test_known_protocols_only(root):
    with pytest.raises(UserError, match="unknown protocol"):
        D.load("coco", root, None, protocol="")


def _official(name, size):
    """torchvision's composition of the paper's evaluation transforms for data set ``name``."""
    from torchvision import transforms as T

    norm = T.Normalize(D.OPENAI_CLIP_MEAN, D.OPENAI_CLIP_STD)
    if name in ("coco", "nocaps"):
        steps = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    elif name == "celeba":
        steps = [T.CenterCrop(178), T.Resize((size, size))]
    else:
        big = int(size * 256.0 / 224.0)
        steps = [T.Resize((big, big)), T.CenterCrop((size, size))]
    return T.Compose(steps + [T.ToTensor(), norm])


@pytest.mark.parametrize("name", ["waterbirds", "meta", "openimages-common", "imgnet", "celeba", "coco", "nocaps"])
def test_paper_preprocessing_equals_the_official_transforms(name):
    size = 384 if name in ("coco", "nocaps") else 224
    ours = D.transform_for(name)
    assert ours.size == size
    photos = [im for n, im in D.sample_images() if n in ("astronaut", "chelsea", "coffee", "rocket", "camera")]
    for image in photos:  # square, landscape and portrait photographs; one grey-scale
        want = _official(name, size)(image.convert("RGB"))
        got = ours(image)
        assert got.shape == want.shape == (3, size, size)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), name
    small = D.transform_for(name, image_size=32)(photos[1])  # a model of another input size: the same recipe at its size
    assert torch.allclose(small, _official(name, 32)(photos[1].convert("RGB")), atol=1e-6, rtol=0)


def test_standard_preprocessing_is_the_models_own():
    image = D.sample_images()[1][1]
    assert torch.equal(D.transform_for("waterbirds", "standard")(image),
                       D.Preprocess(224, D.OPENAI_CLIP_MEAN, D.OPENAI_CLIP_STD)(image))
    assert torch.equal(D.transform_for("coco", "standard")(image),
                       D.Preprocess(384, D.OPENAI_CLIP_MEAN, D.OPENAI_CLIP_STD, crop=False)(image))
    assert not torch.allclose(D.transform_for("waterbirds")(image), D.transform_for("waterbirds", "standard")(image))
