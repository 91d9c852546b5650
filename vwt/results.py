"""Results files: names that never collide, configurations recorded as JSON, atomic writes.

A leaf module (standard library only). Every script names its results ``<readable>__<hash>`` where
``readable`` says what a person needs to find the file (data, model, method) and ``hash`` is a short
digest of the whole configuration, so two runs that differ in anything (dtype, vocabulary file,
protocol, batch, limit, ...) never write the same file. Writes go to a temporary file in the same
folder and are renamed into place, so a crash never leaves a truncated file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

# Options that change where or how fast a run works, never what it computes (--bucket only reorders
# the batches: every image's result is the same, to float rounding).
NOT_CONFIG = ("out", "workers", "restart", "summary", "progress", "bucket")


def slug(text: str) -> str:
    """``text`` made safe as part of a file name: letters, digits, '.', '-'; anything else becomes '-'."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in str(text)).strip("-") or "x"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (paths and other objects become strings; containers recurse)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_of(args: Any, drop: Iterable[str] = ()) -> dict:
    """The configuration a run records: its argparse namespace (or a mapping) as JSON data."""
    items = vars(args) if not isinstance(args, Mapping) else args
    skip = set(drop)
    return {k: jsonable(v) for k, v in items.items() if k not in skip}


def config_hash(config: Mapping, ignore: Iterable[str] = NOT_CONFIG, length: int = 8) -> str:
    """A short digest of everything in ``config`` that changes what a run computes."""
    skip = set(ignore)
    data = {k: v for k, v in jsonable(config).items() if k not in skip}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_stem(readable: Iterable[str], config: Mapping, ignore: Iterable[str] = NOT_CONFIG) -> str:
    """``part1__part2__...__hash``: readable parts (slugged) and the configuration's digest."""
    return "__".join([slug(p) for p in readable if p] + [config_hash(config, ignore)])


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(jsonable(payload), indent=2) + "\n")
