"""vwt.quantize: int8 vision towers stay close to float, combine with the reducers and vwt.patch, touch
only the vision tower, and refuse what cannot run with one clear line."""
import pytest
import torch
from torch import nn

import vwt
from tiny import ENTRIES, NUM_PATCHES, PATCH, hf_clip, images, one_entry_per_family, open_clip_model, timm_vit
from vwt.quant import vision_tower

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor  # noqa: E402

FAMILIES = one_entry_per_family()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float()).min().item()


def int8_linears(module):
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and isinstance(m.weight, Int8Tensor)]


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_patched_close_to_float(name):
    build, entry = ENTRIES[name]
    model = build()
    x = images(3)
    with torch.no_grad():
        ref = entry(model, x)
        vwt.quantize(model)
        vwt.patch(model)
        out = entry(model, x)
    assert int8_linears(vision_tower(model))
    assert cosine(out, ref) > 0.99


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_combines_with_inter_image_and_tome(name):
    build, entry = ENTRIES[name]
    x = images(2)
    word = torch.randn(3, PATCH, PATCH, generator=torch.Generator().manual_seed(5))
    x[0, :, : 2 * PATCH, :] = word.repeat(1, 2, x.shape[-1] // PATCH)  # image 0: 8 patches of one word
    vocab = vwt.Vocabulary(torch.stack([word.flatten(), torch.randn(3 * PATCH * PATCH)]), space="pixel",
                           patch_size=PATCH)
    reducers = (vwt.InterImage(vocab, thresh=0.1), vwt.ToMe(r=2))
    ref_model, model = build(), build()
    with torch.no_grad():
        ref = entry(vwt.patch(ref_model, *reducers), x)
        out = entry(vwt.patch(vwt.quantize(model), *reducers), x)
    assert vwt.stats(model)["tokens_per_layer"][:, 0].tolist() == [NUM_PATCHES + 1 - 7, NUM_PATCHES + 1]
    assert torch.equal(vwt.stats(model)["tokens_per_layer"], vwt.stats(ref_model)["tokens_per_layer"])
    assert cosine(out, ref) > 0.99


def test_quantize_before_or_after_patch_is_the_same():
    x = images(2)
    a, b = timm_vit(), timm_vit()
    with torch.no_grad():
        vwt.patch(vwt.quantize(a), vwt.EViT(keep=0.5))
        vwt.quantize(vwt.patch(b, vwt.EViT(keep=0.5)))
        assert torch.equal(a(x), b(x))


def test_only_the_vision_tower_is_quantized_and_twice_is_a_noop():
    model = hf_clip()
    vwt.quantize(model)
    vwt.quantize(model)
    assert len(int8_linears(model.vision_model)) == 4 * 6  # q, k, v, out, fc1, fc2 per block
    assert not int8_linears(model.text_model) and not isinstance(model.visual_projection.weight, Int8Tensor)


def test_open_clip_quantizes_the_mlp_and_leaves_multihead_attention_in_float():
    model = open_clip_model()
    x = images(2)
    vwt.quantize(model)
    names = int8_linears(model.visual)
    assert names and all(".mlp." in n for n in names)
    assert len(names) == 2 * len(model.visual.transformer.resblocks)
    with torch.no_grad():  # nn.MultiheadAttention's own forward still runs: the model works unpatched
        assert torch.isfinite(model.encode_image(x)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bitsandbytes_without_cuda_is_one_clear_line():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") as e:
        vwt.quantize(timm_vit(), backend="bitsandbytes")
    assert "\n" not in str(e.value)


def test_scripts_report_a_quantizer_that_cannot_run_as_a_user_error(monkeypatch):
    from vwt import cli

    def cannot(model, backend="auto"):
        raise RuntimeError("vwt.quantize: torchao is not importable (no module); install torchao")

    monkeypatch.setattr(vwt, "quantize", cannot)
    with pytest.raises(cli.UserError, match="torchao is not importable"):
        cli.quantize(timm_vit())


def test_unknown_backend_and_model():
    with pytest.raises(ValueError, match="backend must be one of"):
        vwt.quantize(timm_vit(), backend="int4")
    with pytest.raises(TypeError, match="does not support Linear"):
        vwt.quantize(nn.Linear(2, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FAMILIES)
def test_bitsandbytes_on_cuda(name):
    bnb = pytest.importorskip("bitsandbytes")
    build, entry = ENTRIES[name]
    model = build().cuda().half()
    x = images(2).cuda().half()
    with torch.no_grad():
        ref = entry(model, x)
        vwt.quantize(model)  # auto: CUDA -> bitsandbytes
        vwt.patch(model, vwt.ToMe(r=2))
        out = entry(model, x)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in vision_tower(model).modules())
    assert cosine(out, ref) > 0.98
