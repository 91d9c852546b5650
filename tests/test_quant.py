"""vwt.quantize: int8 vision towers stay close to float, combine with the reducers and vwt.patch, touch
only the vision tower, and refuse what cannot run with one clear line. bitsandbytes LLM.int8 runs for
real on the CPU (bitsandbytes 0.50 and later): real Linear8bitLt layers with int8 weights, through
vwt.quantize and through the paper's int8 (the whole model through accelerate,
vwt.quant.quantize_whole_model, with only accelerate's GPU move stood in for), text tower included."""
import pytest
import torch
from torch import nn

import vwt
from tiny import ENTRIES, NUM_PATCHES, PATCH, hf_clip, images, one_entry_per_family, open_clip_model, timm_vit
from vwt.quant import quantize_whole_model, vision_tower

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor  # noqa: E402

FAMILIES = one_entry_per_family()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="needs CUDA")])]
# LLM.int8 against float16 on the tiny towers: largest |difference| over the largest |float16 output|.
# Measured over 5 seeds on the CPU: 1.8e-2 (timm ViT), 4.8e-3 (CLIP vision), 8.8e-3 (CLIP image
# features); float16 against float32: 2.3e-3.
TOL = 3e-2


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")  # a requirement on Linux: skipped only where it is not installed


def dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters()}


def paper_dtypes(model, skipped):
    """The parameter dtypes the paper's int8 leaves on the float ``model`` (read from the paper's
    path, not computed by it): the weight of every nn.Linear not under a ``skipped`` prefix int8,
    every other parameter float16."""
    int8 = {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(n == k or n.startswith(k + ".") for k in skipped)}
    return {n: torch.int8 if n in int8 else torch.float16 for n, p in model.named_parameters()}


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


