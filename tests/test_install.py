"""vwt as an installable package: pyproject.toml's dependencies are requirements.txt's, `pip install`
puts the library (and only it) where Python finds it outside the clone, and README's "Use from
Python" example runs as written."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fixtures
import tiny

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "openai/clip-vit-base-patch16"


def _key(line: str) -> tuple:
    r = Requirement(line)
    return canonicalize_name(r.name), str(r.specifier), str(r.marker or "")


def _requirements() -> list:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_pyproject_dependencies_are_requirements_txt():
    """requirements.txt = the package's dependencies + its test extra (same names, ranges, markers), so
    `pip install .` and `pip install -r requirements.txt` cannot drift apart; pytest is no runtime one."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [_key(d) for d in project["dependencies"]]
    test = [_key(d) for d in project["optional-dependencies"]["test"]]
    assert sorted(runtime + test) == sorted(_key(r) for r in _requirements())
    names = {name: spec for name, spec, _ in runtime}
    assert "pytest" not in names and "pytest" in {name for name, _, _ in test}
    assert "==" not in names["torch"], "torch is a range on purpose (README, Set-up)"
    assert ("bitsandbytes", ">=0.43", 'platform_system == "Linux"') in runtime


def readme_examples() -> list:
    """The python blocks of README's "Use from Python" section: patching a model, then the experiments."""
    section = re.search(r"^## Use from Python\n(.*?)(?=^## )", (ROOT / "README.md").read_text(), re.S | re.M)
    assert section, "README.md has no '## Use from Python' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 2, f"'Use from Python' has {len(blocks)} python blocks; this test runs two"
    return blocks


def readme_example() -> str:
    return readme_examples()[0]


# What the example promises: image features as a tensor, and the model unpatched at the end.
CHECKS = """
assert isinstance(feats, torch.Tensor) and feats.shape == (1, model.config.projection_dim), feats
try:
    vwt.stats(model)
except ValueError:
    pass
else:
    raise AssertionError("the example leaves the model patched")
print("README example: ok")
"""


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: about 15 s
def test_readme_python_example_runs_as_written(tmp_path):
    """README's "Use from Python" block, run in a fresh interpreter outside the clone and offline, with
    its hub model swapped for a tiny local CLIP (saved with its image processor)."""
    from transformers import CLIPImageProcessor

    code = readme_example()
    assert HUB_ID in code, "the example no longer loads the model the reader sees"
    clip_dir = tmp_path / "tiny-clip"
    tiny.hf_clip().save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE},
                       crop_size={"height": tiny.IMAGE, "width": tiny.IMAGE}).save_pretrained(clip_dir)
    script = tmp_path / "elsewhere" / "example.py"
    script.parent.mkdir()
    script.write_text(code.replace(HUB_ID, str(clip_dir)) + CHECKS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "README example: ok" in done.stdout, done.stdout + done.stderr


EXPERIMENT_CHECKS = """
assert result["method"] == "intra0.5+tome13" and result["seeds"] == [1, 2, 3] and "avg" in result["summary"], result
assert set(table["method"]) == {"base", "tome"} and sorted(set(table["batch"])) == [1, 8], table
print("README experiments: ok")
"""


@pytest.mark.slow  # a fresh interpreter, three seeds of zero-shot and an interleaved measurement: about 40 s
def test_readme_experiments_from_python_run_as_written(tmp_path):
    """README's second block (the experiments on a RunSpec), run as written in a fresh interpreter outside
    the clone and offline: its hub model swapped for a tiny local CLIP with a tokenizer, the Waterbirds
    data it names written as a fixture under the default data root."""
    code = readme_examples()[1]
    assert HUB_ID in code
    from transformers import CLIPImageProcessor, CLIPProcessor

    clip_dir = tmp_path / "tiny-clip"
    tok = fixtures.char_clip_tokenizer(tmp_path / "tok")
    model = tiny.hf_clip()
    model.config.text_config.eos_token_id = tok.eos_token_id  # pool the text at this tokenizer's end of text
    model.save_pretrained(clip_dir)
    image = CLIPImageProcessor(size={"shortest_edge": tiny.IMAGE}, crop_size={"height": tiny.IMAGE, "width": tiny.IMAGE})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(clip_dir)
    work = tmp_path / "elsewhere"
    fixtures.write_waterbirds(work / "data")
    script = work / "experiments.py"
    script.write_text(code.replace(HUB_ID, str(clip_dir)) + EXPERIMENT_CHECKS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "README experiments: ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def _git_status(repo: Path) -> list:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.splitlines()


@pytest.mark.slow  # a wheel build, an install and a fresh interpreter importing torch: about 20 s
def test_pip_install_puts_vwt_where_python_finds_it_outside_the_clone(tmp_path):
    """`pip install` of a copy of the clone (offline: no build isolation, no index) installs vwt and its
    subpackages and nothing else (not the scripts, tests or benchmarks); Python run elsewhere imports
    vwt from there; and the build leaves no file in the clone that git would show."""
    pytest.importorskip("setuptools", minversion="70.1", reason="building vwt offline needs setuptools (requirements.txt)")
    clone = fixtures.fresh_clone(tmp_path / "clone")
    git = shutil.which("git")
    if git:
        subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
        subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
        staged = _git_status(clone)
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--target", str(site), str(clone)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    assert {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} == {"vwt"}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vwt").rglob("*.py")}
    assert {p.relative_to(site).as_posix() for p in (site / "vwt").rglob("*.py")} == sources
    if git:
        assert _git_status(clone) == staged, "the build left files in the clone that git shows: extend .gitignore"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", "import vwt, vwt.backends; print(vwt.__file__)"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split()[-1]).resolve() == (site / "vwt" / "__init__.py").resolve()
