"""Tiny confounder data sets in the layouts the paper's code reads (data/cub/, data/celeba/ with the
nested image folder, data/meta/), large enough (a few dozen images, unequal groups, rows of the groups
interleaved as in the releases) that the seeded re-splits differ. Images are crops of scikit-image's
photographs (fixtures.photo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import fixtures

# (split code, group) -> images; unequal on purpose, every group in every split
COUNTS = {(0, 0): 6, (0, 1): 2, (0, 2): 3, (0, 3): 5, (1, 0): 2, (1, 1): 1, (1, 2): 1, (1, 3): 2,
          (2, 0): 4, (2, 1): 3, (2, 2): 3, (2, 3): 4}


def _rows(seed: int) -> list[tuple[int, int]]:
    """(split, group) per row, interleaved by a fixed shuffle."""
    rows = [key for key, n in COUNTS.items() for _ in range(n)]
    order = np.random.RandomState(seed).permutation(len(rows))
    return [rows[i] for i in order]


def write_cub(root) -> Path:
    """data/cub/metadata.csv (img_id,img_filename,y,split,place,place_filename) and the images."""
    base = Path(root) / "cub"
    lines = []
    for i, (split, group) in enumerate(_rows(0)):
        y, place = divmod(group, 2)
        folder = "001.Black_footed_Albatross" if y else "010.Red_winged_Blackbird"
        name = f"{folder}/{folder.split('.')[1]}_{i:04d}_{500 + i}.jpg"
        fixtures._save(base / name, i, size=(40, 30))
        lines.append(f"{i + 1},{name},{y},{split},{place},{'water' if place else 'land'}/x/{i}.jpg")
    (base / "metadata.csv").write_text("img_id,img_filename,y,split,place,place_filename\n" + "\n".join(lines) + "\n")
    return Path(root)


def write_celeba(root) -> Path:
    """data/celeba/{list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/img_align_celeba/}
    with 178 x 218 images, as the paper's loader reads them."""
    base = Path(root) / "celeba"
    attrs, parts = [], []
    for i, (split, group) in enumerate(_rows(1)):
        blond, male = divmod(group, 2)
        image_id = f"{i + 1:06d}.jpg"
        fixtures._save(base / "img_align_celeba" / "img_align_celeba" / image_id, 100 + i, size=(178, 218))
        values = {a: -1 for a in fixtures.CELEBA_ATTRS}
        values.update({"Blond_Hair": 1 if blond else -1, "Male": 1 if male else -1, "Smiling": 1 if i % 3 else -1})
        attrs.append(",".join([image_id] + [str(values[a]) for a in fixtures.CELEBA_ATTRS]))
        parts.append(f"{image_id},{split}")
    (base / "list_attr_celeba.csv").write_text("image_id," + ",".join(fixtures.CELEBA_ATTRS) + "\n" + "\n".join(attrs) + "\n")
    (base / "list_eval_partition.csv").write_text("image_id,partition\n" + "\n".join(parts) + "\n")
    return Path(root)


META_IMAGES = {"train/cat/cat(indoor)": 12, "train/dog/dog(outdoor)": 10, "test/cat/cat(outdoor)": 9,
               "test/dog/dog(indoor)": 11}


def write_meta(root) -> Path:
    """data/meta/ (the release renamed, as the paper's code keeps it): the four folders of JPEGs, no
    metadata.csv (the loader generates it), plus a PNG the paper's glob does not read."""
    base = Path(root) / "meta"
    i = 0
    for folder, n in META_IMAGES.items():
        for k in range(n):
            fixtures._save(base / folder / f"{2400000 + 37 * i}.jpg", 200 + i, size=(36, 30))
            i += 1
    fixtures._save(base / "test/dog/dog(indoor)" / "2499999.png", 7, size=(36, 30))
    return Path(root)
