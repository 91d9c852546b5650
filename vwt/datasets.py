"""Data sets, each yielding (pixel tensor, record), and their preprocessing.

``samples`` needs no download: real public-domain photographs shipped inside scikit-image. The other
data sets (Waterbirds, CelebA, MetaShift, OpenImages, COCO, NoCaps, ImageNet) read the public
releases' layouts, or the paper's code's, under the data root; ``data/README.md`` gives each layout.
Under the ``paper`` protocol the splits (seeded re-splits, MetaShift's generated split), class names
and preprocessing (``transform_for``) are those of the paper's code; ``standard`` keeps the release's
split and the model's own preprocessing (``preprocess_for``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backends import find
from .backends.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: F401  (re-exported)
from .errors import UserError, first_line
from .protocol import Protocol, get as get_protocol

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


@dataclass(frozen=True)
class PaperPreprocess(Preprocess):
    """The paper's evaluation transforms (its ``get_transform(train=False)``), as torchvision composes
    them on a PIL image: ``mode`` "resize-crop" = Resize((s', s')) with s' = int(size * 256 / 224), then
    CenterCrop(size), bilinear (Waterbirds, MetaShift, OpenImages, ImageNet); "celeba" = CenterCrop(178)
    then Resize((size, size)), bilinear; "square" = Resize((size, size)), bicubic (COCO, NoCaps: BLIP).
    PIL resizes with antialiasing, as torchvision does for PIL images."""

    mode: str = "resize-crop"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        from torchvision.transforms import InterpolationMode

        image = image.convert("RGB")
        if self.mode == "resize-crop":
            side = int(self.size * (256.0 / 224.0))
            image = TF.center_crop(TF.resize(image, [side, side], InterpolationMode.BILINEAR), [self.size, self.size])
        elif self.mode == "celeba":
            image = TF.resize(TF.center_crop(image, [CELEBA_CROP, CELEBA_CROP]), [self.size, self.size],
                              InterpolationMode.BILINEAR)
        elif self.mode == "square":
            image = TF.resize(image, [self.size, self.size], InterpolationMode.BICUBIC)
        else:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}")
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


CELEBA_CROP = 178  # the aligned CelebA images are 178 x 218: the paper crops the central square


def transform_for(name: str, protocol: Union[str, Protocol] = "paper", image_size: Optional[int] = None,
                  mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                  data_preprocessing: Optional[bool] = None) -> Preprocess:
    """The preprocessing of data set ``name`` under ``protocol``: PIL image -> normalised tensor.

    With the data set's own preprocessing (``protocol.data_preprocessing``, the paper's; or
    ``data_preprocessing`` given explicitly): the transform the paper's loader of that data set applies
    (its table row's ``paper_transform``, see :class:`PaperPreprocess`); otherwise this project's, the
    model's own (short side to the size, bicubic, centre crop; COCO and NoCaps resized to a square).
    ``image_size`` defaults to the data set's: 384 for COCO and NoCaps (BLIP), 224 otherwise.
    ``mean``/``std``: CLIP's, as every loader of the paper normalises."""
    if data_preprocessing is None:
        data_preprocessing = get_protocol(protocol).data_preprocessing
    row = DATASETS.get(name)
    caption = row is not None and row.task == "captions"
    size = int(image_size or (row.image_size if row is not None else 224))
    mean, std = tuple(mean), tuple(std)
    if not data_preprocessing:
        return Preprocess(size, mean, std, crop=not caption)
    return PaperPreprocess(size, mean, std, crop=not caption, mode=row.paper_transform if row else "resize-crop")


def preprocess_for(model: nn.Module) -> Preprocess:
    """The preprocessing a model was trained with, read from the model itself (works offline)."""
    backend = find(model)
    if backend is None:
        raise TypeError(f"no preprocessing known for {type(model).__module__}.{type(model).__name__}")
    return Preprocess(**backend.preprocess(model))


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
    "waterbirds": "<root>/cub/metadata.csv (the paper's path) or <root>/waterbirds/waterbird_complete95_forest2water2/"
                  "metadata.csv (img_filename,y,split,place), with the image folders beside it",
    "celeba": "<root>/celeba/{list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/[img_align_celeba/]<image_id>}",
    "meta": "<root>/meta/ (the paper's path) or <root>/metashift/MetaShift-Cat-Dog-indoor-outdoor/, holding "
            "{train,test}/{cat,dog}/<class>(<indoor|outdoor>)/*.jpg (and the generated metadata.csv)",
    "openimages": "<root>/openimages/test/<image id>.jpg or <root>/openimages/open-images-v6/test/data/<image id>.jpg, "
                  "with the tag lists <root>/openimages/<common|rare>/{annots.txt, taglist.txt} (shipped in data/openimages/)",
    "coco": "<root>/coco/{[annotations/]coco_karpathy_<split>.json (BLIP) or dataset_coco.json (Karpathy), "
            "val2014/, train2014/}",
    "nocaps": "<root>/nocaps/{nocaps_val_4500_captions.json, val/<file_name>}",
    "imgnet": "<root>/imagenet/{train,val}/<synset id>/*.JPEG (val sorted into synset folders)",
}


