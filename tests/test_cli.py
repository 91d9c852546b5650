"""The shared script plumbing: one label and one reducer builder for every script, one-line errors."""
import argparse

import pytest
import torch

import vwt
from vwt import cli


def flags(argv):
    p = argparse.ArgumentParser()
    cli.add_method_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, label", [
    ([], "base"),
    (["--top_k", "0.5", "--random"], "intra0.5-random"),
    (["--vocab", "1000", "--tome", "13", "--quant"], "inter-v1000-t0.1+tome13+int8"),
    (["--vocab-path", "published/vocab.pt", "--thresh", "0.2", "--random"], "inter-vpublished-t0.2-random"),
    (["--evit", "0.7"], "evit0.7"),
    (["--lgtm", "8"], "lgtm8"),
    (["--top_k", "0"], "intra0"),  # 0 is a value, not "not asked for"
])
def test_method_name_labels_the_flags(argv, label):
    assert cli.method_name(flags(argv)) == label


def test_build_reducers_makes_each_method():
    vocab = vwt.Vocabulary(torch.rand(4, 192))
    made = cli.build_reducers(vocab=vocab, thresh=0.2, tome=3)
    assert [type(r) for r in made] == [vwt.InterImage, vwt.ToMe] and made[0].thresh == 0.2 and made[1].r == 3
    assert [type(r) for r in cli.build_reducers(top_k=0.5, evit=0.7)] == [vwt.IntraImage, vwt.EViT]
    assert type(cli.build_reducers(lgtm=8)[0]) is vwt.LGTM


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=1.0), "fraction of patches to drop"),
    (dict(tome=-1), "ToMe: r must be a non-negative int"),
    (dict(evit=1.5), "EViT: keep must be in"),
    (dict(tome=2, lgtm=2), "one in-network reducer"),
    (dict(top_k=0.5, vocab=vwt.Vocabulary(torch.rand(4, 192))), "choose one input reducer: --top_k"),
])
def test_settings_a_reducer_refuses_are_one_line_user_errors(kwargs, message):
    with pytest.raises(cli.UserError, match=message) as e:
        cli.build_reducers(**kwargs)
    assert "\n" not in str(e.value)


def test_missing_and_unreadable_vocabularies_are_user_errors(tmp_path):
    with pytest.raises(cli.UserError, match="not found; learn it"):
        cli.read_vocabulary(tmp_path / "v9" / "vocab.pt", "; learn it")
    (tmp_path / "vocab.pt").write_text("not a tensor")
    with pytest.raises(cli.UserError, match="cannot read vocabulary"):
        cli.read_vocabulary(tmp_path / "vocab.pt")


def test_first_line_of_an_exception():
    assert cli.first_line(ValueError("first\nsecond")) == "first"
    assert cli.first_line(OSError()) == "OSError"
    assert cli.first_line(ValueError("x" * 500), 10) == "x" * 10 + " ..."  # one word: cut, and marked


def test_lgtm_takes_its_schedule_on_the_command_line(capsys):
    """--lgtm R keeps LGTM's default schedule; --lgtm R,DENSE,LOCAL sets it (and names it in the label);
    anything else is one line."""
    (red,) = cli.reducers_from_args(flags(["--lgtm", "8,1,3"]))
    assert (red.r, red.schedule(12)) == (8, (1, 3)) and cli.method_name(flags(["--lgtm", "8,1,3"])) == "lgtm8-d1-l3"
    (red,) = cli.reducers_from_args(flags(["--lgtm", "8"]))
    assert (red.r, red.schedule(12), red.schedule(24)) == (8, (2, 2), (4, 4))
    with pytest.raises(cli.UserError, match="dense must be a non-negative int"):
        cli.reducers_from_args(flags(["--lgtm", "8,-1,2"]))
    with pytest.raises(SystemExit):
        flags(["--lgtm", "8,2"])
    assert "--lgtm" in capsys.readouterr().err
