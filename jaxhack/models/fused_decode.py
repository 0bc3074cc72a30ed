"""A decode step's attention fused with what precedes it in the layer (GPU, Pallas on Triton).

Per layer and decode step, the split path (`qwen3._layer` with `decode_attention`) runs q-norm,
k-norm, RoPE of q, the two cache writes (RoPE of k fused into one of them), the Pallas attention
kernel and the normalisation of its output: six kernels of ~2 us each around the attention at
batch 64 (docs/benchmarks.md, "Session 17"). `fused_decode_attention` does all of it in one program
per (row, KV head), reading the q/k/v projection's output as it lies:

1. the program's g = Hq/Hkv query heads and its one key head: RMSNorm in fp32 (cast back, times the
   norm weight), then RoPE, with the roundings of `qwen3.rms_norm` / `qwen3.rope`;
2. the new key and value written to the cache at the row's slot (the cache buffers are aliased to the
   outputs: updated in place);
3. attention over the cache slots [start, slot) (flash-decoding's online softmax, blocks of
   `block_k` slots; slots before the block holding `start` are not read) and the new token itself,
   taken from registers, not re-read;
4. the output normalised in fp32 and written once in the query's dtype.

The head dimension is handled as two halves (RoPE's rotation pairs element i with i + hd/2), so the
scores are the sum of two dots. One program per (row, KV head) is the split path's `decode_tiles`
choice for lockstep decoding at batch >= 64.

`fused_decode_parts` is the same prologue for the refill sampler, whose rows are at different steps:
one program per (row, KV head, part of `split` slots) as `attention_parts.parts_attention`, each live
part's program normalising and rotating its queries; the part holding the row's new slot also writes
the new key and value, takes the new token from registers and writes the rotated queries, which the
prompt pool's attention reads (`decode_attention.prompts_and_combine`). At the `full` preset's 152
slots (H200) it removed 4 small kernels a layer (q-norm, the k-norm/RoPE fusions, the two per-row
cache scatters: -389 us of a 9.2 ms decode step) while the own-key attention took 167 us longer; the
sampler -0.6% and -1.2% in two calls (docs/benchmarks.md, "Session 20").
"""
from __future__ import annotations

import functools
import os

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxhack.io import UserError
from jaxhack.models.attention_parts import online_softmax, query_tile, store_part
from jaxhack.models.decode_attention import ONE_PART_MIN_PROGRAMS, default_implementation

ENV = "JAXHACK_DECODE_KERNEL"  # "fused" (default), "split", or "fused-interpret" (any backend; tests)
CHOICES = ("fused", "split", "fused-interpret")
# tiles: JAX's flash-decoding defaults. In isolation (scripts/bench_fused_decode.py, H200) 3 stages were
# 1.6% / 3.5% faster at batch 64 / 256, but in generation, same call, 2 stages gave 13,977 tok/s at
# batch 64 against 13,318 with 3, and 23,401 against 23,399 at batch 256 (docs/benchmarks.md "Session 18")
BLOCK_K = 64
NUM_STAGES = 2


def requested() -> str:
    """The decode kernel JAXHACK_DECODE_KERNEL asks for (default "fused"); a bad value is the user's
    error (one line from the CLI)."""
    choice = os.environ.get(ENV, "fused")
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}; expected one of {', '.join(CHOICES)}")
    return choice


