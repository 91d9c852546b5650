"""In ``train()`` mode a patched model applies the model's own dropout and drop-path.

Fine-tuning through ``vwt.patch`` keeps the model's regularisation: with nothing reduced, a patched
model in train mode equals the unpatched one under the same seed (the same random draws, in the same
order), and its output varies with the seed. Patch dropout, which drops input patches the token state
follows, is refused in one line. Eval mode is unchanged (deterministic, equal to the unpatched model).
"""
import pytest
import torch

import vwt
from test_patch_copy import _words, inputs, lively
from tiny import hf_blip_vision, hf_clip_vision, images, open_clip_model, timm_vit
from vwt.backends import family_of
from vwt.backends.hf_clip import vision_transformer

TOL = 1e-5
RATE = 0.2


def _hf_clip():
    model = hf_clip_vision()
    for layer in vision_transformer(model).encoder.layers:
        layer.self_attn.dropout = RATE  # CLIPAttention keeps config.attention_dropout as a float
    return model


def _hf_blip():
    model = lively(hf_blip_vision())
    for layer in model.encoder.layers:
        layer.self_attn.dropout.p = RATE
    return model


def _open_clip():
    model = open_clip_model()
    for blk in model.visual.transformer.resblocks:
        blk.attn.dropout = RATE  # nn.MultiheadAttention's dropout on the attention weights
    return model


def _timm():
    return timm_vit(attn_drop_rate=RATE, proj_drop_rate=RATE, drop_path_rate=RATE, pos_drop_rate=RATE,
                    drop_rate=RATE)


def _out(o):
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o


# family -> (model with dropout and drop-path where the family has them, output of the vision forward)
MODELS = {
    "hf_clip": (_hf_clip, lambda m, x: _out(m(pixel_values=x))),
    "hf_blip": (_hf_blip, lambda m, x: _out(m(pixel_values=x))),
    "open_clip": (_open_clip, lambda m, x: m.encode_image(x)),
    "timm": (_timm, lambda m, x: m(x)),
}


def _seeded(entry, model, x, seed):
    torch.manual_seed(seed)
    return entry(model, x)


def _grads(model, out):
    """The gradients of ``out.sum()`` on the vision tower's parameters, by name (None: no gradient)."""
    vision = family_of(model).vision(model)
    vision.zero_grad(set_to_none=True)
    out.sum().backward()
    return {n: p.grad for n, p in vision.named_parameters()}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_train_mode_applies_the_models_own_dropout(family):
    build, entry = MODELS[family]
    model = build().train()
    x = images(3)
    ref = [_seeded(entry, model, x, s) for s in (0, 1)]
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # the unpatched model's dropout acts
    ref_grads = _grads(model, ref[0])
    vwt.patch(model)
    out = [_seeded(entry, model, x, s) for s in (0, 1)]
    for a, b in zip(out, ref):
        assert (a - b).abs().max().item() < TOL
    grads = _grads(model, out[0])  # and it trains as the unpatched model does: the same gradients
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), name
        assert g is None or (g - ref_grads[name]).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("family", sorted(MODELS))
def test_eval_mode_is_deterministic_and_equals_the_unpatched_model(family):
    build, entry = MODELS[family]
    model = build().eval()
    x = images(3)
    with torch.no_grad():
        ref = _seeded(entry, model, x, 0)
        vwt.patch(model)
        out = [_seeded(entry, model, x, s) for s in (0, 1)]
    assert torch.equal(out[0], out[1])
    assert (out[0] - ref).abs().max().item() < TOL


@pytest.mark.parametrize("family", sorted(MODELS))
def test_reducers_train_with_dropout_and_a_padded_batch_never_packs(family):
    build, entry = MODELS[family]
    model = vwt.patch(build().train(), vwt.InterImage(_words(), thresh=0.1), packing="on")
    x = inputs()
    a, b, again = (_seeded(entry, model, x, s) for s in (0, 1, 0))
    assert vwt.stats(model)["execution"] == "padded"  # drop-path draws per image: never one packed sequence
    assert torch.equal(a, again) and not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        entry(model, x)
    assert vwt.stats(model)["execution"] == "packed"


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_patch_dropout_in_train_mode_is_refused_in_one_line(family):
    if family == "timm":
        model = timm_vit(patch_drop_rate=0.5)
    else:
        import open_clip

        from tiny import IMAGE, PATCH, WIDTH, HEADS

        model = open_clip.transformer.VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=2,
                                                        heads=HEADS, mlp_ratio=2.0, output_dim=32, patch_dropout=0.5)
    x = images(2)
    vwt.patch(model.eval())
    with torch.no_grad():
        model(x)  # eval: patch dropout does not act
        model.train()
        with pytest.raises(ValueError, match="does not run patch dropout") as err:
            model(x)
    assert "\n" not in str(err.value)
