"""The block loop with no reducer equals every unpatched model, entry point by entry point."""
import pytest
import torch

import vwt
from tiny import ENTRIES, hf_blip, images, timm_vit

TOL = 1e-5


@pytest.mark.parametrize("name", sorted(ENTRIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_without_reducers(name, batch):
    build, entry = ENTRIES[name]
    model = build()
    x = images(batch)
    with torch.no_grad():
        ref = entry(model, x)
        vwt.patch(model)
        out = entry(model, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["hf_clip.image_features", "hf_blip.vision", "open_clip.encode_image", "timm.token"])
def test_patch_twice_equals_once_and_unpatch_restores(name):
    build, entry = ENTRIES[name]
    model = build()
    x = images(2)
    with torch.no_grad():
        ref = entry(model, x)
        vwt.patch(model)
        once = entry(model, x)
        vwt.patch(model)
        twice = entry(model, x)
        vwt.unpatch(model)
        restored = entry(model, x)
    assert torch.equal(once, twice)
    assert torch.equal(restored, ref)
    assert all("forward" not in m.__dict__ and "forward_features" not in m.__dict__ for m in model.modules())


def test_blip_generate_identical_ids():
    model = hf_blip()
    x = images(2)
    kw = dict(num_beams=3, max_length=12, min_length=5)
    ref = model.generate(pixel_values=x, **kw)
    vwt.patch(model)
    out = model.generate(pixel_values=x, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["hf_clip.vision", "hf_blip.vision", "open_clip.encode_image", "timm.avg"])
def test_half_precision_runs_close_to_unpatched(name, dtype):
    build, entry = ENTRIES[name]
    model = build().to(dtype)
    x = images(2).to(dtype)
    with torch.inference_mode():
        ref = entry(model, x).float()
        vwt.patch(model)
        out = entry(model, x).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 1e-2


def test_inference_mode_and_stats():
    model = timm_vit()
    vwt.patch(model)
    with torch.inference_mode():
        model(images(2))
    s = vwt.stats(model)
    assert s["tokens_per_layer"].shape == (2, 5)
    assert (s["tokens_per_layer"] == 17).all()
    assert torch.equal(s["labels"][0], torch.arange(1, 17))


@pytest.mark.parametrize("bad", [torch.nn.Linear(3, 3), torch.nn.Sequential()])
def test_unsupported_model_is_refused_with_the_supported_list(bad):
    with pytest.raises(TypeError, match="supported: Hugging Face CLIPModel"):
        vwt.patch(bad)


def test_non_reducer_argument_is_refused():
    with pytest.raises(TypeError, match="reducers"):
        vwt.patch(timm_vit(), "tome")


def test_stats_before_forward_is_a_clear_error():
    model = vwt.patch(timm_vit())
    with pytest.raises(ValueError, match="run a forward"):
        vwt.stats(model)
