"""File I/O shared by every phase: atomic writes and jsonl (the one owner of both).

Atomic writes: a reader sees the old file/directory or the complete new one, never a partial one
(nothing is lost or half-written on a crash). jsonl: input readers with errors that name the file and
line (`iter_jsonl`), and the append-only logs of a run (`append_jsonl` / `read_jsonl` /
`rewrite_jsonl`), where a torn last line (a crash mid-write) is ignored.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


# ----------------------------------------------------------------------------------------------
# atomic writes

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are meant to be shared
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of the UTF-8 encoding of `text`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary sibling directory to fill; on success it replaces `final` (the old one is
    renamed aside, the new one renamed into place, then the old one removed: no stale file of the old
    directory survives), on an exception it is removed and `final` is left as it was."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as err:
        raise UserError(f"cannot write to {final.parent}: {err.strerror or err}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# user errors and the one run-directory rule

class UserError(Exception):
    """An error of the user's input (a path, a flag, a file): the CLI prints `error: MESSAGE` on one
    line and exits with status 2, without a traceback (jaxhack.commands.guarded). Anything else is a
    bug and keeps its traceback."""


def check_writable(path: str | Path) -> None:
    """UserError unless `path` (a file or directory to be created or replaced) can be written: its
    nearest existing ancestor must be a directory in which a file can really be created (this also
    catches read-only file systems, which permission bits do not show)."""
    p = Path(path).absolute()
    probe = p.parent if p.exists() else p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {path}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UserError(f"cannot write {path}: {probe} is not writable ({err.strerror or err})") from None


def claim_run_dir(path: str | Path, *, what: str, finished: Callable[[Path], bool], force: bool = False,
                  resumable: bool = False) -> bool:
    """The one run-directory rule of every command that writes a run directory (pool, extract,
    phase1, phase2, demo, train; the sweep applies it per run).

    A missing or empty `path` is claimed. A directory holding a run is refused with one line (what
    is there, `--force` to replace it, `--resume` when `resumable`) unless `force`; the command then
    writes its new run into a sibling temporary directory and swaps it in (`atomic_directory`), so
    no file of the old run survives. `finished(path)` says whether the run there completed.
    Returns True when `path` holds a run that `force` will replace. UserError on refusal or when the
    location is not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: exists and is not a directory")
    check_writable(p)
    if not p.exists() or not any(p.iterdir()):
        return False
    if force:
        return True
    state = f"a finished {what}" if finished(p) else f"an unfinished {what} (killed or failed?), or other files"
    hint = "pass --force to replace it" + (", or --resume to continue it" if resumable else "")
    raise UserError(f"{p} already holds {state}; {hint} (or choose another output directory)")


def remove_stale_temp_dirs(directory: str | Path) -> list[Path]:
    """Remove the `.NAME.tmp-*` directories `atomic_directory` left in `directory` when a process
    was killed mid-write (call it only when no other writer is active, e.g. on --resume)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(".") and ".tmp-" in p.name)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------
# jsonl

def iter_jsonl(lines: Iterable[str], path, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """Yield (where, parsed value) for each non-blank line; `where` is "PATH line N" for messages.
    A line that is not JSON raises `error("PATH line N: not valid json: ...")`."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid json: {err.msg}") from None
        yield where, value


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one json line and flush + fsync (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a jsonl log (missing file: []); a torn last line (crash mid-write) is ignored."""
    if not Path(path).is_file():
        return []
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1}: invalid json") from None
    return out


def rewrite_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> None:
    """Atomically rewrite a jsonl log keeping only the records for which `keep` is true."""
    records = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
