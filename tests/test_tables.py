"""The tables are the only place a method or a data set is described: a new reducer is one class and one
row of vwt.method_table, and clip.py, eff.py, len.py and match.py accept it; a new data set is one
reader, one row of vwt.datasets.DATASETS and one fixture, and clip.py and len.py accept it."""
import pandas as pd
import pytest
import torch

import clip as clip_script
import eff
import fixtures
import len as len_script
import match
import tiny
import vwt
from tiny import NUM_PATCHES
from vwt import datasets as D
from vwt import method_table

FAST = ["--seconds", "0.001", "--min-iters", "1", "--warmup", "0", "--warmup-seconds", "0", "--rounds", "2",
        "--paper-warmup", "1", "--limit", "2", "--device", "cpu", "--metric", "time"]


class KeepBright(vwt.IntraImage):
    """A reducer no script knows: keeps the brightest patches (mean value) instead of the most varied."""

    def scores(self, pixel_values, patch_size):
        from vwt.tokenizer import pixel_patches

        return pixel_patches(pixel_values, patch_size).float().mean(-1)


@pytest.fixture
def bright():
    """The one row that makes KeepBright a method of every script (removed again afterwards)."""
    row = method_table.Method("bright", "bright", "--bright", "input", float, 0.25, "brightest patches",
                              "keep the brightest patches: fraction to drop", lambda v, s: KeepBright(drop=v),
                              lambda v, s: f"bright{v:g}", metavar="DROP")
    method_table.register(row)
    yield row
    method_table.METHODS.pop("bright")


def kept(drop: float) -> int:
    return 1 + int(NUM_PATCHES * (1 - drop))  # the class token and the kept patches


def test_a_registered_reducer_runs_in_clip(bright, tmp_path):
    root = fixtures.write_waterbirds(tmp_path / "data")
    loaded = tiny.loaded(tokenizer=fixtures.char_clip_tokenizer(tmp_path / "tok"))
    res = clip_script.main(["--data", "waterbirds", "--data-root", str(root), "--out", str(tmp_path / "out"),
                            "--protocol", "standard", "--workers", "0", "--device", "cpu", "--bright", "0.5"], loaded)
    assert res["method"] == "bright0.5" and res["metrics"]["tokens_first_block"]["mean"] == kept(0.5)


def test_the_rule_names_a_registered_reducer(bright):
    with pytest.raises(vwt.cli.UserError, match=r"or --bright \(brightest patches\); got --top_k and --bright"):
        vwt.cli.check_methods(top_k=0.5, bright=0.5)


def test_a_registered_reducer_runs_in_eff_at_its_paper_default(bright, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = eff.main(["--methods", "base,bright,bright+tome", "--batch", "1", "--out", "res"] + FAST, loaded=tiny.loaded())
    rows = df.set_index("method")
    assert list(df["method"]) == ["base", "bright", "bright+tome"]
    assert rows.loc["bright", "config"] == "bright0.25" and rows.loc["bright", "tokens_in"] == kept(0.25)
    assert rows.loc["bright+tome", "config"] == "bright0.25+tome13"
    df = eff.main(["--bright", "0.5", "--batch", "1", "--out", "res2"] + FAST, loaded=tiny.loaded())
    assert list(df["method"]) == ["base", "bright"] and df.set_index("method").loc["bright", "tokens_in"] == kept(0.5)


def test_a_registered_reducer_runs_in_len_and_match(bright, tmp_path):
    res = len_script.main(["--data", "samples", "--bright", "0.5", "--max-images", "3", "--workers", "0",
                           "--device", "cpu", "--out", str(tmp_path)], tiny.loaded())
    assert res["method"] == "bright0.5" and res["tokens"]["mean"] == kept(0.5)
    out = match.run(match.parse_args(["--bright", "0.5", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"]),
                    loaded=tiny.loaded())
    image = out["images"][0]
    assert out["method"] == "bright0.5" and image["tokens_first_block"] == kept(0.5)
    assert len(image["dropped"]) == NUM_PATCHES - (kept(0.5) - 1)


# --------------------------------------------------------------------------------------------------
# A new data set: one reader, one row, one fixture
# --------------------------------------------------------------------------------------------------
def read_toy(root, transform, split=None, seed=None, class_names="paper"):
    """A grouped data set in a layout no other reader knows: <root>/toy/labels.csv (file,label,group)."""
    table = pd.read_csv(root / "toy" / "labels.csv")
    records = [{"path": str(root / "toy" / f), "image_id": f, "label": int(y), "group": int(g)}
               for f, y, g in zip(table["file"], table["label"], table["group"])]
    return D.ImageRecords("toy", records, transform, classes=("cat", "dog"),
                          group_names=("cat inside", "cat outside", "dog inside", "dog outside"))


def write_toy(root):
    (root / "toy").mkdir(parents=True)
    lines = ["file,label,group"]
    for i in range(6):
        fixtures.photo(i).save(root / "toy" / f"{i}.jpg")
        lines.append(f"{i}.jpg,{i % 2},{i % 4}")
    (root / "toy" / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def toy():
    row = D.register(D.DataSet("toy", lambda root, transform, split, seed, protocol: read_toy(root, transform),
                               "<root>/toy/{labels.csv, images}", "groups"))
    yield row
    D.DATASETS.pop("toy")


def test_a_registered_data_set_runs_in_clip_and_len(toy, tmp_path):
    root = write_toy(tmp_path / "data")
    loaded = tiny.loaded(tokenizer=fixtures.char_clip_tokenizer(tmp_path / "tok"))
    res = clip_script.main(["--data", "toy", "--data-root", str(root), "--out", str(tmp_path / "out"),
                            "--workers", "0", "--device", "cpu", "--top_k", "0.5"], loaded)
    assert res["images"] == 6 and set(res["metrics"]["groups"]) == {"cat inside", "cat outside", "dog inside",
                                                                    "dog outside"}
    assert res["labels"] == ["cat", "dog"] and res["seeds"] == [0]  # not re-split: the protocol runs it once
    counted = len_script.main(["--data", "toy", "--data-root", str(root), "--top_k", "0.5", "--workers", "0",
                               "--device", "cpu", "--out", str(tmp_path / "len")], tiny.loaded())
    assert counted["tokens"]["images"] == 6 and counted["tokens"]["mean"] == kept(0.5)
    assert set(counted["groups"]) == {"cat inside", "cat outside", "dog inside", "dog outside"}
    assert "toy" in D.NAMES and "toy" in clip_script.zs.data_names()
