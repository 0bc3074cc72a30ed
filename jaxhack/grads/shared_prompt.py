"""Shared-prompt layout for the learner: the G rows of a GRPO group run their common prompt once.

The reference pass and the update see each row as [prompt; completion], so a group's prompt is
computed G times. Here each group becomes one packed buffer: its prompt once, then its rows'
completions back to back (no padding between them). Every per-token op (the Linears, norms, MLP)
runs on the packed buffer; only attention needs each row's own sequence, so
`qwen3.grouped_causal_attention` gathers [prompt; completion] per row from the packed buffer, runs the
usual causal attention and scatters the outputs back (a prompt slot takes row 0's output; all rows'
outputs there are the same function of the same inputs). The LM head runs on the packed buffer too:
each slot's token is scored from the hidden state of the slot before it in its row (`packed_pred`: a
completion's first token reads the prompt's last slot), so it sees the groups' real tokens once instead
of every row padded to the micro-batch's longest. The log-probs are then gathered back to the per-row
[M, T] layout of `losses.sequence_logprobs`, so the loss and everything after it are unchanged.

Exact: the same function of the same tokens, up to the float summation order (the gradient of a shared
prompt token is summed over the G rows that read it). At the realistic Phase 3 lengths (prompts ~400
tokens, completions ~500, G = 6) the Linears see 37% fewer tokens (docs/benchmarks.md, "Session 10").

Host side (numpy): `group_layout` (the index maps of one micro-batch) and `group_microbatches` (whole
groups per micro-batch, by packed length). Device side: `shared_prompt_logprobs`.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.grads.microbatch import length_microbatches, put_rows, take_rows
from jaxhack.models import qwen3
from jaxhack.models.config import Qwen3Config

LAYOUT_KEYS = ("packed_tokens", "packed_positions", "packed_mask", "packed_pred", "row_source", "out_row", "out_pos",
               "slot_readers", "row_slot")
GROUP_KEYS = ("row_source", "out_row", "out_pos", "slot_readers", "row_slot")  # what attention needs (`qwen3.grouped_causal_attention`)


def packed_lengths(attention_mask, prompt_len, group_size: int) -> np.ndarray:
    """[M/G] real tokens of each group's packed buffer: its prompt once (none for a group without real
    tokens) plus its rows' completions. attention_mask [M, T] (right-padded), prompt_len [M]."""
    real = np.asarray(attention_mask, bool).sum(1).reshape(-1, group_size)
    prompt = np.asarray(prompt_len, np.int64).reshape(-1, group_size)
    return np.minimum(prompt[:, 0], real.max(1)) + (real - np.minimum(prompt, real)).sum(1)


