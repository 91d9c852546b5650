"""Results files: names that never collide, configurations recorded as JSON, atomic writes.

A leaf module (the standard library and ``vwt.errors`` only). Every script names its results ``<readable>__<hash>`` where
``readable`` says what a person needs to find the file (data, model, method) and ``hash`` is a short
digest of the whole configuration, so two runs that differ in anything (dtype, vocabulary file,
protocol, batch, limit, ...) never write the same file. Every write goes through :func:`write_files`
(a temporary file in the same folder, renamed into place, so a crash never leaves a truncated file; a
full disk is one line and the files saved in the temporary-files folder) or, for the captions file
that grows line by line, :func:`append_whole`.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Optional

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
ONLY_WHEN_OFF = ("paper_runs",)  # the committed reference run predates the switch, and keeps its name


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
    setting by its command-line name), or a mapping; a switch of ``ONLY_WHEN_ON`` only when on, of
    ``ONLY_WHEN_OFF`` only when off."""
    items = run if isinstance(run, Mapping) else run.config() if hasattr(run, "config") else vars(run)
    skip = set(drop)
    return {k: jsonable(v) for k, v in items.items()
            if k not in skip and not (k in ONLY_WHEN_ON and v is False) and not (k in ONLY_WHEN_OFF and v is True)}


def config_hash(config: Mapping, ignore: Iterable[str] = NOT_CONFIG, length: int = 8) -> str:
    """A short digest of everything in ``config`` that changes what a run computes."""
    skip = set(ignore)
    data = {k: v for k, v in jsonable(config).items() if k not in skip}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_stem(readable: Iterable[str], config: Mapping, ignore: Iterable[str] = NOT_CONFIG) -> str:
    """``part1__part2__...__hash``: readable parts (slugged) and the configuration's digest."""
    return "__".join([slug(p) for p in readable if p] + [config_hash(config, ignore)])


