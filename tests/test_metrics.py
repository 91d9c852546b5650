"""Metric code against values worked out by hand from the definitions, scikit-learn's AP, and
pycocoevalcap's own COCOEvalCap (tokenization included); the summary table from results files."""
import csv
import io
import json
import shutil

import numpy as np
import pytest

from fixtures import meteor_once, use_meteor  # noqa: F401 (a fixture)
from vwt import metrics as M

NAMES = ("g0", "g1", "g2", "g3")


def test_group_accuracy_by_hand():
    #            g0 g0 g0 g1 g2 g2     (g3 has no sample)
    label = [0, 0, 0, 0, 1, 1]
    pred = [0, 1, 0, 1, 1, 1]
    group = [0, 0, 0, 1, 2, 2]
    out = M.group_accuracy(pred, label, group, NAMES)
    assert out["groups"] == {"g0": 2 / 3, "g1": 0.0, "g2": 1.0, "g3": None}
    assert out["counts"] == {"g0": 3, "g1": 1, "g2": 2, "g3": 0}
    assert out["avg"] == 4 / 6  # over samples, not the mean of the groups' accuracies
    assert out["worst"] == 0.0
    assert out["worst_class"] == 2 / 4  # class 0: 2 of 4 right, class 1: 2 of 2 (the paper's worst-class acc)


def test_worst_class_is_the_lowest_class_accuracy():
    out = M.group_accuracy([1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [3, 3, 0, 0, 0], NAMES)
    assert out["worst_class"] == 2 / 3 and out["worst"] == 2 / 3
    assert M.group_accuracy([0, 0], [0, 0], [0, 1], NAMES)["worst_class"] == 1.0  # a class without samples is skipped


def test_group_loss_is_cross_entropy_of_the_scores_per_group():
    import torch

    scores = np.array([[0.3, 0.1], [0.2, 0.25], [0.9, -0.4], [0.05, 0.0]])
    label, group = [0, 1, 1, 0], [0, 3, 3, 0]
    out = M.group_loss(scores, label, group, NAMES)
    ce = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(label), reduction="none").numpy()
    assert out["loss"] == pytest.approx(ce.mean())
    assert out["group_loss"]["g0"] == pytest.approx(ce[[0, 3]].mean()) and out["group_loss"]["g3"] == pytest.approx(ce[[1, 2]].mean())
    assert out["group_loss"]["g1"] is None


def test_worst_group_ignores_empty_groups():
    out = M.group_accuracy([1, 0, 1], [1, 0, 0], [0, 0, 3], NAMES)
    assert out["worst"] == 0.0 and out["groups"]["g0"] == 1.0 and out["groups"]["g1"] is None
    out = M.group_accuracy([1, 0], [1, 0], [0, 2], NAMES)
    assert out["worst"] == 1.0


def test_top1():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.2, 0.1]])
    assert M.top1(logits, [1, 0, 1, 0]) == 3 / 4


def test_average_precision_of_rankings_reasoned_by_hand():
    # ranking: pos, neg, pos -> precision 1/1 at the first positive, 2/3 at the second
    assert M.average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    # perfect ranking -> 1; worst ranking of 1 positive among 4 -> precision 1/4
    assert M.average_precision([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert M.average_precision([3, 2, 1, 0], [0, 0, 0, 1]) == pytest.approx(1 / 4)
    # a tie between a positive and a negative counts as one threshold: precision 1/2 there
    assert M.average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(M.average_precision([1, 2], [0, 0]))


def _labels_with_a_positive(rng, n: int) -> np.ndarray:
    """n random labels (about 30% positive), at least one of them positive, drawn from ``rng``."""
    y = rng.rand(n) < 0.3
    y[rng.randint(n)] = True
    return y


def test_average_precision_equals_sklearn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.RandomState(0)
    for _ in range(20):
        y = _labels_with_a_positive(rng, rng.randint(2, 40))
        s = rng.randint(0, 6, len(y)).astype(float)  # many ties
        assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_mean_average_precision_skips_tags_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.7, 0.2, 0.3]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    m, ap = M.mean_average_precision(scores, targets)
    # tag 0: pos, neg, pos -> (1 + 2/3) / 2; tag 1: its one positive ranked first -> 1; tag 2: no positive
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2) and ap[1] == 1.0 and np.isnan(ap[2])
    assert m == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_mean_std_is_the_sample_std():
    assert M.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert M.mean_std([0.5]) == (0.5, 0.0)


REFS = {1: ["A man riding a wave on top of a surfboard.", "a surfer rides a large wave", "A person surfing, in the ocean!"],
        2: ["Two dogs playing with a frisbee in the park", "two dogs play in the grass", "dogs chasing a frisbee."],
        3: ["A plate of food with broccoli and rice.", "a plate with rice, and vegetables", "food on a white plate"]}