def kernel_choice(dtype, cache_len: int, programs: int, lockstep: bool, key_parts: bool = False) -> str | None:
    """How a layer's decode attention runs: 'pallas' (this module's kernels on a GPU), 'interpret'
    (the same kernels run by Pallas' interpreter, any backend) or None (the split path). From the
    environment variable JAXHACK_DECODE_KERNEL, read when the step is traced. 'fused' takes a kernel
    on a GPU for half-precision caches of whole parts (`default_implementation`): `fused_decode_parts`
    where the rows' keys are attended in parts anyway (key_parts: the refill sampler), else
    `fused_decode_attention` where the split path would run one program per (row, KV head) too
    (`decode_tiles`: lockstep rows, programs = rows x KV heads >= ONE_PART_MIN_PROGRAMS); elsewhere the
    split path's key-axis parts balance the work better. 'fused-interpret' takes it everywhere."""
    choice = requested()
    if choice == "split":
        return None
    if choice == "fused-interpret":
        return "interpret"
    one_part = lockstep and programs >= ONE_PART_MIN_PROGRAMS
    return "pallas" if (key_parts or one_part) and default_implementation(dtype, cache_len) == "pallas" else None


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """RoPE's cos, sin [..., hd/2] in `dtype` at integer positions [...] (the half-split layout's
    rotation pairs element i with i + hd/2, so both halves use these; `qwen3.rope` repeats them)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., hd/2]
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def _norm_rope(x1, x2, w1, w2, cos, sin, eps: float, dtype):
    """RMSNorm then RoPE of heads given as halves x1, x2 [n, hd/2]; w1, w2 the norm weight's halves
    [1, hd/2]; cos, sin [1, hd/2]. Each product and sum rounded to `dtype`, as the XLA path does."""
    a, b = x1.astype(jnp.float32), x2.astype(jnp.float32)
    mean_square = (jnp.sum(a * a, axis=1, keepdims=True) + jnp.sum(b * b, axis=1, keepdims=True)) / (2 * a.shape[1])
    scale = jax.lax.rsqrt(mean_square + eps)  # [n,1]

    def times(u, v):  # u * v rounded to dtype (inputs in dtype)
        return (u.astype(jnp.float32) * v.astype(jnp.float32)).astype(dtype)

    n1, n2 = times(w1, (a * scale).astype(dtype)), times(w2, (b * scale).astype(dtype))
    r1 = (times(n1, cos).astype(jnp.float32) - times(n2, sin).astype(jnp.float32)).astype(dtype)
    r2 = (times(n2, cos).astype(jnp.float32) + times(n1, sin).astype(jnp.float32)).astype(dtype)
    return r1, r2


def _queries(qkv_ref, q_norm_ref, cos_ref, sin_ref, head, *, group: int, block_h: int, eps: float):
    """KV head `head`'s query heads, normalised and rotated -> q1, q2 [block_h, hd/2] (rows past
    `group` zero)."""
    half = cos_ref.shape[0]
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    q_rows = (jnp.arange(block_h) < group)[:, None]  # [block_h,1]: the query tile is padded to block_h rows
    q1 = plgpu.load(qkv_ref.at[pl.ds(head * group, block_h), lo], mask=q_rows, other=0.0)  # [block_h,hd/2]
    q2 = plgpu.load(qkv_ref.at[pl.ds(head * group, block_h), hi], mask=q_rows, other=0.0)
    return _norm_rope(q1, q2, q_norm_ref[lo][None, :], q_norm_ref[hi][None, :], cos_ref[lo][None, :],
                      sin_ref[lo][None, :], eps, qkv_ref.dtype)


def _new_key_value(qkv_ref, k_norm_ref, cos_ref, sin_ref, head, *, num_q_heads: int, eps: float):
    """KV head `head`'s new key, normalised and rotated (k1, k2 [1, hd/2]), and its new value [1, hd]."""
    half = cos_ref.shape[0]
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    k_row = pl.ds(num_q_heads + head, 1)
    k1, k2 = _norm_rope(qkv_ref[k_row, lo], qkv_ref[k_row, hi], k_norm_ref[lo][None, :], k_norm_ref[hi][None, :],
                        cos_ref[lo][None, :], sin_ref[lo][None, :], eps, qkv_ref.dtype)  # [1,hd/2]
    kv_heads = (qkv_ref.shape[0] - num_q_heads) // 2
    return k1, k2, qkv_ref[pl.ds(num_q_heads + kv_heads + head, 1), :]