def group_layout(tokens, attention_mask, prompt_len, group_size: int, multiple: int = 128) -> dict[str, np.ndarray]:
    """The packed buffers and index maps of M = Bg x G right-padded rows (rows g*G .. g*G+G-1 are a group).

    tokens, attention_mask: [M, T]; prompt_len: [M] (a row's completion is tokens[P:real length]).
    Returns numpy arrays (Tp = the longest group's prompt + completions + 1, rounded up to `multiple`;
    the last slot is always padding, where rows' right padding points):
      packed_tokens, packed_positions [Bg, Tp] int32, packed_mask [Bg, Tp] bool (real tokens),
      packed_pred [Bg, Tp] int32 (the slot before each slot in its row: the hidden state that predicts
      its token; 0 where there is none), row_source [Bg, G, T] int32 (the packed slot of each row position), out_row / out_pos [Bg, Tp]
      int32 (the row and row position whose attention output each slot takes), and their inverses for the
      gathers' gradients (`models.packed_rows`): slot_readers [Bg, Tp, G] int32 (the position of row g that
      reads slot s; T where none does) and row_slot [Bg, G, T] int32 (the slot that takes row g's output at
      position t; Tp where none does).
    ValueError when a group's rows do not share their prompt tokens."""
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask, bool)
    prompt_len = np.asarray(prompt_len, np.int64)
    M, T = tokens.shape
    G = group_size
    if M % G:
        raise ValueError(f"{M} rows are not a whole number of groups of {G}")
    Bg = M // G
    real = attention_mask.sum(1)
    comp = real - np.minimum(prompt_len, real)  # [M]
    packed_len = packed_lengths(attention_mask, prompt_len, G)  # [Bg]
    for g in range(Bg):
        rows = range(g * G, g * G + G)
        P = prompt_len[g * G]
        if any(prompt_len[r] != P or not np.array_equal(tokens[r, :P], tokens[g * G, :P]) for r in rows if real[r]):
            raise ValueError(f"rows {g * G}..{g * G + G - 1}: a group's rows must share one prompt "
                             "(the shared-prompt layout runs it once)")
    Tp = int(-(-(packed_len.max() + 1) // multiple) * multiple)
    out = {"packed_tokens": np.zeros((Bg, Tp), np.int32), "packed_positions": np.zeros((Bg, Tp), np.int32),
           "packed_mask": np.zeros((Bg, Tp), bool), "packed_pred": np.zeros((Bg, Tp), np.int32), "row_source": np.full((Bg, G, T), Tp - 1, np.int32),
           "out_row": np.zeros((Bg, Tp), np.int32), "out_pos": np.full((Bg, Tp), T - 1, np.int32),
           "slot_readers": np.full((Bg, Tp, G), T, np.int32), "row_slot": np.full((Bg, G, T), Tp, np.int32)}
    for g in range(Bg):
        r0 = g * G
        P = int(min(prompt_len[r0], real[r0:r0 + G].max()))  # an all-empty group has no prompt either
        span = np.arange(P)
        out["packed_tokens"][g, :P] = tokens[r0, :P]
        out["packed_positions"][g, :P] = span
        out["packed_mask"][g, :P] = True
        out["packed_pred"][g, 1:P] = span[:-1]
        out["row_source"][g, :, :P] = span
        out["out_pos"][g, :P] = span
        out["slot_readers"][g, :P, :] = span[:, None]  # every row reads the prompt at its own positions
        out["row_slot"][g, 0, :P] = span  # the prompt slots take row 0's outputs
        offset = P
        for j in range(G):
            L = int(comp[r0 + j])
            slots, positions = np.arange(offset, offset + L), np.arange(P, P + L)
            out["packed_tokens"][g, slots] = tokens[r0 + j, P:P + L]
            out["packed_positions"][g, slots] = positions
            out["packed_mask"][g, slots] = True
            out["packed_pred"][g, slots] = np.concatenate([[max(P - 1, 0)], slots[:-1]])[:L]
            out["row_source"][g, j, P:P + L] = slots
            out["out_row"][g, slots] = j
            out["out_pos"][g, slots] = positions
            out["slot_readers"][g, slots, j] = positions
            out["row_slot"][g, j, P:P + L] = slots
            offset += L
    return out


def group_microbatches(batch: dict, group_size: int, microbatch: int | None, multiple: int,
                       max_tokens: int | None = None, devices: int = 1) -> list[tuple[np.ndarray, int, dict]]:
    """Micro-batches of whole groups of a right-padded host batch (tokens, attention_mask, prompt_len):
    [(rows [R], T, layout)], rows -1 empty (whole empty groups), T the rows' cut (their longest row
    rounded up to `multiple`), layout = `group_layout` of those rows. Groups are taken in order of
    packed length (prompt + all completions); a micro-batch holds at most microbatch // G groups (None:
    all) and, with the token budget, at most max_tokens // Tp of them (at least one). Rows past the last
    whole group must have no completion (the trainer's padding rows); they are left out.
    devices D (a mesh's data axis): D times as many groups per micro-batch (microbatch and max_tokens are
    per device), a multiple of D (empty groups fill it), so each device gets whole groups and their rows."""
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"], bool)
    prompt_len = np.asarray(batch["prompt_len"], np.int64)
    N, T_all = tokens.shape
    G = group_size
    whole = N // G * G  # rows past the last whole group: padding rows without a completion (no loss)
    if (mask[whole:].sum(1) > prompt_len[whole:]).any():
        raise ValueError(f"{N} rows are not a whole number of groups of {G}, and rows {whole}.. have completions")
    tokens, mask, prompt_len = tokens[:whole], mask[:whole], prompt_len[:whole]
    real = mask.sum(1)
    packed = packed_lengths(mask, prompt_len, G)  # [N/G]
    per_mb = -(-len(packed) // devices) if microbatch is None else max(1, microbatch // G)
    plan = []
    for groups, _ in length_microbatches(packed + 1, per_mb, multiple=multiple, max_tokens=max_tokens,
                                         devices=devices):
        rows = np.concatenate([np.arange(g * G, g * G + G) if g >= 0 else np.full(G, -1) for g in groups])
        longest = int(real[rows[rows >= 0]].max(initial=1))
        t = min(int(-(-longest // multiple) * multiple), T_all)
        part = take_rows({"tokens": tokens, "attention_mask": mask, "prompt_len": prompt_len}, rows, t)
        plan.append((rows, t, group_layout(part["tokens"], part["attention_mask"], part["prompt_len"], G,
                                           multiple)))
    return plan


@functools.partial(jax.jit, static_argnames=("config", "remat", "chunk"))
def shared_prompt_logprobs(params, config: Qwen3Config, adapters, tokens: jax.Array, layout: dict,
                           remat: str = "none", chunk: int = 256) -> jax.Array:
    """[M,T] fp32: entry t is log p(tokens[t] | tokens[<t]) of each row (0 at t = 0), as
    `losses.sequence_logprobs` with causal attention, computed on the groups' packed buffers.

    tokens: [M,T] the rows (right-padded); layout: `group_layout` of them (jnp or numpy arrays);
    adapters: merged adapter dict or None (the base model)."""
    chex.assert_rank(tokens, 2)
    Bg, G, T = layout["row_source"].shape
    chex.assert_shape(tokens, (Bg * G, T))
    groups = {k: layout[k] for k in GROUP_KEYS}
    hidden, _ = qwen3.forward(params, config, layout["packed_tokens"], layout["packed_mask"], adapters=adapters,
                              remat=remat, positions=layout["packed_positions"], attention="grouped",
                              groups=groups)  # [Bg,Tp,D]
    take = jax.vmap(lambda a, idx: a[idx])  # per group: [Tp, ...] at idx [...] -> [..., ...]
    predecessors = take(hidden, layout["packed_pred"])  # [Bg,Tp,D]: the state that predicts each slot's token
    logp_packed = qwen3.token_logprobs(params, config, predecessors, layout["packed_tokens"], chunk=chunk)  # [Bg,Tp]
    logp = take(logp_packed, layout["row_source"]).reshape(Bg * G, T)  # [M,T]; a row's position 0 has no predecessor
    return logp.at[:, 0].set(0.0)


def batched_shared_prompt_logprobs(params, config: Qwen3Config, adapters, batch: dict, group_size: int,
                                   microbatch: int | None, multiple: int, max_tokens: int | None = None,
                                   chunk: int = 256) -> np.ndarray:
    """[N,T] `shared_prompt_logprobs` of a host batch (tokens, attention_mask, prompt_len), whole groups
    per micro-batch (`group_microbatches`); entries past a row's micro-batch cut, and rows left out
    (padding rows past the last whole group), are 0."""
    host = {k: np.asarray(batch[k]) for k in ("tokens", "attention_mask", "prompt_len")}
    parts = [(rows, t, shared_prompt_logprobs(params, config, adapters, jnp.asarray(take_rows(host, rows, t)["tokens"]),
                                              jax.tree.map(jnp.asarray, layout), chunk=chunk))  # [R, t], dispatched
             for rows, t, layout in group_microbatches(host, group_size, microbatch, multiple, max_tokens)]
    return put_rows(np.zeros(host["tokens"].shape, np.float32), parts)
