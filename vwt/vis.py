"""Drawing for ``match.py`` and ``word.py``: visual-word overlays, blanked drops, merge groups, word grids.

Every picture is first built as a uint8 RGB array with exact integer patch geometry (no resampling, only
integer nearest-neighbour enlargement), so a PNG read back can be checked patch cell by patch cell.
Matplotlib only draws the title and the legend around that array (:func:`decorate`), which is pasted
in unchanged at a recorded position.
"""
from __future__ import annotations

import colorsys
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

BLANK = (128, 128, 128)   # what a dropped patch is painted with (solid, not translucent)
BACKGROUND = 255          # figure and grid background (white)
GOLDEN = (math.sqrt(5) - 1) / 2


# --------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------
def key_color(key: int) -> np.ndarray:
    """The colour (uint8 RGB) of a key (a word index, or a token index for merge groups).

    A pure function of the key, so a visual word keeps its colour in every image and every run.
    Hues step by the golden ratio (neighbouring keys get far-apart hues); saturation and value
    alternate so keys whose hues come close still differ."""
    if key < 0:
        raise ValueError(f"colour keys are >= 0 (-1 means unpainted); got {key}")
    h = (key * GOLDEN) % 1.0
    s = (0.95, 0.6)[key % 2]
    v = (1.0, 0.8, 0.9)[key % 3]
    return np.array([round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)], dtype=np.uint8)


def key_colors(keys: Sequence[int]) -> np.ndarray:
    """(n, 3) uint8 colours of ``keys``."""
    return np.stack([key_color(int(k)) for k in keys]) if len(keys) else np.zeros((0, 3), np.uint8)


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------
def to_uint8(image: Tensor) -> np.ndarray:
    """[0, 1] RGB (..., 3, H, W) tensor -> (..., H, W, 3) uint8 array."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(arr, -3, -1).copy()


def enlarge(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an (H, W, ...) array by an integer factor."""
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    if scale == 1:
        return arr
    return np.repeat(np.repeat(arr, scale, 0), scale, 1)


def cell_size(shape: tuple, grid: tuple[int, int]) -> tuple[int, int]:
    """Pixel height and width of one patch cell of an (H, W, 3) image split into ``grid``."""
    (h, w), (rows, cols) = shape[:2], grid
    if rows <= 0 or cols <= 0 or h % rows or w % cols:
        raise ValueError(f"an image of {h}x{w} pixels does not split into a {rows}x{cols} patch grid")
    return h // rows, w // cols