CANDS = {1: "a man riding a wave on a surfboard", 2: "two dogs playing in the grass.", 3: "A plate of rice with broccoli"}


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_caption_scores_equal_cocoevalcap_including_ptb_tokenization(tmp_path, monkeypatch, meteor_once):
    import pycocoevalcap.eval as E
    from pycocotools.coco import COCO

    use_meteor(monkeypatch, meteor_once)
    ours = M.caption_scores(REFS, CANDS)
    assert ours["SPICE"] is None or isinstance(ours["SPICE"], float)
    if not M.spice_available()[0]:
        assert ours["SPICE"] is None and ours["SPICE_note"].startswith("SPICE unavailable: ")

    class NoSpice:  # COCOEvalCap always runs SPICE; its CoreNLP jars cannot be fetched here
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(E, "Spice", NoSpice)
    gt = {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in REFS],
          "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c} for i, cs in REFS.items() for k, c in enumerate(cs)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in CANDS.items()]))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = E.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    ev.evaluate()
    theirs = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
              "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    for ours_name, their_name in theirs.items():
        assert ours[ours_name] == pytest.approx(ev.eval[their_name], abs=1e-12), ours_name
    assert 0 < ours["BLEU-4"] < 1 and ours["CIDEr"] > 0
    # the tokenizer matters: the same captions scored untokenized give different n-gram matches
    from pycocoevalcap.bleu.bleu import Bleu

    raw = Bleu(4).compute_score({i: r for i, r in REFS.items()}, {i: [c] for i, c in CANDS.items()}, verbose=0)[0][3]
    assert raw != pytest.approx(ours["BLEU-4"])


def test_caption_scores_refuse_mismatched_ids():
    with pytest.raises(ValueError, match="same image ids"):
        M.caption_scores({1: ["a"]}, {2: "a"})


def _result(path, model, method, data, summary, gpu=None):
    env = {"processor": "x86_64", "cpu_count": 2} if gpu is None else {"gpu": gpu}
    path.write_text(json.dumps({"model": model, "method": method, "data": data, "summary": summary, "environment": env}))


def test_summary_table_rows_per_model_and_method(tmp_path):
    _result(tmp_path / "a.json", "clip", "tome8", "waterbirds", {"avg": [80.0, 1.25], "worst": [40.0, 2.0]})
    _result(tmp_path / "b.json", "clip", "base", "waterbirds", {"avg": [85.0, 0.0], "worst": [45.5, 0.0]})
    _result(tmp_path / "c.json", "clip", "base", "openimages-common", {"mAP": 60.04})
    (tmp_path / "sub").mkdir()
    _result(tmp_path / "sub" / "d.json", "blip", "base", "coco", {"CIDEr": 133.3, "SPICE": None}, gpu="H100")
    (tmp_path / "junk.json").write_text("[1, 2]")
    md_path, csv_path, md = M.write_summary(tmp_path)
    lines = md.splitlines()
    assert lines[0] == ("| model | method | waterbirds avg | waterbirds worst | openimages-common mAP | coco CIDEr "
                        "| coco SPICE |")
    assert lines[2] == "| blip | base | n/a | n/a | n/a | 133.3 | n/a |"
    assert lines[3] == "| clip | base | 85.0 ± 0.0 | 45.5 ± 0.0 | 60.0 | n/a | n/a |"
    assert lines[4] == "| clip | tome8 | 80.0 ± 1.2 | 40.0 ± 2.0 | n/a | n/a | n/a |"
    assert "H100" in lines[-1] and "x86_64 CPU (2 cores)" in lines[-1]
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows[2]["method"] == "tome8" and rows[2]["waterbirds avg"] == "80.0000" and rows[2]["waterbirds avg std"] == "1.2500"
    assert rows[1]["openimages-common mAP"] == "60.0400" and rows[1]["openimages-common mAP std"] == ""
    assert md_path.read_text() == md


def _papers_ap(scores, positive):
    """The paper's AP written from its description: rank the images one by one, highest score first and,
    among equal scores, the later image first; average the precision at each positive (over the
    positives + 1e-8); no positive: 0."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
    hits, total = 0, 0.0
    for rank, i in enumerate(ranked, 1):
        if positive[i]:
            hits += 1
            total += hits / rank
    return total / (sum(map(bool, positive)) + 1e-8)


def test_paper_map_counts_a_tag_without_positives_as_zero_and_ranks_ties_one_by_one():
    # tag 0: a positive tied with an earlier negative ranks first (the paper: 1/1, then 2/4; scikit-learn:
    # one threshold at 1/2); tag 1: every score tied, the one positive first image ranks last; tag 2: no
    # positive. float16 scores, as the paper's int8 runs give them.
    scores = np.array([[0.5, 0.3, 0.9], [0.5, 0.3, 0.1], [0.1, 0.3, 0.4], [0.4, 0.3, 0.4]], dtype=np.float16)
    targets = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    m, ap = M.mean_average_precision(scores, targets, paper=True)
    expected = [_papers_ap(scores[:, t].tolist(), targets[:, t].tolist()) for t in range(3)]
    assert ap.tolist() == pytest.approx(expected, abs=1e-12) and m == pytest.approx(np.mean(expected), abs=1e-12)
    assert ap.tolist() == pytest.approx([(1 + 2 / 4) / 2, 1 / 4, 0]) and m == pytest.approx(1 / 3)
    # the default (scikit-learn's): tied scores one threshold, the tag without positives left out
    m_std, ap_std = M.mean_average_precision(scores, targets)
    assert ap_std[:2].tolist() == pytest.approx([1 / 2, 1 / 4]) and np.isnan(ap_std[2])
    assert m_std == pytest.approx(3 / 8)


def test_paper_ap_equals_the_scikit_learn_ap_without_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.RandomState(1)
    for _ in range(10):
        y = _labels_with_a_positive(rng, rng.randint(2, 60))
        s = rng.permutation(len(y)).astype(float)
        assert M.paper_average_precision(s, y) == pytest.approx(average_precision_score(y, s), rel=1e-7)
