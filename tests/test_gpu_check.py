"""benchmarks/gpu_check.sh, the one prepared GPU run: its dry run goes through every step on the CPU
with tiny sizes, so the GPU's few minutes are not spent on a typo."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = {"fixtures", "tests", "eff", "eff-int8", "clip-float32", "clip-float16", "blip-float32", "blip-float16",
         "packed", "process"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _env():
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
    with open(out / "steps.tsv") as f:
        steps = {row["step"]: row["status"] for row in csv.DictReader(f, delimiter="\t")}
    assert steps.keys() == STEPS, steps
    failed = {k: (out / f"{k}.log").read_text()[-600:] for k, v in steps.items() if v != "ok"}
    assert not failed, failed
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(list(out.glob("eff__*__base-intra-inter-tome-evit-lgtm-int8__*.csv"))) == 1
    assert len(list(out.glob("eff__*__base-int8__*.csv"))) == 1
    assert (out / "bench_packed.json").is_file()
    assert len(list((out / "clip-float16" / "clip").glob("waterbirds__*.json"))) == 1
    assert len(list((out / "blip-float16" / "blip").glob("coco__*.captions.jsonl"))) == 1
    env = (out / "environment.txt").read_text()
    assert "when: before" in env and "when: after" in env and "torch" in env
    summary = (out / "summary.txt").read_text()
    assert "dry run on the CPU" in summary and "intra0.5" in summary
    assert "step V=100: sklearn-labels" in summary and "| 100 | paper | torch |" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_without_a_gpu_it_says_to_dry_run(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "x")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: no CUDA GPU visible to {sys.executable}'s torch; on a CPU run: bash benchmarks/gpu_check.sh --dry-run"]
    assert not (tmp_path / "x").exists()


def test_unknown_argument_is_one_line(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown argument --bogus (use --dry-run, --out DIR)"