def _write_new(k_out_ref, v_out_ref, slot, k1, k2, v_new):
    """The new key (halves) and value into the cache at `slot`, in the cache's dtype."""
    half = k1.shape[1]
    cache_dtype = k_out_ref.dtype
    k_out_ref[pl.ds(slot, 1), pl.ds(0, half)] = k1.astype(cache_dtype)
    k_out_ref[pl.ds(slot, 1), pl.ds(half, half)] = k2.astype(cache_dtype)
    v_out_ref[pl.ds(slot, 1), :] = v_new.astype(cache_dtype)


def _add_new_token(acc, peak, total, q1, q2, k1, k2, v_new, scale: float):
    """One more online-softmax update with the new token, from registers (not re-read from the cache)."""
    own = (jnp.sum(q1.astype(jnp.float32) * k1.astype(jnp.float32), axis=1)
           + jnp.sum(q2.astype(jnp.float32) * k2.astype(jnp.float32), axis=1)) * scale  # [block_h]
    new_peak = jnp.maximum(peak, own)
    correction = jnp.exp(peak - new_peak)
    own_prob = jnp.exp(own - new_peak).astype(q1.dtype).astype(jnp.float32)  # rounded as the block's probs are
    acc = acc * correction[:, None] + own_prob[:, None] * v_new.astype(jnp.float32)
    return acc, new_peak, total * correction + own_prob


def _kernel(qkv_ref, q_norm_ref, k_norm_ref, cos_ref, sin_ref, start_ref, slot_ref, k_cache_ref, v_cache_ref,
            out_ref, k_out_ref, v_out_ref, *, num_q_heads: int, group: int, block_h: int, block_k: int,
            eps: float, scale: float):
    """One (row, KV head). qkv_ref [Hq+2Hkv, hd]; q/k_norm_ref [hd]; cos/sin_ref [hd/2]; start/slot_ref
    []; k/v_cache_ref [S, hd] (read); out_ref [g, hd]; k/v_out_ref [S, hd] (the same buffers, written)."""
    half, head = cos_ref.shape[0], pl.program_id(1)
    q1, q2 = _queries(qkv_ref, q_norm_ref, cos_ref, sin_ref, head, group=group, block_h=block_h, eps=eps)
    k1, k2, v_new = _new_key_value(qkv_ref, k_norm_ref, cos_ref, sin_ref, head, num_q_heads=num_q_heads, eps=eps)
    start, slot = start_ref[()], slot_ref[()]
    _write_new(k_out_ref, v_out_ref, slot, k1, k2, v_new)
    acc, peak, total = online_softmax([(q1, pl.ds(0, half)), (q2, pl.ds(half, half))], k_cache_ref, v_cache_ref,
                                      start, slot, block_k=block_k, scale=scale, block_h=block_h, hd=2 * half)
    acc, peak, total = _add_new_token(acc, peak, total, q1, q2, k1, k2, v_new, scale)
    q_rows = (jnp.arange(block_h) < group)[:, None]
    plgpu.store(out_ref.at[pl.ds(0, block_h), :], (acc / total[:, None]).astype(out_ref.dtype), mask=q_rows)


