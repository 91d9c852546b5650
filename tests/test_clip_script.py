"""clip.py end to end on the fixtures with tiny random models (through the test-only ``loaded`` hook)
and tokenizers built offline: metrics equal a direct computation, every method runs, seeds work, bad
input is one line, and the summary gathers the runs."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip as clip_script
import fixtures
import tiny
import vwt
from vwt import cli
from vwt import datasets as D
from vwt.patch import patch_info



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    for write in (fixtures.write_waterbirds, fixtures.write_celeba, fixtures.write_metashift,
                  fixtures.write_openimages, fixtures.write_imagenet):
        write(r)
    return r


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fixtures.char_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def hf(tok):
    from transformers import CLIPModel

    cfg = tiny.hf_clip_config()
    cfg.text_config.eos_token_id = tok.eos_token_id  # pool the text at this tokenizer's end-of-text token
    torch.manual_seed(0)
    return cli.Loaded(CLIPModel(cfg).eval(), "hf_clip", "tiny-hf-clip", False, tok)


def oc(tok):
    return cli.Loaded(tiny.open_clip_model(), "open_clip", "tiny-open-clip", False, fixtures.open_clip_tokenizer(tok))


def run(root, out, argv, loaded):
    batch = [] if "--batch" in argv else ["--batch", "8"]
    return clip_script.main(argv + batch + ["--data-root", str(root), "--out", str(out), "--workers", "0",
                                            "--device", "cpu"], loaded)


def pixels_of(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_waterbirds_metrics_equal_a_direct_zero_shot(root, tmp_path, tok):
    loaded = hf(tok)
    res = run(root, tmp_path, ["--data", "waterbirds", "--batch", "3", "--protocol", "standard"], loaded)
    model = loaded.model
    ds = D.load("waterbirds", root, D.preprocess_for(model))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels_of(ds)).pooler_output
        enc = tok(["a photo of a landbird", "a photo of a waterbird"], padding=True, truncation=True, return_tensors="pt")
        txt = model.get_text_features(**enc).pooler_output
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    pred = cos.argmax(1).numpy()
    label = np.array([r["label"] for r in ds.records])
    group = np.array([2 * r["label"] + r["place"] for r in ds.records])
    ce = F.cross_entropy(cos.double(), torch.from_numpy(label), reduction="none").numpy()  # the paper's loss lines
    assert res["metrics"]["loss"]["mean"] == pytest.approx(ce.mean(), abs=1e-6)
    assert res["metrics"]["group_loss"]["waterbird on land"]["mean"] == pytest.approx(ce[group == 2].mean(), abs=1e-6)
    per_group = [float((pred[group == g] == label[group == g]).mean()) for g in range(4)]
    m = res["metrics"]
    assert [m["groups"][n]["mean"] for n in ds.group_names] == per_group
    assert m["avg"]["mean"] == float((pred == label).mean()) and m["worst"]["mean"] == min(per_group)
    assert m["worst_class"]["mean"] == min(float((pred[label == c] == c).mean()) for c in (0, 1))
    assert res["seeds"] == [0] and res["deterministic"] and m["avg"]["std"] == 0.0
    assert m["tokens_first_block"]["mean"] == 17 == m["tokens_mean"]["mean"]
    [path] = (tmp_path / "clip").glob("waterbirds__tiny-hf-clip__base__standard__????????.json")
    saved = json.loads(path.read_text())
    assert saved["protocol"] == "standard" and saved["labels"] == ["landbird", "waterbird"]
    rows = path.with_name(path.stem + ".seed0.predictions.csv").read_text().splitlines()
    assert rows[0] == "image_id,Prediction,Label,Group"
    assert rows[1:] == [f"{r['image_id']},{p},{l},{g}" for r, p, l, g in zip(ds.records, pred, label, group)]
    assert saved["summary"]["avg"] == [100 * m["avg"]["mean"], 0.0] and saved["pretrained"] is False
    assert "torch" in saved["environment"]["versions"] and saved["model"] == "tiny-hf-clip"
    assert saved["config"]["batch"] == 3 and saved["images"] == 8


def _transform(protocol, data, model):
    own = D.preprocess_for(model)
    return own if protocol == "standard" else D.transform_for(data, "paper", own.size, own.mean, own.std)


@pytest.mark.parametrize("protocol", ["paper", "standard"])
def test_openimages_map_equals_sklearn_on_direct_scores(root, tmp_path, tok, protocol):
    from sklearn.metrics import average_precision_score

    loaded = oc(tok)
    res = run(root, tmp_path, ["--data", "openimages-common", "--batch", "2", "--protocol", protocol], loaded)
    assert res["seeds"] == [0] and res["protocol"] == protocol
    ds = D.load("openimages-common", root, _transform(protocol, "openimages-common", loaded.model))
    with torch.no_grad():
        img = loaded.model.encode_image(pixels_of(ds))
        txt = loaded.model.encode_text(loaded.tokenizer([f"a photo of a {t}" for t in ds.classes]))
    scores = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).numpy()
    targets = np.zeros_like(scores)
    for i, r in enumerate(ds.records):
        targets[i, r["labels"]] = 1
    aps = [average_precision_score(targets[:, t], scores[:, t]) for t in range(len(ds.classes)) if targets[:, t].any()]
    assert res["metrics"]["mAP"]["mean"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
    assert res["metrics"]["tags_with_positives"]["mean"] == len(aps) == 5


@pytest.mark.parametrize("protocol", ["paper", "standard"])
def test_imagenet_top1_of_a_timm_classifier(root, tmp_path, protocol):
    loaded = cli.Loaded(tiny.timm_vit(num_classes=3), "timm", "tiny-timm", False)
    res = run(root, tmp_path, ["--data", "imgnet", "--protocol", protocol], loaded)
    ds = D.load("imgnet", root, _transform(protocol, "imgnet", loaded.model))
    with torch.no_grad():
        pred = loaded.model(pixels_of(ds)).argmax(1)
    assert res["metrics"]["top1"]["mean"] == (pred.numpy() == np.array([0, 0, 1, 1, 2, 2])).mean()


@pytest.mark.parametrize("data, names", [("celeba", ["not blond, female", "not blond, male", "blond, female", "blond, male"]),
                                         ("meta", ["cat indoor", "cat outdoor", "dog indoor", "dog outdoor"])])
def test_celeba_and_metashift_report_every_group(root, tmp_path, tok, data, names):
    res = run(root, tmp_path, ["--data", data, "--protocol", "standard"], oc(tok))
    assert list(res["metrics"]["groups"]) == names and res["images"] == 8
    assert res["labels"] == D.load(data, root, None, protocol="standard").classes


def _vocab(directory, words: int):
    """A random pixel vocabulary (P = 8). With --thresh 2 every patch matches its nearest word, so an
    image keeps at most 1 + words tokens, and exactly 2 with one word."""
    w = torch.randn(words, 192, generator=torch.Generator().manual_seed(words))
    return vwt.Vocabulary(w, space="pixel", patch_size=8).save(directory)


@pytest.mark.parametrize("flags, label", [(["--top_k", "0.5"], "intra"), (["--vocab-path", "{vocab}", "--thresh", "2"], "inter"),
                                          (["--tome", "2"], "tome"), (["--quant", "--protocol", "standard"], "int8")])
def test_methods_run_and_reduce_tokens(root, tmp_path, tok, flags, label):
    vocab = _vocab(tmp_path / "v1", words=1)
    flags = [f.format(vocab=vocab) for f in flags]
    loaded = hf(tok)
    res = run(root, tmp_path, ["--data", "waterbirds", "--batch", "4", "--seeds", "1"] + flags, loaded)
    m = res["metrics"]
    assert res["method"] == cli.method_name(clip_script.parse_args(flags)) and res["method"].startswith(label)
    assert 0 <= m["worst"]["mean"] <= m["avg"]["mean"] <= 1
    first, mean = m["tokens_first_block"]["mean"], m["tokens_mean"]["mean"]
    if label.startswith("intra"):
        assert first == mean == 1 + 8
    elif label.startswith("inter"):
        assert first == 2
    elif label.startswith("tome"):
        assert first == 17 and mean < 17
    else:
        assert first == mean == 17
    assert patch_info(loaded.model) is None  # left unpatched


def test_random_ablation_runs_each_seed_and_is_reproducible(root, tmp_path, tok):
    loaded = hf(tok)
    two = run(root, tmp_path, ["--data", "waterbirds", "--top_k", "0.5", "--random", "--seeds", "3", "4"], loaded)
    assert two["seeds"] == [3, 4] and not two["deterministic"] and len(two["runs"]) == 2
    again = run(root, tmp_path, ["--data", "waterbirds", "--top_k", "0.5", "--random", "--seeds", "4"], loaded)
    assert again["runs"][0]["groups"] == two["runs"][1]["groups"]
    vals = [r["avg"] for r in two["runs"]]
    assert two["metrics"]["avg"]["mean"] == pytest.approx(np.mean(vals))
    assert two["metrics"]["avg"]["std"] == pytest.approx(np.std(vals, ddof=1))


def test_seed_placeholder_picks_a_vocabulary_per_seed(root, tmp_path, tok):
    _vocab(tmp_path / "s0", words=1)
    _vocab(tmp_path / "s1", words=16)
    res = run(root, tmp_path, ["--data", "waterbirds", "--vocab-path", str(tmp_path / "s{seed}" / "vocab.pt"),
                               "--thresh", "2", "--seeds", "0", "1"], hf(tok))
    first = [r["tokens_first_block"] for r in res["runs"]]
    assert res["seeds"] == [0, 1] and first[0] == 2 and 2 < first[1] <= 17


def test_vocab_size_uses_process_py_seed_folders(root, tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _vocab(tmp_path / "tokenizers" / "waterbirds" / "v1", words=1)
    argv = ["--data", "waterbirds", "--vocab", "1", "--vocab-data", "waterbirds", "--thresh", "2", "--seeds", "0", "1",
            "--protocol", "standard"]
    alone = run(root, tmp_path, argv, hf(tok))
    assert alone["seeds"] == [0] and alone["deterministic"]  # one vocabulary for every seed: one run
    _vocab(tmp_path / "tokenizers" / "waterbirds" / "v1-seed1", words=16)  # what process.py --seed 1 writes
    res = run(root, tmp_path, argv, hf(tok))
    assert [r["vocab_path"] for r in res["runs"]] == ["tokenizers/waterbirds/v1/vocab.pt",
                                                      "tokenizers/waterbirds/v1-seed1/vocab.pt"]
    assert res["runs"][0]["tokens_first_block"] == 2 < res["runs"][1]["tokens_first_block"]


def test_summary_gathers_the_runs(root, tmp_path, tok, capsys):
    loaded = hf(tok)
    run(root, tmp_path, ["--data", "waterbirds", "--protocol", "standard"], loaded)
    run(root, tmp_path, ["--data", "waterbirds", "--tome", "2", "--protocol", "standard"], loaded)
    run(root, tmp_path, ["--data", "meta", "--protocol", "standard"], loaded)
    capsys.readouterr()
    assert clip_script.main(["--summary", "--out", str(tmp_path)]) is None
    table = capsys.readouterr().out
    assert "| model | method | meta avg | meta worst | meta tokens | waterbirds avg | waterbirds worst | waterbirds tokens |" in table
    rows = [l for l in table.splitlines() if l.startswith("| tiny-hf-clip")]
    assert [r.split(" | ")[1] for r in rows] == ["base", "tome2"]
    assert (tmp_path / "clip" / "summary.csv").exists()


def _error(capsys, argv, loaded=None):
    return fixtures.one_line_error(capsys, lambda: clip_script.main(argv, loaded))


def test_bad_input_is_one_line(root, tmp_path, tok, capsys):
    base = ["--out", str(tmp_path), "--workers", "0", "--device", "cpu"]
    err = _error(capsys, base + ["--data", "celeba", "--data-root", str(tmp_path / "nowhere")], hf(tok))
    assert str(tmp_path / "nowhere" / "celeba" / "list_attr_celeba.csv") in err and "expected layout" in err
    err = _error(capsys, base + ["--data", "imgnet", "--data-root", str(root)], hf(tok))
    assert "timm" in err
    err = _error(capsys, base + ["--data", "imgnet", "--data-root", str(root)], cli.Loaded(tiny.timm_vit(), "timm", "t", False))
    assert "t has 10 classes but imgnet has 3 synset folders" in err
    err = _error(capsys, base + ["--data", "meta", "--data-root", str(root), "--labels", "cat"], hf(tok))
    assert "--labels gives 1 names; meta has 2 classes" in err
    err = _error(capsys, base + ["--data", "waterbirds", "--data-root", str(root), "--vocab-path", str(tmp_path / "no.pt")], hf(tok))
    assert "no.pt not found" in err


def test_the_command_line_never_evaluates_random_weights(root, tmp_path, tok, capsys, monkeypatch):
    err = _error(capsys, ["--model", "open_clip:ViT-B-16", "--data-root", str(root), "--out", str(tmp_path)])
    assert "no pretrained weights" in err and "open_clip:ViT-B-16/openai" in err  # refused before building it
    from vwt import models

    monkeypatch.setattr(models, "load_model", lambda name, device, dtype: hf(tok))  # it gave random weights
    err = _error(capsys, ["--model", "org/clip", "--data-root", str(root), "--out", str(tmp_path)])
    assert "org/clip has no pretrained weights" in err
    assert not (tmp_path / "clip").exists()


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        clip_script.parse_args(["--help"])
    out = capsys.readouterr().out
    for opt in ("--seeds", "--prompt", "--labels", "--split", "--limit", "--summary", "--quant", "--tome", "--vocab-path"):
        assert opt in out


def test_paper_protocol_runs_three_seeds_each_with_its_own_split_and_vocabulary(tmp_path, tok, monkeypatch):
    """`clip.py --data waterbirds --vocab 100` on the paper's layout (data/cub/): seeds 1 2 3, each on its
    re-split test images with its own in-domain vocabulary tokenizers/waterbirds/v100/seed_<i>/, the
    paper's preprocessing; the predictions equal a direct zero-shot of that seed's split and vocabulary."""
    import paper_fixtures

    root = paper_fixtures.write_cub(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2, 3):
        w = torch.randn(100, 192, generator=torch.Generator().manual_seed(seed))
        vwt.Vocabulary(w, space="pixel", patch_size=8).save(tmp_path / "tokenizers" / "waterbirds" / "v100" / f"seed_{seed}")
    loaded = hf(tok)
    res = run(root, tmp_path / "out", ["--data", "waterbirds", "--vocab", "100", "--thresh", "2"], loaded)
    assert res["protocol"] == "paper" and res["seeds"] == [1, 2, 3] and not res["deterministic"]
    assert [r["vocab_path"] for r in res["runs"]] == [f"tokenizers/waterbirds/v100/seed_{s}/vocab.pt" for s in (1, 2, 3)]
    files = sorted((tmp_path / "out" / "clip").glob("*.json"))
    assert [f.name[:-len("12345678.json")] for f in files] == ["waterbirds__tiny-hf-clip__inter-v100-t2__paper__"]
    assert json.loads(files[0].read_text())["protocol"] == "paper"
    model = loaded.model
    transform = D.transform_for("waterbirds", "paper", image_size=32)
    enc = tok(["a photo of a landbird", "a photo of a waterbird"], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
    splits = []
    for seed, r in zip((1, 2, 3), res["runs"]):
        ds = D.load("waterbirds", root, transform, seed=seed)
        vocab = vwt.Vocabulary.load(tmp_path / "tokenizers" / "waterbirds" / "v100" / f"seed_{seed}" / "vocab.pt")
        vwt.patch(model, vwt.InterImage(vocab, thresh=2))
        try:
            with torch.no_grad():
                img = model.get_image_features(pixel_values=pixels_of(ds)).pooler_output
        finally:
            vwt.unpatch(model)
        pred = (F.normalize(img, dim=-1) @ txt.T).argmax(1).tolist()
        rows = [l.split(",") for l in open(r["predictions"]).read().splitlines()[1:]]
        assert rows == [[rec["image_id"], str(p), str(rec["label"]), str(rec["group"])] for rec, p in zip(ds.records, pred)]
        assert r["avg"] == float(np.mean([p == rec["label"] for rec, p in zip(ds.records, pred)]))
        splits.append(tuple(rec["image_id"] for rec in ds.records))
    assert len(set(splits)) == 3  # each seed its own test images
    avgs = [r["avg"] for r in res["runs"]]
    assert res["metrics"]["avg"]["mean"] == pytest.approx(np.mean(avgs))
    assert res["metrics"]["avg"]["std"] == pytest.approx(np.std(avgs, ddof=1))
    assert res["metrics"]["worst_class"]["mean"] == pytest.approx(np.mean([r["worst_class"] for r in res["runs"]]))


def test_paper_protocol_celeba_prompts_and_metashift_split(tmp_path, tok):
    import paper_fixtures

    root = tmp_path / "data"
    paper_fixtures.write_celeba(root)
    paper_fixtures.write_meta(root)
    res = run(root, tmp_path, ["--data", "celeba", "--seeds", "2"], hf(tok))
    assert res["labels"] == ["non-blond", "blond"] and res["images"] == 14
    res = run(root, tmp_path, ["--data", "meta", "--seeds", "1"], hf(tok))
    assert res["labels"] == ["dog", "cat"] and res["images"] == int(0.25 * sum(paper_fixtures.META_IMAGES.values()))
    assert (root / "meta" / "metadata.csv").exists()
