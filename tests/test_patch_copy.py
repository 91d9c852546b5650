"""Copies and pickles of a patched model are patched models of their own weights.

``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of a model ``vwt.patch`` patched give a
model that runs its own (copied) modules through the block loop with the same reducers: its outputs
equal patching a copy of the unpatched model, a change to its weights changes it and not the original,
and ``vwt.unpatch`` on it restores it and leaves the original patched.
"""
import copy
import io
import pickle

import pytest
import torch

import vwt
from tiny import ENTRIES, NUM_PATCHES, PATCH, images, one_entry_per_family, tile
from vwt.encoder import pixel_patches
from vwt.patch import patch_info

# one entry per family, and BLIP's full model (its text decoder carries the pad-mask hook)
FAMILIES = one_entry_per_family() + ["hf_blip.forward"]


def _words():
    """A tiny pixel-space vocabulary: 6 patches of a random image."""
    return pixel_patches(images(1, seed=5), PATCH)[0, :6].clone()


def inputs(n=3):
    """n random images in which image i repeats word i % 6 of :func:`_words` in its first 2 + 3 i
    patches, so InterImage merges a different number of patches per image (a padded batch)."""
    patches = pixel_patches(images(n), PATCH)
    for i in range(n):
        patches[i, : 2 + 3 * i] = _words()[i % 6]
    return torch.stack([tile(patches[i], range(NUM_PATCHES)) for i in range(n)])


def lively(model):
    """``model`` with noise on every parameter: the tiny BLIP models are initialised with weights of
    about 1e-10 (BlipConfig's initializer_range), whose outputs hardly depend on their input."""
    _perturb(model, seed=3)
    return model


REDUCERS = {
    "intra": lambda: [vwt.IntraImage(drop=0.5)],
    "inter": lambda: [vwt.InterImage(_words(), thresh=0.1)],
    "tome": lambda: [vwt.ToMe(r=2)],
    "evit": lambda: [vwt.EViT(keep=0.7)],
    "lgtm": lambda: [vwt.LGTM(r=4, dense=1, local=1)],
    "inter+tome": lambda: [vwt.InterImage(_words(), thresh=0.1), vwt.ToMe(r=2)],
}


def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save,
}


def _run(entry, model, x):
    with torch.no_grad():
        return entry(model, x)


def _differs(a, b) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b)


def _perturb(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def _patched(base, reducers, state=None):
    """A patched copy of the unpatched ``base`` (with ``state`` loaded): the reference a copy must equal."""
    ref = copy.deepcopy(base)
    if state is not None:
        ref.load_state_dict(state)
    return vwt.patch(ref, *reducers())


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("method", sorted(REDUCERS))
@pytest.mark.parametrize("name", FAMILIES)
def test_a_copy_runs_its_own_weights_patched(name, method, how):
    build, entry = ENTRIES[name]
    base = lively(build())
    x = inputs()
    original = vwt.patch(copy.deepcopy(base), *REDUCERS[method]())
    before = _run(entry, original, x)  # a forward first: the copy also carries the last state
    copied = COPIES[how](original)
    assert torch.equal(_run(entry, copied, x), _run(entry, _patched(base, REDUCERS[method]), x))
    assert vwt.stats(copied)["tokens_per_layer"].shape[0] == 3
    if method.startswith("inter"):
        assert vwt.stats(copied)["execution"] != "dense"  # the images merged differently: padded or packed

    _perturb(copied)
    out = _run(entry, copied, x)
    assert _differs(out, before)
    assert torch.equal(out, _run(entry, _patched(base, REDUCERS[method], copied.state_dict()), x))
    assert torch.equal(_run(entry, original, x), before)  # the original runs its own weights still


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("name", FAMILIES)
def test_unpatching_a_copy_restores_the_copy_and_leaves_the_original_patched(name, how):
    build, entry = ENTRIES[name]
    base = lively(build())
    x = inputs()
    unpatched = _run(entry, base, x)
    original = vwt.patch(copy.deepcopy(base), vwt.ToMe(r=2))
    patched = _run(entry, original, x)
    assert _differs(patched, unpatched)
    copied = COPIES[how](original)
    vwt.unpatch(copied)
    assert patch_info(copied) is None
    assert all("forward" not in m.__dict__ and "forward_features" not in m.__dict__ for m in copied.modules())
    assert torch.equal(_run(entry, copied, x), unpatched)
    assert patch_info(original) is not None
    assert torch.equal(_run(entry, original, x), patched)
    vwt.unpatch(original)
    assert torch.equal(_run(entry, original, x), unpatched)


@pytest.mark.parametrize("name", FAMILIES)
def test_patching_a_copy_again_replaces_only_the_copys_reducers(name):
    build, entry = ENTRIES[name]
    base = lively(build())
    x = inputs()
    original = vwt.patch(copy.deepcopy(base), vwt.ToMe(r=2))
    patched = _run(entry, original, x)
    copied = vwt.patch(copy.deepcopy(original), vwt.IntraImage(drop=0.5))
    assert torch.equal(_run(entry, copied, x), _run(entry, _patched(base, REDUCERS["intra"]), x))
    assert torch.equal(_run(entry, original, x), patched)


def test_an_int8_patched_model_deep_copies_too():
    """int8 (torchao) and a reducer: the deep copy runs its own quantized layers patched. (A torchao
    int8 model does not pickle even unpatched, a limitation of torchao 0.18, so only deepcopy here.)"""
    pytest.importorskip("torchao")
    from vwt.quant import cpu_int8_unsupported

    if cpu_int8_unsupported():
        pytest.skip(cpu_int8_unsupported())
    build, entry = ENTRIES["timm.token"]
    base = vwt.quantize(build(), backend="torchao")
    x = inputs()
    original = vwt.patch(copy.deepcopy(base), vwt.ToMe(r=2))
    before = _run(entry, original, x)
    copied = copy.deepcopy(original)
    assert torch.equal(_run(entry, copied, x), _run(entry, _patched(base, REDUCERS["tome"]), x))
    with torch.no_grad():
        copied.norm.weight.add_(0.5)  # a float parameter of the copy (the linear weights are int8)
    assert _differs(_run(entry, copied, x), before)
    assert torch.equal(_run(entry, original, x), before)
    vwt.unpatch(copied)
    ref = copy.deepcopy(base)
    ref.load_state_dict(copied.state_dict())
    assert torch.equal(_run(entry, copied, x), _run(entry, ref, x))
    assert torch.equal(_run(entry, original, x), before)
