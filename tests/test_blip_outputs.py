"""blip.py's outputs as the paper's code writes them: predictions.json ([{"image_id", "caption"}], the
NoCaps EvalAI upload format) beside our own scores, and COCO scored against BLIP's
coco_karpathy_test_gt.json where it is there (the paper protocol). The scorer is replaced by one that
records what it is given, so these tests need no Java."""
import json

import pytest

import blip as blip_script
import fixtures
import tiny
from vwt import cli
from vwt import metrics as M


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fixtures.word_bert_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scored(monkeypatch):
    calls = []

    def record(references, candidates, spice=None, which=M.CAPTION_METRICS):
        calls.append((references, candidates))
        return {m: 0.5 for m in which}

    monkeypatch.setattr(M, "caption_scores", record)
    return calls


def run(root, out, argv, tok):
    loaded = cli.Loaded(tiny.hf_blip(), "hf_blip", "tiny-blip", False, tok)
    return blip_script.main(argv + ["--batch", "2", "--data-root", str(root), "--out", str(out), "--workers", "0",
                                    "--device", "cpu"], loaded)


def _captions(path):
    return [json.loads(l) for l in path.read_text().splitlines()[1:]]


def test_nocaps_writes_evalai_predictions_and_keeps_local_scores(tmp_path, tok, scored):
    root = fixtures.write_nocaps(tmp_path / "data")
    res = run(root, tmp_path, ["--data", "nocaps"], tok)
    [captions] = (tmp_path / "blip").glob("nocaps__tiny-blip__base__????????.captions.jsonl")
    made = _captions(captions)
    [path] = (tmp_path / "blip").glob("nocaps__tiny-blip__base__????????.predictions.json")
    predictions = json.loads(path.read_text())
    assert predictions == [{"image_id": l["image_id"], "caption": l["caption"]} for l in made]
    assert [p["image_id"] for p in predictions] == [0, 1, 2] and res["predictions_file"].endswith("predictions.json")
    assert res["metrics"]["CIDEr"] == 0.5 and set(res["domains"]) == {"in-domain", "near-domain", "out-domain"}


def test_coco_references_come_from_the_gt_file_when_present(tmp_path, tok, scored):
    root = fixtures.write_coco(tmp_path / "data")
    run(root, tmp_path, ["--data", "coco"], tok)
    own = {r: c for r, c in scored[-1][0].items()}
    assert sorted(own) == [42, 73, 74, 133]
    gt = {"images": [{"id": i} for i in own], "annotations": [
        {"image_id": i, "id": n, "caption": f"reference {n} of {i}"} for n, i in enumerate(list(own) * 2)]}
    (root / "coco" / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))
    res = run(root, tmp_path, ["--data", "coco"], tok)
    refs = scored[-1][0]
    assert refs == {i: [a["caption"] for a in gt["annotations"] if a["image_id"] == i] for i in own}
    assert res["references"] == "coco_karpathy_test_gt.json"
    assert len(list((tmp_path / "blip").glob("coco__tiny-blip__base__????????.predictions.json"))) == 1
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 74]
    (root / "coco" / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))
    with pytest.raises(cli.UserError, match="image 74 has no reference in coco_karpathy_test_gt.json"):
        run(root, tmp_path, ["--data", "coco"], tok)


def _apostrophe_tokenizer(directory):
    """A BERT word-piece tokenizer built offline whose basic tokenizer splits "man's" into man ' s."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "[DEC]", "a", "man", "'", "s", "hand"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizer(str(directory / "vocab.txt"), bos_token="[DEC]")


class _Generates:
    """A stand-in BLIP whose beam search returns fixed ids (BOS, the caption, SEP)."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, pixel_values, **kw):
        return self.ids.expand(len(pixel_values), -1)


@pytest.mark.parametrize("protocol, caption", [("paper", "a man's hand"), ("standard", None)])
def test_captions_decode_as_the_protocol_says(tmp_path, protocol, caption):
    import types

    import torch

    from vwt.captioning import Decoding, caption_batch
    from vwt.spec import RunSpec

    tok = _apostrophe_tokenizer(tmp_path / "tok")
    pieces = tok.tokenize("a man's hand")
    assert pieces == ["a", "man", "'", "s", "hand"]  # the split the PTB tokenizer then scores differently
    ids = torch.tensor([[tok.bos_token_id, *tok.convert_tokens_to_ids(pieces), tok.sep_token_id]])
    loaded = types.SimpleNamespace(tokenizer=tok, model=_Generates(ids), name="stand-in")
    spec = RunSpec(protocol=protocol, options=Decoding(max_length=20, prompt=""))
    got = caption_batch(spec, loaded, torch.zeros(2, 3, 4, 4), None)
    # paper: the spaces joined as transformers 4.28.1's default decode did; standard: the tokenizer's default
    expected = caption or ("a man's hand" if tok.clean_up_tokenization_spaces else "a man ' s hand")
    assert got == [expected, expected]
