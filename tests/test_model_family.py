"""The model family comes from the checkpoint's own config.json, not from its name or folder (issue 21):
a tiny CLIP saved under blip-experiments/ loads, and runs through clip.py and len.py, as CLIP; a tiny
BLIP saved as captioner/ as BLIP; a config.json of another model type is one line; only where no
config.json can be read do random weights fall back to a guess from the name, and say so."""
import importlib
import json
import shutil

import pytest
import torch

import blip as blip_script
import clip as clip_script
import fixtures
import tiny
import vwt
from vwt import cli, models
from vwt.backends import by_name, family_for_config

len_script = importlib.import_module("len")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny CLIP in <d>/blip-experiments/clip, the tiny BLIP in <d>/captioner, data, a vocabulary."""
    d = tmp_path_factory.mktemp("family")
    clip_dir, blip_dir = fixtures.save_tiny_models(d / "saved")
    (d / "blip-experiments").mkdir()
    w = type("Saved", (), {})()
    w.clip, w.blip = d / "blip-experiments" / "clip", d / "captioner"
    shutil.move(str(clip_dir), w.clip)
    shutil.move(str(blip_dir), w.blip)
    assert "blip" not in str(w.blip).lower() and "clip" not in str(w.blip).lower()
    w.data = d / "data"
    fixtures.write_waterbirds(w.data)
    fixtures.write_coco(w.data)
    g = torch.Generator().manual_seed(0)
    w.vocab = vwt.Vocabulary(torch.rand(6, 3 * tiny.PATCH ** 2, generator=g) * 4 - 2,
                             patch_size=tiny.PATCH).save(d / "vocab")
    return w


def reference(path, family):
    """The checkpoint loaded with the transformers class of its family directly, as vwt should."""
    from transformers import AutoProcessor, BlipForConditionalGeneration, CLIPModel

    cls = CLIPModel if family == "hf_clip" else BlipForConditionalGeneration
    return cli.Loaded(cls.from_pretrained(path).eval(), family, str(path), True, AutoProcessor.from_pretrained(path))


@pytest.fixture
def loads(monkeypatch):
    """What the scripts got from load_model (cli's, or the library experiments' vwt.models.load_model)."""
    got, real = [], models.load_model

    def spy(*a, **k):
        got.append(real(*a, **k))
        return got[-1]

    monkeypatch.setattr(cli, "load_model", spy)
    monkeypatch.setattr(models, "load_model", spy)
    return got


@pytest.mark.parametrize("which,family,cls", [("clip", "hf_clip", "CLIPModel"),
                                              ("blip", "hf_blip", "BlipForConditionalGeneration")])
def test_the_config_names_the_family_whatever_the_folder_is_called(saved, which, family, cls, capsys):
    path = getattr(saved, which)
    loaded = models.load_model(str(path), CPU)
    assert (loaded.family, type(loaded.model).__name__, loaded.pretrained) == (family, cls, True)
    ref = reference(path, family).model.state_dict()
    assert all(torch.equal(p, ref[k]) for k, p in loaded.model.state_dict().items())
    assert loaded.tokenizer is not None and not loaded.note
    # random weights are of the checkpoint's own architecture (its 32 px, 8 px patches), not a guess
    for vision_only in (False, True):
        rand = models.load_model(str(path), CPU, random_weights=True, vision_only=vision_only)
        assert (rand.family, rand.pretrained, rand.guessed, rand.note) == (family, False, "", "")
        dims = by_name(family).dims(rand.model)
        assert (dims.patch_size, dims.num_patches, dims.width, dims.depth) == (tiny.PATCH, tiny.NUM_PATCHES,
                                                                             tiny.WIDTH, 4)
    assert rand.model.config.text_config.num_hidden_layers == 1  # vision_only: the one-layer text tower
    assert "note:" not in capsys.readouterr().out


def test_family_for_config_by_model_type_then_architectures():
    from transformers import BlipConfig, CLIPConfig

    assert family_for_config(CLIPConfig()).name == "hf_clip" and family_for_config(BlipConfig()).name == "hf_blip"
    assert family_for_config({"model_type": "blip", "architectures": ["CLIPModel"]}).name == "hf_blip"
    assert family_for_config({"architectures": ["BlipForConditionalGeneration"]}).name == "hf_blip"
    for other in ({"model_type": "bert"}, {"model_type": "clip_vision_model"}, {"model_type": "blip-2"},
                  {"architecture": "vit_base_patch16_224"}, {}):
        assert family_for_config(other) is None, other


def test_clip_py_runs_a_clip_in_a_blip_folder_as_clip(saved, tmp_path, loads):
    common = ["--data", "waterbirds", "--data-root", str(saved.data), "--batch", "4", "--workers", "0",
              "--device", "cpu", "--vocab-path", str(saved.vocab), "--thresh", "0.5"]
    got = clip_script.main(common + ["--model", str(saved.clip), "--out", str(tmp_path / "a")])
    [loaded] = loads
    assert (loaded.family, loaded.pretrained) == ("hf_clip", True)
    want = clip_script.main(common + ["--out", str(tmp_path / "b")], reference(saved.clip, "hf_clip"))
    assert got["metrics"] == want["metrics"] and got["model"] == str(saved.clip)


def test_len_py_counts_a_clip_in_a_blip_folder_as_clip(saved, tmp_path, loads):
    common = ["--data", "waterbirds", "--data-root", str(saved.data), "--batch", "4", "--workers", "0",
              "--device", "cpu", "--vocab-path", str(saved.vocab), "--thresh", "0.5"]
    got = len_script.main(common + ["--model", str(saved.clip), "--out", str(tmp_path / "a")])
    [loaded] = loads
    assert (loaded.family, loaded.pretrained, loaded.note) == ("hf_clip", True, "")
    assert got["patches_per_image"] == tiny.NUM_PATCHES  # not BLIP base's 576
    want = len_script.main(common + ["--out", str(tmp_path / "b")], reference(saved.clip, "hf_clip"))
    assert got["per_image"] == want["per_image"] and got["tokens"] == want["tokens"]


def test_blip_py_captions_with_a_blip_named_captioner(saved, tmp_path, loads):
    common = ["--data", "coco", "--data-root", str(saved.data), "--batch", "2", "--workers", "0", "--device", "cpu",
              "--no-score"]
    blip_script.main(common + ["--model", str(saved.blip), "--out", str(tmp_path / "a")])
    [loaded] = loads
    assert (loaded.family, loaded.pretrained) == ("hf_blip", True)
    blip_script.main(common + ["--out", str(tmp_path / "b")], reference(saved.blip, "hf_blip"))

    def captions(out):
        [path] = (out / "blip").glob("*.captions.jsonl")
        return {l["image_id"]: l["caption"] for l in map(json.loads, path.read_text().splitlines()) if "caption" in l}

    got, want = captions(tmp_path / "a"), captions(tmp_path / "b")
    assert got == want and len(got) > 0


def unsupported(d, config: dict):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config,says", [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "a 'bert' model (BertModel)"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "a 'llama' model (LlamaForCausalLM)"),
    ({"architecture": "vit_base_patch16_224", "num_classes": 1000}, "no Hugging Face model_type"),
])
def test_a_config_of_another_model_type_is_one_line(tmp_path, config, says):
    path = unsupported(tmp_path / "blip-clip-folder", config)  # a name that would have been guessed from
    for kw in ({}, {"fallback_random": True}, {"random_weights": True}):
        with pytest.raises(cli.UserError) as err:
            models.load_model(str(path), CPU, **kw)
        text = str(err.value)
        assert "\n" not in text and says in text and "clip (CLIPModel)" in text, text
        assert "blip (BlipForConditionalGeneration)" in text and "timm:NAME" in text


def test_a_script_on_an_unsupported_config_fails_in_one_line(saved, tmp_path):
    path = unsupported(tmp_path / "clip-ish", {"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(cli.UserError, match=r"is a 'bert' model .*vwt loads Hugging Face model types"):
        len_script.main(["--model", str(path), "--data", "waterbirds", "--data-root", str(saved.data), "--top_k",
                         "0.5", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("name,family,size", [("nobody/blip-never-published", "hf_blip", 384),
                                              ("nobody/vit-never-published", "hf_clip", 224)])
def test_without_a_readable_config_random_weights_guess_from_the_name_and_say_so(name, family, size, capsys):
    """Offline (conftest) and not cached: the name is the only clue, and the note says it was used."""
    loaded = models.load_model(name, CPU, random_weights=True, vision_only=True)
    out = capsys.readouterr().out.splitlines()
    assert loaded.family == family and loaded.model.config.vision_config.image_size == size
    assert "guessed from the name" in loaded.guessed and loaded.guessed in loaded.note
    assert len(out) == 1 and out[0].startswith(f"note: {name}: using random weights of an architecture guessed from the name")
    fallen = models.load_model(name, CPU, fallback_random=True, vision_only=True)
    out = capsys.readouterr().out.splitlines()
    assert fallen.family == family and not fallen.pretrained
    assert len(out) == 1 and "pretrained weights unavailable" in out[0] and "guessed from the name" in out[0]
    assert "using random weights" in out[0]
    with pytest.raises(cli.UserError, match="cannot load model"):  # pretrained weights: nothing to guess
        models.load_model(name, CPU)
