"""Data sets, each yielding (pixel tensor, record) with the model's own preprocessing.

``samples`` needs no download: real public-domain photographs shipped inside scikit-image. The other
data sets (Waterbirds, CelebA, MetaShift, OpenImages, COCO, NoCaps, ImageNet) read the public
releases' layouts under the data root; ``data/README.md`` gives each layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import UserError, first_line

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SAMPLE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "camera", "coins", "brick", "grass", "moon")


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised (3, size, size) float tensor, as the model's own processor does it."""

    size: int
    mean: tuple
    std: tuple
    crop: bool = True  # resize the short side then centre-crop; False: resize to size x size (BLIP)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        from torchvision.transforms import InterpolationMode

        image = image.convert("RGB")
        if self.crop:
            image = TF.center_crop(TF.resize(image, self.size, InterpolationMode.BICUBIC), self.size)
        else:
            image = TF.resize(image, [self.size, self.size], InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def denormalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (..., 3, H, W) back to [0, 1] RGB."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return (pixels * std + mean).clamp(0, 1)


def preprocess_for(model: nn.Module) -> Preprocess:
    """The preprocessing a model was trained with, read from the model itself (works offline)."""
    name = type(model).__name__
    module = type(model).__module__
    hf = module.startswith("transformers")
    if hf and name.startswith("CLIP"):
        cfg = getattr(model.config, "vision_config", model.config)
        return Preprocess(cfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if hf and name.startswith("Blip"):
        cfg = getattr(model.config, "vision_config", model.config)
        return Preprocess(cfg.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop=False)
    visual = getattr(model, "visual", model)
    if type(visual).__module__.startswith("open_clip"):
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        mean = getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_CLIP_STD
        return Preprocess(int(size), tuple(mean), tuple(std))
    if module.startswith("timm"):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = model.patch_embed.img_size[0]
        return Preprocess(int(size), tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5))))
    raise TypeError(f"no preprocessing known for {module}.{name}")


def sample_images() -> list[tuple[str, Image.Image]]:
    """The real photographs of the ``samples`` data set, as (name, RGB PIL image); read once per process
    (decoding them takes seconds), so treat the images as read-only."""
    return list(_sample_images())


@lru_cache(maxsize=1)
def _sample_images() -> tuple:
    import skimage.data

    out = []
    for name in SAMPLE_NAMES:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append((name, Image.fromarray(arr[..., :3].astype(np.uint8))))
    return tuple(out)