class _Sink(io.RawIOBase):
    """An open file descriptor as a binary file whose every byte goes through ``os.write``: the one
    place where a results file meets the disk. It has no ``fileno``, so no library (PIL writes PNGs
    straight to a descriptor where it can) goes around it."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return os.write(self.fd, data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _write_files(files: Mapping[Path, Callable[[IO[bytes]], Any]]) -> None:
    """Fill a temporary file beside each target (``write(f)``, f opened binary), sync them all, then
    rename them into place in order: until the renames, nothing under a final name has changed."""
    temps = []
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append(tmp)
            with io.BufferedWriter(_Sink(fd)) as f:
                write(f)
                f.flush()
                os.fsync(fd)
        for tmp, path in zip(temps, files):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)  # renamed ones are gone already


def write_files(files: Mapping[Path, Callable[[IO[bytes]], Any]], rescue: bool = True) -> list[Path]:
    """The one writer of every results file (text, JSON, CSV, PNG, tensors): each ``write(f)`` fills a
    temporary file in its target's folder, synced and renamed into place only when all are whole, so a
    crash or a full disk never leaves a truncated file under a final name and the files before stay
    byte for byte. Where the disk refuses them (full, gone, read-only) they are saved instead under a
    folder of the temporary-files folder at the same relative paths (:func:`rescue_path`) and a one-line
    UserError says where (inside :func:`saving_what_it_can`, once at its end, the run going on meanwhile).
    ``rescue=False`` (files the run reads back, not results) re-raises the OSError. Returns the paths
    written (the rescued ones where rescued)."""
    files = {Path(p): w for p, w in files.items()}
    try:
        _write_files(files)
        return list(files)
    except OSError as e:
        if not rescue:
            raise
        failed = e
    try:
        copies = {rescue_path(p): w for p, w in files.items()}
        _write_files(copies)
    except OSError as again:
        raise UserError(f"{_head(list(files), failed)}, nor a copy in {tempfile.gettempdir()} ({first_line(again)}); "
                        "free some space and rerun") from None
    done = list(zip(files, copies))
    if _RESCUED is None:
        raise UserError(_failure_line(done, failed))
    _RESCUED.append((done, failed))
    return list(copies)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], rescue: bool = True) -> Path:
    """Write one file through :func:`write_files`; returns where it went."""
    return write_files({path: write}, rescue)[0]


# --------------------------------------------------------------------------------------------------
# Where a write the disk refused goes, and the one line that says so
# --------------------------------------------------------------------------------------------------
_ROOTS: dict = {}  # temporary-files folder -> this process's rescue folder in it
_RESCUED: Optional[list] = None  # inside saving_what_it_can(): [([(target, copy), ...], error), ...]


def _rescue_root() -> Path:
    tmp = tempfile.gettempdir()
    if tmp not in _ROOTS or not _ROOTS[tmp].is_dir():
        _ROOTS[tmp] = Path(tempfile.mkdtemp(prefix="vwt-rescue-", dir=tmp))
    return _ROOTS[tmp]


def rescue_path(path: Path) -> Path:
    """Where a file that cannot be written at ``path`` is saved instead: this process's folder of the
    temporary-files folder, at ``path``'s path relative to the current folder (absolute paths elsewhere
    under their full path), so copying that folder back restores every file where it belongs."""
    full = Path(os.path.abspath(path))
    try:
        rel = full.relative_to(Path.cwd())
    except ValueError:
        rel = full.relative_to(full.anchor)
    return _rescue_root() / rel


def _head(targets: list, error: OSError) -> str:
    """``no space left on device writing X`` (or ``cannot write X (why)``); several files are named by
    their count and folder, or the first and how many more."""
    folders = {t.parent for t in targets}
    what = str(targets[0]) if len(targets) == 1 else \
        f"{len(targets)} files in {targets[0].parent}" if len(folders) == 1 else \
        f"{targets[0]} and {len(targets) - 1} more file{'s' * (len(targets) > 2)}"
    if error.errno == errno.ENOSPC:
        return f"no space left on device writing {what}"
    return f"cannot write {what} ({first_line(error)})"


def _failure_line(done: list, error: OSError) -> str:
    """The one line of rescued files: ``no space left on device writing X; saved to Y`` for the
    (target, copy) pairs of ``done``."""
    copies = [c for _, c in done]
    where = str(copies[0]) if len(copies) == 1 else str(copies[0].parent) if len({c.parent for c in copies}) == 1 \
        else f"{_rescue_root()} (at the same paths; copy them back when there is space)"
    return f"{_head([t for t, _ in done], error)}; saved to {where}"


@contextmanager
def saving_what_it_can():
    """Inside (every script's main, vwt.cli.main): a results file the disk refuses is saved in the
    temporary-files folder and the run goes on, so every later result is kept too; on leaving, one
    UserError names them all and where they are. Outside (library calls), the first such write raises
    its UserError at once, the file saved."""
    global _RESCUED
    outer, _RESCUED = _RESCUED, []
    try:
        yield
    except UserError as e:
        rescued, _RESCUED = _RESCUED, outer
        if rescued:
            raise UserError(f"{e}; before that: {_failure_line(*_merge(rescued))}") from None
        raise
    except BaseException:
        rescued, _RESCUED = _RESCUED, outer
        if rescued:
            print(f"note: {_failure_line(*_merge(rescued))}", file=sys.stderr)
        raise
    rescued, _RESCUED = _RESCUED, outer
    if rescued:
        raise UserError(_failure_line(*_merge(rescued)))


def _merge(rescued: list) -> tuple:
    """Every rescued (target, copy) pair and the first error."""
    return [pair for done, _ in rescued for pair in done], rescued[0][1]


def append_whole(f: IO[bytes], data: bytes) -> None:
    """Append ``data`` to ``f`` (a file opened for appending, binary) whole or not at all, the way the
    captions file grows line by line: the bytes go through ``os.write`` until all are written, then are
    synced; where that fails (a full disk mid-line, an interrupt) the file is cut back to its length
    before, so it never keeps a torn line. The failure is a one-line UserError (an interrupt is raised
    as it is)."""
    fd = f.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as e:
        os.ftruncate(fd, start)
        if not isinstance(e, OSError):
            raise
        raise UserError(f"{_head([Path(f.name)], e)}; everything written to it before is kept, whole: free some "
                        "space and rerun to go on from there") from None


@contextmanager
def exclusive(path: Path):
    """Hold the lock of ``path`` (``.<name>.lock`` beside it, ``fcntl.flock``) while the block runs, so
    two runs never append to one file at once: a second run is a one-line UserError. The kernel drops
    the lock when the process ends, however it ends; the empty lock file stays, never written (removing
    it would let a third run lock a new file while the first still holds the old one)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as before
        yield
        return
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot make the lock {lock} of {path.name} ({first_line(e)}); pass an --out you can "
                        "write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing {path} now; wait for it to finish, or pass another "
                            "--out") from None
        yield
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, rescue: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(bytes(text, "utf-8")), rescue)


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
