"""Tiny data sets written in the real public layouts (see data/README.md), for tests of the loaders
and the scripts. Images are small crops of scikit-image's sample photographs, saved as JPEG (one PNG
in MetaShift), at sizes that are not the models' input size so resizing and cropping run. Every writer takes the data root, writes under it and returns it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository


@lru_cache(maxsize=1)
def _photos():
    from vwt.datasets import sample_images

    return [np.asarray(im) for name, im in sample_images() if name in ("astronaut", "chelsea", "coffee", "rocket",
                                                                        "camera", "coins", "brick", "grass")]


def photo(i: int, size=(48, 40)) -> Image.Image:
    """A real-looking (width, height) RGB image: crop ``i`` of the sample photographs."""
    photos = _photos()
    arr = photos[i % len(photos)]
    h, w = arr.shape[:2]
    rng = np.random.RandomState(i)
    side = min(h, w) // 2
    y, x = rng.randint(0, h - side), rng.randint(0, w - side)
    return Image.fromarray(arr[y:y + side, x:x + side]).resize(size, Image.BILINEAR)


def _save(path: Path, i: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(i, size).save(path)


def write_waterbirds(root) -> Path:
    """waterbirds/waterbird_complete95_forest2water2/: metadata.csv + species folders. Test split: two
    images of each of the 4 (y, place) groups; train and val: one image of each group."""
    root = Path(root)
    base = root / "waterbirds" / "waterbird_complete95_forest2water2"
    rows, i = [], 0
    for split, per_group in ((0, 1), (1, 1), (2, 2)):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_group):
                    folder = "001.Black_footed_Albatross" if y else "010.Red_winged_Blackbird"
                    fname = f"{folder}/{folder.split('.')[1]}_{i:04d}_{100 + i}.jpg"
                    _save(base / fname, i)
                    rows.append(f"{i + 1},{fname},{y},{split},{place},{'water' if place else 'land'}/x/{i}.jpg")
                    i += 1
    (base / "metadata.csv").write_text("img_id,img_filename,y,split,place,place_filename\n" + "\n".join(rows) + "\n")
    return root


CELEBA_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
                "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
                "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
                "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
                "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
                "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
                "Wearing_Necktie", "Young"]


def write_celeba(root) -> Path:
    """celeba/: list_attr_celeba.csv (-1/1), list_eval_partition.csv, img_align_celeba/ (178x218 JPEGs).
    Test partition: two images of each (Blond_Hair, Male) group; train and val one of each."""
    root = Path(root)
    base = root / "celeba"
    attr_rows, part_rows, i = [], [], 0
    for partition, per_group in ((0, 1), (1, 1), (2, 2)):
        for blond in (0, 1):
            for male in (0, 1):
                for _ in range(per_group):
                    image_id = f"{i + 1:06d}.jpg"
                    _save(base / "img_align_celeba" / image_id, 10 + i, size=(36, 44))
                    values = {a: (1 if (a == "Blond_Hair" and blond) or (a == "Male" and male) or
                                  (a == "Young" and i % 2) else -1) for a in CELEBA_ATTRS}
                    attr_rows.append(",".join([image_id] + [str(values[a]) for a in CELEBA_ATTRS]))
                    part_rows.append(f"{image_id},{partition}")
                    i += 1
    (base / "list_attr_celeba.csv").write_text("image_id," + ",".join(CELEBA_ATTRS) + "\n" + "\n".join(attr_rows) + "\n")
    (base / "list_eval_partition.csv").write_text("image_id,partition\n" + "\n".join(part_rows) + "\n")
    return root


def write_metashift(root) -> Path:
    """metashift/MetaShift-Cat-Dog-indoor-outdoor/: train/cat/cat(indoor), train/dog/dog(outdoor),
    test/cat/cat(outdoor), test/dog/dog(indoor), two images each (the last one a PNG)."""
    root = Path(root)
    base = root / "metashift" / "MetaShift-Cat-Dog-indoor-outdoor"
    i = 0
    for split, animal, context in (("train", "cat", "indoor"), ("train", "dog", "outdoor"),
                                   ("test", "cat", "outdoor"), ("test", "dog", "indoor")):
        for k in range(2):
            suffix = ".png" if (split, animal, k) == ("test", "dog", 1) else ".jpg"
            _save(base / split / animal / f"{animal}({context})" / f"{2300000 + i}{suffix}", 20 + i)
            i += 1
    (base / "imageID_to_group.pkl").write_bytes(b"")  # present in the release; not read
    return root


OPENIMAGES = {
    "common": (["car", "flower", "dog", "halloween", "pumpkin"],
               [("0000c64e1253d68f", ["car"]), ("0002ab0af02e4a77", ["flower"]), ("00045d609ca3f4eb", ["pumpkin", "halloween"]),
                ("0007ef7b46ad6bb8", ["dog", "car"]), ("000a1249af2bc5f0", [])]),
    "rare": (["Auto racing", "Lawn game", "Junk food", "Fried food"],
             [("0000c64e1253d68f", ["Auto racing"]), ("0003d84e0165d630", ["Lawn game"]),
              ("0006acf221a3e1d1", ["Junk food", "Fried food"]), ("000a1249af2bc5f0", ["Fried food"])]),
}


def write_openimages(root) -> Path:
    """openimages/test/<id>.jpg and the tag lists openimages/{common,rare}/{annots.txt,taglist.txt} in the
    shipped format (``test/<id>,tag,tag``), with small tag lists of the real tags."""
    root = Path(root)
    base = root / "openimages"
    written = set()
    for subset, (tags, annots) in OPENIMAGES.items():
        (base / subset).mkdir(parents=True, exist_ok=True)
        (base / subset / "taglist.txt").write_text("\n".join(tags) + "\n")
        (base / subset / "annots.txt").write_text("".join(",".join([f"test/{i}"] + t) + "\n" for i, t in annots))
        for image_id, _ in annots:
            if image_id not in written:
                _save(base / "test" / f"{image_id}.jpg", 30 + len(written), size=(44, 36))
                written.add(image_id)
    return root


CAPTIONS = ["a cat lying on a couch next to a remote", "an astronaut in a suit poses for a photo",
            "a cup of coffee on a saucer on a table", "a rocket standing on a launch pad",
            "a man holding a camera on a field", "a pile of old coins on a surface",
            "a brick wall with a small window", "a field of green grass in the sun"]


def _captions(i: int, n: int) -> list[str]:
    base = CAPTIONS[i % len(CAPTIONS)]
    variants = [base, base.capitalize() + ".", base.replace(" a ", " the ", 1), f"{base} today",
                f"there is {base}", f"{base}, in daylight", f"{base} outside", f"{base} inside",
                f"close up of {base}", f"{base} with colors"]
    return variants[:n]


def write_coco(root, fmt: str = "blip") -> Path:
    """coco/ with val2014/ images (COCO file names) and the Karpathy split: fmt "blip" writes BLIP's
    annotations/coco_karpathy_{val,test}.json (4 test, 2 val images, 5 captions each), fmt "karpathy"
    writes dataset_coco.json with the same images plus 2 train images in train2014/."""
    root = Path(root)
    base = root / "coco"
    splits = {"test": [42, 73, 74, 133], "val": [136, 164]}
    if fmt == "karpathy":
        splits["train"] = [9, 25]
    images = []
    for split, ids in splits.items():
        for k, cid in enumerate(ids):
            folder = "train2014" if split == "train" else "val2014"
            rel = f"{folder}/COCO_{folder}_{cid:012d}.jpg"
            i = len(images)
            _save(base / rel, 40 + i, size=(56, 42))
            images.append({"split": split, "rel": rel, "cocoid": cid, "captions": _captions(i, 5)})
    if fmt == "blip":
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        for split in ("test", "val"):
            items = [{"image": im["rel"], "caption": im["captions"]} for im in images if im["split"] == split]
            (base / "annotations" / f"coco_karpathy_{split}.json").write_text(json.dumps(items))
    elif fmt == "karpathy":
        items = [{"filepath": im["rel"].split("/")[0], "filename": im["rel"].split("/")[1], "split": im["split"],
                  "cocoid": im["cocoid"], "imgid": n,
                  "sentences": [{"raw": c, "tokens": c.lower().split()} for c in im["captions"]]}
                 for n, im in enumerate(images)]
        (base / "dataset_coco.json").write_text(json.dumps({"images": items, "dataset": "coco"}))
    else:
        raise ValueError(fmt)
    return root


def write_nocaps(root) -> Path:
    """nocaps/nocaps_val_4500_captions.json (COCO format, 10 captions per image, a domain per image)
    and nocaps/val/<file_name>, three images."""
    root = Path(root)
    base = root / "nocaps"
    images, annots = [], []
    for i, (oid, domain) in enumerate((("0013ea2087020901", "in-domain"), ("0016ad8bd7f2c5f2", "near-domain"),
                                       ("00223e9a5e5ac24c", "out-domain"))):
        _save(base / "val" / f"{oid}.jpg", 50 + i, size=(52, 40))
        images.append({"id": i, "file_name": f"{oid}.jpg", "open_images_id": oid, "height": 40, "width": 52,
                       "domain": domain, "coco_url": "", "license": 0, "date_captured": ""})
        for c in _captions(i + 2, 10):
            annots.append({"image_id": i, "id": len(annots), "caption": c})
    (base / "nocaps_val_4500_captions.json").write_text(json.dumps(
        {"info": {"description": "nocaps validation (fixture)"}, "licenses": [], "images": images,
         "annotations": annots}))
    return root


IMAGENET_SYNSETS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root) -> Path:
    """imagenet/{train,val}/<synset>/: three synsets, two train and two val images each."""
    root = Path(root)
    base = root / "imagenet"
    i = 0
    for split in ("train", "val"):
        for wnid in IMAGENET_SYNSETS:
            for k in range(2):
                name = f"{wnid}_{1000 + k}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
                path = base / split / wnid / name
                path.parent.mkdir(parents=True, exist_ok=True)
                photo(60 + i, (50, 38)).save(path, format="JPEG")
                i += 1
    return root


WRITERS = {"waterbirds": write_waterbirds, "celeba": write_celeba, "meta": write_metashift,
           "openimages-common": write_openimages, "openimages-rare": write_openimages, "coco": write_coco,
           "nocaps": write_nocaps, "imgnet": write_imagenet}


@pytest.fixture(scope="session")
def meteor_once():
    """One pycocoevalcap METEOR process for every caption test in the session: its start-up loads the
    paraphrase table (15 s and more on a busy CPU), computing a score is instant. Tests route
    ``Meteor()`` to it with ``use_meteor(monkeypatch, meteor_once)``."""
    from pycocoevalcap.meteor import meteor

    if not _METEOR:  # one process even where several test modules import this fixture
        _METEOR.append(meteor.Meteor())
    return _METEOR[0]


_METEOR: list = []


def use_meteor(monkeypatch, shared) -> None:
    import pycocoevalcap.eval
    from pycocoevalcap.meteor import meteor

    monkeypatch.setattr(meteor, "Meteor", lambda: shared)
    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", lambda: shared)


def one_line_error(capsys, run) -> str:
    """Run a script's main (``run()``) as the command line does (``vwt.cli.main``) and check that it
    failed the way bad input must: exit code 2, one ``error: ...`` line, no traceback. Returns the line."""
    from vwt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(run)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # library warnings and progress bars may come first
    assert err[-1].startswith("error: ") and sum(l.startswith("error") for l in err) == 1, err
    assert not any("Traceback" in l for l in err)
    return err[-1]


def load_png(path) -> np.ndarray:
    """A PNG back as an RGB uint8 array."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def char_clip_tokenizer(directory, max_length: int = 16):
    """A CLIPTokenizer built offline: one token per letter (and per word-final letter), no merges, the
    end-of-text token last so it has the highest id (open_clip pools there). Fits the tiny text towers
    (vocabulary 99, 16 positions); longer texts are truncated to ``max_length``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz-"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def open_clip_tokenizer(tok, context: int = 16):
    """open_clip's tokenizer interface (texts -> (B, context) LongTensor) over a Hugging Face tokenizer."""
    import torch

    def tokenize(texts):
        ids = tok(list(texts), padding="max_length", max_length=context, truncation=True).input_ids
        return torch.tensor(ids)

    return tokenize


