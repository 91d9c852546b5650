"""vwt.quantize: int8 vision towers stay close to float, combine with the reducers and vwt.patch, touch
only the vision tower, and refuse what cannot run with one clear line. The paper's int8 (the whole
model through accelerate, vwt.quant.quantize_whole_model): the text tower too on CUDA, one line on a
CPU."""
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

    monkeypatch.setattr(vwt.quant, "quantize", cannot)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_paper_int8_on_a_cpu_is_one_clear_line(tmp_path, capsys):
    import clip as clip_script
    import fixtures
    from vwt import cli
    from vwt.quant import quantize_whole_model

    with pytest.raises(RuntimeError, match="needs CUDA") as e:
        quantize_whole_model(hf_clip())
    assert "\n" not in str(e.value)
    root = tmp_path / "data"
    fixtures.write_waterbirds(root)
    loaded = cli.Loaded(hf_clip(), "hf_clip", "tiny", False, fixtures.char_clip_tokenizer(tmp_path / "tok"))
    argv = ["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path), "--workers", "0",
            "--device", "cpu", "--quant", "--protocol", "paper"]
    with pytest.raises(SystemExit) as e:
        cli.main(lambda: clip_script.main(argv, loaded))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "needs CUDA" in err[-1] and "--protocol standard" in err[-1], err
    assert sum(line.startswith("error") for line in err) == 1 and not any("Traceback" in line for line in err)


def _bnb_int8(module, bnb):
    """Whether every nn.Linear below ``module`` is an LLM.int8 layer holding int8 weights."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in linears)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paper_int8_quantizes_the_whole_clip_model_text_tower_included():
    bnb = pytest.importorskip("bitsandbytes")
    from vwt.quant import quantize_whole_model

    model = hf_clip().cuda()
    x, ids = images(2).cuda(), torch.arange(1, 9).view(2, 4).cuda()
    with torch.no_grad():
        ref_text = _features(model.get_text_features(input_ids=ids))
        ref_image = _features(model.get_image_features(pixel_values=x))
        quantize_whole_model(model)
        assert _bnb_int8(model.text_model, bnb) and _bnb_int8(model.vision_model, bnb)
        assert _bnb_int8(model.text_projection, bnb) and _bnb_int8(model.visual_projection, bnb)
        assert model.text_model.embeddings.token_embedding.weight.dtype == torch.float16  # the rest float16
        text = _features(model.get_text_features(input_ids=ids))
        vwt.patch(model, vwt.ToMe(r=2, sizes="per-block"))
        image = _features(model.get_image_features(pixel_values=x))
    assert cosine(text, ref_text) > 0.98 and cosine(image, ref_image) > 0.98


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paper_int8_leaves_blips_text_decoder_as_accelerate_skips_it():
    bnb = pytest.importorskip("bitsandbytes")
    from tiny import hf_blip
    from vwt.quant import quantize_whole_model

    model = quantize_whole_model(hf_blip().cuda())
    assert _bnb_int8(model.vision_model, bnb)
    decoder = [m for m in model.text_decoder.modules() if isinstance(m, nn.Linear)]
    assert decoder and not any(isinstance(m, bnb.nn.Linear8bitLt) for m in decoder)
    assert all(m.weight.dtype == torch.float16 for m in decoder)
    with torch.no_grad():
        ids = model.generate(pixel_values=images(2).cuda().half(), num_beams=3, max_length=8, min_length=2)
    assert ids.shape[0] == 2
