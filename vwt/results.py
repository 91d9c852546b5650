"""Results files: names that never collide, configurations recorded as JSON, atomic writes.

A leaf module (the standard library and ``vwt.errors`` only). Every script names its results ``<readable>__<hash>`` where
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
from typing import IO, Any, Callable, Iterable, Mapping

from .errors import UserError, first_line

# Options that change where or how fast a run works, never what it computes (--bucket only reorders
# the batches: every image's result is the same, to float rounding).
NOT_CONFIG = ("out", "workers", "restart", "summary", "progress", "bucket")

# Where runs write unless --out says otherwise: a folder git ignores (.gitignore), so a user's run never
# touches what the repository ships; the committed reference results in results/ are refreshed only
# by naming that folder (``--out results``, README "The main job").
DEFAULT_OUT = Path("runs")

# Switches recorded (and hashed) only when on: a run without one keeps the name it had before the
# switch existed (eff.py --compile)
ONLY_WHEN_ON = ("compile",)


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


def config_of(run: Any, drop: Iterable[str] = ()) -> dict:
    """The configuration a run records, as JSON data: a ``vwt.spec.RunSpec``'s :meth:`config` (every
    setting by its command-line name), or a mapping; a switch of ``ONLY_WHEN_ON`` only when on."""
    items = run if isinstance(run, Mapping) else run.config() if hasattr(run, "config") else vars(run)
    skip = set(drop)
    return {k: jsonable(v) for k, v in items.items() if k not in skip and not (k in ONLY_WHEN_ON and v is False)}


def config_hash(config: Mapping, ignore: Iterable[str] = NOT_CONFIG, length: int = 8) -> str:
    """A short digest of everything in ``config`` that changes what a run computes."""
    skip = set(ignore)
    data = {k: v for k, v in jsonable(config).items() if k not in skip}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_stem(readable: Iterable[str], config: Mapping, ignore: Iterable[str] = NOT_CONFIG) -> str:
    """``part1__part2__...__hash``: readable parts (slugged) and the configuration's digest."""
    return "__".join([slug(p) for p in readable if p] + [config_hash(config, ignore)])


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """The one atomic writer of every results file (text, JSON, CSV, PNG, tensors): ``write(f)`` fills
    a temporary file in the same folder (opened binary), which is synced and renamed onto ``path``; a
    crash or a full disk never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(bytes(text, "utf-8")))


def atomic_savefig(fig, path: Path, **kwargs) -> Path:
    """Save a matplotlib figure as a PNG atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", **kwargs))


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(jsonable(payload), indent=2) + "\n")


def model_label(name: str) -> str:
    """A model's name as results file names show it: a local model folder by its last component (the
    file name's hash still tells two folders of the same name apart), anything else as it is."""
    return Path(name).name if os.path.isdir(name) else name


def writable_dir(path, flag: str = "--out") -> Path:
    """Make sure results can be written into the folder ``path`` (created if missing) before any long
    work: an existing file in the way or a folder that refuses a file is a one-line UserError. Under
    torchrun only rank 0 writes results, and only it checks: ranks probing and tidying the same new
    folder at once would remove it under each other."""
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        return path
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a folder; pass a folder "
                            "(it is created if missing)")
    created = [d for d in [path, *path.parents] if not d.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({first_line(e)}); pass a folder you can write to") from None
    finally:
        for d in created:  # leave no empty folders behind: the results create them when they are written
            try:
                d.rmdir()
            except OSError:
                break
    return path