def word_bert_tokenizer(directory):
    """A BertTokenizer built offline for the tiny BLIP (vocabulary 120): [PAD]=0, [SEP]=2 (BLIP's eos),
    [DEC] (bos) = 30, and common caption words."""
    from transformers import BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]"] + [f"[unused{i}]" for i in range(25)] + ["[DEC]"]
    words += sorted(set(" ".join(CAPTIONS).split()) | {"picture", "of", "photo", "the", "there", "is", "close", "up"})
    words += [f"w{i}" for i in range(120 - len(words))]
    assert len(words) == 120 and words[30] == "[DEC]"
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer(str(directory / "vocab.txt"), bos_token="[DEC]")


def save_tiny_clip(d: Path, name: str = "tiny-clip", patch_size: Optional[int] = None) -> Path:
    """A tiny CLIP saved in ``d/name`` with its processor (``patch_size``: another than tiny's), as
    --model takes it."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    import tiny

    tok = char_clip_tokenizer(d / f"{name}-tokenizer")
    cfg = tiny.hf_clip_config()
    if patch_size is not None:
        cfg.vision_config.patch_size = patch_size
    cfg.text_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d / name)
    size = {"height": tiny.IMAGE, "width": tiny.IMAGE}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE}, crop_size=size),
                  tokenizer=tok).save_pretrained(d / name)
    return d / name


def save_tiny_models(d: Path) -> tuple[Path, Path]:
    """Tiny CLIP and BLIP saved in local folders with their processors, as --model takes them."""
    from transformers import BlipImageProcessor, BlipProcessor

    import tiny

    clip = save_tiny_clip(d)
    size = {"height": tiny.IMAGE, "width": tiny.IMAGE}
    tiny.hf_blip().save_pretrained(d / "tiny-blip")
    BlipProcessor(image_processor=BlipImageProcessor(size=size),
                  tokenizer=word_bert_tokenizer(d / "blip-tokenizer")).save_pretrained(d / "tiny-blip")
    return clip, d / "tiny-blip"


def fresh_clone(dest: Path, results: bool = False, git: bool = False) -> Path:
    """A copy of the repository's own files (git's view where there is one), without tokenizers/ and,
    unless ``results``, without results/. ``git``: the copy is a git repository with every file
    committed, as a fresh clone is (then ``git status --porcelain`` shows what a run changed)."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
    skip = ("tokenizers/",) if results else ("results/", "tokenizers/")
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(skip):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, dest / f)
    if git:
        quiet = dict(cwd=dest, check=True, capture_output=True)
        subprocess.run(["git", "init", "-q"], **quiet)
        subprocess.run(["git", "add", "-A"], **quiet)
        subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m",
                        "clone"], **quiet)
    return dest