def _parts_kernel(qkv_ref, q_norm_ref, k_norm_ref, cos_ref, sin_ref, start_ref, slot_ref, k_cache_ref, v_cache_ref,
                  q_out_ref, out_ref, total_ref, peak_ref, k_out_ref, v_out_ref, *, num_q_heads: int, group: int,
                  block_h: int, block_k: int, split: int, eps: float, scale: float):
    """One (row, KV head, part). As `_kernel`, over the cache slots [start, slot) within this part; the
    part holding `slot` also writes the new key and value, adds the new token and writes q_out_ref
    [g, hd] (the rotated queries). out_ref [g, hd] (normalised), total/peak_ref [g]: this part's
    attention and softmax statistics, written only where the part is live (as `parts_attention`)."""
    head, part = pl.program_id(1), pl.program_id(2)  # read here: the interpreter binds them at the top level only
    half = cos_ref.shape[0]
    start, slot = start_ref[()], slot_ref[()]
    lo = jnp.maximum(start, part * split)
    hi = jnp.minimum(slot, (part + 1) * split)
    holds_new = part == slot // split
    q_rows = (jnp.arange(block_h) < group)[:, None]

    @pl.when(holds_new | (lo < hi))
    def _():
        q1, q2 = _queries(qkv_ref, q_norm_ref, cos_ref, sin_ref, head, group=group, block_h=block_h, eps=eps)
        halves = [(q1, pl.ds(0, half)), (q2, pl.ds(half, half))]
        acc, peak, total = online_softmax(halves, k_cache_ref, v_cache_ref, lo, hi,  # lo <= hi: start <= slot
                                          block_k=block_k, scale=scale, block_h=block_h, hd=2 * half)

        @pl.when(holds_new)
        def _():
            k1, k2, v_new = _new_key_value(qkv_ref, k_norm_ref, cos_ref, sin_ref, head, num_q_heads=num_q_heads,
                                           eps=eps)
            _write_new(k_out_ref, v_out_ref, slot, k1, k2, v_new)
            for q_half, columns in halves:
                plgpu.store(q_out_ref.at[pl.ds(0, block_h), columns], q_half, mask=q_rows)
            new = _add_new_token(acc, peak, total, q1, q2, k1, k2, v_new, scale)
            store_part(out_ref, total_ref, peak_ref, *new, q_rows[:, 0])

        @pl.when(jnp.logical_not(holds_new))
        def _():
            store_part(out_ref, total_ref, peak_ref, acc, peak, total, q_rows[:, 0])


