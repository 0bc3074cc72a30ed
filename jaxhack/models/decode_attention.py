"""Attention of one new token per row over its live slice of the KV cache (the decode step).

Row b attends to the cache slots [start[b], end[b]): in the sampler that is the left-padded prompt's
first real slot up to and including the token just written, so the keys a row attends to are
contiguous. Reading only those slots is what makes decoding fast: at step t the slots past P + t are
never read, where a masked einsum over the whole static cache reads all of them.

- GPU, bf16/fp16: JAX's Pallas flash-decoding kernel (`jax.experimental.pallas.ops.gpu.decode_attention
  .gqa`): the key axis is split into parts of `split` slots, one program per (row, KV head, part); parts
  past `end` exit at once. The tiles come from `decode_tiles` (measured:
  scripts/bench_decode_kernels.py, docs/benchmarks.md).
- elsewhere: the same function as a masked softmax over all S slots (`decode_attention_reference`).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

SPLIT = 128  # the cache length must be a multiple of this (the sampler pads to it)
BLOCK_K = 64  # slots per inner iteration of a program
ONE_PART_MIN_PROGRAMS = 512  # (row, KV head) pairs from which one program each fills the GPU


def decode_tiles(cache_len: int, programs: int, lockstep: bool) -> dict:
    """The Pallas kernel's tiles for a cache of cache_len slots and `programs` = rows x KV heads.

    lockstep: every row decodes the same step (one cache_index for all rows, the row-group
    schedule), so the rows' live lengths differ only by their prompts' padding. Then, with at least
    ONE_PART_MIN_PROGRAMS pairs (batch >= 64 at Qwen3's 8 KV heads), each pair is one program over
    all its live slots (k_splits = 1) and no partial outputs are combined afterwards: generation at
    batch 64 / 256 ran 4.6% / 5.6% faster (H200, same call). Otherwise (the refill schedule, whose
    rows are at different steps, or few pairs) the key axis is cut into parts of SPLIT slots
    (flash-decoding), which balances rows of unequal length: one program per pair made the refill
    sampler 13% slower (22.3 against 19.8 s, H200, same call; docs/benchmarks.md "Session 9")."""
    if lockstep and programs >= ONE_PART_MIN_PROGRAMS:
        return {"split": cache_len, "block_k": BLOCK_K, "num_warps": 4, "num_stages": 2}
    return {"split": SPLIT, "block_k": BLOCK_K, "num_warps": 4, "num_stages": 2}


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                               end: jax.Array) -> jax.Array:
    """q: [B,Hq,hd]; k, v: [B,Hkv,S,hd] (the cache layout); start, end: [B] int -> [B,Hq,hd].

    Softmax of the scores in fp32 over slots start <= s < end (a row with start >= end gets a uniform
    average instead of NaN; the sampler never reads such a row)."""
    B, Hq, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    slots = jnp.arange(S)
    live = (slots[None, :] >= start[:, None]) & (slots[None, :] < end[:, None])  # [B,S]
    scores = jnp.where(live[:, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(B, Hq, hd)


def default_implementation(dtype, cache_len: int) -> str:
    """'pallas' on a GPU for half-precision caches whose length is a multiple of SPLIT, else 'xla'."""
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "pallas" if on_gpu and half and cache_len % SPLIT == 0 else "xla"


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, end: jax.Array,
                     implementation: str | None = None, tiles: dict | None = None,
                     lockstep: bool = False) -> jax.Array:
    """q: [B,Hq,hd]; k, v: [B,Hkv,S,hd]; start, end: [B] int32 -> [B,Hq,hd] in q's dtype.

    implementation: None (default_implementation), 'pallas' (GPU kernel), 'interpret' (the same
    Pallas kernel run by the interpreter: any backend, slow; for tests) or 'xla' (the reference).
    tiles: the kernel's {"split", "block_k", "num_warps", "num_stages"} (default `decode_tiles`);
    lockstep: all rows are at the same decode step (see `decode_tiles`).
    """
    B, Hq, hd = q.shape
    chex.assert_rank([k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_shape([start, end], (B,))
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    if implementation is None:
        implementation = default_implementation(k.dtype, S)
    if implementation == "xla":
        return decode_attention_reference(q, k, v, start, end)
    if implementation not in ("pallas", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected None, 'pallas', 'interpret' or 'xla'")
    if S % SPLIT:
        raise ValueError(f"cache length {S} is not a multiple of {SPLIT} (the Pallas decode kernel's split)")
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    tiles = decode_tiles(S, B * Hkv, lockstep) if tiles is None else tiles
    if S % tiles["split"] or tiles["split"] % tiles["block_k"]:
        raise ValueError(f"tiles {tiles}: the cache length {S} must be a multiple of split, and split of block_k")
    # gqa takes [B,S,Hkv,hd] and swaps to [B,Hkv,S,hd] inside: the two transposes cancel in XLA
    out = pallas_decode.gqa(q, k.swapaxes(1, 2), v.swapaxes(1, 2), start.astype(jnp.int32),
                            end.astype(jnp.int32), block_k=tiles["block_k"], k_splits=S // tiles["split"],
                            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
                            interpret=implementation == "interpret")
    return out.astype(q.dtype)
