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
choice for lockstep decoding at batch >= 64; rows of unequal length (the refill schedule) would want
the key axis split as well, which this kernel does not do.
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
from jaxhack.models.attention_parts import online_softmax, query_tile
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


def kernel_choice(dtype, cache_len: int, programs: int, lockstep: bool) -> str | None:
    """How a layer's decode attention runs: 'pallas' (this module's kernel on a GPU), 'interpret'
    (the same kernel run by Pallas' interpreter, any backend) or None (the split path). From the
    environment variable JAXHACK_DECODE_KERNEL, read when the step is traced. 'fused' takes the
    kernel on a GPU where the split path would run one program per (row, KV head) too
    (`decode_tiles`: lockstep rows, programs = rows x KV heads >= ONE_PART_MIN_PROGRAMS); elsewhere the
    split path's key-axis parts balance the work better. 'fused-interpret' takes it everywhere."""
    choice = requested()
    if choice == "split":
        return None
    if choice == "fused-interpret":
        return "interpret"
    one_part = lockstep and programs >= ONE_PART_MIN_PROGRAMS
    return "pallas" if one_part and default_implementation(dtype, cache_len) == "pallas" else None


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


def _kernel(qkv_ref, q_norm_ref, k_norm_ref, cos_ref, sin_ref, start_ref, slot_ref, k_cache_ref, v_cache_ref,
            out_ref, k_out_ref, v_out_ref, *, num_q_heads: int, group: int, block_h: int, block_k: int,
            eps: float, scale: float):
    """One (row, KV head). qkv_ref [Hq+2Hkv, hd]; q/k_norm_ref [hd]; cos/sin_ref [hd/2]; start/slot_ref
    []; k/v_cache_ref [S, hd] (read); out_ref [g, hd]; k/v_out_ref [S, hd] (the same buffers, written)."""
    head = pl.program_id(1)
    half = cos_ref.shape[0]
    dtype = qkv_ref.dtype
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    heads = jnp.arange(block_h)
    q_rows = (heads < group)[:, None]  # [block_h,1]: the query tile is padded to block_h rows
    cos, sin = cos_ref[lo][None, :], sin_ref[lo][None, :]  # [1,hd/2]

    q_first = head * group
    q1 = plgpu.load(qkv_ref.at[pl.ds(q_first, block_h), lo], mask=q_rows, other=0.0)  # [block_h,hd/2]
    q2 = plgpu.load(qkv_ref.at[pl.ds(q_first, block_h), hi], mask=q_rows, other=0.0)
    q1, q2 = _norm_rope(q1, q2, q_norm_ref[lo][None, :], q_norm_ref[hi][None, :], cos, sin, eps, dtype)
    k_row = pl.ds(num_q_heads + head, 1)
    k1, k2 = _norm_rope(qkv_ref[k_row, lo], qkv_ref[k_row, hi], k_norm_ref[lo][None, :], k_norm_ref[hi][None, :],
                        cos, sin, eps, dtype)  # [1,hd/2]
    v_new = qkv_ref[pl.ds(num_q_heads + pl.num_programs(1) + head, 1), :]  # [1,hd]

    start, slot = start_ref[()], slot_ref[()]
    cache_dtype = k_out_ref.dtype
    k_out_ref[pl.ds(slot, 1), lo] = k1.astype(cache_dtype)
    k_out_ref[pl.ds(slot, 1), hi] = k2.astype(cache_dtype)
    v_out_ref[pl.ds(slot, 1), :] = v_new.astype(cache_dtype)

    acc, peak, total = online_softmax([(q1, lo), (q2, hi)], k_cache_ref, v_cache_ref, start, slot,
                                      block_k=block_k, scale=scale, block_h=block_h, hd=2 * half)

    # the new token, from registers: its score with each query head, then one more softmax update
    own = (jnp.sum(q1.astype(jnp.float32) * k1.astype(jnp.float32), axis=1)
           + jnp.sum(q2.astype(jnp.float32) * k2.astype(jnp.float32), axis=1)) * scale  # [block_h]
    new_peak = jnp.maximum(peak, own)
    correction = jnp.exp(peak - new_peak)
    own_prob = jnp.exp(own - new_peak).astype(dtype).astype(jnp.float32)  # rounded as the block's probs are
    acc = acc * correction[:, None] + own_prob[:, None] * v_new.astype(jnp.float32)
    total = total * correction + own_prob
    plgpu.store(out_ref.at[pl.ds(0, block_h), :], (acc / total[:, None]).astype(out_ref.dtype), mask=q_rows)


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
    B, heads_total, hd = qkv.shape
    _, Hkv, S, _ = k_cache.shape
    chex.assert_equal(heads_total, num_q_heads + 2 * Hkv)
    chex.assert_shape([k_cache, v_cache], (B, Hkv, S, hd))
    chex.assert_shape([q_norm, k_norm], (hd,))
    chex.assert_shape([cos, sin], (B, hd // 2))
    chex.assert_shape([start, slot], (B,))
    if implementation not in ("pallas", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected 'pallas' or 'interpret'")
    if num_q_heads % Hkv or hd % 2 or S % block_k:
        raise ValueError(f"{num_q_heads} query heads over {Hkv} KV heads, head dim {hd}, {S} cache slots: "
                         f"expected whole groups, an even head dim and slots a multiple of {block_k}")
    group = num_q_heads // Hkv
    block_h = query_tile(group)
    kernel = functools.partial(_kernel, num_q_heads=num_q_heads, group=group, block_h=block_h, block_k=block_k,
                               eps=eps, scale=hd ** -0.5)
    row = lambda b, h: (b, 0, 0)  # noqa: E731
    vector = pl.BlockSpec((hd,), lambda b, h: (0,))
    cache = pl.BlockSpec((None, None, S, hd), lambda b, h: (b, h, 0, 0))
    scalar = pl.BlockSpec((None,), lambda b, h: (b,))
    out, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(B, Hkv),
        in_specs=[pl.BlockSpec((None, heads_total, hd), row), vector, vector,
                  pl.BlockSpec((None, hd // 2), lambda b, h: (b, 0)), pl.BlockSpec((None, hd // 2), lambda b, h: (b, 0)),
                  scalar, scalar, cache, cache],
        out_specs=[pl.BlockSpec((None, None, group, hd), lambda b, h: (b, h, 0, 0)), cache, cache],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, group, hd), qkv.dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={7: 1, 8: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=implementation == "interpret", name="fused_decode_attention",
    )(qkv, q_norm, k_norm, cos, sin, start.astype(jnp.int32), slot.astype(jnp.int32), k_cache, v_cache)
    return out.reshape(B, num_q_heads, hd), k_cache, v_cache
