"""The figures of match.py and word.py, read back from their PNGs and checked patch cell by patch cell."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures
import vwt
from tiny import PATCH, hf_clip
from tiny import loaded as tiny_loaded
from vwt import cli, vis
from vwt.datasets import Samples, preprocess_for
from vwt.tokenizer import pixel_patches

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import match  # noqa: E402
import word  # noqa: E402

ALPHA = 0.5


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def cells(arr, grid):
    """(rows * cols, ph, pw, 3) float cells of an (H, W, 3) array."""
    return vis.image_patches(arr, grid).astype(np.float64)


def recovered_colors(out, orig, grid, alpha=ALPHA):
    """Per cell, the colour that was blended in: (out - (1 - alpha) orig) / alpha, averaged."""
    return ((cells(out, grid) - (1 - alpha) * cells(orig, grid)) / alpha).mean((1, 2))


def check_painted(out, orig, grid, keys, dropped, alpha=ALPHA):
    """What every figure must satisfy: clear cells keep the original pixels exactly, dropped cells are
    the blank colour exactly, and each painted cell carries its key's colour (up to rounding)."""
    keys, dropped = np.asarray(keys), np.asarray(dropped, bool)
    o, i = cells(out, grid), cells(orig, grid)
    clear = (keys < 0) & ~dropped
    assert np.array_equal(o[clear], i[clear])
    assert (o[dropped] == np.asarray(vis.BLANK)).all()
    painted = (keys >= 0) & ~dropped
    got = recovered_colors(out, orig, grid, alpha)[painted]
    want = vis.key_colors(keys[painted]).astype(np.float64)
    assert np.abs(got - want).max(initial=0) <= 0.5 / alpha + 1e-9  # rounding of the blend only
    return got


def sample_pixels(model, n):
    pre = preprocess_for(model)
    data = Samples(pre, limit=n)
    return pre, torch.stack([data[i][0] for i in range(n)])


def read_figure(folder, entry):
    """The exact image region of a match.py PNG, shrunk back to model resolution."""
    top, left, h, w = entry["box"]
    fig = fixtures.load_png(folder / entry["file"])
    s = entry["scale"]
    region = fig[top:top + h, left:left + w]
    small = region[::s, ::s]
    assert np.array_equal(vis.enlarge(small, s), region)  # integer enlargement, nothing resampled
    return small


# --------------------------------------------------------------------------------------------------
# vis on synthetic arrays
# --------------------------------------------------------------------------------------------------
def test_key_colors_are_pure_and_distinct():
    first = vis.key_colors(range(64))
    assert np.array_equal(first, vis.key_colors(range(64)))
    assert len({tuple(c) for c in first}) == 64
    with pytest.raises(ValueError):
        vis.key_color(-1)


def test_paint_clear_dropped_and_colours():
    rng = np.random.default_rng(0)
    grid = (3, 4)
    image = rng.integers(0, 256, (3 * 5, 4 * 6, 3), dtype=np.uint8)  # 5x6-pixel cells
    keys = np.array([7, 7, -1, 3, -1, 7, 3, -1, 12, -1, -1, 12])
    dropped = np.zeros(12, bool)
    dropped[[4, 10]] = True
    out = vis.paint(image, grid, keys, dropped, alpha=ALPHA)
    got = check_painted(out, image, grid, keys, dropped)
    assert len(got) == (keys >= 0).sum()
    # On a uniform image the cells of one key are identical and differ from every other key's.
    flat = np.full_like(image, 90)
    c = cells(vis.paint(flat, grid, keys, alpha=ALPHA), grid)
    for k in (3, 7, 12):
        same = c[keys == k]
        assert (same == same[0]).all()
        assert not (c[(keys >= 0) & (keys != k)] == same[0]).all((1, 2, 3)).any()


def test_paint_rejects_grids_that_do_not_fit():
    with pytest.raises(ValueError, match="does not split"):
        vis.paint(np.zeros((10, 10, 3), np.uint8), (3, 3), np.zeros(9, int))
    with pytest.raises(ValueError, match="one value per patch"):
        vis.paint(np.zeros((9, 9, 3), np.uint8), (3, 3), np.zeros(8, int))