class Samples(torch.utils.data.Dataset):
    """``samples``: the scikit-image photographs; records carry the image name."""

    def __init__(self, transform: Callable, limit: Optional[int] = None):
        self.items = sample_images()[:limit]
        self.transform = transform
        self.name = "samples"
        self.records = [{"name": n, "index": i, "image_id": n} for i, (n, _) in enumerate(self.items)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image = self.items[i][1]
        return (self.transform(image) if self.transform is not None else image), self.records[i]


def collate(batch):
    """Stack pixels; keep records as a list of dicts."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


# --------------------------------------------------------------------------------------------------
# The public data sets, read from their public layouts under the data root
# --------------------------------------------------------------------------------------------------
REPO_DATA = Path(__file__).resolve().parents[1] / "data"  # the shipped small files (OpenImages tag lists)

LAYOUTS = {
    "samples": "nothing to download (scikit-image's sample photographs)",
    "waterbirds": "<root>/waterbirds/waterbird_complete95_forest2water2/metadata.csv (img_filename,y,split,place) "
                  "with the image folders beside it",
    "celeba": "<root>/celeba/{list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/<image_id>}",
    "meta": "<root>/metashift/MetaShift-Cat-Dog-indoor-outdoor/{train,test}/{cat,dog}/<class>(<indoor|outdoor>)/*.jpg",
    "openimages": "<root>/openimages/test/<image id>.jpg with the tag lists <root>/openimages/<common|rare>/"
                  "{annots.txt, taglist.txt} (shipped in data/openimages/)",
    "coco": "<root>/coco/{annotations/coco_karpathy_<split>.json (BLIP) or dataset_coco.json (Karpathy), "
            "val2014/, train2014/}",
    "nocaps": "<root>/nocaps/{nocaps_val_4500_captions.json, val/<file_name>}",
    "imgnet": "<root>/imagenet/{train,val}/<synset id>/*.JPEG (val sorted into synset folders)",
}
NAMES = ("samples", "waterbirds", "celeba", "meta", "openimages-common", "openimages-rare", "coco", "nocaps",
         "imgnet")


def layout(name: str) -> str:
    """The expected layout of a data set, as error messages and data/README.md give it."""
    return LAYOUTS.get("openimages" if name.startswith("openimages") else name, "")


def _where(name: str) -> str:
    return f"; expected layout: {layout(name)} (see data/README.md)" if layout(name) else ""


def _missing(name: str, what: str, path: Path):

    return UserError(f"{name}: {what} {path} not found{_where(name)}")


def _need(name: str, what: str, path: Path) -> Path:
    if not path.exists():
        raise _missing(name, what, path)
    return path


def read_image(path, name: str = "") -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is a one-line UserError naming it."""

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise _missing(name, "image", Path(path)) from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated, not an image, bad header
        raise UserError(f"{name}: cannot read image {path}: {first_line(e)}{_where(name)}") from None


class ImageRecords(torch.utils.data.Dataset):
    """A list of records (dicts with at least "path"); item i is ``(transform(image), record)``.

    ``classes`` are the class (or tag) names where the task has them; ``group_names`` name the groups
    of grouped data (record "group" indexes them)."""

    def __init__(self, name: str, records: list[dict], transform: Optional[Callable],
                 classes: Sequence[str] = (), group_names: Sequence[str] = ()):
        self.name = name
        self.records = records
        self.transform = transform
        self.classes = list(classes)
        self.group_names = list(group_names)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        image = read_image(rec["path"], self.name)
        return (self.transform(image) if self.transform is not None else image), rec

    def subset(self, keep: Callable[[dict], bool]) -> "ImageRecords":
        """The same data set restricted to the records ``keep`` accepts (order kept)."""
        return ImageRecords(self.name, [r for r in self.records if keep(r)], self.transform, self.classes,
                            self.group_names)


def _split(name: str, split: Optional[str], allowed: Sequence[str], default: str) -> str:

    split = default if split is None else split
    if split not in allowed:
        raise UserError(f"{name}: unknown split {split!r}; choose one of {', '.join(allowed)}")
    return split


def _read_csv(name: str, path: Path, columns: Sequence[str]):
    import pandas as pd


    _need(name, "file", path)
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise UserError(f"{name}: cannot read {path}: {first_line(e)}{_where(name)}") from None
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise UserError(f"{name}: {path} lacks the column(s) {', '.join(lacking)}{_where(name)}")
    return df


WATERBIRDS_DIR = "waterbird_complete95_forest2water2"


def waterbirds(root: Path, transform, split=None) -> ImageRecords:
    """Waterbirds (Sagawa et al. 2020): y 0 landbird / 1 waterbird, place 0 land / 1 water, split column
    0/1/2 = train/val/test (default test); group = 2 * y + place. Also accepted without the
    ``waterbirds/`` folder (the tarball extracted directly under the root)."""
    split = _split("waterbirds", split, ("train", "val", "test"), "test")
    base = root / "waterbirds" / WATERBIRDS_DIR
    if not base.exists() and (root / WATERBIRDS_DIR).exists():
        base = root / WATERBIRDS_DIR
    df = _read_csv("waterbirds", base / "metadata.csv", ("img_filename", "y", "split", "place"))
    df = df[df["split"] == {"train": 0, "val": 1, "test": 2}[split]]
    records = [{"path": str(base / f), "image_id": f, "label": int(y), "place": int(p), "group": 2 * int(y) + int(p)}
               for f, y, p in zip(df["img_filename"], df["y"], df["place"])]
    return ImageRecords("waterbirds", records, transform, classes=("landbird", "waterbird"),
                        group_names=("landbird on land", "landbird on water", "waterbird on land", "waterbird on water"))


def celeba(root: Path, transform, split=None) -> ImageRecords:
    """CelebA (Liu et al. 2015), the public CSVs: target Blond_Hair, groups by Male (attributes are -1/1);
    list_eval_partition 0/1/2 = train/val/test (default test); group = 2 * blond + male. The images may
    sit in ``img_align_celeba/`` or the Kaggle copy's nested ``img_align_celeba/img_align_celeba/``."""
    split = _split("celeba", split, ("train", "val", "test"), "test")
    base = root / "celeba"
    attrs = _read_csv("celeba", base / "list_attr_celeba.csv", ("image_id", "Blond_Hair", "Male"))
    parts = _read_csv("celeba", base / "list_eval_partition.csv", ("image_id", "partition"))
    images = _need("celeba", "image folder", base / "img_align_celeba")
    if (images / "img_align_celeba").is_dir():
        images = images / "img_align_celeba"
    df = attrs.merge(parts, on="image_id")
    df = df[df["partition"] == {"train": 0, "val": 1, "test": 2}[split]]
    records = []
    for image_id, blond, male in zip(df["image_id"], df["Blond_Hair"], df["Male"]):
        y, m = int(blond == 1), int(male == 1)
        records.append({"path": str(images / image_id), "image_id": image_id, "label": y, "male": m, "group": 2 * y + m})
    return ImageRecords("celeba", records, transform, classes=("non-blond person", "blond person"),
                        group_names=("not blond, female", "not blond, male", "blond, female", "blond, male"))


METASHIFT_DIR = "MetaShift-Cat-Dog-indoor-outdoor"


def metashift(root: Path, transform, split=None) -> ImageRecords:
    """MetaShift cat/dog (Liang and Zou 2022), the authors' indoor/outdoor release: ``train`` holds
    cat(indoor) and dog(outdoor), ``test`` cat(outdoor) and dog(indoor); the default ``all`` reads both,
    so every group is present. label 0 cat / 1 dog, context 0 indoor / 1 outdoor, group = 2 * label +
    context."""
    split = _split("meta", split, ("train", "test", "all"), "all")
    base = _need("meta", "folder", root / "metashift" / METASHIFT_DIR)
    records = []
    for part in (("train", "test") if split == "all" else (split,)):
        folder = _need("meta", "split folder", base / part)
        for label, animal in enumerate(("cat", "dog")):
            for sub in sorted((folder / animal).glob(f"{animal}(*)")):
                context = sub.name[len(animal) + 1:-1]
                if context not in ("indoor", "outdoor"):
                    continue
                c = int(context == "outdoor")
                for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
                    records.append({"path": str(path), "image_id": f"{part}/{animal}/{sub.name}/{path.name}",
                                    "label": label, "context": c, "group": 2 * label + c})
    if not records:
        raise _missing("meta", "images under", base / ("{train,test}" if split == "all" else split))
    return ImageRecords("meta", records, transform, classes=("cat", "dog"),
                        group_names=("cat indoor", "cat outdoor", "dog indoor", "dog outdoor"))


def openimages(root: Path, transform, subset: str = "common", split=None) -> ImageRecords:
    """OpenImages V6 test with the common (214) or rare (200) tag lists of the Recognize Anything
    benchmark. annots.txt lines are ``test/<image id>,tag,tag,...``; records carry "labels" (tag indices).
    The lists are read from ``<root>/openimages/<subset>/`` or, if absent there, the shipped copy in the
    repository's data/openimages/."""

    name = f"openimages-{subset}"
    _split(name, split, ("test",), "test")
    lists = root / "openimages" / subset
    if not (lists / "annots.txt").exists() and (REPO_DATA / "openimages" / subset / "annots.txt").exists():
        lists = REPO_DATA / "openimages" / subset
    _need(name, "image folder", root / "openimages" / "test")
    tags = [t for t in _need(name, "tag list", lists / "taglist.txt").read_text().splitlines() if t]
    index = {t: i for i, t in enumerate(tags)}
    records = []
    base = str(root / "openimages")
    for n, line in enumerate(_need(name, "annotation list", lists / "annots.txt").read_text().splitlines()):
        if not line.strip():
            continue
        image, *labels = line.split(",")
        try:
            labels = [index[t] for t in labels]
        except KeyError as e:
            raise UserError(f"{name}: {lists / 'annots.txt'} line {n + 1} names tag {e} not in taglist.txt") from None
        ext = "" if image.lower().endswith((".jpg", ".jpeg", ".png")) else ".jpg"
        records.append({"path": f"{base}/{image}{ext}", "image_id": image.rsplit("/", 1)[-1].split(".")[0],
                        "labels": labels})
    return ImageRecords(name, records, transform, classes=tags)


def _coco_id(filename: str) -> int:
    return int(Path(filename).stem.rsplit("_", 1)[-1])


def coco(root: Path, transform, split=None) -> ImageRecords:
    """COCO 2014 with the Karpathy split (default test, 5000 images). Reads BLIP's
    ``annotations/coco_karpathy_<split>.json`` (a list of {"image", "caption": [...]}), or else
    Karpathy's ``dataset_coco.json`` ({"images": [{"filepath", "filename", "split", "cocoid",
    "sentences"}]}). Records carry "image_id" (the COCO id) and "captions"."""
    split = _split("coco", split, ("train", "val", "test"), "test")
    base = root / "coco"
    blip = base / "annotations" / f"coco_karpathy_{split}.json"
    karpathy = base / "dataset_coco.json"
    records = []
    if blip.exists() and split != "train":  # BLIP's train file has one entry per caption
        with _structure("coco", blip, 'a list of {"image": "val2014/<file>", "caption": [...]}'):
            for item in _read_json("coco", blip):
                records.append({"path": str(base / item["image"]), "image_id": _coco_id(item["image"]),
                                "captions": _strings(item["caption"])})
    elif karpathy.exists():
        with _structure("coco", karpathy, '{"images": [{"filepath", "filename", "split", "cocoid", '
                                          '"sentences": [{"raw"}]}]}'):
            for item in _read_json("coco", karpathy)["images"]:
                if item["split"] == split or (split == "train" and item["split"] == "restval"):
                    records.append({"path": str(base / item["filepath"] / item["filename"]),
                                    "image_id": int(item.get("cocoid", _coco_id(item["filename"]))),
                                    "captions": _strings([s["raw"] for s in item["sentences"]])})
    else:
        raise _missing("coco", "split file", blip)
    return ImageRecords("coco", records, transform)


class _structure:
    """``with _structure(name, path, expected):`` an annotation file of the wrong shape (a KeyError,
    TypeError, ... while reading it) becomes one line naming the file and the structure it needs."""

    def __init__(self, name: str, path: Path, expected: str):
        self.name, self.path, self.expected = name, path, expected

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, (KeyError, TypeError, AttributeError, IndexError, ValueError)):
            what = f"no key {e}" if kind is KeyError else first_line(e, 120)
            raise UserError(f"{self.name}: {self.path} does not have the expected structure ({what}); expected "
                            f"{self.expected}{_where(self.name)}") from None
        return False


