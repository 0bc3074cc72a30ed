"""Length-bucketed micro-batches for the reference pass and the update (bounded memory, no padding waste).

A Phase 3 batch has N rows of very different real lengths (prompt + completion). Padding every row
to the longest possible length (prompt + max_new) makes the reference pass and the update pay for
tokens that do not exist: at the full preset (max_new 1536) with completions of ~500 tokens that is
about half the work. Instead the rows are sorted by real length and cut into micro-batches of M
rows; each micro-batch is cut to its own longest row, rounded up to `multiple` (so only a few
distinct shapes compile). Memory is that of one micro-batch of at most M x max_len tokens, whatever N;
with a token budget (`max_tokens`) a micro-batch of T positions holds at most max_tokens // T rows, so
short rows are not held to the row count that the longest rows need.

Exactness: rows are right-padded and the model is causal, so dropping trailing pad positions does not
change any real token's log-prob; the loss and gradient are sums over rows, so the grouping of rows
only changes the float summation order.
"""
from __future__ import annotations

import numpy as np


def rows_at(T: int, microbatch: int, max_tokens: int | None) -> int:
    """Rows of a micro-batch cut to T positions: `microbatch`, or fewer so that rows * T <= max_tokens
    (at least 1)."""
    return microbatch if max_tokens is None else max(1, min(microbatch, max_tokens // T))


def length_microbatches(lengths, microbatch: int, multiple: int = 512, max_len: int | None = None,
                        max_tokens: int | None = None, devices: int = 1) -> list[tuple[np.ndarray, int]]:
    """Plan micro-batches: [(rows [R] int, T)] covering every row exactly once.

    lengths: [N] real tokens per row (prompt + completion). Rows are taken in order of length
    (stable). T = the micro-batch's longest row rounded up to `multiple`, capped at max_len. A
    micro-batch holds R = `microbatch` rows, or with `max_tokens` (a token budget: memory is about
    rows x T) R = rows_at(T) = min(microbatch, max_tokens // T) (at least 1): short rows go many at a
    time, long rows few. Each micro-batch is filled up to R with -1 (an empty row for the caller), so
    there is one shape (R, T) per T. devices D: R = D x rows_at(T) (`microbatch` and `max_tokens` are
    per device; a mesh's data axis splits the R rows into D equal blocks).
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array, got shape {lengths.shape}")
    if microbatch < 1 or multiple < 1 or devices < 1:
        raise ValueError(f"microbatch, multiple and devices must be >= 1, got {microbatch}, {multiple}, {devices}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_len is not None and lengths.max() > max_len:
        raise ValueError(f"a row of {int(lengths.max())} tokens exceeds max_len {max_len}")

    def cut(n: int) -> int:  # positions of a micro-batch whose longest row has n tokens
        T = int(-(-max(int(n), 1) // multiple) * multiple)
        return T if max_len is None else min(T, max_len)

    order = np.argsort(lengths, kind="stable")
    plan, current = [], []
    for row in order:  # ascending length: adding a row can only raise T (and lower R)
        if current and len(current) + 1 > devices * rows_at(cut(lengths[row]), microbatch, max_tokens):
            plan.append(current)
            current = []
        current.append(row)
    plan.append(current)
    out = []
    for rows in plan:
        T = cut(lengths[rows[-1]])
        R = devices * rows_at(T, microbatch, max_tokens)
        out.append((np.concatenate([np.asarray(rows, order.dtype), np.full(R - len(rows), -1, order.dtype)]), T))
    return out


def take_rows(batch: dict, rows: np.ndarray, T: int) -> dict:
    """The micro-batch `rows` of a right-padded numpy batch ({name: [N, ...]}), cut to T positions.
    Rows -1 become empty rows: every entry zero / False (zero loss, zero gradient)."""
    real = rows >= 0
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        part = x[np.where(real, rows, 0)]
        if part.ndim >= 2 and part.shape[1] >= T and name != "advantage":
            part = part[:, :T]
        part = np.where(real.reshape((-1,) + (1,) * (part.ndim - 1)), part, np.zeros((), part.dtype))
        out[name] = part
    return out


def put_rows(out: np.ndarray, parts, to_host=np.asarray) -> np.ndarray:
    """Write each micro-batch's result [R, t] back at its rows into out [N, T] (rows -1: empty, dropped).
    parts: [(rows, t, values)], values device arrays of micro-batches already dispatched: they are read
    back (`to_host`) only here, so the device runs the micro-batches back to back instead of waiting for
    the host between them."""
    for rows, t, values in parts:
        values = to_host(values)
        real = rows >= 0
        out[rows[real], :t] = values[real]
    return out