def test_group_keys_from_labels():
    # patches 0,1 -> token 1; 2 alone; 3,4,5 -> token 3; 6 dropped; 7 alone
    labels = np.array([1, 1, 2, 3, 3, 3, -1, 4])
    keys = vis.group_keys(labels)
    assert keys.tolist() == [1, 1, -1, 3, 3, 3, -1, -1]


def test_tile_grid_has_one_cell_per_tile():
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 200, (7, 4, 5, 3), dtype=np.uint8)
    arr, grid = vis.tile_grid(tiles, cols=3, gap=1, scale=2)
    assert arr.shape[:2] == grid.shape and grid.count == 7 and grid.rows == 3
    covered = np.zeros(arr.shape[:2], bool)
    for k in range(7):
        t, l, b, r = grid.box(k)
        assert np.array_equal(arr[t:b, l:r], vis.enlarge(tiles[k], 2))
        assert not covered[t:b, l:r].any()
        covered[t:b, l:r] = True
    assert (arr[~covered] == vis.BACKGROUND).all()


def test_decorate_pastes_the_array_unchanged():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    fig, placed = vis.decorate(arr, "a title\nsecond line", [(vis.key_color(3), "word 3"), (None, "note")])
    assert np.array_equal(fig[placed.top:placed.top + 40, placed.left:placed.left + 60], arr)
    assert (fig[:placed.top] < 100).any()  # the title's text is drawn above


def test_word_tiles_use_the_tokenizer_patch_layout():
    """Words made of an image's own pixel patches draw back as that image's patch cells."""
    model = hf_clip(depth=1)
    pre, pixels = sample_pixels(model, 1)
    words = pixel_patches(pixels, PATCH)[0]
    tiles = vis.word_tiles(words, PATCH, pre.denormalise)
    image = vis.to_uint8(pre.denormalise(pixels[0]))
    assert np.array_equal(tiles, vis.image_patches(image, (4, 4)))


def test_match_recorder_keeps_the_words_inter_image_used():
    model = hf_clip(depth=1)
    _, pixels = sample_pixels(model, 2)
    patches = pixel_patches(pixels, PATCH)
    inter = vwt.InterImage(vwt.Vocabulary(patches[0, [0, 5, 9]].clone(), patch_size=PATCH), thresh=0.2)
    rec = vis.MatchRecorder(inter)
    vwt.patch(model, inter)
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    keys = rec.keys()
    word, dist = type(inter).match(inter, patches)
    assert np.array_equal(keys, torch.where(dist <= 0.2, word, -1).numpy())
    assert keys[0, 5] == 1
    labels = vwt.stats(model)["labels"].numpy()
    for b in range(2):  # every word's patches became one token
        for k in np.unique(keys[b][keys[b] >= 0]):
            assert len(np.unique(labels[b][keys[b] == k])) == 1
    rec.detach()
    assert "match" not in inter.__dict__


# --------------------------------------------------------------------------------------------------
# match.py end to end (tiny model, the sample photographs)
# --------------------------------------------------------------------------------------------------
def run_match(tmp_path, *flags, loaded=None):
    args = match.parse_args(["--out", str(tmp_path), "--limit", "2", "--alpha", str(ALPHA), "--scale", "3",
                             *flags])
    loaded = loaded or tiny_loaded()
    result = match.run(args, loaded=loaded)
    return result, match.figure_dir(args, loaded), loaded


def originals(loaded, n):
    pre, pixels = sample_pixels(loaded.model, n)
    return [vis.to_uint8(pre.denormalise(p)) for p in pixels], pixels


def test_match_intra_blanks_exactly_the_dropped_patches(tmp_path):
    result, folder, loaded = run_match(tmp_path, "--top_k", "0.5")
    images, _ = originals(loaded, 2)
    assert len(result["images"]) == 2
    for entry, orig in zip(result["images"], images):
        dropped = np.zeros(16, bool)
        dropped[entry["dropped"]] = True
        assert dropped.sum() == entry["tokens_in"] - entry["tokens_first_block"] > 0
        check_painted(read_figure(folder, entry), orig, tuple(entry["grid"]), entry["keys"], dropped)
        assert all(k == -1 for k in entry["keys"])
    saved = json.loads((folder / "match.json").read_text())
    assert saved["config"]["top_k"] == 0.5 and "versions" in saved["environment"]


