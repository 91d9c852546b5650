"""Packed execution: a batch that an input reducer left padded runs its blocks on the real tokens only,
with the same outputs as the padded path (pads exact zeros, pooled outputs, BLIP's captions)."""
import pytest
import torch

import vwt
from test_tokenizer import _batch_of_different_lengths, tokens_in
from tiny import ENTRIES, NUM_PATCHES, hf_blip, timm_vit


def _outputs(model, entry, x, packing, *reducers):
    vwt.patch(model, *reducers, packing=packing)
    with torch.no_grad():
        out = entry(model, x)
    return out, vwt.stats(model)


@pytest.mark.parametrize("name", sorted(ENTRIES))
@pytest.mark.parametrize("prop_attn", [False, True])
def test_packed_equals_padded_for_inter_image(name, prop_attn):
    build, entry = ENTRIES[name]
    model = build()
    words, x = _batch_of_different_lengths()
    inter = vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3, prop_attn=prop_attn)
    padded, s_pad = _outputs(model, entry, x, "off", inter)
    packed, s_pack = _outputs(model, entry, x, "auto", inter)
    assert (s_pad["execution"], s_pack["execution"]) == ("padded", "packed")
    assert tokens_in(model).tolist() == [2, 4, 1 + 2 + 8, 1 + NUM_PATCHES]
    assert torch.equal(s_pad["tokens_per_layer"], s_pack["tokens_per_layer"])
    assert packed.shape == padded.shape
    assert (packed - padded).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_intra_image_has_nothing_to_pack(name):
    build, entry = ENTRIES[name]
    model = build()
    _, x = _batch_of_different_lengths()
    off, s_off = _outputs(model, entry, x, "off", vwt.IntraImage(drop=0.5))
    auto, s_auto = _outputs(model, entry, x, "auto", vwt.IntraImage(drop=0.5))
    assert s_off["execution"] == s_auto["execution"] == "dense"
    assert torch.equal(off, auto)


def test_pads_are_exact_zeros_in_the_packed_sequence_output():
    build, _ = ENTRIES["hf_clip.vision"]
    model = build()
    words, x = _batch_of_different_lengths()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3))
    with torch.no_grad():
        last = model(pixel_values=x).last_hidden_state
    real = vwt.stats(model)["size"] > 0
    assert vwt.stats(model)["execution"] == "packed"
    assert (last[~real] == 0).all() and (last[real].abs().sum(-1) > 0).all()


def test_blip_captions_packed_equal_padded():
    model = hf_blip()
    words, x = _batch_of_different_lengths()
    kw = dict(num_beams=3, max_length=10, min_length=5)
    captions = {}
    for packing in ("off", "on"):
        vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3), packing=packing)
        with torch.no_grad():
            captions[packing] = model.generate(pixel_values=x, **kw)
        assert vwt.stats(model)["execution"] == ("padded" if packing == "off" else "packed")
    assert torch.equal(captions["off"], captions["on"])


@pytest.mark.parametrize("second", [vwt.ToMe(r=2), vwt.EViT(keep=0.7), vwt.LGTM(r=2)])
def test_in_network_reducer_after_inter_image_stays_padded(second):
    model = timm_vit()
    words, x = _batch_of_different_lengths()
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3), second)
    with torch.no_grad():
        model(x)
    assert vwt.stats(model)["execution"] == "padded"


def test_unknown_packing_is_refused():
    with pytest.raises(ValueError, match="packing"):
        vwt.patch(timm_vit(), packing="sometimes")


def test_buckets_cover_every_image_once_and_group_neighbours_in_length():
    counts = torch.tensor([5, 1, 9, 1, 7, 3, 5])
    batches = vwt.buckets(counts, 3)
    assert [b.tolist() for b in batches] == [[1, 3, 5], [0, 6, 4], [2]]  # ties keep data-set order
    assert sorted(torch.cat(batches).tolist()) == list(range(7))
    with pytest.raises(ValueError, match="batch"):
        vwt.buckets(counts, 0)


def test_per_image_results_with_bucketing_equal_those_without():
    build, entry = ENTRIES["hf_clip.image_features"]
    model = build()
    words, x = _batch_of_different_lengths()
    x = torch.cat([x, x.flip(0)])  # 8 images, lengths 2, 4, 11, 17, 17, 11, 4, 2
    vwt.patch(model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3))
    with torch.no_grad():
        plain = torch.cat([entry(model, x[i:i + 3]) for i in range(0, 8, 3)])
        entry(model, x)
        counts = tokens_in(model)
        by_image = torch.empty_like(plain)
        for idx in vwt.buckets(counts, 3):
            by_image[idx] = entry(model, x[idx])
    assert (by_image - plain).abs().max().item() < 1e-4
