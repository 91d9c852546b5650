"""Results files: names that separate configurations, atomic writes."""
import json
from pathlib import Path

import pytest

from vwt import results


def test_config_hash_separates_what_a_run_computes_and_ignores_where_it_writes():
    base = {"data": "waterbirds", "dtype": "float32", "vocab_path": Path("a/vocab.pt"), "out": "results"}
    assert results.config_hash(base) == results.config_hash(dict(base, out="elsewhere", workers=8))
    assert results.config_hash(base) != results.config_hash(dict(base, dtype="float16"))
    assert results.config_hash(base) != results.config_hash(dict(base, vocab_path=Path("b/vocab.pt")))


def test_run_stem_is_readable_and_file_safe():
    stem = results.run_stem(["waterbirds", "openai/clip-vit-base-patch16", "tome13"], {"tome": 13})
    parts = stem.split("__")
    assert parts[:3] == ["waterbirds", "openai-clip-vit-base-patch16", "tome13"] and len(parts[3]) == 8
    assert "/" not in stem


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    results.write_json(path, {"a": Path("x"), "b": (1, 2)})
    results.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_atomic_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "r.json"
    results.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        results.atomic_write_text(path, None)  # fails while writing the temporary file
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_writable_dir_checks_and_tidies_on_the_main_process_only(tmp_path, monkeypatch):
    """A new folder is probed and removed again (results create it when written); an unwritable one is a
    UserError. torchrun's other ranks write no results and skip the check, so they never remove the
    folder from under rank 0's probe (the race two processes hit)."""
    from vwt.errors import UserError

    target = tmp_path / "a" / "b"
    assert results.writable_dir(target) == target and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        results.writable_dir(tmp_path / "file" / "sub")
    monkeypatch.setenv("RANK", "1")
    assert results.writable_dir(tmp_path / "file" / "sub") == tmp_path / "file" / "sub"  # rank 1: no check
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError):
        results.writable_dir(tmp_path / "file" / "sub")