def test_match_inter_colours_each_word_alike_across_images(tmp_path):
    loaded = tiny_loaded()
    images, pixels = originals(loaded, 2)
    patches = pixel_patches(pixels, PATCH)
    words = patches[0, [0, 3, 6, 9, 12, 15]].clone()  # words taken from the first image only
    vocab = vwt.Vocabulary(words, patch_size=PATCH, data="test")
    thresh = float(vwt.InterImage(vocab).match(patches)[1].median())  # about half the patches match
    vocab.save(tmp_path / "v6")
    result, folder, _ = run_match(tmp_path, "--vocab-path", str(tmp_path / "v6" / "vocab.pt"),
                                  "--thresh", str(thresh), loaded=loaded)
    colours = {}
    for entry, orig in zip(result["images"], images):
        keys = np.array(entry["keys"])
        assert entry["key_kind"] == "word" and (keys >= 0).any() and (keys < 0).any()
        assert entry["tokens_first_block"] == entry["tokens_in"] - (keys >= 0).sum() + len(np.unique(keys[keys >= 0]))
        got = check_painted(read_figure(folder, entry), orig, (4, 4), keys, np.zeros(16, bool))
        colours[entry["name"]] = dict(zip(keys[keys >= 0], got))
    a, b = colours.values()
    shared = set(a) & set(b)
    assert shared  # a word of the first image matched patches of the second
    for k in shared:  # a word keeps its colour from image to image
        assert np.abs(a[k] - b[k]).max() <= 1 / ALPHA + 1e-9


@pytest.mark.parametrize("flag", [["--tome", "4"], ["--lgtm", "4"]])
def test_match_merge_groups_share_a_colour(tmp_path, flag):
    result, folder, loaded = run_match(tmp_path, *flag)
    images, pixels = originals(loaded, 2)
    assert folder.name.split("__")[0].endswith("-random-weights") and result["pretrained"] is False
    vwt.patch(loaded.model, *cli.reducers_from_args(match.parse_args(flag)))
    with torch.no_grad():
        loaded.vision(pixels)
    labels = vwt.stats(loaded.model)["labels"].numpy()
    grouped = 0
    for b, (entry, orig) in enumerate(zip(result["images"], images)):
        keys = np.array(entry["keys"])
        for t in np.unique(labels[b]):  # the patches one final token holds carry one key
            held = labels[b] == t
            assert len(np.unique(keys[held])) == 1
            assert (keys[held][0] >= 0) == (held.sum() >= 2)
        grouped += (keys >= 0).sum()
        check_painted(read_figure(folder, entry), orig, (4, 4), keys, np.zeros(16, bool))
        assert entry["tokens_last_block"] < entry["tokens_in"]
    assert grouped > 0


def test_match_with_no_method_draws_intra_and_inter_on_the_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the samples vocabulary is learned into tokenizers/samples/ on first use
    runs = match.run(match.parse_args(["--out", str(tmp_path), "--limit", "1"]), loaded=tiny_loaded())["runs"]
    assert [r["method"] for r in runs] == ["intra0.5", "inter-v100-t0.1"]
    learned = vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / f"v100-p{PATCH}-32px" / "vocab.pt")
    assert len(learned) == 100 and learned.patch_size == PATCH and learned.meta["data"] == "samples"


