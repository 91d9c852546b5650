"""blip.py end to end on the COCO and NoCaps fixtures with the tiny random BLIP (through the test-only
``loaded`` hook) and a BERT tokenizer built offline: captions equal direct beam search, scores equal
vwt.metrics on the captions file, every method runs, stopped runs resume without redoing images,
and bad input is one line. METEOR (Java) starts once for the whole session (fixtures.meteor_once)."""
import json

import pytest
import torch

import blip as blip_script
import fixtures
import tiny
import vwt
from fixtures import meteor_once, use_meteor  # noqa: F401 (fixtures)
from vwt import captioning, cli
from vwt import datasets as D
from vwt import metrics as M
from vwt.patch import patch_info
from vwt.spec import RunSpec



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    fixtures.write_coco(r)
    fixtures.write_nocaps(r)
    return r


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fixtures.word_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def blip(tok):
    return cli.Loaded(tiny.hf_blip(), "hf_blip", "tiny-blip", False, tok)


def run(root, out, argv, loaded):
    batch = [] if "--batch" in argv else ["--batch", "2"]
    return blip_script.main(argv + batch + ["--data-root", str(root), "--out", str(out), "--workers", "0",
                                            "--device", "cpu"], loaded)


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def captions_file(out, stem):
    """The one captions file of a run: <stem>__<hash of its configuration>.captions.jsonl."""
    [path] = (out / "blip").glob(f"{stem}__????????.captions.jsonl")
    return path


def count_images(monkeypatch, loaded, stop_after=None):
    """Count the images the model captions; optionally stop the run (KeyboardInterrupt) after some."""
    seen = []
    generate = loaded.model.generate

    def counted(pixel_values=None, **kw):
        if stop_after is not None and len(seen) >= stop_after:
            raise KeyboardInterrupt
        seen.extend([1] * len(pixel_values))
        return generate(pixel_values=pixel_values, **kw)

    monkeypatch.setattr(loaded.model, "generate", counted)
    return seen


@pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap needs Java")
def test_coco_captions_equal_direct_beam_search_and_scores_equal_metrics(root, tmp_path, tok, monkeypatch, meteor_once):
    use_meteor(monkeypatch, meteor_once)
    loaded = blip(tok)
    res = run(root, tmp_path, ["--data", "coco"], loaded)
    got = lines(captions_file(tmp_path, "coco__tiny-blip__base"))
    assert got[0]["config"]["beams"] == 3 and got[0]["config"]["max_length"] == 20 and got[0]["config"]["min_length"] == 5
    assert got[0]["config"]["prompt"] == "" and got[0]["config"]["protocol"] == "paper"
    ds = D.load("coco", root, D.preprocess_for(loaded.model))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():  # the paper's decoding: no text prompt, from BOS
        ids = loaded.model.generate(pixel_values=x, num_beams=3, max_length=20, min_length=5)
    direct = [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    assert [l["image_id"] for l in got[1:]] == [42, 73, 74, 133]
    assert [l["caption"] for l in got[1:]] == direct
    assert all(l["tokens_first_block"] == 17 for l in got[1:])
    expected = M.caption_scores({r["image_id"]: r["captions"] for r in ds.records},
                                {l["image_id"]: l["caption"] for l in got[1:]})
    assert res["metrics"] == expected
    assert res["metrics"]["SPICE"] is None and res["summary"]["SPICE"] is None
    assert res["metrics"]["SPICE_note"].startswith("SPICE unavailable")
    assert res["summary"]["CIDEr"] == 100 * expected["CIDEr"] and res["summary"]["tokens"] == 17
    [saved] = [json.loads(f.read_text()) for f in (tmp_path / "blip").glob("coco__tiny-blip__base__????????.json")]
    assert saved["metrics"] == expected and "versions" in saved["environment"] and saved["protocol"] == "paper"


def test_standard_protocol_starts_from_the_prompt_and_cuts_it(root, tmp_path, tok):
    loaded = blip(tok)
    run(root, tmp_path, ["--data", "coco", "--no-score", "--protocol", "standard"], loaded)
    got = lines(captions_file(tmp_path, "coco__tiny-blip__base"))
    assert got[0]["config"]["prompt"] == "a picture of " and got[0]["config"]["protocol"] == "standard"
    ds = D.load("coco", root, D.preprocess_for(loaded.model))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    prompt = tok("a picture of ", return_tensors="pt").input_ids.expand(len(x), -1).clone()
    with torch.no_grad():
        ids = loaded.model.generate(pixel_values=x, input_ids=prompt, num_beams=3, max_length=20, min_length=5)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert all(t.startswith("a picture of") for t in texts)
    assert [l["caption"] for l in got[1:]] == [t[len("a picture of"):].strip() for t in texts]


def long_blip(tok):
    """The tiny BLIP with room for 40-token captions."""
    from transformers import BlipForConditionalGeneration

    cfg = tiny.blip_config()
    cfg.text_config.max_position_embeddings = 48
    torch.manual_seed(0)
    return cli.Loaded(BlipForConditionalGeneration(cfg).eval(), "hf_blip", "tiny-blip", False, tok)


def generate_calls(monkeypatch, loaded):
    """The keyword arguments of every call of the model's generate."""
    calls = []
    generate = loaded.model.generate

    def recorded(*args, **kw):
        calls.append(dict(kw, positional=len(args)))
        return generate(*args, **kw)

    monkeypatch.setattr(loaded.model, "generate", recorded)
    return calls


@pytest.mark.parametrize("flags, max_length, penalty", [([], 20, 1.0), (["--penalty", "1.2"], 40, 1.2),
                                                        (["--penalty", "1.2", "--max-length", "30"], 30, 1.2)])
def test_paper_protocol_decodes_from_bos_with_the_papers_lengths(root, tmp_path, tok, monkeypatch, flags, max_length,
                                                                 penalty):
    loaded = long_blip(tok)
    calls = generate_calls(monkeypatch, loaded)
    run(root, tmp_path, ["--data", "coco", "--no-score", "--protocol", "paper"] + flags, loaded)
    assert len(calls) == 2  # 4 images, batch 2
    for kw in calls:
        assert "input_ids" not in kw and kw["positional"] == 0 and kw["pixel_values"].shape[0] == 2
        assert (kw["num_beams"], kw["min_length"], kw["max_length"]) == (3, 5, max_length)
        assert kw["length_penalty"] == penalty and kw["do_sample"] is False
    header = lines(next((tmp_path / "blip").glob("*.captions.jsonl")))[0]["config"]
    assert header["max_length"] == max_length and header["penalty"] == penalty and header["prompt"] == ""


def test_paper_protocol_tome_is_the_papers_tome(root, tmp_path, tok, monkeypatch):
    loaded = blip(tok)
    seen = []
    generate = loaded.model.generate

    def spy(**kw):
        seen.append(patch_info(loaded.model).reducers)
        return generate(**kw)

    monkeypatch.setattr(loaded.model, "generate", spy)
    run(root, tmp_path / "p", ["--data", "coco", "--no-score", "--tome", "2"], loaded)
    run(root, tmp_path / "s", ["--data", "coco", "--no-score", "--tome", "2", "--protocol", "standard"], loaded)
    (paper,), (standard,) = seen[0], seen[-1]
    assert (paper.r, paper.sizes, paper.prop_attn) == (2, "per-block", False)  # BLIP: no proportional attention
    assert (standard.r, standard.sizes, standard.prop_attn) == (2, "cumulative", True)


def test_paper_int8_captions_on_a_cpu(root, tmp_path, tok):
    bnb = pytest.importorskip("bitsandbytes")
    loaded = blip(tok)
    run(root, tmp_path, ["--data", "coco", "--no-score", "--limit", "2", "--quant", "--protocol", "paper"], loaded)
    got = lines(captions_file(tmp_path, "coco__tiny-blip__int8"))
    assert len(got) == 3 and all(isinstance(l["caption"], str) for l in got[1:])
    vision = [m for m in loaded.model.vision_model.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in vision)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in loaded.model.text_decoder.modules())


@pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap needs Java")
def test_nocaps_scores_each_domain_and_the_summary_gathers_runs(root, tmp_path, tok, monkeypatch, meteor_once, capsys):
    use_meteor(monkeypatch, meteor_once)
    loaded = blip(tok)
    res = run(root, tmp_path, ["--data", "nocaps", "--prompt", ""], loaded)
    got = {l["image_id"]: l["caption"] for l in lines(captions_file(tmp_path, "nocaps__tiny-blip__base"))[1:]}
    ds = D.load("nocaps", root, None)
    for r in ds.records:
        alone = M.caption_scores({r["image_id"]: r["captions"]}, {r["image_id"]: got[r["image_id"]]}, which=("CIDEr",))
        assert res["domains"][r["domain"]] == alone  # one image per domain in the fixture
    assert res["summary"]["CIDEr out-domain"] == 100 * res["domains"]["out-domain"]["CIDEr"]
    capsys.readouterr()
    blip_script.main(["--summary", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| model | method | nocaps BLEU-4 | nocaps METEOR | nocaps ROUGE-L | nocaps CIDEr | nocaps SPICE |" in table
    assert table.splitlines()[2].startswith("| tiny-blip | base | ") and " n/a |" in table.splitlines()[2]


@pytest.mark.parametrize("flags, first", [([], 17), (["--top_k", "0.5"], 9), (["--vocab-path", "{vocab}", "--thresh", "2"], 2),
                                          (["--tome", "2"], 17), (["--quant", "--protocol", "standard"], 17)])
def test_methods_caption_every_image(root, tmp_path, tok, flags, first):
    vocab = vwt.Vocabulary(torch.randn(1, 192), space="pixel", patch_size=8).save(tmp_path / "v1")
    flags = [f.format(vocab=vocab) for f in flags]
    loaded = blip(tok)
    assert run(root, tmp_path, ["--data", "coco", "--no-score"] + flags, loaded) is None
    method = cli.method_name(blip_script.parse_args(flags))
    got = lines(captions_file(tmp_path, f"coco__tiny-blip__{method}"))
    assert got[0]["config"]["method"] == method and len(got) == 5
    assert all(isinstance(l["caption"], str) for l in got[1:])
    assert [l["tokens_first_block"] for l in got[1:]] == [first] * 4
    if "--tome" in flags:
        assert all(l["tokens_mean"] < 17 for l in got[1:])
    assert patch_info(loaded.model) is None  # left unpatched


def test_a_limited_then_whole_run_captions_each_image_once(root, tmp_path, tok, monkeypatch):
    loaded = blip(tok)
    seen = count_images(monkeypatch, loaded)
    run(root, tmp_path, ["--data", "coco", "--no-score", "--limit", "2"], loaded)
    assert len(seen) == 2
    path = captions_file(tmp_path, "coco__tiny-blip__base")
    first = lines(path)
    run(root, tmp_path, ["--data", "coco", "--no-score"], loaded)
    assert len(seen) == 2 + 2
    run(root, tmp_path, ["--data", "coco", "--no-score"], loaded)
    assert len(seen) == 4  # nothing left to do
    assert lines(path)[:3] == first and [l["image_id"] for l in lines(path)[1:]] == [42, 73, 74, 133]


def test_an_interrupted_run_resumes_where_it_stopped(root, tmp_path, tok, monkeypatch):
    loaded = blip(tok)
    seen = count_images(monkeypatch, loaded, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(root, tmp_path, ["--data", "coco", "--no-score", "--batch", "1"], loaded)
    path = captions_file(tmp_path, "coco__tiny-blip__base")
    assert [l["image_id"] for l in lines(path)[1:]] == [42, 73, 74]
    # a torn last line (killed mid-write): that image is captioned again, the others are not
    text = path.read_text()
    path.write_text(text[: text.rindex('"caption"')])
    monkeypatch.undo()
    seen = count_images(monkeypatch, loaded)
    run(root, tmp_path, ["--data", "coco", "--no-score", "--batch", "1"], loaded)
    assert len(seen) == 2
    ids = [l["image_id"] for l in (json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")) if "image_id" in l]
    assert sorted(ids) == [42, 73, 74, 133]


def test_run_from_python_without_a_command_line(root, tmp_path, tok, monkeypatch):
    """vwt.captioning.run takes a RunSpec built in Python: its captions file is the command line's (same
    name, same header), so blip.py resumes it without captioning an image again."""
    spec = RunSpec(data="coco", root=root, out=tmp_path, batch=2, device="cpu",
                   options=captioning.Decoding(no_score=True))
    settled = captioning.caption_settings(spec)
    assert (settled.options.prompt, settled.options.max_length) == ("", 20)
    assert spec.options.prompt is None and spec.options.max_length is None  # a new spec, the given one untouched
    standard = captioning.caption_settings(spec.replace(protocol="standard", penalty=1.2))
    assert (standard.options.prompt, standard.options.max_length) == ("a picture of ", 40)
    loaded = blip(tok)
    seen = count_images(monkeypatch, loaded)
    assert captioning.run(spec, loaded) is None and len(seen) == 4
    path = captions_file(tmp_path, "coco__tiny-blip__base")
    run(root, tmp_path, ["--data", "coco", "--no-score"], loaded)
    assert len(seen) == 4 and captions_file(tmp_path, "coco__tiny-blip__base") == path
    header = lines(path)[0]["config"]
    cmd = captioning.caption_settings(cli.spec_from_args(blip_script.parse_args(["--data", "coco", "--data-root", str(root)]),
                                                         captioning.Decoding))
    assert header == {**captioning.run_config(cmd, "tiny-blip"), "data_root": str(root.resolve())}


def _error(capsys, argv, loaded=None):
    return fixtures.one_line_error(capsys, lambda: blip_script.main(argv, loaded))


def test_another_configuration_is_refused_not_mixed(root, tmp_path, tok, capsys):
    base = ["--data-root", str(root), "--out", str(tmp_path), "--workers", "0", "--no-score", "--limit", "1"]
    blip_script.main(base + ["--beams", "2"], blip(tok))
    two = captions_file(tmp_path, "coco__tiny-blip__base")
    kept = two.read_bytes()
    blip_script.main(base + ["--beams", "1"], blip(tok))  # another configuration: its own file
    [one] = [p for p in (tmp_path / "blip").glob("*.captions.jsonl") if p != two]
    assert lines(one)[0]["config"]["beams"] == 1 and two.read_bytes() == kept
    blip_script.main(base + ["--beams", "1", "--restart"], blip(tok))  # removes only its own captions
    assert lines(one)[0]["config"]["beams"] == 1 and two.read_bytes() == kept
    one.write_bytes(kept)  # a file whose header is not its configuration's: refused, never mixed
    capsys.readouterr()
    err = _error(capsys, base + ["--beams", "1"], blip(tok))
    assert "another configuration (differs in beams)" in err and f"mv {one}" in err
    err = _error(capsys, base + ["--beams", "1", "--restart"], blip(tok))
    assert "left alone" in err and one.read_bytes() == kept


def test_bad_input_is_one_line(root, tmp_path, tok, capsys, monkeypatch):
    base = ["--out", str(tmp_path), "--workers", "0"]
    err = _error(capsys, base + ["--data-root", str(tmp_path / "none")], blip(tok))
    assert str(tmp_path / "none" / "coco" / "annotations" / "coco_karpathy_test.json") in err and "expected layout" in err
    err = _error(capsys, base + ["--data", "nocaps", "--data-root", str(tmp_path / "none")], blip(tok))
    assert "nocaps_val_4500_captions.json not found" in err
    bad = tmp_path / "broken"
    fixtures.write_coco(bad)
    image = D.load("coco", bad, None).records[1]["path"]
    open(image, "wb").write(b"\x89PNG broken")
    err = _error(capsys, base + ["--data-root", str(bad), "--no-score"], blip(tok))
    assert f"cannot read image {image}" in err
    err = _error(capsys, base + ["--data-root", str(root)], cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-clip", False, tok))
    assert "Hugging Face BLIP" in err
    monkeypatch.setattr(captioning, "load_model", lambda name, device, dtype: blip(tok))  # the loader vwt.captioning.run calls
    err = _error(capsys, base + ["--data-root", str(root)])
    assert "no pretrained weights" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        blip_script.parse_args(["--help"])
    out = capsys.readouterr().out
    for opt in ("--beams", "--max-length", "--min-length", "--prompt", "--restart", "--no-score", "--summary", "--quant"):
        assert opt in out
