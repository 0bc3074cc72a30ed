"""Padded batches of (prompt, completion) token sequences (layout: docs/architecture.md).

batch = {"tokens": [N,T] int32, "attention_mask": [N,T] bool, "completion_mask": [N,T] bool}
Each row holds prompt + completion, left- or right-padded with `pad_id` to a common length T.
Loss-specific rows ("advantage" [N], "old_logp" / "ref_logp" [N,T]) are added by the caller.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PADDING_SIDES = ("right", "left")


def make_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
               pad_id: int = 0, padding: str = "right", length: int | None = None,
               pad_multiple: int = 1) -> dict[str, np.ndarray]:
    """Build a padded batch from N prompts and their N completions (lists of token ids).

    padding: "right" (real tokens first) or "left" (pad first). length: the row length T (error if a
    sequence is longer); default the longest sequence, rounded up to a multiple of `pad_multiple`
    (fewer distinct shapes -> fewer recompiles). Returns numpy arrays (see module docstring).
    """
    if padding not in PADDING_SIDES:
        raise ValueError(f"padding={padding!r}; expected one of {PADDING_SIDES}")
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("empty batch")
    seqs = [(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids)]
    for i, (p, _) in enumerate(seqs):
        if not p:
            raise ValueError(f"row {i}: empty prompt (the first completion token needs a context)")
    longest = max(len(p) + len(c) for p, c in seqs)
    if length is None:
        length = -(-longest // pad_multiple) * pad_multiple
    elif length < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest} tokens)")
    N, T = len(seqs), length
    tokens = np.full((N, T), pad_id, np.int32)
    attention_mask = np.zeros((N, T), bool)
    completion_mask = np.zeros((N, T), bool)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        start = 0 if padding == "right" else T - n
        tokens[i, start:start + n] = p + c
        attention_mask[i, start:start + n] = True
        completion_mask[i, start + len(p):start + n] = True
    return {"tokens": tokens, "attention_mask": attention_mask, "completion_mask": completion_mask}


def place_completion_values(batch: dict, values: Sequence[Sequence[float]], fill: float = 0.0
                            ) -> np.ndarray:
    """Scatter per-completion-token values (e.g. sampler log-probs, one list per row, in token
    order) into a [N,T] float32 array aligned with batch["tokens"]; `fill` elsewhere."""
    mask = np.asarray(batch["completion_mask"])
    out = np.full(mask.shape, fill, np.float32)
    for i, v in enumerate(values):
        v = np.asarray(v, np.float32)
        if v.shape != (int(mask[i].sum()),):
            raise ValueError(f"row {i}: {v.shape[0] if v.ndim else 'scalar'} values for "
                             f"{int(mask[i].sum())} completion tokens")
        out[i, mask[i]] = v
    return out


def completion_lengths(batch: dict) -> np.ndarray:
    """[N] number of completion tokens per row."""
    return np.asarray(batch["completion_mask"]).sum(axis=1)
