"""--resize / vwt.Resize, the downsampling baseline: the patched model at SIZE equals the unpatched model
run on the image resized with torch's interpolate, its position embeddings interpolated here (bicubic,
corners not aligned; antialiased for timm and open_clip as their resamplers are, not for Hugging Face
as transformers' interpolate_pos_encoding is), on every family and entry point; len.py counts
(SIZE/P)^2 + 1 tokens; the combination rule holds for it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eff
import len as len_script
import tiny
import vwt
from tiny import PATCH
from vwt.errors import UserError


def resized(x, size):
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def grid_resample(pos, size, antialias):
    """(1, 1 + g*g, C) class + grid position embeddings -> the grid resampled to size // PATCH."""
    g, new, c = int((pos.shape[1] - 1) ** 0.5), size // PATCH, pos.shape[-1]
    grid = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, c)], 1)


def at_size(model, size):
    """A copy of the unpatched ``model`` whose position embeddings are interpolated to ``size``."""
    m = copy.deepcopy(model)
    family = vwt.backends.family_of(m).name
    vision = vwt.backends.family_of(m).vision(m)
    if family == "hf_clip":
        emb = vision.embeddings
        pos = grid_resample(emb.position_embedding.weight[None], size, antialias=False)[0]
        emb.position_embedding = nn.Embedding.from_pretrained(pos, freeze=True)
        emb.image_size, emb.num_patches, emb.num_positions = size, (size // PATCH) ** 2, pos.shape[0]
        emb.register_buffer("position_ids", torch.arange(pos.shape[0])[None], persistent=False)
    elif family == "hf_blip":
        emb = vision.embeddings
        emb.position_embedding = nn.Parameter(grid_resample(emb.position_embedding, size, antialias=False))
        emb.image_size, emb.num_patches, emb.num_positions = size, (size // PATCH) ** 2, emb.position_embedding.shape[1]
    elif family == "open_clip":
        vision.positional_embedding = nn.Parameter(grid_resample(vision.positional_embedding[None], size, True)[0])
    else:
        vision.pos_embed = nn.Parameter(grid_resample(vision.pos_embed, size, antialias=True))
        vision.patch_embed.strict_img_size = False
    return m


@pytest.mark.parametrize("size", [24, 48])
@pytest.mark.parametrize("name", list(tiny.ENTRIES))
def test_resize_equals_the_unpatched_model_at_that_size(name, size):
    build, entry = tiny.ENTRIES[name]
    model = build()
    x = tiny.images(2)
    with torch.no_grad():
        expected = entry(at_size(model, size), resized(x, size))
        vwt.patch(model, vwt.Resize(size))
        got = entry(model, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert vwt.stats(model)["tokens_first_block"].tolist() == [(size // PATCH) ** 2 + 1] * 2


def test_resize_combines_with_tome_and_counts_its_tokens():
    model = tiny.timm_vit()
    x = tiny.images(2)
    with torch.no_grad():
        vwt.patch(model, vwt.Resize(24), vwt.ToMe(r=2))
        model(x)
    counts = vwt.stats(model)["tokens_per_layer"][0].tolist()
    assert counts[0] == 10 and counts[1] == 8  # 3x3 patches + class token, then 2 merged


def test_resize_refuses_a_size_off_the_patch_grid():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8; use e.g. 16 or 24"):
        vwt.patch(tiny.timm_vit(), vwt.Resize(20))(tiny.images(1))
    with pytest.raises(UserError, match="not a multiple of the patch size 8"):
        len_script.main(["--data", "samples", "--resize", "20", "--max-images", "2", "--workers", "0",
                         "--device", "cpu", "--out", "unused"], tiny.loaded())


@pytest.mark.parametrize("size", [16, 24, 40])
def test_len_counts_the_resized_tokens(size, tmp_path):
    res = len_script.main(["--data", "samples", "--resize", str(size), "--max-images", "3", "--workers", "0",
                           "--device", "cpu", "--out", str(tmp_path)], tiny.loaded())
    assert res["method"] == f"resize{size}"
    assert res["tokens"]["mean"] == res["tokens"]["min"] == res["tokens"]["max"] == (size // PATCH) ** 2 + 1


def test_the_rule_refuses_resize_with_another_input_reducer():
    with pytest.raises(UserError, match=r"choose one input reducer: .*--resize \(resize\); got --vocab/--vocab-path and --resize"):
        vwt.cli.check_methods(vocab=1000, resize=160)
    with pytest.raises(ValueError, match="choose one input reducer: IntraImage, InterImage or Resize"):
        vwt.patch(tiny.timm_vit(), vwt.IntraImage(0.5), vwt.Resize(24))
    with pytest.raises(UserError, match="--methods 'inter\\+resize'"):
        eff.main(["--methods", "base,inter+resize", "--device", "cpu"], loaded=tiny.loaded())
    vwt.cli.check_methods(resize=160, tome=8, quant=True)  # one input + one in-network reducer + int8: accepted


FAST = ["--seconds", "0.001", "--min-iters", "1", "--warmup", "0", "--warmup-seconds", "0", "--rounds", "2",
        "--paper-warmup", "1", "--limit", "2", "--device", "cpu", "--metric", "time"]


def test_eff_measures_resize_alone_and_with_tome(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = eff.main(["--methods", "base,resize,resize+tome", "--batch", "1", "--out", "res"] + FAST,
                  loaded=tiny.loaded())
    rows = df.set_index("method")
    # the default side scaled to the tiny model: 176/224 of 32 pixels is 25.1, rounded to 24 (P = 8)
    assert rows.loc["resize", "config"] == "resize24" and rows.loc["resize", "tokens_in"] == 10
    assert rows.loc["resize+tome", "config"] == "resize24+tome13"
    assert rows.loc["resize", "gflops_per_image"] < rows.loc["base", "gflops_per_image"]
    df = eff.main(["--resize", "16", "--batch", "1", "--out", "res2"] + FAST, loaded=tiny.loaded())
    assert list(df["method"]) == ["base", "resize"] and df.set_index("method").loc["resize", "tokens_in"] == 5


def test_clip_and_match_run_resize(tmp_path):
    import clip as clip_script
    import fixtures
    import match

    root = fixtures.write_waterbirds(tmp_path / "data")
    loaded = tiny.loaded(tokenizer=fixtures.char_clip_tokenizer(tmp_path / "tok"))
    res = clip_script.main(["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path / "out"),
                            "--protocol", "standard", "--workers", "0", "--device", "cpu", "--resize", "24"], loaded)
    assert res["method"] == "resize24" and res["metrics"]["tokens_first_block"]["mean"] == 10
    out = match.run(match.parse_args(["--resize", "16", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"]),
                    loaded=tiny.loaded())
    assert out["method"] == "resize16" and out["images"][0]["tokens_first_block"] == 5
