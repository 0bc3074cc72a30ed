"""Decode attention in key parts, then one combine: the refill sampler's attention (GPU, Pallas on Triton).

The refill sampler's rows are at different steps, so each row's keys are cut into parts of `split`
slots (flash-decoding) to balance the work, and its prompt's keys are attended separately, once per
GRPO group (`decode_attention.prefix_decode_attention`). With JAX's stock kernel each attention's parts
are combined by XLA (a maximum, an optimisation barrier, exponentials, a weighted sum) and the two
attentions then merged: ~8 small kernels a layer, ~780 us of a 10 ms decode step at 152 slots
(docs/benchmarks.md, "Session 17").

- `parts_attention`: one program per (row, KV head, part) writes that part's normalised output (in the
  query's dtype) and its softmax statistics (sum, max; fp32); a part outside the row's live range
  [start, end) is not read and writes nothing.
- `combine_prefix_parts`: one program per (row, KV head) merges the live parts of the row's own keys
  and of its prompt's keys (found through the row's prompt and its place among the prompt's rows),
  reading only live parts, in a fixed order, and writes the row's attention once.

`online_softmax` is the flash-decoding loop both this module and `fused_decode` run.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -1e30  # masked scores: finite, so that exp(masked - max) is 0 and never NaN


def online_softmax(queries, k_ref, v_ref, lo, hi, *, block_k: int, scale: float, block_h: int, hd: int):
    """Attention statistics over the key slots [lo, hi) of k_ref / v_ref [S, hd], blocks of block_k.
    queries: [(q [block_h, w], columns)]: the scores are the sum of q @ k[:, columns]^T over the list
    (one entry for whole heads; fused_decode passes RoPE's two halves). Blocks before the one holding
    lo are not read. Returns (acc [block_h, hd] unnormalised fp32, peak [block_h], total [block_h]).
    An empty range [lo, lo) that is not block-aligned still runs one block, all masked: peak stays NEG
    and total counts the masked slots. Callers either ensure lo < hi (`parts_attention`) or add a real
    score afterwards (`fused_decode`'s new token), whose correction exp(NEG - score) = 0 clears it."""
    def block(index, carry):  # slots [index * block_k, +block_k) intersected with [lo, hi)
        acc, peak, total = carry
        slots = index * block_k + jnp.arange(block_k)
        live = (slots >= lo) & (slots < hi)  # [block_k]
        keys = pl.ds(index * block_k, block_k)
        scores = sum(plgpu.dot(q, plgpu.load(k_ref.at[keys, columns], mask=live[:, None], other=0.0).T)
                     for q, columns in queries) * scale  # [block_h,block_k] fp32
        scores = jnp.where(live[None, :], scores, NEG)
        new_peak = jnp.maximum(peak, scores.max(axis=1))
        correction = jnp.exp(peak - new_peak)
        probs = jnp.exp(scores - new_peak[:, None])
        values = plgpu.load(v_ref.at[keys, :], mask=live[:, None], other=0.0)  # [block_k,hd]
        acc = acc * correction[:, None] + plgpu.dot(probs.astype(values.dtype), values)
        return acc, new_peak, total * correction + probs.sum(axis=1)

    init = (jnp.zeros((block_h, hd), jnp.float32), jnp.full((block_h,), NEG, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    return jax.lax.fori_loop(lo // block_k, pl.cdiv(hi, block_k), block, init)


def query_tile(heads: int) -> int:
    """Query rows per program: a power of two >= 16 (the dot's smallest tile) covering `heads`."""
    return max(16, 1 << (heads - 1).bit_length())


def _parts_kernel(q_ref, start_ref, end_ref, k_ref, v_ref, out_ref, total_ref, peak_ref, *,
                  heads: int, split: int, block_k: int, scale: float):
    """Program (n, h, j). q_ref [Hkv*heads, hd]; start/end_ref []; k/v_ref [S, hd]; out_ref [heads, hd];
    total/peak_ref [heads]."""
    head, part = pl.program_id(1), pl.program_id(2)
    hd = q_ref.shape[-1]
    block_h = query_tile(heads)
    lo = jnp.maximum(start_ref[()], part * split)
    hi = jnp.minimum(end_ref[()], (part + 1) * split)

    @pl.when(lo < hi)
    def _():
        rows = jnp.arange(block_h) < heads
        q = plgpu.load(q_ref.at[pl.ds(head * heads, block_h), :], mask=rows[:, None], other=0.0)
        acc, peak, total = online_softmax([(q, pl.ds(0, hd))], k_ref, v_ref, lo, hi, block_k=block_k,
                                          scale=scale, block_h=block_h, hd=hd)
        store_part(out_ref, total_ref, peak_ref, acc, peak, total, rows)


def store_part(out_ref, total_ref, peak_ref, acc, peak, total, rows):
    """A part's normalised output (in out_ref's dtype) and its softmax statistics, for the query tile's
    real rows (rows [block_h] bool)."""
    block_h = acc.shape[0]
    plgpu.store(out_ref.at[pl.ds(0, block_h), :], (acc / total[:, None]).astype(out_ref.dtype), mask=rows[:, None])
    plgpu.store(total_ref.at[pl.ds(0, block_h)], total, mask=rows)
    plgpu.store(peak_ref.at[pl.ds(0, block_h)], peak, mask=rows)


def parts_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, end: jax.Array, *,
                    split: int, block_k: int, implementation: str = "pallas", num_warps: int = 4,
                    num_stages: int = 2):
    """Each (row, KV head, part of `split` slots): attention over its slots within [start, end).

    q: [N, Hq, hd] (KV head h's queries are heads h*Hq/Hkv ..); k, v: [N, Hkv, S, hd]; start, end: [N]
    int. Returns (out [N, Hkv, P, Hq/Hkv, hd] in q's dtype, normalised; total, peak [N, Hkv, P,
    Hq/Hkv] fp32), P = S / split. Parts with no live slot are left unwritten (garbage): only
    `combine_prefix_parts`, which reads live parts only, may consume them."""
    N, Hq, hd = q.shape
    _, Hkv, S, _ = k.shape
    chex.assert_shape([k, v], (N, Hkv, S, hd))
    chex.assert_shape([start, end], (N,))
    if Hq % Hkv or S % split or split % block_k:
        raise ValueError(f"{Hq} query heads over {Hkv} KV heads, {S} slots in parts of {split}, blocks of "
                         f"{block_k}: expected whole groups, whole parts and whole blocks")
    heads, P = Hq // Hkv, S // split
    kernel = functools.partial(_parts_kernel, heads=heads, split=split, block_k=block_k, scale=hd ** -0.5)
    scalar = pl.BlockSpec((None,), lambda n, h, j: (n,))
    cache = pl.BlockSpec((None, None, S, hd), lambda n, h, j: (n, h, 0, 0))
    stats = pl.BlockSpec((None, None, None, heads), lambda n, h, j: (n, h, j, 0))
    return pl.pallas_call(
        kernel, grid=(N, Hkv, P),
        in_specs=[pl.BlockSpec((None, Hq, hd), lambda n, h, j: (n, 0, 0)), scalar, scalar, cache, cache],
        out_specs=[pl.BlockSpec((None, None, None, heads, hd), lambda n, h, j: (n, h, j, 0, 0)), stats, stats],
        out_shape=[jax.ShapeDtypeStruct((N, Hkv, P, heads, hd), q.dtype),
                   jax.ShapeDtypeStruct((N, Hkv, P, heads), jnp.float32),
                   jax.ShapeDtypeStruct((N, Hkv, P, heads), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=implementation == "interpret", name="parts_attention",
    )(q, start.astype(jnp.int32), end.astype(jnp.int32), k, v)


def _combine_kernel(own_out_ref, own_total_ref, own_peak_ref, start_ref, end_ref, prompt_ref, member_ref,
                    sh_out_ref, sh_total_ref, sh_peak_ref, sh_start_ref, sh_end_ref, out_ref, *,
                    heads: int, split: int):
    """Program (b, h). own_*: this row and head's parts [Po, heads(, hd)]; start/end/prompt/member_ref
    []; sh_*: every prompt's parts [NP, Hkv, Ps, Gm*heads(, hd)]; sh_start/end_ref [NP]; out_ref [heads, hd]."""
    head = pl.program_id(1)
    hd = out_ref.shape[-1]
    prompt, member = prompt_ref[()], member_ref[()]
    rows = pl.ds(member * heads, heads)  # the row's queries among its prompt's rows'

    def merge(carry, out, total, peak):  # one more part: out [heads, hd] normalised, total/peak [heads]
        acc, norm, top = carry
        new_top = jnp.maximum(top, peak)
        weight = total * jnp.exp(peak - new_top)
        correction = jnp.exp(top - new_top)
        return acc * correction[:, None] + weight[:, None] * out.astype(jnp.float32), norm * correction + weight, new_top

    def own_part(j, carry):
        return merge(carry, own_out_ref[j], own_total_ref[j], own_peak_ref[j])

    def shared_part(j, carry):
        return merge(carry, sh_out_ref[prompt, head, j, rows, :], sh_total_ref[prompt, head, j, rows],
                     sh_peak_ref[prompt, head, j, rows])

    init = (jnp.zeros((heads, hd), jnp.float32), jnp.zeros((heads,), jnp.float32), jnp.full((heads,), NEG, jnp.float32))
    start, end = sh_start_ref[prompt], sh_end_ref[prompt]
    carry = jax.lax.fori_loop(start // split, pl.cdiv(end, split) * (start < end), shared_part, init)
    start, end = start_ref[()], end_ref[()]
    acc, norm, _ = jax.lax.fori_loop(start // split, pl.cdiv(end, split) * (start < end), own_part, carry)
    out_ref[...] = (acc / jnp.where(norm > 0, norm, 1.0)[:, None]).astype(out_ref.dtype)


def combine_prefix_parts(own, shared, start: jax.Array, end: jax.Array, prefix: dict, *, split: int,
                         implementation: str = "pallas") -> jax.Array:
    """Each row's attention over its prompt's keys and its own, from `parts_attention`'s results.

    own: parts_attention over the rows' own caches ([B, Hkv, Po, g, hd], ..), live over [start, end)
    ([B] each); shared: over the prompts' caches with the rows' queries grouped per prompt ([NP, Hkv,
    Ps, Gm*g, hd], ..), live over [prefix["start"], prefix["end"]); prefix["prompt"], ["member"]: [B]
    each row's prompt and its place among the prompt's rows. -> [B, Hkv*g, hd] in own's dtype; a row
    with no live key at all gets zeros."""
    own_out, own_total, own_peak = own
    sh_out, sh_total, sh_peak = shared
    B, Hkv, Po, g, hd = own_out.shape
    NP, _, Ps, members_g, _ = sh_out.shape
    chex.assert_shape([own_total, own_peak], (B, Hkv, Po, g))
    chex.assert_shape([sh_total, sh_peak], (NP, Hkv, Ps, members_g))
    chex.assert_shape([start, end, prefix["prompt"], prefix["member"]], (B,))
    chex.assert_shape([prefix["start"], prefix["end"]], (NP,))
    kernel = functools.partial(_combine_kernel, heads=g, split=split)
    scalar = pl.BlockSpec((None,), lambda b, h: (b,))
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)  # noqa: E731
    ints = [x.astype(jnp.int32) for x in (start, end, prefix["prompt"], prefix["member"])]
    sh_range = [prefix["start"].astype(jnp.int32), prefix["end"].astype(jnp.int32)]
    out = pl.pallas_call(
        kernel, grid=(B, Hkv),
        in_specs=[pl.BlockSpec((None, None, Po, g, hd), lambda b, h: (b, h, 0, 0, 0)),
                  pl.BlockSpec((None, None, Po, g), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, Po, g), lambda b, h: (b, h, 0, 0)),
                  scalar, scalar, scalar, scalar,
                  whole(sh_out), whole(sh_total), whole(sh_peak), whole(sh_range[0]), whole(sh_range[1])],
        out_specs=pl.BlockSpec((None, None, g, hd), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, g, hd), own_out.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=implementation == "interpret", name="combine_prefix_parts",
    )(own_out, own_total, own_peak, *ints, sh_out, sh_total, sh_peak, *sh_range)
    return out.reshape(B, Hkv * g, hd)
