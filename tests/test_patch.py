"""The block loop with no reducer equals every unpatched model, entry point by entry point."""
import pytest
import torch

import vwt
from tiny import ENTRIES, IMAGE, NUM_PATCHES, hf_blip, images, one_entry_per_family, timm_vit
from vwt.backends import REGISTRY, family_of

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


def test_every_registered_backend_has_tiny_models():
    assert {n.split(".")[0] for n in ENTRIES} == {b.name for b in REGISTRY}
    assert one_entry_per_family() == ["hf_clip.image_features", "hf_blip.vision", "open_clip.encode_image", "timm.token"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_registry_answers_for_every_model(name):
    build, _ = ENTRIES[name]
    model = build()
    backend = family_of(model)
    assert backend.name == name.split(".")[0]
    vision = backend.vision(model)
    assert any(m is vision for m in model.modules())  # a module inside the model, or the model
    assert family_of(vision) is backend and backend.vision(vision) is vision
    with torch.no_grad():
        x, patches, grid = backend.tower(model).embed(images(2))
    assert x.shape[:2] == (2, NUM_PATCHES + 1) and patches.shape[1] == NUM_PATCHES and grid == (4, 4)
    assert backend.dims(model).num_patches == NUM_PATCHES and backend.preprocess(model)["size"] == IMAGE


@pytest.mark.parametrize("name", one_entry_per_family())
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


@pytest.mark.parametrize("reducers, message", [
    ((vwt.IntraImage(0.5), vwt.IntraImage(0.2)), "choose one input reducer: IntraImage, InterImage or Resize"),
    ((vwt.ToMe(2), vwt.EViT(0.7)), "choose one in-network reducer: ToMe, EViT or LGTM; got ToMe and EViT"),
])
def test_one_input_and_one_in_network_reducer_at_most(reducers, message):
    with pytest.raises(ValueError, match=message):
        vwt.patch(timm_vit(), *reducers)
    assert vwt.patch(timm_vit(), reducers[0], vwt.LGTM(2) if reducers[0].kind == "input" else vwt.IntraImage(0.5))


def test_non_reducer_argument_is_refused():
    with pytest.raises(TypeError, match="reducers"):
        vwt.patch(timm_vit(), "tome")


def test_stats_before_forward_is_a_clear_error():
    model = vwt.patch(timm_vit())
    with pytest.raises(ValueError, match="run a forward"):
        vwt.stats(model)