def layout(name: str) -> str:
    """The expected layout of a data set, as error messages and data/README.md give it."""
    row = DATASETS.get(name)
    return row.layout if row is not None else LAYOUTS.get(name, "")


def _where(name: str) -> str:
    return f"; expected layout: {layout(name)} (see data/README.md)" if layout(name) else ""


def _missing(name: str, what: str, path: Path):

    return UserError(f"{name}: {what} {path} not found{_where(name)}")


def _need(name: str, what: str, path: Path) -> Path:
    if not path.exists():
        raise _missing(name, what, path)
    return path


HIGH_DEPTH_HINT = "convert it to an 8- or 16-bit PNG"


def _integer_depth(im: Image.Image) -> tuple[int, bool]:
    """(bits, signed) of a single-channel integer image's values: 16 unsigned for PIL's "I;16" modes
    and for the "I" images PNG and PGM/PPM decode (16 bits at most), a TIFF's BitsPerSample and
    SampleFormat otherwise. A value range that cannot be known is a ValueError (a one-line error)."""
    if im.mode.startswith("I;16") or im.format in ("PNG", "PPM"):
        return 16, False
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    bits = bits[0] if isinstance(bits, tuple) else bits
    if isinstance(bits, int) and 8 < bits <= 32:
        return bits, tags.get(339) in (2, (2,))  # SampleFormat 2: signed integers
    raise ValueError(f"{im.mode}-mode integer pixels of unknown range ({im.format or 'unknown format'}); "
                     f"{HIGH_DEPTH_HINT}")


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB. High-bit-depth greyscale (16- or 32-bit integer pixels, where PIL's
    own conversion clips every value above 255 to white) is scaled to 0-255 from its full range (a
    16-bit 32768 becomes 128; negative values of signed pixels are black); floating-point pixels have
    no fixed range and are refused (ValueError). Other modes convert as PIL converts them (16-bit RGB
    PNGs already decode to 8 bits)."""
    if im.mode == "F":
        raise ValueError(f"floating-point pixels have no fixed range; {HIGH_DEPTH_HINT}")
    if im.mode == "I" or im.mode.startswith("I;16"):
        bits, signed = _integer_depth(im)
        values = np.asarray(im)
        if bits == 32 and not signed:
            values = values.view(np.uint32)  # PIL holds unsigned 32-bit pixels as int32
        values = values.astype(np.float64) * (255.0 / (2 ** (bits - signed) - 1))
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _check_mode(im: Image.Image) -> None:
    """What :func:`to_rgb` would refuse, found from the header alone (no pixel is decoded)."""
    if im.mode == "F":
        raise ValueError(f"floating-point pixels have no fixed range; {HIGH_DEPTH_HINT}")
    if im.mode == "I":
        _integer_depth(im)


def _image_problem(path, header_only: bool = False):
    """(None, image) for a readable image (None for the image with ``header_only``: only its header is
    read), else (what is wrong with it, None)."""
    try:
        with Image.open(path) as im:
            if header_only:
                _check_mode(im)
                return None, None
            return None, to_rgb(im)
    except FileNotFoundError:
        return f"image {path} not found", None
    except Image.DecompressionBombError as e:  # more than twice PIL.Image.MAX_IMAGE_PIXELS: refused unread
        return (f"image {path} is over PIL's decompression-bomb limit ({first_line(e)}); shrink the image, or, if "
                f"you trust it, raise PIL.Image.MAX_IMAGE_PIXELS from Python"), None
    except (OSError, ValueError, SyntaxError) as e:  # truncated, not an image, bad header, no known range
        return f"cannot read image {path}: {first_line(e)}", None


def read_image(path, name: str = "") -> Image.Image:
    """Open an image as 8-bit RGB (:func:`to_rgb`: high bit depths scaled, never clipped); a missing or
    unreadable file is a one-line UserError naming it."""
    problem, image = _image_problem(path)
    if problem is not None:
        raise UserError(f"{name + ': ' if name else ''}{problem}{_where(name)}")
    return image


def _paths(data) -> tuple[str, list]:
    """(name, image paths) of a data set, a ``torch.utils.data.Subset`` of one, or a list of records."""
    if isinstance(data, torch.utils.data.Subset):
        name, records = getattr(data.dataset, "name", ""), [data.dataset.records[i] for i in data.indices]
    else:
        name, records = getattr(data, "name", ""), getattr(data, "records", data)
    return name, [r["path"] for r in records if isinstance(r, dict) and "path" in r]


def check_images(*sets) -> int:
    """Open the header of every image the data sets ``sets`` hold (data sets, Subsets of them, or record
    lists; each path once), before a run's long work: a missing file, a file that is not an image, or
    pixels of no known range is one UserError naming the first such image and how many more there are,
    instead of an end in the middle of the run that loses its finished part. Reads no pixels (a file
    cut short inside its pixel data is still found only when it is decoded). Returns how many images
    were checked."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    order, names = {}, {}
    for data in sets:
        name, paths = _paths(data)
        for p in paths:
            order.setdefault(p, None)
            names.setdefault(p, name)
    paths = list(order)
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        found = list(tqdm(pool.map(lambda p: _image_problem(p, header_only=True)[0], paths), total=len(paths),
                          desc="checking images", unit="image", disable=len(paths) < 2000, leave=False))
    bad = [(p, problem) for p, problem in zip(paths, found) if problem is not None]
    if bad:
        path, problem = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(paths)} images this run reads)" if len(bad) > 1 else ""
        name = names[path]
        raise UserError(f"{name + ': ' if name else ''}{problem}{more}{_where(name)}")
    return len(paths)