def image_patches(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) -> (rows * cols, ph, pw, 3): the patch cells, row-major (the model's patch order)."""
    ph, pw = cell_size(image.shape, grid)
    rows, cols = grid
    return image.reshape(rows, ph, cols, pw, -1).transpose(0, 2, 1, 3, 4).reshape(rows * cols, ph, pw, -1)


def paint(image: np.ndarray, grid: tuple[int, int], keys: Optional[np.ndarray] = None,
          dropped: Optional[np.ndarray] = None, alpha: float = 0.5, blank=BLANK) -> np.ndarray:
    """Paint patch cells of ``image`` (H, W, 3) uint8 split into ``grid`` (rows, cols).

    keys (P,): a patch with key k >= 0 is blended with ``key_color(k)`` at opacity ``alpha``
    (rounded: ``round((1 - alpha) * pixel + alpha * colour)``); key -1 leaves its pixels untouched.
    dropped (P,) bool: those cells are filled with ``blank``, solid. Patches are row-major."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha is an opacity in (0, 1]; got {alpha}")
    ph, pw = cell_size(image.shape, grid)
    rows, cols = grid
    n = rows * cols
    out = image.copy()

    def per_pixel(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a).reshape(-1)
        if a.shape[0] != n:
            raise ValueError(f"expected one value per patch ({n} for a {rows}x{cols} grid); got {a.shape[0]}")
        return np.repeat(np.repeat(a.reshape(rows, cols), ph, 0), pw, 1)

    if keys is not None:
        keys = np.asarray(keys, dtype=np.int64)
        uniq = np.unique(keys[keys >= 0])
        if len(uniq):
            table = key_colors(uniq).astype(np.float64)
            kmap = per_pixel(keys)
            where = kmap >= 0
            color = table[np.searchsorted(uniq, kmap[where])]
            out[where] = np.round((1 - alpha) * image[where].astype(np.float64) + alpha * color).astype(np.uint8)
    if dropped is not None:
        out[per_pixel(np.asarray(dropped, dtype=bool))] = np.asarray(blank, dtype=np.uint8)
    return out


def group_keys(labels: np.ndarray, min_size: int = 2) -> np.ndarray:
    """Merge groups from ``vwt.stats`` labels (P,): each patch gets its token's index as key when that
    token holds at least ``min_size`` patches, else -1 (a token of its own, or dropped)."""
    labels = np.asarray(labels, dtype=np.int64)
    held = labels >= 0
    counts = np.bincount(labels[held], minlength=1) if held.any() else np.zeros(1, np.int64)
    keys = np.full_like(labels, -1)
    big = held.copy()
    big[held] = counts[labels[held]] >= min_size
    keys[big] = labels[big]
    return keys


# --------------------------------------------------------------------------------------------------
# Grids of tiles (word.py)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Geometry of a tile grid: ``count`` tiles of ``tile`` (h, w) pixels, ``cols`` per row, ``gap``
    background pixels between tiles and around the border, the whole enlarged by ``scale``."""

    count: int
    cols: int
    tile: tuple[int, int]
    gap: int = 1
    scale: int = 1

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.count / self.cols))

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.tile
        return ((self.gap + self.rows * (h + self.gap)) * self.scale,
                (self.gap + self.cols * (w + self.gap)) * self.scale)

    def box(self, k: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel box of tile ``k`` (row-major), bottom/right exclusive."""
        if not 0 <= k < self.count:
            raise IndexError(f"tile {k} of {self.count}")
        h, w = self.tile
        r, c = divmod(k, self.cols)
        top, left = self.gap + r * (h + self.gap), self.gap + c * (w + self.gap)
        s = self.scale
        return top * s, left * s, (top + h) * s, (left + w) * s


def tile_grid(tiles: np.ndarray, cols: Optional[int] = None, gap: int = 1, scale: int = 1,
              background: int = BACKGROUND) -> tuple[np.ndarray, Grid]:
    """Lay out (N, h, w, 3) uint8 tiles row-major on a background; returns the array and its Grid."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be (N, h, w, 3); got {tiles.shape}")
    n = tiles.shape[0]
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    grid = Grid(n, min(cols, max(n, 1)), tiles.shape[1:3], gap, 1)
    out = np.full((*grid.shape, 3), background, dtype=np.uint8)
    for k in range(n):
        t, l, b, r = grid.box(k)
        out[t:b, l:r] = tiles[k]
    return enlarge(out, scale), Grid(grid.count, grid.cols, grid.tile, gap, scale)


def side_by_side(left: np.ndarray, right: np.ndarray, sep: int = 1, background: int = BACKGROUND) -> np.ndarray:
    """(N, h, w, 3) pairs -> (N, h, 2w + sep, 3) tiles: left | sep background columns | right."""
    if left.shape != right.shape:
        raise ValueError(f"pairs must have equal shapes; got {left.shape} and {right.shape}")
    n, h, w, c = left.shape
    out = np.full((n, h, 2 * w + sep, c), background, dtype=np.uint8)
    out[:, :, :w], out[:, :, w + sep:] = left, right
    return out


def word_tiles(centres: Tensor, patch_size: int, denormalise) -> np.ndarray:
    """Visual words (V, 3·P·P) in the normalised pixel space -> (V, P, P, 3) uint8 image patches.
    The vector layout is (channel, row, column), as in ``vwt.tokenizer.pixel_patches``;
    ``denormalise`` maps normalised (..., 3, H, W) back to [0, 1] (``Preprocess.denormalise``)."""
    v, d = centres.shape
    if d != 3 * patch_size * patch_size:
        raise ValueError(f"words of {d} values are not 3x{patch_size}x{patch_size} pixel patches")
    return to_uint8(denormalise(centres.float().reshape(v, 3, patch_size, patch_size)))


# --------------------------------------------------------------------------------------------------
# Recording what InterImage matched
# --------------------------------------------------------------------------------------------------
class MatchRecorder:
    """Keeps, for the last forward, every patch's nearest word and distance as an ``InterImage``
    computed them (wrapping its ``match`` on the instance), so a figure colours exactly the words the
    tokenizer used, random ablation and embed space included. ``detach()`` restores the method."""

    def __init__(self, inter):
        self.inter = inter
        self.word: Optional[Tensor] = None
        self.dist: Optional[Tensor] = None
        inner = type(inter).match.__get__(inter)

        def match(feats):
            word, dist = inner(feats)
            self.word, self.dist = word.detach().cpu(), dist.detach().cpu()
            return word, dist

        inter.match = match

    def keys(self) -> np.ndarray:
        """(B, P) word index of every matched patch, -1 where the nearest word is beyond the threshold."""
        if self.word is None:
            raise RuntimeError("no InterImage match recorded yet: run a forward of the patched model first")
        matched = self.dist <= self.inter.thresh
        return torch.where(matched, self.word, -1).numpy()

    def detach(self) -> None:
        self.inter.__dict__.pop("match", None)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placed:
    """Where :func:`decorate` pasted the exact array: rows top:top+height, columns left:left+width."""

    top: int
    left: int
    height: int
    width: int


