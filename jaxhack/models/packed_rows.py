"""Gathers between shared-prompt packed buffers and their rows, whose gradients are gathers too.

The shared-prompt learner (`grads.shared_prompt`) keeps each GRPO group as one packed buffer [Tp] (its
prompt once, then its rows' completions) and runs attention on each row's own sequence [T], so every
layer gathers q, k, v from the packed buffer into the rows (`gather_rows`), and the attention outputs
back into the packed buffer (`gather_slots`). Differentiated as plain gathers, both transposes are
scatter-adds; on a GPU those four scatters took 5% of an update micro-batch (docs/benchmarks.md,
"Session 15"). Both maps are known on the host, and so are their inverses (`group_layout`'s
`slot_readers` and `row_slot`), so here each transpose is a gather of the cotangent by the inverse map:

- d packed[s] = sum over the rows g of d rows[g, slot_readers[s, g]]: a prompt slot is read by every row
  of the group at the same position, a completion slot by its own row only, a padding slot by no row's
  real position (`slot_readers` is T there: nothing), so its cotangent is 0;
- d rows[g, t] = d packed[row_slot[g, t]]: the output of a position no slot takes (another row's copy of
  the prompt, right padding) gets cotangent 0 (`row_slot` is Tp there).

This is the exact gradient of the forward gather for every cotangent that is 0 at the rows' right
padding, which is what attention gives there (each row's padding is skipped; `qwen3.causal_attention`
with lengths). The G terms of a prompt slot are summed in fp32 and rounded once, in a fixed order: unlike
a GPU scatter-add with repeated indices (atomic adds), the result does not depend on the order in which
threads land.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [Bg, S, ...] at index [Bg, ...] (per group along S) -> [Bg, *index.shape[1:], ...]; an index
    >= S (the inverse maps' "nothing") gives 0."""
    return jax.vmap(lambda v, i: jnp.take(v, i, axis=0, mode="fill", fill_value=0))(values, index)


@jax.custom_vjp
def gather_rows(packed: jax.Array, row_source: jax.Array, slot_readers: jax.Array) -> jax.Array:
    """packed [Bg, Tp, ...] -> rows [Bg, G, T, ...]: rows[b, g, t] = packed[b, row_source[b, g, t]].
    slot_readers [Bg, Tp, G]: the position of row g that reads slot s (T: none), the inverse map."""
    return _gather_rows_fwd(packed, row_source, slot_readers)[0]


def _gather_rows_fwd(packed, row_source, slot_readers):
    Bg, G, _ = row_source.shape
    chex.assert_shape(slot_readers, (Bg, packed.shape[1], G))
    return _take(packed, row_source), slot_readers


def _gather_rows_bwd(slot_readers, d_rows):
    G = d_rows.shape[1]
    total = None
    for g in range(G):  # G gathers [Bg, Tp, ...]; a completion slot has one reader, a prompt slot G
        part = _take(d_rows[:, g], slot_readers[:, :, g]).astype(jnp.float32)
        total = part if total is None else total + part
    return total.astype(d_rows.dtype), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def gather_slots(rows: jax.Array, out_row: jax.Array, out_pos: jax.Array, row_slot: jax.Array) -> jax.Array:
    """rows [Bg, G, T, ...] -> packed [Bg, Tp, ...]: packed[b, s] = rows[b, out_row[b, s], out_pos[b, s]].
    row_slot [Bg, G, T]: the slot that takes row g's position t (Tp: none), the inverse map."""
    return _gather_slots_fwd(rows, out_row, out_pos, row_slot)[0]


def _gather_slots_fwd(rows, out_row, out_pos, row_slot):
    chex.assert_shape(row_slot, rows.shape[:3])
    chex.assert_equal_shape([out_row, out_pos])
    Bg, G, T = rows.shape[:3]
    return _take(rows.reshape(Bg, G * T, *rows.shape[3:]), out_row * T + out_pos), row_slot


def _gather_slots_bwd(row_slot, d_packed):
    return _take(d_packed, row_slot), None, None, None


gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)