class ImageRecords(torch.utils.data.Dataset):
    """A list of records (dicts with at least "path"); item i is ``(transform(image), record)``.

    ``classes`` are the class (or tag) names where the task has them; ``group_names`` name the groups
    of grouped data (record "group" indexes them); ``source`` is the annotation file the records'
    captions were read from (COCO, NoCaps), for errors that name it."""

    def __init__(self, name: str, records: list[dict], transform: Optional[Callable],
                 classes: Sequence[str] = (), group_names: Sequence[str] = (), source: Optional[Path] = None):
        self.name = name
        self.records = records
        self.transform = transform
        self.classes = list(classes)
        self.group_names = list(group_names)
        self.source = source

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        image = read_image(rec["path"], self.name)
        return (self.transform(image) if self.transform is not None else image), rec

    def subset(self, keep: Callable[[dict], bool]) -> "ImageRecords":
        """The same data set restricted to the records ``keep`` accepts (order kept)."""
        return ImageRecords(self.name, [r for r in self.records if keep(r)], self.transform, self.classes,
                            self.group_names, self.source)


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


def _cell(value) -> str:
    """A metadata cell as an error quotes it."""
    import pandas as pd

    return "empty" if pd.isna(value) else repr(value.item() if hasattr(value, "item") else value)


def _codes(name: str, path: Path, df, column: str, allowed: Sequence[int], image: str):
    """The column ``column`` of the metadata ``df`` (read from ``path``) as integers, each one of
    ``allowed``: a missing value, a word, a fraction or a code out of range (a label with no class or
    group, which would end the run after the model loads or be counted in no group) is one UserError
    naming the file, its line, the image (column ``image``) and the value, before any model loads."""
    import pandas as pd

    values = pd.to_numeric(df[column], errors="coerce")
    bad = np.flatnonzero(~values.isin(allowed).to_numpy())
    if len(bad):
        i = int(bad[0])
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise UserError(f"{name}: {path} line {i + 2} (image {df[image].iloc[i]}): {column} is "
                        f"{_cell(df[column].iloc[i])}, not one of {', '.join(map(str, allowed))}{more}; correct "
                        f"or remove that row{_where(name)}")
    return values.astype(int)


def _image_column(name: str, path: Path, df, column: str, split: Optional[str] = None) -> None:
    """Every row of the metadata ``df`` names an image (column ``column``), each image once: an empty
    name, or an image listed twice (in two splits: ``split`` names the split column), is one UserError
    naming the file, the lines and the image."""
    empty = np.flatnonzero(df[column].isna().to_numpy())
    if len(empty):
        raise UserError(f"{name}: {path} line {int(empty[0]) + 2}: {column} is empty; every row must name an "
                        f"image{_where(name)}")
    twice = np.flatnonzero(df[column].duplicated(keep=False).to_numpy())
    if len(twice):
        image = df[column].iloc[twice[0]]
        rows = [int(i) for i in twice if df[column].iloc[i] == image]
        where = f" (in {split}s {' and '.join(_cell(df[split].iloc[i]) for i in rows)})" if split else ""
        raise UserError(f"{name}: {path} lists image {image} on lines {' and '.join(str(i + 2) for i in rows)}"
                        f"{where}; an image belongs to one row: remove the others{_where(name)}")


def _labelled(name: str, path: Path, df):
    """A Waterbirds-style metadata table (img_filename, y, place, split; MetaShift's generated one too),
    each value checked (:func:`_codes`, :func:`_image_column`), with the columns the confounder
    readers use: file, y, c (= place), split, group = 2 * y + place."""
    _image_column(name, path, df, "img_filename", "split")
    y, place = (_codes(name, path, df, c, (0, 1), "img_filename") for c in ("y", "place"))
    split = _codes(name, path, df, "split", tuple(SPLIT_CODES.values()), "img_filename")
    return df.assign(file=df["img_filename"], y=y, c=place, split=split, group=2 * y + place)


WATERBIRDS_DIR = "waterbird_complete95_forest2water2"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Class names, in label order, and the zero-shot template, as the paper's loaders give them (CelebA's
# and MetaShift's differ under the standard protocol: "person" added; cat = 0 from the folder layout).
TEMPLATE = "a photo of a {}"
CLASSNAMES = {"waterbirds": ("landbird", "waterbird"), "celeba": ("non-blond", "blond"), "meta": ("dog", "cat")}
STANDARD_CLASSNAMES = {"waterbirds": ("landbird", "waterbird"), "celeba": ("non-blond person", "blond person"),
                       "meta": ("cat", "dog")}
