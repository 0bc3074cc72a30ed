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
    """Yield a temporary sibling directory to fill; on success it replaces `final` (renamed into
    place), on an exception it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