# --------------------------------------------------------------------------------------------------
# word.py end to end
# --------------------------------------------------------------------------------------------------
def test_word_grid_and_pairs(tmp_path):
    loaded = tiny_loaded()
    pre, pixels = sample_pixels(loaded.model, 3)
    images = [vis.to_uint8(pre.denormalise(p)) for p in pixels]
    patches = pixel_patches(pixels, PATCH)
    picks = [(0, 2), (0, 7), (1, 4), (2, 11), (2, 13)]  # (image, patch) pairs taken as the words
    words = torch.stack([patches[i, j] for i, j in picks])
    vwt.Vocabulary(words, patch_size=PATCH, data="test", mean=pre.mean, std=pre.std).save(tmp_path / "v5")
    args = word.parse_args(["--vocab-path", str(tmp_path / "v5" / "vocab.pt"), "--out", str(tmp_path),
                            "--images", "chelsea", "astronaut", "--thresh", "0.05", "--scale", "2"])
    result = word.run(args, loaded=loaded)
    [folder] = (tmp_path / "figures" / "word").glob("test-v5__*")

    # The grid: one cell per word, each the image patch the word was made of, background elsewhere.
    g = result["words"]
    top, left, h, w = g["box"]
    arr = fixtures.load_png(folder / "words.png")[top:top + h, left:left + w]
    grid = vis.Grid(g["count"], g["cols"], tuple(g["tile"]), g["gap"], g["scale"])
    assert grid.count == len(picks) and arr.shape[:2] == grid.shape
    covered = np.zeros(arr.shape[:2], bool)
    for k, (i, j) in enumerate(picks):
        t, l, b, r = grid.box(k)
        assert np.array_equal(arr[t:b, l:r], vis.enlarge(vis.image_patches(images[i], (4, 4))[j], 2))
        covered[t:b, l:r] = True
    assert (arr[~covered] == vis.BACKGROUND).all()

    # The pairs: each matched patch of the chosen image beside its word; words' own patches included.
    by_name = {e["name"]: e for e in result["images"]}
    assert list(by_name) == ["chelsea", "astronaut"]
    for name, index in (("astronaut", 0), ("chelsea", 1)):
        e = by_name[name]
        assert e["matched"] == len(e["pairs"]) > 0
        own = {j: k for k, (i, j) in enumerate(picks) if i == index}
        assert all([j, k] in e["pairs"] for j, k in own.items())
        top, left, h, w = e["box"]
        arr = fixtures.load_png(folder / e["file"])[top:top + h, left:left + w]
        p, s = e["tile"][0], e["scale"]
        pgrid = vis.Grid(len(e["pairs"]), e["cols"], tuple(e["tile"]), e["gap"], s)
        cells_ = vis.image_patches(images[index], (4, 4))
        for n, (j, k) in enumerate(e["pairs"]):
            t, l, b, r = pgrid.box(n)
            tile = arr[t:b, l:r]
            assert np.array_equal(tile[:, :p * s], vis.enlarge(cells_[j], s))
            i2, j2 = picks[k]
            assert np.array_equal(tile[:, (p + e["sep"]) * s:], vis.enlarge(vis.image_patches(images[i2], (4, 4))[j2], s))


def test_word_refuses_embed_vocabularies_and_unknown_images(tmp_path):
    vwt.Vocabulary(torch.randn(4, 64), space="embed").save(tmp_path / "e")
    args = word.parse_args(["--vocab-path", str(tmp_path / "e" / "vocab.pt"), "--out", str(tmp_path)])
    with pytest.raises(cli.UserError, match="embed-space"):
        word.run(args, loaded=tiny_loaded())
    vwt.Vocabulary(torch.randn(4, 3 * PATCH * PATCH), patch_size=PATCH).save(tmp_path / "p")
    args = word.parse_args(["--vocab-path", str(tmp_path / "p" / "vocab.pt"), "--out", str(tmp_path),
                            "--images", "no-such-image"])
    with pytest.raises(cli.UserError, match="unknown image"):
        word.run(args, loaded=tiny_loaded())


# --------------------------------------------------------------------------------------------------
# The scripts as a user runs them
# --------------------------------------------------------------------------------------------------
def script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_match_script_runs_end_to_end(tmp_path):
    done = script("match.py", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--top_k", "0.5",
                  "--limit", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "figures" / "match").glob("intra0.5__*/astronaut.png"))) == 1


@pytest.mark.parametrize("module, argv, says", [
    (match, ["--top_k", "1.5"], "--top_k"),
    (match, ["--vocab-path", "missing/vocab.pt"], "not found"),
    (match, ["--top_k", "0.5", "--limit", "0"], "--limit"),
    (word, ["--vocab-path", "missing/vocab.pt"], "not found"),
])
def test_bad_input_is_one_line(module, argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(lambda: module.run(module.parse_args([*argv, "--out", str(tmp_path)]), loaded=tiny_loaded()))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and says in err and err.count("\n") == 1