def _bnb_int8(module, bnb):
    """Whether every nn.Linear below ``module`` is an LLM.int8 layer holding int8 weights."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in linears)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("device", DEVICES)
def test_paper_int8_quantizes_the_whole_clip_model_text_tower_included(device, bnb):
    model = hf_clip().to(device)
    x, ids = images(2).to(device), torch.arange(1, 9).view(2, 4).to(device)
    with torch.no_grad():
        ref_text = _features(model.get_text_features(input_ids=ids))
        ref_image = _features(model.get_image_features(pixel_values=x))
        quantize_whole_model(model)
        assert _bnb_int8(model.text_model, bnb) and _bnb_int8(model.vision_model, bnb)
        assert _bnb_int8(model.text_projection, bnb) and _bnb_int8(model.visual_projection, bnb)
        assert dtypes(model) == paper_dtypes(hf_clip(), skipped=())  # the rest float16
        text = _features(model.get_text_features(input_ids=ids))
        vwt.patch(model, vwt.ToMe(r=2, sizes="per-block"))
        image = _features(model.get_image_features(pixel_values=x))
    assert cosine(text, ref_text) > 0.98 and cosine(image, ref_image) > 0.98


@pytest.mark.parametrize("device", DEVICES)
def test_paper_int8_leaves_blips_text_decoder_as_accelerate_skips_it(device, bnb):
    from tiny import hf_blip

    model = quantize_whole_model(hf_blip().to(device))
    assert _bnb_int8(model.vision_model, bnb)
    decoder = [m for m in model.text_decoder.modules() if isinstance(m, nn.Linear)]
    assert decoder and not any(isinstance(m, bnb.nn.Linear8bitLt) for m in decoder)
    assert dtypes(model) == paper_dtypes(hf_blip(), skipped=("text_decoder",))  # the decoder float16
    with torch.no_grad():
        ids = model.generate(pixel_values=images(2).to(device).half(), num_beams=3, max_length=8, min_length=2)
    assert ids.shape[0] == 2


def _llm_int8_rows(weight):
    """LLM.int8's vector-wise weight quantization (Dettmers et al. 2022): each row scaled by 127 over
    its largest |value| and rounded; the row maxima kept as the scales."""
    w = weight.to(torch.float16).float()
    absmax = w.abs().amax(1)
    return torch.round(w * (127.0 / absmax[:, None])).to(torch.int8), absmax


@pytest.mark.parametrize("name", ["timm.token", "hf_clip.vision"])
@pytest.mark.parametrize("path", ["vwt.quantize", "paper"])
def test_llm_int8_runs_on_the_cpu_with_int8_weights_close_to_float16(name, path, bnb):
    build, entry = ENTRIES[name]
    model, half, x = build(), build().half(), images(3).half()
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    skipped = ("head",) if (name, path) == ("timm.token", "paper") else ()  # accelerate skips a timm model's last child
    expected = paper_dtypes(model, skipped)
    if path == "paper":
        quantize_whole_model(model)
    else:
        vwt.quantize(model, backend="bitsandbytes")
    assert dtypes(model) == expected
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(int8) == len(floats) - len(skipped) and not set(skipped) & set(int8)
    for n, m in int8.items():  # the weights are LLM.int8's rows and scales of the float16 weights
        rows, absmax = _llm_int8_rows(floats[n])
        assert torch.equal(m.weight.data, rows) and torch.allclose(m.weight.SCB, absmax)
    with torch.no_grad():
        ref, out = entry(half, x), entry(model, x)
        vwt.patch(model, vwt.ToMe(0))  # a reducer that reduces nothing
        reduced = entry(model, x)
    assert (vwt.stats(model)["tokens_per_layer"] == NUM_PATCHES + 1).all()
    scale = ref.float().abs().max()
    assert (out.float() - ref.float()).abs().max() <= TOL * scale
    assert (reduced.float() - out.float()).abs().max() <= TOL * scale
    assert (reduced.float() - ref.float()).abs().max() <= TOL * scale


def test_the_cpu_check_runs_llm_int8_and_names_what_fails(bnb, monkeypatch):
    from packaging.version import Version

    from vwt.quant import cpu_int8_unsupported

    if Version(bnb.__version__) >= Version("0.50"):
        assert cpu_int8_unsupported() is None

    def no_kernel(self, x):
        raise NotImplementedError("no CPU kernel for int8_linear_matmul\nsecond line")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", no_kernel)
    assert cpu_int8_unsupported.__wrapped__() == "NotImplementedError: no CPU kernel for int8_linear_matmul"


def test_bitsandbytes_without_llm_int8_on_the_cpu_is_one_clear_line(bnb, monkeypatch):
    from vwt import cli

    monkeypatch.setattr(vwt.quant, "cpu_int8_unsupported", lambda: "NotImplementedError: no kernel")
    with pytest.raises(RuntimeError, match="cannot run LLM.int8 on a CPU") as e:
        vwt.quantize(timm_vit(), backend="bitsandbytes")
    assert "\n" not in str(e.value) and "NotImplementedError: no kernel" in str(e.value)
    assert "backend='torchao'" in str(e.value)
    with pytest.raises(cli.UserError, match="cannot run LLM.int8 on a CPU") as e:
        cli.quantize(hf_clip(), "paper", "hf_clip")
    assert "\n" not in str(e.value) and "--protocol standard" in str(e.value)


def test_the_stand_in_is_accelerates_alone_and_only_while_it_quantizes(bnb, monkeypatch):
    import accelerate.utils.bnb as accelerate_bnb

    seen = []
    real = accelerate_bnb.load_and_quantize_model

    def spy(model, config):
        seen.append((accelerate_bnb.torch.cuda.is_available(), accelerate_bnb.torch.cuda.current_device(),
                     torch.cuda.is_available(), accelerate_bnb.torch.float16))
        return real(model, config)

    monkeypatch.setattr("accelerate.utils.load_and_quantize_model", spy)
    quantize_whole_model(timm_vit())
    assert seen == [(True, "cpu", torch.cuda.is_available(), torch.float16)]
    assert accelerate_bnb.torch is torch

    def fails(model, config):
        raise RuntimeError("No GPU or Intel XPU found. A GPU or Intel XPU is needed for quantization.")

    monkeypatch.setattr("accelerate.utils.load_and_quantize_model", fails)
    with pytest.raises(RuntimeError, match="No GPU"):
        quantize_whole_model(timm_vit())
    assert accelerate_bnb.torch is torch


def test_paper_int8_runs_clip_py_on_a_cpu(tmp_path, bnb):
    import clip as clip_script
    import fixtures
    from vwt import cli

    root = tmp_path / "data"
    fixtures.write_waterbirds(root)
    loaded = cli.Loaded(hf_clip(), "hf_clip", "tiny", False, fixtures.char_clip_tokenizer(tmp_path / "tok"))
    res = clip_script.main(["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path), "--workers", "0",
                            "--device", "cpu", "--quant", "--protocol", "paper", "--seeds", "1"], loaded)
    assert res["method"] == "int8" and res["protocol"] == "paper" and res["images"] == 8
    assert 0 <= res["metrics"]["avg"]["mean"] <= 1
    assert _bnb_int8(loaded.model.text_model, bnb) and _bnb_int8(loaded.model.vision_model, bnb)  # text features too
    assert {p.dtype for p in loaded.model.parameters()} == {torch.int8, torch.float16}


def test_paper_int8_that_cannot_run_on_a_cpu_is_one_clear_line(tmp_path, capsys, monkeypatch, bnb):
    import clip as clip_script
    import fixtures
    from vwt import cli

    monkeypatch.setattr(vwt.quant, "cpu_int8_unsupported", lambda: "NotImplementedError: no kernel")
    root = tmp_path / "data"
    fixtures.write_waterbirds(root)
    loaded = cli.Loaded(hf_clip(), "hf_clip", "tiny", False, fixtures.char_clip_tokenizer(tmp_path / "tok"))
    argv = ["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path), "--workers", "0",
            "--device", "cpu", "--quant", "--protocol", "paper"]
    with pytest.raises(SystemExit) as e:
        cli.main(lambda: clip_script.main(argv, loaded))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "cannot run LLM.int8 on a CPU" in err[-1], err
    assert "--protocol standard" in err[-1]
    assert sum(line.startswith("error") for line in err) == 1 and not any("Traceback" in line for line in err)


def test_paper_int8_leaves_every_other_parameter_float16_whatever_accelerates_dtype_pass(bnb, monkeypatch):
    import accelerate.utils.bnb as accelerate_bnb

    real = accelerate_bnb.load_and_quantize_model

    def before_1_13(model, config):  # accelerate < 1.13 computed param.to(dtype) without keeping it (issue 22)
        model = real(model, config)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.float()
        return model

    monkeypatch.setattr("accelerate.utils.load_and_quantize_model", before_1_13)
    assert dtypes(quantize_whole_model(hf_clip())) == paper_dtypes(hf_clip(), skipped=())


def test_an_accelerate_that_leaves_float_weights_on_the_cpu_is_one_clear_line(bnb, monkeypatch):
    import accelerate.utils.bnb as accelerate_bnb

    monkeypatch.setattr("accelerate.utils.load_and_quantize_model",  # swaps the layers, never moves the model
                        lambda model, config: accelerate_bnb.replace_with_bnb_layers(model, config))
    with pytest.raises(RuntimeError, match="not int8") as e:
        quantize_whole_model(timm_vit())
    assert "\n" not in str(e.value)


def test_paper_int8_zero_shot_scores_are_computed_in_float16(tmp_path, bnb, monkeypatch):
    """The paper's clip.py with --quant: the int8 model's float16 text and image features, each
    normalised in float16, multiplied in float16, then widened to float32 (its utils/enc.py)."""
    import torch.nn.functional as F

    import clip as clip_script
    import fixtures
    from vwt import cli, zeroshot

    tok = fixtures.char_clip_tokenizer(tmp_path / "tok")
    loaded = cli.Loaded(quantize_whole_model(hf_clip()), "hf_clip", "tiny", False, tok)
    prompts, x = ["a photo of a bird", "a photo of a tree"], images(3)
    with torch.no_grad():
        enc = tok(prompts, padding=True, return_tensors="pt")
        t16 = _features(loaded.model.get_text_features(**enc))
        i16 = _features(loaded.model.get_image_features(pixel_values=x.half()))
        assert t16.dtype == i16.dtype == torch.float16
        expected = (F.normalize(i16, dim=-1) @ F.normalize(t16, dim=-1).T).float()
        text = zeroshot.text_features(loaded, prompts, "cpu", model_dtype=True)
        got = zeroshot.image_scores(loaded, x.half(), text)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # clip.py: float16 scores under paper, float32 under standard
    root = tmp_path / "data"
    fixtures.write_waterbirds(root)
    seen, real = [], zeroshot.image_scores
    monkeypatch.setattr(zeroshot, "image_scores", lambda *a: seen.append(real(*a)) or seen[-1])
    for protocol in ("paper", "standard"):
        seen.clear()
        clip_script.main(["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path), "--workers", "0",
                          "--device", "cpu", "--quant", "--protocol", protocol, "--seeds", "1"],
                         cli.Loaded(hf_clip(), "hf_clip", "tiny", False, tok))
        scores = torch.cat(seen)
        assert torch.equal(scores, scores.half().float()) == (protocol == "paper"), protocol
