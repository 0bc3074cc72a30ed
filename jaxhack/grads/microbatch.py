"""Length-bucketed micro-batches for the reference pass and the update (bounded memory, no padding waste).

A Phase 3 batch has N rows of very different real lengths (prompt + completion). Padding every row
to the longest possible length (prompt + max_new) makes the reference pass and the update pay for
tokens that do not exist: at the full preset (max_new 1536) with completions of ~500 tokens that is
about half the work. Instead the rows are sorted by real length and cut into micro-batches of M
rows; each micro-batch is cut to its own longest row, rounded up to `multiple` (so only a few
distinct shapes compile). Memory is that of one micro-batch of at most M x max_len tokens, whatever N.

Exactness: rows are right-padded and the model is causal, so dropping trailing pad positions does not
change any real token's log-prob; the loss and gradient are sums over rows, so the grouping of rows
only changes the float summation order.
"""
from __future__ import annotations

import numpy as np


def length_microbatches(lengths, microbatch: int, multiple: int = 512,
                        max_len: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Plan micro-batches: [(rows [microbatch] int, T)] covering every row exactly once.

    lengths: [N] real tokens per row (prompt + completion). Rows are taken in order of length
    (stable), `microbatch` at a time; the last micro-batch is filled with -1 (an empty row for the
    caller). T = the micro-batch's longest row rounded up to `multiple`, capped at max_len.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array, got shape {lengths.shape}")
    if microbatch < 1 or multiple < 1:
        raise ValueError(f"microbatch and multiple must be >= 1, got {microbatch}, {multiple}")
    order = np.argsort(lengths, kind="stable")
    plan = []
    for start in range(0, len(order), microbatch):
        rows = order[start:start + microbatch]
        T = int(-(-max(int(lengths[rows].max()), 1) // multiple) * multiple)
        if max_len is not None:
            if lengths[rows].max() > max_len:
                raise ValueError(f"a row of {int(lengths[rows].max())} tokens exceeds max_len {max_len}")
            T = min(T, max_len)
        rows = np.concatenate([rows, np.full(microbatch - len(rows), -1, rows.dtype)])
        plan.append((rows, T))
    return plan


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
