"""What a user's run touches and what --help tells: the README's main job on a fresh clone leaves every
file git tracks as it was (the committed reference results included) and adds none that git would
show; every script's and benchmark's default output folder is one git ignores; --help gives the
default of every option that takes a value, the method flags' from the method table."""
import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fixtures
from vwt import bench, cli, method_table

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("eff", "clip", "blip", "len", "process", "match", "word")
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
TINY_RUN = ["--methods", "all", "--vocab", "8", "--device", "cpu", "--rounds", "1", "--seconds", "0.001",
            "--warmup", "0", "--warmup-seconds", "0", "--paper-warmup", "1", "--limit", "2", "--batch", "1", "2"]


def git(*argv, cwd: Path) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def has_git():
    try:
        git("rev-parse", "--is-inside-work-tree", cwd=ROOT)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout")


# --------------------------------------------------------------------------------------------------
# User runs never touch what the repository ships
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two fresh interpreters importing torch and transformers, and a tiny eff.py run: about 40 s
def test_the_main_job_on_a_fresh_clone_changes_nothing_git_shows(tmp_path, has_git):
    """The README's main job, `python eff.py`, with a tiny stand-in configuration (a tiny local CLIP,
    8 words, one round), on a fresh clone: afterwards `git status --porcelain` lists no modified
    tracked file and no untracked file outside the ignored folders, and the quoted-results test
    (the committed reference run and the documents quoting it) still passes there."""
    clone = fixtures.fresh_clone(tmp_path / "clone", results=True, git=True)
    tiny_clip, _ = fixtures.save_tiny_models(tmp_path / "models")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "eff.py", "--model", str(tiny_clip), *TINY_RUN], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone).splitlines() == []
    assert re.search(r"wrote runs/eff__samples__\S*tiny-clip__\S+\.csv", done.stdout), done.stdout[-2000:]

    quoted = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_quoted_results.py"], cwd=clone,
                            env=env, capture_output=True, text=True, timeout=600)
    assert quoted.returncode == 0, quoted.stdout[-3000:] + quoted.stderr[-2000:]
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone).splitlines() == []


def parser_of(module, argv=()) -> argparse.ArgumentParser:
    """The parser a script's or benchmark's own parse function builds (caught as it parses ``argv``)."""
    caught = {}
    parse = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        caught["parser"] = self
        return parse(self, list(argv), namespace)

    argparse.ArgumentParser.parse_args = catch
    try:
        (getattr(module, "parse_args", None) or module.parse)()
    finally:
        argparse.ArgumentParser.parse_args = parse
    return caught["parser"]


def benchmark(name: str):
    """benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/<name>.py` has it: they import each other
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def default_outputs() -> dict:
    """Every script's and benchmark's default --out, by name (process.py's None: tokenizers/)."""
    found = {}
    for name in SCRIPTS:
        out = parser_of(importlib.import_module(name)).get_default("out")
        found[f"{name}.py"] = Path(out if out is not None else "tokenizers/x")
    for name in BENCHMARKS:
        module = benchmark(name)
        if hasattr(module, "parse"):
            out = parser_of(module).get_default("out")
            if out is not None:
                found[f"benchmarks/{name}.py"] = Path(out)
    return found


def test_every_default_output_is_a_folder_git_ignores(has_git):
    outputs = default_outputs()
    assert {"eff.py", "clip.py", "benchmarks/bench_packed.py", "benchmarks/bench_reducers.py"} <= set(outputs)
    for name, out in outputs.items():
        assert not out.is_absolute() and out.parts[0] != "results", (name, out)
        probe = out / "probe.json"  # a file the run would write there
        ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT).returncode == 0
        assert ignored, f"{name}'s default output {out} is not ignored by git"
    from vwt.spec import RunSpec

    assert RunSpec().out == Path("runs") and RunSpec().out == outputs["clip.py"]


def test_the_committed_reference_results_are_tracked_where_no_default_run_writes(has_git):
    """results/ holds what the repository ships (tracked); no default output lies in it, and the
    README documents the one command that refreshes the reference run."""
    tracked = git("ls-files", "results", cwd=ROOT).split()
    assert any(re.fullmatch(r"results/eff__samples__openai-clip-vit-base-patch16__.*\.csv", f) for f in tracked)
    assert "results/bench_packed.json" in tracked
    readme = (ROOT / "README.md").read_text()
    assert "python eff.py --full --out results" in readme and "python benchmarks/quote_results.py" in readme


# --------------------------------------------------------------------------------------------------
# --help gives every default
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_help_gives_the_default_of_every_option_that_takes_a_value(name):
    p = parser_of(importlib.import_module(name))
    silent = [a.option_strings[0] for a in p._actions
              if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction)
              and "default" not in (a.help or "")]
    assert silent == [], f"{name}.py --help gives no default for {silent}"


def help_of(p: argparse.ArgumentParser, option: str) -> str:
    return " ".join(next(a.help for a in p._actions if option in a.option_strings).split())


@pytest.mark.parametrize("name", ["eff", "clip", "blip", "len", "match"])
def test_method_flags_give_the_method_tables_default(name, monkeypatch):
    """A row's default (the paper's setting, what eff.py measures it at) is in its flag's --help, read
    from the table (change the row and the help follows): eff.py's flags default to it, the other
    scripts' are off unless given."""
    import dataclasses

    import vwt.methods

    monkeypatch.setitem(method_table.METHODS, "lgtm", dataclasses.replace(method_table.METHODS["lgtm"], default=5))
    p = parser_of(importlib.import_module(name))
    for m in vwt.methods.rows():
        if m.type is not None:
            said = help_of(p, m.option or m.flag)
            assert (f"(default {m.default}: {m.source})" in said if name == "eff" else
                    f"(default: off; eff.py measures {m.default}: {m.source})" in said), said
    assert "5" in help_of(p, "--lgtm")
    assert "(default 0.1)" in help_of(p, "--thresh")


@pytest.mark.parametrize("name", ["clip", "blip", "len", "process"])
@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (16, 4)])
def test_workers_default_to_min_4_and_the_usable_cores(name, cores, workers, monkeypatch):
    monkeypatch.setattr(bench, "usable_cores", lambda: cores)
    p = parser_of(importlib.import_module(name))
    assert p.get_default("workers") == workers
    assert f"default {workers}" in help_of(p, "--workers")


def test_usable_cores_follow_the_affinity_where_the_os_gives_one():
    if hasattr(os, "sched_getaffinity"):
        assert bench.usable_cores() == len(os.sched_getaffinity(0))
    assert cli.default_workers() == min(4, bench.usable_cores())
