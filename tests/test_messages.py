"""What a run prints, for a newcomer (issue #24, item 5): no warning from a library the run does not use
(torchao unless int8 is asked for), each message once and whole, and a model name a library does not
know answered as unknown (random weights cannot build it)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eff
import fixtures
import tiny
from vwt import models
from vwt.errors import UserError, first_line

REPO = Path(__file__).resolve().parents[1]
cpu = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return fixtures.save_tiny_models(tmp_path_factory.mktemp("models"))[0]


def in_fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_a_run_without_int8_never_imports_torchao(tiny_clip, tmp_path):
    """len.py on a Hugging Face checkpoint, in a fresh interpreter: transformers' quantizers would import
    torchao (seconds, and torch's Enum deprecation notices); the run says nothing of it."""
    argv = ["len.py", "--model", str(tiny_clip), "--data", "samples", "--top_k", "0.5", "--max-images", "2",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "out")]
    done = in_fresh_python(
        f"import runpy, sys; sys.argv = {argv!r}\n"
        "try:\n    runpy.run_path('len.py', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torchao imported:', 'torchao' in sys.modules)", REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchao imported: False" in done.stdout, done.stdout[-2000:]
    assert "Enum subclass" not in done.stderr and "torchao" not in done.stderr, done.stderr[-3000:]


def test_int8_imports_torchao_without_torchs_notices_to_its_authors(tmp_path):
    done = in_fresh_python(
        "import sys; sys.path.insert(0, 'tests')\nimport torch, tiny, vwt\n"
        "model = tiny.timm_vit()\nassert 'torchao' not in sys.modules\nvwt.quantize(model)\n"
        "print('torchao imported:', 'torchao' in sys.modules)", REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchao imported: True" in done.stdout
    assert "Enum subclass" not in done.stderr, done.stderr[-3000:]


def test_loading_a_checkpoint_logs_no_transformers_warning(tiny_clip):
    """Holding back transformers' load report must not set off another: raising the modeling_utils
    logger's level made transformers log every key as "not sharded" (the report that reached stderr in
    tests/test_bad_input.py's first case where transformers' handler wrote to a closed stream)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep, hf = Keep(logging.WARNING), logging.getLogger("transformers")
    hf.addHandler(keep)
    try:
        loaded = models.load_model(str(tiny_clip), cpu)
    finally:
        hf.removeHandler(keep)
    assert loaded.pretrained and not loaded.missing
    assert not [r for r in records if "not sharded" in r.getMessage() or "LOAD REPORT" in r.getMessage()], \
        [r.getMessage()[:200] for r in records]


@pytest.mark.parametrize("name, says", [
    ("timm:vit_bse_patch16_224", "timm has no model 'vit_bse_patch16_224' (closest: vit_base_patch16_224"),
    ("timm:vit_base_patch16_224.nosuchtag", "timm has no pretrained weights 'nosuchtag' for vit_base_patch16_224; its tags: "),
    ("open_clip:ViT-B-33", "open_clip has no model 'ViT-B-33' (closest: ViT-B-32"),
    ("open_clip:ViT-B-32/openaix", "open_clip has no pretrained weights 'openaix' for ViT-B-32 and no file of that name"),
])
@pytest.mark.parametrize("how", [dict(), dict(fallback_random=True), dict(random_weights=True)])
def test_a_name_the_library_does_not_know_is_unknown_whatever_the_weights(name, says, how):
    with pytest.raises(models.UnsupportedModel) as e:
        models.load_model(name, cpu, needs="vision", **how)
    line = str(e.value)
    assert line.startswith(says) and "\n" not in line and "--random-weights" not in line, line


def test_a_hub_id_the_hub_does_not_have_is_unknown(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import PretrainedConfig

    def no_such_repository(name, **kw):
        missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub's 404 (no response needed)
        Exception.__init__(missing, "404 Client Error: Repository Not Found")
        try:
            raise missing
        except RepositoryNotFoundError as e:
            raise OSError(f"{name} is not a local folder and is not a valid model identifier") from e

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", no_such_repository)
    for how in (dict(), dict(random_weights=True), dict(fallback_random=True)):
        with pytest.raises(models.UnsupportedModel, match=r"^opnai/clip-vit-base-patch16 is neither a local folder nor "
                                                          r"a model on the Hugging Face hub"):
            models.load_model("opnai/clip-vit-base-patch16", cpu, **how)


def test_the_fallback_note_quotes_the_cause_whole_and_once(monkeypatch, capsys):
    cause = "the hub said " + " ".join(f"word{i}" for i in range(80))  # 500+ characters, one line
    real = models._load

    def unavailable(name, random_weights, vision_only=False):
        if not random_weights:
            raise models.Unavailable(f"cannot load model {name!r}: {cause}. Models come from ...", cause)
        return real("timm:vit_tiny_patch16_224", True, vision_only)

    monkeypatch.setattr(models, "_load", unavailable)
    loaded = models.load_model("timm:vit_tiny_patch16_224", cpu, fallback_random=True)
    out = capsys.readouterr().out
    assert out.count(cause) == 1 and loaded.note == f"pretrained weights unavailable ({cause})", out


def test_a_cut_message_ends_on_a_whole_word():
    text = "alpha beta gamma delta " * 20
    cut = first_line(ValueError(text), 50)
    assert cut == "alpha beta gamma delta alpha beta gamma delta ..." and len(cut) <= 54
    assert first_line(ValueError("short one\nsecond")) == "short one"


def test_eff_says_why_the_weights_are_random_once(monkeypatch, tmp_path, capsys):
    """The reason for random weights is the load's note; the run's other lines only say "random"."""
    from test_eff_script import FAST, no_rapl

    no_rapl(monkeypatch, tmp_path)
    cause = "no hub here, and nothing cached for this model"

    def fake(name, device, dtype=torch.float32, **kw):
        loaded = tiny.loaded()
        loaded.note = f"pretrained weights unavailable ({cause})"
        print(f"note: {name}: {loaded.note}; using random weights")
        return loaded

    monkeypatch.setattr("vwt.efficiency.load_model", fake)
    eff.main(["--methods", "base,intra", "--batch", "1", "--metric", "time", "--out", str(tmp_path)] + FAST)
    out = capsys.readouterr().out
    assert out.count(cause) == 1, out
    assert "weights: random (the note at the start says why)" in out, out


@pytest.mark.parametrize("how", [dict(random_weights=True), dict(fallback_random=True)])
def test_open_clip_random_weights_are_said_once(how, caplog, capsys):
    """open_clip logs on the root logger ("No pretrained weights loaded", "Failed to download"); vwt's
    note says it, once."""
    caplog.set_level(logging.WARNING)
    models.load_model("open_clip:ViT-B-32/openai", cpu, needs="vision", **how)
    assert not [r.getMessage() for r in caplog.records if "open_clip" in r.pathname]
    assert capsys.readouterr().out.count("random weights") == (1 if how.get("fallback_random") else 0)


def test_open_clip_leaves_the_root_logger_unconfigured(tmp_path):
    """In a fresh interpreter: open_clip's logging.warning would give the root logger a handler bound to
    the sys.stderr of that moment, for good (in a test, a captured stream that is closed later)."""
    done = in_fresh_python(
        "import logging, torch\nfrom vwt import models\n"
        "models.load_model('open_clip:ViT-B-32', torch.device('cpu'), random_weights=True)\n"
        "print('root handlers:', logging.getLogger().handlers)", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "root handlers: []" in done.stdout and "No pretrained weights" not in done.stderr, done.stderr[-2000:]
