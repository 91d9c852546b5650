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


def _bucket_runs(script, argv, loaded, out_of):
    """``script``'s outputs with --bucket and with --no-bucket (each in its own folder)."""
    outs = {}
    for flag in ("--bucket", "--no-bucket"):
        out = out_of(flag)
        outs[flag] = script.main(argv + [flag, "--out", str(out)], loaded), out
    return outs


def test_clip_per_image_predictions_with_bucketing_equal_those_without(tmp_path, monkeypatch):
    import clip as clip_script
    import fixtures
    from test_token_stats import _setup
    import tiny

    monkeypatch.chdir(tmp_path)
    root = fixtures.write_waterbirds(tmp_path / "data")
    loaded = tiny.loaded(tiny.hf_clip, "tiny-clip", fixtures.char_clip_tokenizer(tmp_path / "tok"))
    _, inter, _, _ = _setup(loaded, "waterbirds", root, tmp_path)
    argv = ["--data", "waterbirds", "--data-root", str(root), "--protocol", "standard", "--workers", "0",
            "--device", "cpu", "--batch", "3"] + inter
    outs = _bucket_runs(clip_script, argv, loaded, lambda flag: tmp_path / flag)
    preds = {flag: sorted(out.rglob("*.predictions.csv"))[0].read_text() for flag, (_, out) in outs.items()}
    assert preds["--bucket"] == preds["--no-bucket"]
    metrics = {flag: res["metrics"] for flag, (res, _) in outs.items()}
    assert metrics["--bucket"] == metrics["--no-bucket"]


def test_blip_captions_with_bucketing_equal_those_without(tmp_path, monkeypatch):
    import json

    import blip as blip_script
    import fixtures
    from test_token_stats import _setup
    import tiny

    monkeypatch.chdir(tmp_path)
    root = fixtures.write_coco(tmp_path / "data")
    loaded = tiny.loaded(tiny.hf_blip, "tiny-blip", fixtures.word_bert_tokenizer(tmp_path / "tok"))
    _, inter, _, _ = _setup(loaded, "coco", root, tmp_path)
    argv = ["--data", "coco", "--data-root", str(root), "--no-score", "--workers", "0", "--device", "cpu",
            "--batch", "3", "--max-length", "8"] + inter
    outs = _bucket_runs(blip_script, argv, loaded, lambda flag: tmp_path / flag)
    captions = {}
    for flag, (_, out) in outs.items():
        (path,) = out.rglob("*.captions.jsonl")
        lines = [json.loads(l) for l in path.read_text().splitlines()[1:]]
        captions[flag] = {l["image_id"]: l["caption"] for l in lines}
    assert captions["--bucket"] == captions["--no-bucket"] and len(captions["--bucket"]) > 3


def test_batch_order_buckets_by_token_count_only_when_it_should(tmp_path):
    import argparse

    import tiny
    from vwt import cli

    words, x = _batch_of_different_lengths()
    x = torch.cat([x, x.flip(0)])  # lengths 2, 4, 11, 17, 17, 11, 4, 2
    loaded = tiny.loaded(tiny.hf_clip, "tiny-clip", None)
    data = [(img, {"image_id": i}) for i, img in enumerate(x)]
    order = lambda bucket, batch: [idx.tolist() for idx in cli.batch_order(  # noqa: E731
        argparse.Namespace(bucket=bucket, batch=batch, workers=0), loaded, data, "cpu", torch.float32)]
    in_order = [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert order(None, 3) == in_order  # no reducer: nothing to bucket
    vwt.patch(loaded.model, vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3))
    assert order(None, 3) == [[0, 7, 1], [6, 2, 5], [3, 4]]  # by tokens entering the first block
    assert order(False, 3) == in_order and order(None, 1) == [[i] for i in range(8)]
    vwt.patch(loaded.model, vwt.ToMe(r=2))
    assert order(True, 3) == in_order  # no input reducer: every image the same length


def _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None):
    """Variable-length attention written from its description: (T, H, d) tensors, sequence i at rows
    cu[i]:cu[i + 1], each attending to itself only, logits scaled by ``scale`` (default d ** -0.5)."""
    d = query.shape[-1]
    out = torch.empty_like(query)
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        logits = torch.einsum("qhd,khd->hqk", query[s:e].double(), key[s:e].double()) * (scale or d ** -0.5)
        out[s:e] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), value[s:e].double()).to(query.dtype)
        assert e - s <= max_q == max_k
    return out


def _without_scale(query, key, value, cu_q, cu_k, max_q, max_k):
    """PyTorch 2.10's signature: no ``scale`` (always d ** -0.5)."""
    return _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("kernel", [_reference_varlen, _without_scale])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_variable_length_kernel_path_equals_padded(name, kernel, monkeypatch):
    """The packed path's one-call variable-length attention (taken on CUDA in 16-bit without a bias)
    lays q, k, v and the offsets out as the kernel takes them: with a stand-in kernel written from its
    description, packed outputs equal the padded path's, with and without the ``scale`` argument."""
    from vwt import encoder

    calls = []
    monkeypatch.setattr(encoder, "varlen_kernel", lambda: kernel)
    monkeypatch.setattr(encoder, "uses_varlen", lambda q, bias: not calls.append(q.shape))
    build, entry = ENTRIES[name]
    model = build()
    words, x = _batch_of_different_lengths()
    inter = vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3)
    padded, _ = _outputs(model, entry, x, "off", inter)
    assert not calls
    packed, s_pack = _outputs(model, entry, x, "on", inter)
    assert s_pack["execution"] == "packed" and len(calls) == s_pack["tokens_per_layer"].shape[1] - 1
    assert (packed - padded).abs().max().item() < 1e-5


def test_only_cuda_16_bit_without_a_bias_takes_the_variable_length_kernel():
    from vwt import encoder

    q = torch.zeros(1, 2, 5, 4)
    assert not encoder.uses_varlen(q, None)                       # CPU
    assert not encoder.uses_varlen(q.half(), None)                # CPU, 16-bit
    if torch.cuda.is_available():
        assert not encoder.uses_varlen(q.cuda(), None)            # float32: FlashAttention takes 16-bit only
        assert not encoder.uses_varlen(q.cuda().half(), torch.zeros(1, 5, device="cuda", dtype=torch.half))
        assert encoder.uses_varlen(q.cuda().half(), None) == (encoder.varlen_kernel() is not None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_packed_equals_padded_on_cuda(name, dtype, tol):
    """On CUDA, packed (the variable-length kernel in 16-bit, per-image attention in float32) equals
    padded: float32 within 1e-4, float16 within 2e-2 (bfloat16 within 5e-2)."""
    build, entry = ENTRIES[name]
    model = build().cuda().to(dtype)
    words, x = _batch_of_different_lengths()
    inter = vwt.InterImage(vwt.Vocabulary(words), thresh=1e-3)
    padded, _ = _outputs(model, entry, x.cuda().to(dtype), "off", inter)
    packed, s_pack = _outputs(model, entry, x.cuda().to(dtype), "on", inter)
    assert s_pack["execution"] == "packed"
    assert (packed.float() - padded.float()).abs().max().item() < tol
