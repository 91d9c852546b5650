"""Accuracy on weights that learned something: a tiny timm ViT trained in the test session on
scikit-learn's digits (benchmarks/trained_digits.py's recipe, smaller: 24x24 images, 4x4 patches, 36
patches + class token, width 32, 3 blocks, 25 epochs; about 15 s of CPU) keeps its test accuracy within
MARGIN of base under every reducer at a mild setting, and the same check catches a broken merge.

Random weights cannot tell a subtly wrong merge from a right one; trained weights can, where the bug
moves what the class token reads. Measured on this model (450 test images, base 0.967): ToMe that merges
each image's *least* similar pairs instead of the most similar (one flipped sort) loses 3.8 points at
r 2 and 6.2 at r 4, and is caught (the right ToMe loses nothing at r 4); ToMe with the size weighting dropped (plain means, sizes reset) or
with the merged tokens summed instead of averaged loses nothing at r 4, and at r 12 (where the right
ToMe itself loses 6 points) only 2 and 3.8 points more: most merges here join identical background
patches, so this model cannot see that bug, and tests/test_tome_reference.py (official ToMe, 1e-5) is
what guards the weighting.
Inter-image (a 100-word vocabulary learned here) merges the blank background even at threshold 0.02
(36 -> 26.6 tokens) and loses 1.8 points there, 4.0 at 0.05 and 0.1: no proportional attention, as the
paper. Resize is left out: this model, trained at one resolution, keeps 0.44-0.68 of its accuracy at 16-28
pixels (results/trained_digits.md); tests/test_resize.py checks Resize against its reference instead.
Run with ``pytest -s`` to see the accuracies."""
import copy
import sys
from pathlib import Path

import pytest
import torch

import vwt
from vwt import merge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trained_digits as T  # noqa: E402

pytestmark = pytest.mark.slow

MARGIN = 0.03  # accuracy a mild setting may lose: 13 of the 450 test images
RECIPE = T.Recipe(image=24, patch=4, dim=32, depth=3, heads=4, epochs=25)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model, int8 copy, vocabulary, test images, labels, base accuracy), trained once per session."""
    model = T.train(RECIPE, cache=tmp_path_factory.mktemp("digits"))
    _, _, x, y = T.digits(RECIPE.image)
    vocab = T.vocabulary(RECIPE, size=100)
    int8 = vwt.quantize(copy.deepcopy(model), backend="torchao")
    return model, int8, vocab, x, y, T.evaluate(model, x, y)["accuracy"]


def keeps_accuracy(trained, reducers, int8=False) -> tuple[float, bool]:
    """The check every mild setting passes: (accuracy, whether it is within MARGIN of base)."""
    model, q, _, x, y, base = trained
    acc = T.evaluate(q if int8 else model, x, y, reducers)["accuracy"]
    print(f"\n{reducers} int8={int8}: {acc:.4f} (base {base:.4f})")
    return acc, acc >= base - MARGIN


MILD = {
    "intra drop 0.25": lambda v: [vwt.IntraImage(0.25)],
    "inter v100 t0.02": lambda v: [vwt.InterImage(v, thresh=0.02)],  # the paper's 0.1 loses 4 points here
    "tome r 4": lambda v: [vwt.ToMe(r=4)],
    "evit keep 0.9": lambda v: [vwt.EViT(keep=0.9)],
    "lgtm r 4, 1 dense, 1 local": lambda v: [vwt.LGTM(r=4, dense=1, local=1)],
    "intra 0.25 + tome r 2": lambda v: [vwt.IntraImage(0.25), vwt.ToMe(r=2)],
    "int8": None,
    "int8 + tome r 4": lambda v: [vwt.ToMe(r=4)],
}


def test_the_model_learned_digits(trained):
    assert trained[-1] > 0.9, f"the small ViT did not learn digits ({trained[-1]:.3f})"


@pytest.mark.parametrize("name", list(MILD))
def test_a_mild_setting_keeps_accuracy(trained, name):
    make = MILD[name]
    reducers = [] if make is None else make(trained[2])
    model, _, _, x, y, _ = trained
    if reducers:  # the setting removes tokens (else the check would prove nothing)
        assert T.evaluate(model, x[:8], y[:8], reducers)["tokens_mean"] < (RECIPE.image // RECIPE.patch) ** 2 + 1
    acc, ok = keeps_accuracy(trained, reducers, int8=name.startswith("int8"))
    assert ok, f"{name}: {acc:.4f} vs base {trained[-1]:.4f}"


def test_the_check_catches_a_broken_merge(trained, monkeypatch):
    """ToMe merging each image's least similar pairs (the sort flipped) fails the same check at the
    same mild setting that the right ToMe passes."""
    right, ok = keeps_accuracy(trained, [vwt.ToMe(r=4)])
    assert ok
    select = merge._select
    monkeypatch.setattr(merge, "_select", lambda best, *a: select(torch.where(best > merge._NEG, -best, best), *a))
    broken, ok = keeps_accuracy(trained, [vwt.ToMe(r=4)])
    assert not ok, f"a ToMe merging the least similar pairs kept {broken:.4f} (right ToMe {right:.4f})"