def _checked(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot, num_q_heads: int, implementation: str,
             slots_multiple: int) -> tuple[int, int, int, int]:
    """Both kernels' input checks. -> (B, Hkv, S, hd)."""
    B, heads_total, hd = qkv.shape
    _, Hkv, S, _ = k_cache.shape
    chex.assert_equal(heads_total, num_q_heads + 2 * Hkv)
    chex.assert_shape([k_cache, v_cache], (B, Hkv, S, hd))
    chex.assert_shape([q_norm, k_norm], (hd,))
    chex.assert_shape([cos, sin], (B, hd // 2))
    chex.assert_shape([start, slot], (B,))
    if implementation not in ("pallas", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected 'pallas' or 'interpret'")
    if num_q_heads % Hkv or hd % 2 or S % slots_multiple:
        raise ValueError(f"{num_q_heads} query heads over {Hkv} KV heads, head dim {hd}, {S} cache slots: "
                         f"expected whole groups, an even head dim and slots a multiple of {slots_multiple}")
    return B, Hkv, S, hd


def _input_specs(heads_total: int, hd: int, S: int) -> list:
    """BlockSpecs of (qkv, q_norm, k_norm, cos, sin, start, slot, k_cache, v_cache) on a grid whose
    first two axes are (row, KV head)."""
    vector = pl.BlockSpec((hd,), lambda b, h, *_: (0,))
    table = pl.BlockSpec((None, hd // 2), lambda b, h, *_: (b, 0))
    scalar = pl.BlockSpec((None,), lambda b, h, *_: (b,))
    cache = pl.BlockSpec((None, None, S, hd), lambda b, h, *_: (b, h, 0, 0))
    return [pl.BlockSpec((None, heads_total, hd), lambda b, h, *_: (b, 0, 0)), vector, vector, table, table,
            scalar, scalar, cache, cache]


def fused_decode_attention(qkv: jax.Array, q_norm: jax.Array, k_norm: jax.Array, cos: jax.Array, sin: jax.Array,
                           k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, slot: jax.Array, *,
                           num_q_heads: int, eps: float, implementation: str = "pallas", block_k: int = BLOCK_K,
                           num_warps: int = 4, num_stages: int = NUM_STAGES):
    """One decode step's attention of a layer, from its q/k/v projection's output.

    qkv: [B, Hq + 2 Hkv, hd], the projection's output (queries, then keys, then values) before the
    norms and RoPE; q_norm, k_norm: [hd] the layer's head norms; cos, sin: [B, hd/2] (`rope_tables`);
    k_cache, v_cache: [B,Hkv,S,hd]; start, slot: [B] int, row b attends to cache slots [start, slot)
    and its new token, which is written at `slot`. implementation: 'pallas' (GPU) or 'interpret'.
    Returns (out [B,Hq,hd] in qkv's dtype, k_cache, v_cache updated at `slot`: in place on a GPU)."""
    B, Hkv, S, hd = _checked(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot, num_q_heads,
                             implementation, block_k)
    group = num_q_heads // Hkv
    kernel = functools.partial(_kernel, num_q_heads=num_q_heads, group=group, block_h=query_tile(group),
                               block_k=block_k, eps=eps, scale=hd ** -0.5)
    cache = pl.BlockSpec((None, None, S, hd), lambda b, h: (b, h, 0, 0))
    out, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(B, Hkv),
        in_specs=_input_specs(qkv.shape[1], hd, S),
        out_specs=[pl.BlockSpec((None, None, group, hd), lambda b, h: (b, h, 0, 0)), cache, cache],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, group, hd), qkv.dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={7: 1, 8: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=implementation == "interpret", name="fused_decode_attention",
    )(qkv, q_norm, k_norm, cos, sin, start.astype(jnp.int32), slot.astype(jnp.int32), k_cache, v_cache)
    return out.reshape(B, num_q_heads, hd), k_cache, v_cache


def fused_decode_parts(qkv: jax.Array, q_norm: jax.Array, k_norm: jax.Array, cos: jax.Array, sin: jax.Array,
                       k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, slot: jax.Array, *,
                       num_q_heads: int, eps: float, split: int, block_k: int = BLOCK_K,
                       implementation: str = "pallas", num_warps: int = 4, num_stages: int = NUM_STAGES):
    """The refill sampler's decode step over the rows' own caches, in key parts, from the q/k/v
    projection's output (inputs as `fused_decode_attention`'s; each row at its own `slot`).

    Returns (q [B,Hq,hd] normalised and rotated, in qkv's dtype; parts: (out [B,Hkv,P,g,hd] normalised,
    total, peak [B,Hkv,P,g] fp32) as `attention_parts.parts_attention` returns them over [start,
    slot + 1), the new token in the part holding `slot`, dead parts unwritten; k_cache, v_cache updated
    at `slot`), P = S / split. For `attention_parts.combine_prefix_parts` with end = slot + 1."""
    B, Hkv, S, hd = _checked(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot, num_q_heads,
                             implementation, split)
    if split % block_k:
        raise ValueError(f"parts of {split} slots in blocks of {block_k}: expected whole blocks")
    group, P = num_q_heads // Hkv, S // split
    kernel = functools.partial(_parts_kernel, num_q_heads=num_q_heads, group=group, block_h=query_tile(group),
                               block_k=block_k, split=split, eps=eps, scale=hd ** -0.5)
    cache = pl.BlockSpec((None, None, S, hd), lambda b, h, j: (b, h, 0, 0))
    stats = pl.BlockSpec((None, None, None, group), lambda b, h, j: (b, h, j, 0))
    q, out, total, peak, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(B, Hkv, P),
        in_specs=_input_specs(qkv.shape[1], hd, S),
        out_specs=[pl.BlockSpec((None, None, group, hd), lambda b, h, j: (b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, group, hd), lambda b, h, j: (b, h, j, 0, 0)), stats, stats,
                   cache, cache],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, group, hd), qkv.dtype),
                   jax.ShapeDtypeStruct((B, Hkv, P, group, hd), qkv.dtype),
                   jax.ShapeDtypeStruct((B, Hkv, P, group), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, P, group), jnp.float32),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={7: 4, 8: 5},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=implementation == "interpret", name="fused_decode_parts",
    )(qkv, q_norm, k_norm, cos, sin, start.astype(jnp.int32), slot.astype(jnp.int32), k_cache, v_cache)
    return q.reshape(B, num_q_heads, hd), (out, total, peak), k_cache, v_cache