def _strings(captions) -> list:
    """A record's reference captions, which must be a list of strings."""
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    return list(captions)


def nocaps(root: Path, transform, split=None) -> ImageRecords:
    """NoCaps validation (4500 images, 10 captions each; COCO-format json). Records carry "image_id",
    "captions" and "domain" (in-domain, near-domain, out-domain)."""
    _split("nocaps", split, ("val",), "val")
    base = root / "nocaps"
    path = base / "nocaps_val_4500_captions.json"
    data = _read_json("nocaps", path)
    captions: dict = {}
    with _structure("nocaps", path, '{"images": [{"id", "file_name", "domain"}], "annotations": '
                                    '[{"image_id", "caption"}]} (COCO format)'):
        for a in data["annotations"]:
            captions.setdefault(a["image_id"], []).append(_strings([a["caption"]])[0])
        records = [{"path": str(base / "val" / im["file_name"]), "image_id": im["id"],
                    "domain": im.get("domain", ""), "captions": captions.get(im["id"], [])} for im in data["images"]]
    return ImageRecords("nocaps", records, transform)


def imagenet(root: Path, transform, split=None) -> ImageRecords:
    """ImageNet-1K as image folders (train/, val/ with one folder per synset). Labels index the sorted
    synset ids, the order timm and torchvision classifiers use."""
    split = _split("imgnet", split, ("train", "val"), "val")
    base = _need("imgnet", "split folder", root / "imagenet" / split)
    synsets = sorted(d.name for d in os.scandir(base) if d.is_dir())
    if not synsets:
        raise _missing("imgnet", "synset folders under", base)
    records = []
    for label, wnid in enumerate(synsets):
        for entry in sorted(os.scandir(base / wnid), key=lambda e: e.name):
            if entry.is_file() and Path(entry.name).suffix.lower() in (".jpeg", ".jpg", ".png"):
                records.append({"path": entry.path, "image_id": entry.name, "label": label, "synset": wnid})
    return ImageRecords("imgnet", records, transform, classes=synsets)