CLASS_NAME_TABLES = {"paper": CLASSNAMES, "standard": STANDARD_CLASSNAMES}  # by Protocol.class_names
GROUP_NAMES = {"waterbirds": ("landbird on land", "landbird on water", "waterbird on land", "waterbird on water"),
               "celeba": ("not blond, female", "not blond, male", "blond, female", "blond, male"),
               "meta": ("dog outdoor", "dog indoor", "cat outdoor", "cat indoor")}


def paper_resplit(split_codes, groups, seed: int) -> dict:
    """The paper's re-split of a confounder data set for ``seed``: its loader seeds NumPy's global
    generator with the seed, then, once for each of train, val and test (in that order), permutes the
    split codes (0/1/2) within every group (groups ascending) and keeps that split's rows of the
    permuted codes. Same group counts per split, other images; train, val and test come from the
    first, second and third permutation. Returns {split: row indices, ascending}."""
    codes = np.array(split_codes, copy=True)
    groups = np.asarray(groups)
    rng = np.random.RandomState(seed)  # the same stream as np.random.seed(seed) + np.random.permutation
    out = {}
    for split in ("train", "val", "test"):
        for g in np.unique(groups):
            members = groups == g
            codes[members] = rng.permutation(codes[members])
        out[split] = np.flatnonzero(codes == SPLIT_CODES[split])
    return out


def _select(name: str, table, split: str, seed: Optional[int]):
    """Rows of a confounder table (columns split, group; the release's row order) in ``split``: the
    release's split, or with ``seed`` the paper's re-split of it."""
    if seed is None:
        return table[table["split"] == SPLIT_CODES[split]]
    if split not in SPLIT_CODES:
        raise UserError(f"{name}: split {split!r} cannot be re-split by seed; choose train, val or test")
    return table.iloc[paper_resplit(table["split"].to_numpy(), table["group"].to_numpy(), int(seed))[split]]


def _confounded(name: str, base: Path, table, split: str, seed, class_names: str, transform,
                extra: str) -> "ImageRecords":
    rows = _select(name, table, split, seed)
    records = [{"path": str(base / f), "image_id": f, "index": int(i), "label": int(y), extra: int(c),
                "group": int(g)} for i, f, y, c, g in zip(rows.index, rows["file"], rows["y"], rows["c"], rows["group"])]
    return ImageRecords(name, records, transform, classes=CLASS_NAME_TABLES[class_names][name],
                        group_names=GROUP_NAMES[name])


def waterbirds(root: Path, transform, split=None, seed=None, class_names: str = "paper") -> ImageRecords:
    """Waterbirds (Sagawa et al. 2020): y 0 landbird / 1 waterbird, place 0 land / 1 water, split column
    0/1/2 = train/val/test (default test); group = 2 * y + place. Read from the paper's ``<root>/cub/``
    (metadata.csv and the image folders), ``<root>/waterbirds/waterbird_complete95_forest2water2/`` or
    the tarball extracted directly under the root. ``seed``: the paper's re-split (see paper_resplit)."""
    split = _split("waterbirds", split, ("train", "val", "test"), "test")
    candidates = (root / "cub", root / "waterbirds" / WATERBIRDS_DIR, root / WATERBIRDS_DIR)
    base = next((c for c in candidates if (c / "metadata.csv").exists()), candidates[1])
    path = base / "metadata.csv"
    table = _labelled("waterbirds", path, _read_csv("waterbirds", path, ("img_filename", "y", "split", "place")))
    return _confounded("waterbirds", base, table, split, seed, class_names, transform, "place")


def celeba(root: Path, transform, split=None, seed=None, class_names: str = "paper") -> ImageRecords:
    """CelebA (Liu et al. 2015), the public CSVs: target Blond_Hair, groups by Male (attributes are -1/1);
    list_eval_partition 0/1/2 = train/val/test (default test); group = 2 * blond + male, rows in the
    order of list_attr_celeba.csv. The images may sit in ``img_align_celeba/`` or the Kaggle copy's
    (and the paper's) nested ``img_align_celeba/img_align_celeba/``. ``seed``: the paper's re-split."""
    split = _split("celeba", split, ("train", "val", "test"), "test")
    base = root / "celeba"
    attrs_path, parts_path = base / "list_attr_celeba.csv", base / "list_eval_partition.csv"
    attrs = _read_csv("celeba", attrs_path, ("image_id", "Blond_Hair", "Male"))
    parts = _read_csv("celeba", parts_path, ("image_id", "partition"))
    _image_column("celeba", attrs_path, attrs, "image_id")
    _image_column("celeba", parts_path, parts, "image_id", "partition")
    for column in ("Blond_Hair", "Male"):  # -1/1 in the release; 0 for "not" in some copies
        attrs[column] = _codes("celeba", attrs_path, attrs, column, (-1, 0, 1), "image_id")
    parts["partition"] = _codes("celeba", parts_path, parts, "partition", tuple(SPLIT_CODES.values()), "image_id")
    images = _need("celeba", "image folder", base / "img_align_celeba")
    if (images / "img_align_celeba").is_dir():
        images = images / "img_align_celeba"
    df = attrs[["image_id", "Blond_Hair", "Male"]].merge(parts, on="image_id", how="left", sort=False)
    if df["partition"].isna().any():
        raise UserError(f"celeba: {base / 'list_eval_partition.csv'} has no partition for "
                        f"{df['image_id'][df['partition'].isna()].iloc[0]}{_where('celeba')}")
    y, male = (df["Blond_Hair"] == 1).astype(int), (df["Male"] == 1).astype(int)
    table = df.assign(file=df["image_id"], y=y, c=male, group=2 * y + male, split=df["partition"].astype(int))
    return _confounded("celeba", images, table, split, seed, class_names, transform, "male")


