"""The protocols are objects (vwt.protocol): the README's protocol table and PAPER/STANDARD agree row by
row, and no module but vwt/protocol.py decides anything by comparing a protocol's name."""
import ast
import re
from pathlib import Path

import pytest

from vwt import datasets as D
from vwt import protocol as P
from vwt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def readme_rows() -> dict:
    """{row title: (paper cell, standard cell)} of the README's "Protocols" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Protocols\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| difference"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = (cells[1], cells[2])
    return rows


def says(attr: str, value, rules: P.Protocol) -> list:
    """What a table cell must say for ``attr`` = ``value`` (written from the README's wording)."""
    if attr == "resplit":
        return ["re-splits the data"] if value else ["fixed split"]
    if attr == "grouped_seeds":
        return ["seeds " + " ".join(map(str, value))]
    if attr == "other_seeds":
        return [f"seed {value[0]} once"] if len(value) == 1 else ["seeds " + " ".join(map(str, value))]
    if attr == "metashift_generated":
        return ["generated"] if value else ["the release's folders"]
    if attr == "class_names":
        table = D.CLASS_NAME_TABLES[value]
        return [f'"{n}"' for data in ("celeba", "meta") for n in table[data]]
    if attr in ("data_preprocessing", "process_data_preprocessing"):
        return ["the data set's own"] if value else ["the model's own"]
    if attr == "coco_train_per_caption":
        return ["one record per caption"] if value else ["once each"]
    if attr == "coco_blip_references":
        return ["coco_karpathy_test_gt.json"] if value else ["the split file's captions"]
    if attr == "len_seed":
        return [f"`--seed`, default {value}"] if value is not None else ["fixed split"]
    if attr in ("paper_tome", "paper_tome_elsewhere"):
        return ['sizes="per-block"'] if value else ["official ToMe"]
    if attr == "whole_model_int8":
        return ["the whole model"] if value else ["the vision tower only"]
    if attr == "caption_prompt":
        return [f'"{value}"'] if value else ["none"]
    if attr == "caption_lengths":
        if rules is P.STANDARD and value == P.PAPER.caption_lengths:
            return ["the same"]
        return ["beams {}, min length {}, max length {}, or {}".format(*value)]
    if attr == "caption_cleanup":
        return [f"clean_up_tokenization_spaces={value}"] if value is not None else ["the tokenizer's own default"]
    if attr == "paper_map":
        return ["`get_mAP`", "counts AP 0"] if value else ["`average_precision_score`", "with a positive image"]
    if attr == "float32_word_ties":
        return ["rounded to float32"] if value else ["float64"]
    if attr == "process_paper_size":
        return ["224 px whatever the model's"] if value else ["the model's own size"]
    if attr == "int8_float16_scores":
        return ["in float16"] if value else ["in float32"]
    if attr == "paper_measurement":
        return ["also runs the paper's"] if value else ["ours only"]
    if attr == "kmeans":
        return [f"`--kmeans {value}`"]
    if attr == "vocab_per_seed":
        seeds = rules.grouped_seeds
        return [f"one per seed {seeds[0]}-{seeds[-1]}"] if value else ["one (seed 0"]
    if attr == "process_coco_per_caption":
        return ["one entry per caption"] if value else ["each image once"]
    if attr == "in_domain_vocab":
        return ["in-domain"] if value else ["ImageNet's"]
    raise AssertionError(f"no README wording known for {attr}: add it here and a row to the README's table")


def test_the_readme_table_has_one_row_per_protocol_row_and_every_attribute_has_a_row():
    assert set(readme_rows()) == set(P.ROWS)
    documented = [a for attrs in P.ROWS.values() for a in attrs]
    assert sorted(documented) == sorted(P.attributes())


@pytest.mark.parametrize("title", sorted(P.ROWS))
def test_each_readme_row_says_what_the_protocol_objects_hold(title):
    cells = dict(zip((P.PAPER, P.STANDARD), readme_rows()[title]))
    for rules, cell in cells.items():
        for attr in P.ROWS[title]:
            for phrase in says(attr, getattr(rules, attr), rules):
                assert phrase in cell, f"README row {title!r}, {rules.name}: {attr}={getattr(rules, attr)!r} " \
                                       f"should say {phrase!r}"


def test_a_changed_protocol_value_is_caught_by_the_table_check():
    import dataclasses

    changed = dataclasses.replace(P.PAPER, grouped_seeds=(4, 5, 6))
    cell = readme_rows()["seeds and splits (Waterbirds, CelebA, MetaShift)"][0]
    assert not all(p in cell for p in says("grouped_seeds", changed.grouped_seeds, changed))


def test_protocols_by_name_and_a_clear_error_for_an_unknown_one():
    assert P.get("paper") is P.PAPER and P.get("standard") is P.STANDARD and P.get(None) is P.DEFAULT
    assert P.get(P.STANDARD) is P.STANDARD
    with pytest.raises(UserError, match="unknown protocol 'papr'; choose paper or standard"):
        P.get("papr")


def _name_compares(path: Path) -> list:
    """Lines where ``path`` compares something named protocol, or the strings 'paper'/'standard' as
    protocol names, with == / != / in."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any(re.search(r"(^|\.)protocol$", ast.unparse(s)) for s in sides)
        literal = any(isinstance(s, ast.Constant) and s.value in ("paper", "standard") for s in sides) and \
            any("protocol" in ast.unparse(s) for s in sides)
        if named or literal:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_the_protocol_module_compares_a_protocol_name():
    files = [p for p in sorted((ROOT / "vwt").rglob("*.py")) if p.name != "protocol.py"]
    files += sorted(ROOT.glob("*.py"))
    found = [line for path in files for line in _name_compares(path)]
    assert not found, "decide through the Protocol object's attributes instead:\n" + "\n".join(found)


def test_the_compare_finder_finds_a_comparison(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(args):\n    return args.protocol == "paper"\n')
    (tmp_path / "vwt").mkdir()
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert _name_compares(bad) == ['bad.py:2: args.protocol == \'paper\'']
    finally:
        ROOT = old