def decorate(array: np.ndarray, title: str, legend: Sequence[tuple] = (), margin: int = 12,
             legend_width: int = 210, font_size: float = 10.5,
             min_width: int = 480) -> tuple[np.ndarray, Placed]:
    """A figure: ``title`` above, ``array`` pasted unchanged below it, ``legend`` entries
    ((rgb or None, text), ...) to its right. Returns the RGB uint8 figure and where the array is."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = array.shape[:2]
    line = round(font_size * 1.6)
    width = max(min_width, margin + w + (margin + legend_width if legend else 0) + margin)
    chars = max(20, int((width - 2 * margin) / (font_size * 0.85)))  # bold DejaVu Sans at 100 dpi
    lines = [part for raw in title.split("\n") for part in (textwrap.wrap(raw, chars) or [""])]
    top = margin + line * len(lines) + margin // 2
    height = max(top + h, top + line * len(legend)) + margin

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)

    def xy(x, y):  # pixel (x from left, y from top) -> figure fraction
        return x / width, 1 - y / height

    for i, text in enumerate(lines):
        fig.text(*xy(margin, margin + i * line), text, va="top", ha="left", fontsize=font_size + (1 if i == 0 else 0),
                 fontweight="bold" if i == 0 else "normal")
    x0 = margin + w + margin
    sw = round(font_size * 1.2)
    for i, (rgb, text) in enumerate(legend):
        y = top + i * line
        tx = x0
        if rgb is not None:
            fig.patches.append(Rectangle(xy(x0, y + sw), sw / width, sw / height, transform=fig.transFigure,
                                         facecolor=np.asarray(rgb) / 255, edgecolor="black", linewidth=0.5))
            tx = x0 + sw + 6
        fig.text(*xy(tx, y + sw / 2), text, va="center", ha="left", fontsize=font_size - 1)
    canvas.draw()
    buf = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    hh, ww = min(height, buf.shape[0]), min(width, buf.shape[1])
    out[:hh, :ww] = buf[:hh, :ww]
    out[top:top + h, margin:margin + w] = array
    return out, Placed(top, margin, h, w)


def legend(keys: np.ndarray, dropped: np.ndarray, kind: str, limit: int) -> list:
    """Legend entries: the most common words (kind "word") or merge groups ("token") first, then what
    is left clear and what is blanked."""
    entries = []
    painted = keys[keys >= 0]
    uniq, counts = np.unique(painted, return_counts=True)
    order = np.lexsort((uniq, -counts))
    for i in order[:limit]:
        entries.append((key_color(int(uniq[i])), f"{kind} {uniq[i]}: {_count(counts[i], 'patch')}"))
    if len(uniq) > limit:
        entries.append((None, f"+ {_count(len(uniq) - limit, 'more ' + kind)}"))
    clear = int(((keys < 0) & ~dropped).sum())
    what = {"word": "unmatched", "token": "single"}.get(kind, "kept")
    entries.append((None, f"clear: {_count(clear, what + ' patch')}"))
    if dropped.any():
        entries.append((BLANK, f"dropped: {_count(int(dropped.sum()), 'patch')}"))
    return entries


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


def record_name(record: dict) -> str:
    """A file-name-safe name for a data set record: its "name", else its file's stem, else its id."""
    import re

    name = record.get("name") or (Path(record["path"]).stem if record.get("path") else None) \
        or str(record.get("image_id", record.get("index", "image")))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


def record_names(records: Sequence[dict]) -> list[str]:
    """:func:`record_name` of each record, made unique among ``records`` so that no two images' figures
    share a file: a name that images in different folders share gets the folder's name in front
    (``dog_0001``, ``cat_0001``), and one that still repeats a short digest of its path behind. A name
    no other image shares stays as it is."""
    import hashlib
    from collections import Counter

    names = [record_name(r) for r in records]
    seen = Counter(names)
    names = [record_name({"name": f"{Path(r['path']).parent.name}_{n}"}) if seen[n] > 1 and r.get("path") else n
             for r, n in zip(records, names)]
    seen = Counter(names)
    key = lambda r: str(r.get("path") or r.get("image_id") or r.get("index"))  # noqa: E731
    return [f"{n}_{hashlib.sha256(key(r).encode()).hexdigest()[:8]}" if seen[n] > 1 else n
            for r, n in zip(records, names)]


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write an RGB uint8 array as a PNG, pixel for pixel."""
    from PIL import Image

    from .results import atomic_write

    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")
    return atomic_write(path, lambda f: image.save(f, format="PNG", optimize=True))  # never a half-written PNG