METASHIFT_DIR = "MetaShift-Cat-Dog-indoor-outdoor"
# The paper's MetaShift: folder -> (y, place); y 1 = cat, place 1 = indoor.
METASHIFT_FOLDERS = {"train/cat/cat(indoor)": (1, 1), "train/dog/dog(outdoor)": (0, 0),
                     "test/cat/cat(outdoor)": (1, 0), "test/dog/dog(indoor)": (0, 1)}


def metashift_metadata(base: Path, test_pct: float = 0.25, val_pct: float = 0.1) -> Path:
    """Write ``base/metadata.csv`` as the paper's code generates it, unless it is there (then it is
    reused): every ``*.jpg`` of the four folders (train/cat/cat(indoor), train/dog/dog(outdoor),
    test/cat/cat(outdoor), test/dog/dog(indoor), each in directory-listing order), columns
    img_filename, y (1 cat), place (1 indoor), split; ``RandomState(42)`` draws int(25%) test rows,
    then int(10%) val rows from the rest; the others are train."""
    import pandas as pd

    path = base / "metadata.csv"
    if path.exists():
        return path
    rows = []
    for folder, (y, place) in METASHIFT_FOLDERS.items():
        for image in (base / folder).glob("*.jpg"):
            rows.append({"img_filename": f"{folder}/{image.name}", "y": y, "place": place})
    if not rows:
        raise _missing("meta", "*.jpg images under", base / "{train,test}/{cat,dog}/")
    n = len(rows)
    rng = np.random.RandomState(42)
    test = rng.choice(np.arange(n), size=int(n * test_pct), replace=False)
    val = rng.choice(np.setdiff1d(np.arange(n), test), size=int(n * val_pct), replace=False)
    split = np.zeros(n, dtype=int)
    split[val], split[test] = 1, 2
    df = pd.DataFrame(rows).assign(split=split)
    from .results import atomic_write_text

    try:
        atomic_write_text(path, df.to_csv(index=False), rescue=False)  # read back now: no copy elsewhere
    except OSError as e:
        raise UserError(f"meta: cannot write the generated split {path} ({first_line(e)}); make the folder "
                        "writable once (the file is then reused) or use --protocol standard") from None
    return path


def _metashift_base(root: Path) -> Path:
    """The paper's ``<root>/meta/`` (the release renamed) or the release's own folder name."""
    for base in (root / "meta", root / "metashift" / METASHIFT_DIR):
        if (base / "metadata.csv").exists() or (base / "train").is_dir():
            return base
    return _need("meta", "folder", root / "metashift" / METASHIFT_DIR)


def metashift(root: Path, transform, split=None, seed=None, generated: bool = True,
              class_names: str = "paper") -> ImageRecords:
    """MetaShift cat/dog (Liang and Zou 2022), the authors' indoor/outdoor release, under ``<root>/meta/``
    (the paper's path) or ``<root>/metashift/MetaShift-Cat-Dog-indoor-outdoor/``.

    ``generated`` (the paper's): its split, ``metadata.csv`` beside the images (generated once by
    :func:`metashift_metadata`, then reused): label 0 dog / 1 cat, place 1 indoor, group = 2 * label +
    place, default split test, ``seed`` re-splits as for Waterbirds. Otherwise the release's folders,
    ``train`` = cat(indoor) + dog(outdoor), ``test`` = cat(outdoor) + dog(indoor), default ``all`` (every
    group present); label 0 cat / 1 dog, context 0 indoor / 1 outdoor, group = 2 * label + context."""
    base = _metashift_base(root)
    if generated:
        split = _split("meta", split, ("train", "val", "test"), "test")
        path = metashift_metadata(base)
        table = _labelled("meta", path, _read_csv("meta", path, ("img_filename", "y", "place", "split")))
        return _confounded("meta", base, table, split, seed, class_names, transform, "place")
    split = _split("meta", split, ("train", "test", "all"), "all")
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
    return ImageRecords("meta", records, transform, classes=STANDARD_CLASSNAMES["meta"],
                        group_names=("cat indoor", "cat outdoor", "dog indoor", "dog outdoor"))


def _tags(name: str, path: Path) -> dict:
    """{tag: index} of a tag list, one tag a line (blank lines skipped): a list with no tag (every image
    would have no class to score) or with a tag twice (two indices for one tag) is a one-line UserError."""
    tags = [t for t in path.read_text().splitlines() if t]
    if not tags:
        raise UserError(f"{name}: {path} lists no tags (one tag a line); restore it, e.g. from this repository's "
                        f"data/openimages/{_where(name)}")
    index: dict = {}
    for n, t in enumerate(tags):
        if t in index:
            raise UserError(f"{name}: {path} lists tag {t!r} twice (tags {index[t] + 1} and {n + 1}); each tag "
                            f"must be listed once{_where(name)}")
        index[t] = n
    return index


