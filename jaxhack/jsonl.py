"""Reading jsonl input with errors that name the file and line."""
from __future__ import annotations

import json
from typing import Iterable, Iterator


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