def _read_json(name: str, path: Path):
    import json


    _need(name, "file", path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: {path} is not valid JSON ({e}){_where(name)}") from None


def load(name: str, root, transform: Optional[Callable], split: Optional[str] = None,
         limit: Optional[int] = None) -> torch.utils.data.Dataset:
    """The data set ``name`` (see NAMES) under the data root, yielding (transform(image), record).

    Records carry what the tasks need: "path", "image_id", and "label" + "group" (grouped data),
    "labels" (OpenImages tag indices), "captions" (COCO, NoCaps). ``split`` None picks the evaluation
    split; ``limit`` keeps the first records. A missing file is a one-line UserError naming it and the
    expected layout."""

    root = Path(root)
    if name == "samples":
        return Samples(transform, limit=limit)
    readers = {"waterbirds": waterbirds, "celeba": celeba, "meta": metashift, "coco": coco, "nocaps": nocaps,
               "imgnet": imagenet, "openimages-common": lambda r, t, split: openimages(r, t, "common", split),
               "openimages-rare": lambda r, t, split: openimages(r, t, "rare", split)}
    if name not in readers:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}")
    ds = readers[name](root, transform, split=split)
    if limit is not None:
        ds.records = ds.records[:limit]
    return ds


def batches(dataset, batch: int, workers: int = 0):
    """Iterate ``(pixels, records)`` batches in order. A UserError raised in a worker process (an
    unreadable image) comes back as the same one line, not the worker's traceback."""

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                         collate_fn=collate)
    try:
        yield from loader
    except UserError as e:
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        last = lines[-1] if lines else ""
        raise UserError(last.split("UserError: ", 1)[-1]) from None