def openimages(root: Path, transform, subset: str = "common", split=None) -> ImageRecords:
    """OpenImages V6 test with the common (214) or rare (200) tag lists of the Recognize Anything
    benchmark. annots.txt lines are ``test/<image id>,tag,tag,...``; records carry "labels" (tag indices).
    The lists are read from ``<root>/openimages/<subset>/`` or, if absent there, the shipped copy in the
    repository's data/openimages/; the images from ``<root>/openimages/test/`` or the paper's (fiftyone's)
    ``<root>/openimages/open-images-v6/test/data/``."""

    name = f"openimages-{subset}"
    _split(name, split, ("test",), "test")
    lists = root / "openimages" / subset
    if not (lists / "annots.txt").exists() and (REPO_DATA / "openimages" / subset / "annots.txt").exists():
        lists = REPO_DATA / "openimages" / subset
    images = root / "openimages" / "test"
    if not images.is_dir() and (root / "openimages" / "open-images-v6" / "test" / "data").is_dir():
        images = root / "openimages" / "open-images-v6" / "test" / "data"  # the paper's (fiftyone's) layout
    _need(name, "image folder", images)
    index = _tags(name, _need(name, "tag list", lists / "taglist.txt"))
    tags = list(index)
    records = []
    for n, line in enumerate(_need(name, "annotation list", lists / "annots.txt").read_text().splitlines()):
        if not line.strip():
            continue
        image, *labels = line.split(",")
        try:
            labels = [index[t] for t in labels]
        except KeyError as e:
            raise UserError(f"{name}: {lists / 'annots.txt'} line {n + 1} names tag {e} not in taglist.txt") from None
        image_id = image.rsplit("/", 1)[-1]
        ext = "" if image_id.lower().endswith((".jpg", ".jpeg", ".png")) else ".jpg"
        records.append({"path": str(images / f"{image_id}{ext}"), "image_id": image_id.split(".")[0], "labels": labels})
    return ImageRecords(name, records, transform, classes=tags)


def _coco_id(filename: str) -> int:
    return int(Path(filename).stem.rsplit("_", 1)[-1])


def _coco_file(base: Path, filename: str) -> Path:
    """A BLIP annotation file: the paper's ``<root>/coco/<file>`` or ``<root>/coco/annotations/<file>``."""
    return next((p for p in (base / filename, base / "annotations" / filename) if p.exists()),
                base / "annotations" / filename)


def coco(root: Path, transform, split=None, per_caption: bool = True) -> ImageRecords:
    """COCO 2014 with the Karpathy split (default test, 5000 images). Reads BLIP's
    ``coco_karpathy_<split>.json`` (a list of {"image", "caption": [...]}; in ``<root>/coco/`` as the
    paper's code keeps it, or in ``<root>/coco/annotations/``), or else Karpathy's ``dataset_coco.json``
    ({"images": [{"filepath", "filename", "split", "cocoid", "sentences"}]}). Records carry "image_id"
    (the COCO id) and "captions". The train split with ``per_caption`` (the paper's) is BLIP's train
    file as the paper's vocabulary learning reads it, one record per caption (an image about five
    times); otherwise every train (and restval) image once, from Karpathy's file."""
    split = _split("coco", split, ("train", "val", "test"), "test")
    base = root / "coco"
    blip = _coco_file(base, f"coco_karpathy_{split}.json")
    karpathy = base / "dataset_coco.json"
    records = []
    expected = 'a list of {"image": "val2014/<file>", "caption": [...]}'
    source = blip if blip.exists() and (split != "train" or per_caption) else karpathy
    if blip.exists() and split == "train" and per_caption:
        with _structure("coco", blip, 'a list of {"image": "train2014/<file>", "caption": "..."}'):
            for item in _read_json("coco", blip):
                caption = item["caption"]
                records.append({"path": str(base / item["image"]), "image_id": _coco_id(item["image"]),
                                "captions": [caption] if isinstance(caption, str) else _strings(caption)})
    elif blip.exists() and split != "train":  # BLIP's train file has one entry per caption
        with _structure("coco", blip, expected):
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
    return ImageRecords("coco", records, transform, source=source)


def coco_gt_path(root, split: str = "test") -> Path:
    """Where BLIP's COCO-format references ``coco_karpathy_<split>_gt.json`` are (or would be)."""
    return _coco_file(Path(root) / "coco", f"coco_karpathy_{split}_gt.json")


def coco_gt_references(root, split: str = "test") -> Optional[dict]:
    """{image_id: [caption, ...]} from BLIP's COCO-format ``coco_karpathy_<split>_gt.json`` (the
    references the paper scores against), or None where the file is absent. The captions are as the
    file has them: :func:`check_references` checks them."""
    path = coco_gt_path(root, split)
    if not path.exists():
        return None
    data = _read_json("coco", path)
    refs: dict = {}
    try:
        for a in data["annotations"]:
            refs.setdefault(int(a["image_id"]), []).append(a["caption"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"coco: {path} is not a COCO caption file (annotations with image_id and caption): "
                        f"{first_line(e)}") from None
    return refs


def check_references(name: str, path, references: dict) -> None:
    """Every image of ``references`` ({image_id: captions}, read from the annotation file ``path``) has
    at least one reference caption, each a non-empty string: otherwise one UserError naming the file
    and the image, before any image is captioned (the scorers would fail only after all of them are)."""
    for image_id, captions in references.items():
        if not isinstance(captions, (list, tuple)) or not captions:
            raise UserError(f"{name}: {path} gives image {image_id} no reference caption; captions are scored "
                            f"against at least one: add its captions, or leave the image out")
        for c in captions:
            if not isinstance(c, str) or not c.strip():
                what = "an empty caption" if isinstance(c, str) else f"a caption that is not text ({c!r:.40})"
                raise UserError(f"{name}: {path} gives image {image_id} {what}; every reference caption must be "
                                f"a non-empty string: correct or remove it")


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
    return ImageRecords("nocaps", records, transform, source=path)


def _followed(name: str, entry: os.DirEntry, kind: str) -> bool:
    """Whether a folder entry is a folder (``kind`` "dir") or a file ("file"), symbolic links followed;
    a link that cannot be followed (a loop, ELOOP) is a one-line UserError naming it."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as e:
        raise UserError(f"{name}: cannot follow {entry.path} ({e.strerror or first_line(e)}: a symbolic link loop?); "
                        f"fix or remove the link{_where(name)}") from None


def _class_folders(name: str, base: Path) -> list:
    """The names of the class folders under ``base``, sorted (symbolic links followed). A link that
    loops, or that leads to ``base`` itself or a folder above it, or two names of one folder (its images
    would be in two classes, and every later label shifted) are one-line UserErrors naming the links."""
    here, seen, names = os.path.realpath(base), {}, []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if not _followed(name, entry, "dir"):
            continue
        target = os.path.realpath(entry.path)
        if os.path.commonpath([here, target]) == target:
            raise UserError(f"{name}: class folder {entry.path} leads to {target}, a folder that holds it (a symbolic "
                            f"link loop); remove the link{_where(name)}")
        if target in seen:
            raise UserError(f"{name}: class folders {seen[target]} and {entry.path} are one folder ({target}, through a "
                            f"symbolic link): its images would be in two classes; remove the link{_where(name)}")
        seen[target] = entry.path
        names.append(entry.name)
    return names


def imagenet(root: Path, transform, split=None) -> ImageRecords:
    """ImageNet-1K as image folders (train/, val/ with one folder per synset). Labels index the sorted
    synset ids, the order timm and torchvision classifiers use."""
    split = _split("imgnet", split, ("train", "val"), "val")
    base = _need("imgnet", "split folder", root / "imagenet" / split)
    synsets = _class_folders("imgnet", base)
    if not synsets:
        raise _missing("imgnet", "synset folders under", base)
    records = []
    for label, wnid in enumerate(synsets):
        for entry in sorted(os.scandir(base / wnid), key=lambda e: e.name):
            if _followed("imgnet", entry, "file") and Path(entry.name).suffix.lower() in (".jpeg", ".jpg", ".png"):
                records.append({"path": entry.path, "image_id": entry.name, "label": label, "synset": wnid})
    return ImageRecords("imgnet", records, transform, classes=synsets)


def _read_json(name: str, path: Path):
    import json


    _need(name, "file", path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: {path} is not valid JSON ({e}){_where(name)}") from None


# --------------------------------------------------------------------------------------------------
# The data-set table: one row per data set; a new data set is one reader, one row and one fixture
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSet:
    """One data set: how to read it and what the scripts do with it.

    ``read(root, transform, split, seed, protocol)`` returns the records (``seed`` is given only where
    the protocol re-splits this data set); ``task``: "groups" (label + group: average and worst-group
    accuracy), "tags" (multi-label mAP), "top1" (a classifier's top-1), "captions" or "images" (no
    labels); ``resplit``: the paper's seeds re-split it; ``paper_transform``: its loader's preprocessing
    (:class:`PaperPreprocess` mode); ``vocab``: the data set whose vocabulary is its in-domain one;
    ``learnable``: process.py learns vocabularies on it; ``image_size``: its default input size;
    ``paper_name``: the paper's name for it where that differs (its ``tokenizers/<name>/`` folders);
    ``paper_process_size``: the size the paper's process.py reads it at whatever the model's (ImageNet:
    its loader's 224 px, also for BLIP's 384 px model)."""

    name: str
    read: Callable
    layout: str
    task: str
    resplit: bool = False
    paper_transform: str = "resize-crop"
    vocab: Optional[str] = None
    learnable: bool = False
    image_size: int = 224
    paper_name: Optional[str] = None
    paper_process_size: Optional[int] = None

    @property
    def in_domain(self) -> str:
        return self.vocab or self.name


def _samples(root, transform, split, seed, protocol):
    return Samples(transform)


def _openimages(subset: str) -> Callable:
    return lambda root, transform, split, seed, protocol: openimages(root, transform, subset, split)


def _plain(reader: Callable) -> Callable:
    return lambda root, transform, split, seed, protocol: reader(root, transform, split=split)


def _confounder(reader: Callable) -> Callable:
    return lambda root, transform, split, seed, protocol: reader(root, transform, split=split, seed=seed,
                                                                 class_names=protocol.class_names)


DATASETS: dict = {}


def register(row: DataSet) -> DataSet:
    """Add (or replace) a data set's row: every script that reads ``DATASETS`` accepts it."""
    DATASETS[row.name] = row
    return row


for _row in (
    DataSet("samples", _samples, LAYOUTS["samples"], "images", learnable=True),
    DataSet("waterbirds", _confounder(waterbirds), LAYOUTS["waterbirds"], "groups", resplit=True, learnable=True,
            paper_name="cub"),
    DataSet("celeba", _confounder(celeba), LAYOUTS["celeba"], "groups", resplit=True, paper_transform="celeba",
            learnable=True),
    DataSet("meta", lambda root, transform, split, seed, protocol: metashift(
        root, transform, split=split, seed=seed, generated=protocol.metashift_generated,
        class_names=protocol.class_names), LAYOUTS["meta"], "groups", resplit=True, learnable=True),
    DataSet("openimages-common", _openimages("common"), LAYOUTS["openimages"], "tags", vocab="imgnet"),
    DataSet("openimages-rare", _openimages("rare"), LAYOUTS["openimages"], "tags", vocab="imgnet"),
    DataSet("coco", lambda root, transform, split, seed, protocol: coco(
        root, transform, split, per_caption=protocol.coco_train_per_caption), LAYOUTS["coco"], "captions",
        paper_transform="square", learnable=True, image_size=384),
    DataSet("nocaps", _plain(nocaps), LAYOUTS["nocaps"], "captions", paper_transform="square", vocab="coco",
            image_size=384),
    DataSet("imgnet", _plain(imagenet), LAYOUTS["imgnet"], "top1", learnable=True, paper_process_size=224),
):
    register(_row)


def names(task: Optional[str] = None, **where) -> tuple:
    """The data sets' names in table order, those of ``task`` (a string or a tuple of them) and with the
    given row attributes (e.g. ``resplit=True``, ``learnable=True``) only."""
    tasks = (task,) if isinstance(task, str) else task
    return tuple(r.name for r in DATASETS.values() if (tasks is None or r.task in tasks)
                 and all(getattr(r, k) == v for k, v in where.items()))


def row(name: str) -> DataSet:
    """The table row of ``name``; an unknown data set is a one-line UserError listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


def __getattr__(attr: str):  # the name lists, read from the table when asked (rows may be registered later)
    if attr == "NAMES":
        return tuple(DATASETS)
    if attr == "CONFOUNDED":
        return names(resplit=True)
    if attr == "CAPTION_DATA":
        return names("captions")
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def load(name: str, root, transform: Optional[Callable], split: Optional[str] = None, seed: Optional[int] = None,
         protocol: Union[str, Protocol] = "paper", limit: Optional[int] = None) -> torch.utils.data.Dataset:
    """The data set ``name`` (a row of ``DATASETS``) under the data root, yielding (transform(image), record).

    Records carry what the tasks need: "path", "image_id", and "label" + "group" (grouped data),
    "labels" (OpenImages tag indices), "captions" (COCO, NoCaps). ``split`` None picks the evaluation
    split; ``seed`` re-splits a data set whose row says ``resplit`` where ``protocol.resplit`` (the
    paper's code uses seeds 1, 2, 3; see paper_resplit); None, the other data sets and the standard
    protocol keep the one fixed split. ``protocol`` also gives MetaShift's split, the class names and
    COCO's train records (see each reader); ``limit`` keeps the first records. A missing file is a
    one-line UserError naming it and the expected layout."""
    protocol = get_protocol(protocol)
    entry = row(name)
    seed = seed if protocol.resplits(entry.resplit) else None  # standard: the release's fixed split for every seed
    ds = entry.read(Path(root), transform, split, seed, protocol)
    if limit is not None:
        if hasattr(ds, "items"):
            ds.items = ds.items[:limit]
        ds.records = ds.records[:limit]
    return ds


def batches(dataset, batch: int, workers: int = 0, order=None, prefetch: Optional[int] = None):
    """Iterate ``(pixels, records)`` batches in data-set order, or with ``order`` (a list of index
    batches, e.g. from ``vwt.buckets``) those batches in turn. A UserError raised in a worker process
    (an unreadable image) comes back as the same one line, not the worker's traceback. ``prefetch``:
    batches each worker loads ahead (None: PyTorch's 2); memory holds about workers x prefetch batches."""
    extra = {"prefetch_factor": prefetch} if prefetch is not None and workers > 0 else {}
    if order is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                                             collate_fn=collate, **extra)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[int(i) for i in idx] for idx in order],
                                             num_workers=workers, collate_fn=collate, **extra)
    try:
        yield from loader
    except UserError as e:
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        last = lines[-1] if lines else ""
        raise UserError(last.split("UserError: ", 1)[-1]) from None
