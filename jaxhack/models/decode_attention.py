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

`prefix_decode_attention` is the refill sampler's form: each row's keys are its prompt's, held once
per distinct prompt in a shared cache (the G rows of a GRPO group read one copy), then its own
generated tokens'. The two parts are attended separately and merged by their softmax statistics: on
a GPU by `attention_parts`' kernels (each key set in parts of SPLIT slots, then one combine per row);
`prompts_and_combine` is its second half, which the sampler's fused kernel (`fused_decode_parts`:
the rows' own keys with the norms, RoPE and cache write) hands its own-key parts to.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from jaxhack.models.attention_parts import combine_prefix_parts, parts_attention, query_tile

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
                               end: jax.Array, residuals: bool = False):
    """q: [B,Hq,hd]; k, v: [B,Hkv,S,hd] (the cache layout); start, end: [B] int -> [B,Hq,hd].

    Softmax of the scores in fp32 over slots start <= s < end (a row with start >= end gets a uniform
    average instead of NaN; the sampler never reads such a row). residuals: also return the softmax's
    (sum [B,Hq], max [B,Hq]) in fp32, sum = 0 for an empty range (as the Pallas kernel's)."""
    B, Hq, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    slots = jnp.arange(S)
    live = (slots[None, :] >= start[:, None]) & (slots[None, :] < end[:, None])  # [B,S]
    scores = jnp.where(live[:, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(B, Hq, hd)
    if not residuals:
        return out
    peak = jnp.max(scores, axis=-1)  # [B,Hkv,g]
    total = jnp.sum(jnp.where(live[:, None, None, :], jnp.exp(scores - peak[..., None]), 0.0), axis=-1)
    return out, (total.reshape(B, Hq), peak.reshape(B, Hq))


def default_implementation(dtype, cache_len: int) -> str:
    """'pallas' on a GPU for half-precision caches whose length is a multiple of SPLIT, else 'xla'."""
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "pallas" if on_gpu and half and cache_len % SPLIT == 0 else "xla"


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, end: jax.Array,
                     implementation: str | None = None, tiles: dict | None = None,
                     lockstep: bool = False, residuals: bool = False):
    """q: [B,Hq,hd]; k, v: [B,Hkv,S,hd]; start, end: [B] int32 -> [B,Hq,hd] in q's dtype.

    implementation: None (default_implementation), 'pallas' (GPU kernel), 'interpret' (the same
    Pallas kernel run by the interpreter: any backend, slow; for tests) or 'xla' (the reference).
    tiles: the kernel's {"split", "block_k", "num_warps", "num_stages"} (default `decode_tiles`);
    lockstep: all rows are at the same decode step (see `decode_tiles`). residuals: return
    (out, (sum, max)), the softmax statistics [B,Hq] fp32 that `merge_attention` combines.
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
        return decode_attention_reference(q, k, v, start, end, residuals)
    if implementation not in ("pallas", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected None, 'pallas', 'interpret' or 'xla'")
    if S % SPLIT:
        raise ValueError(f"cache length {S} is not a multiple of {SPLIT} (the Pallas decode kernel's split)")
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    tiles = decode_tiles(S, B * Hkv, lockstep) if tiles is None else tiles
    if S % tiles["split"] or tiles["split"] % tiles["block_k"]:
        raise ValueError(f"tiles {tiles}: the cache length {S} must be a multiple of split, and split of block_k")
    # query heads per program: a power of two >= 16 covering one KV head's (4 at Qwen3-4B; 24 when the
    # G = 6 rows of a group read their shared prompt together), so each KV tile is read by one program
    block_h = query_tile(Hq // Hkv)
    # gqa takes [B,S,Hkv,hd] and swaps to [B,Hkv,S,hd] inside: the two transposes cancel in XLA
    out = pallas_decode.gqa(q, k.swapaxes(1, 2), v.swapaxes(1, 2), start.astype(jnp.int32),
                            end.astype(jnp.int32), block_h=block_h, block_k=tiles["block_k"],
                            k_splits=S // tiles["split"], num_warps=tiles["num_warps"],
                            num_stages=tiles["num_stages"], interpret=implementation == "interpret",
                            return_residuals=residuals)
    if residuals:
        out, stats = out
        return out.astype(q.dtype), stats
    return out.astype(q.dtype)


def merge_attention(parts) -> jax.Array:
    """Attention over the union of disjoint key sets from each set's (out [B,H,hd], (sum, max) [B,H]):
    out = sum_i w_i out_i with w_i = sum_i exp(max_i - M) / sum_j sum_j exp(max_j - M), M the largest
    max; a part with sum 0 (no keys) weighs nothing. fp32 weights, output in the first part's dtype."""
    peak = functools.reduce(jnp.maximum, [m for _, (_, m) in parts])  # [B,H]
    weights = [total * jnp.exp(m - peak) for _, (total, m) in parts]
    norm = functools.reduce(jnp.add, weights)
    norm = jnp.where(norm > 0, norm, 1.0)
    out = functools.reduce(jnp.add, [o.astype(jnp.float32) * (w / norm)[..., None]
                                     for (o, _), w in zip(parts, weights)])
    return out.astype(parts[0][0].dtype)


def prefix_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, end: jax.Array,
                            prefix: dict, implementation: str | None = None, parts_kernel: bool = True) -> jax.Array:
    """One new token per row over its prompt's keys (shared) and its own generated keys.

    q: [B,Hq,hd]; k, v: [B,Hkv,S,hd] the rows' own cache, slots [start, end) live ([B] each);
    prefix: {"k", "v": [NP,Hkv,Pp,hd] the distinct prompts' keys/values; "start", "end": [NP] each
    prompt's live slots (end = start: no live row reads it, nothing is read); "members": [NP,Gm] the
    slot of each prompt's m-th row (any slot where none); "prompt", "member": [B] each row's prompt
    and its place among the prompt's rows}. A prompt's keys are read once for its Gm rows: their
    Gm x Hq/Hkv queries per KV head go to one program (the kernel's query tile). -> [B,Hq,hd].
    parts_kernel: with the Pallas kernels ('pallas' / 'interpret'), attend in key parts and combine all
    of a row's parts in one kernel (`attention_parts`); False: JAX's stock kernel for each attention,
    its parts and the two attentions merged by XLA (JAXHACK_DECODE_KERNEL=split)."""
    B, Hq, hd = q.shape
    chosen = {implementation or default_implementation(x.dtype, x.shape[2]) for x in (k, prefix["k"])}
    if parts_kernel and len(chosen) == 1 and chosen <= {"pallas", "interpret"}:
        implementation = chosen.pop()
        own = parts_attention(q, k, v, start, end, split=SPLIT, block_k=BLOCK_K, implementation=implementation)
        return prompts_and_combine(q, own, start, end, prefix, implementation)
    own = decode_attention(q, k, v, start, end, implementation, residuals=True)
    NP, Hkv, Gm = prefix["k"].shape[0], prefix["k"].shape[1], prefix["members"].shape[1]
    shared_out, (total, peak) = decode_attention(_prompt_queries(q, prefix), prefix["k"], prefix["v"], prefix["start"],
                                                 prefix["end"], implementation, residuals=True)

    def to_rows(x):  # [NP, Hkv*Gm*g, ...] -> [B, Hq, ...]: row b's own queries' results
        x = x.reshape(NP, Hkv, Gm, Hq // Hkv, *x.shape[2:]).swapaxes(1, 2).reshape(NP, Gm, Hq, *x.shape[2:])
        return x[prefix["prompt"], prefix["member"]]

    shared = (to_rows(shared_out), (to_rows(total), to_rows(peak)))
    return merge_attention([own, shared])


def _prompt_queries(q: jax.Array, prefix: dict) -> jax.Array:
    """q [B,Hq,hd] -> [NP, Hkv*Gm*g, hd]: each prompt's rows' queries, KV-head-major (one program per
    (prompt, KV head) takes its Gm rows' g query heads as one query tile)."""
    B, Hq, hd = q.shape
    NP, Hkv = prefix["k"].shape[:2]
    Gm = prefix["members"].shape[1]
    chex.assert_shape([prefix["start"], prefix["end"]], (NP,))
    chex.assert_shape([prefix["prompt"], prefix["member"]], (B,))
    qp = q[jnp.clip(prefix["members"], 0, B - 1)].reshape(NP, Gm, Hkv, Hq // Hkv, hd)  # [NP,Gm,Hkv,g,hd]
    return qp.transpose(0, 2, 1, 3, 4).reshape(NP, Hkv * Gm * (Hq // Hkv), hd)


def prompts_and_combine(q: jax.Array, own, start: jax.Array, end: jax.Array, prefix: dict,
                        implementation: str) -> jax.Array:
    """The prompt pool's attention in key parts, then each row's parts combined in one kernel.
    q: [B,Hq,hd] (normalised, rotated); own: the rows' own-key parts over [start, end) (`parts_attention`
    or `fused_decode.fused_decode_parts`, parts of SPLIT slots); prefix as `prefix_decode_attention`'s;
    implementation 'pallas' or 'interpret'. -> [B,Hq,hd] in own's dtype."""
    shared = parts_attention(_prompt_queries(q, prefix), prefix["k"], prefix["v"], prefix["start"], prefix["end"],
                             split=SPLIT, block_k=BLOCK_K, implementation=implementation)
    return combine_prefix_parts(own, shared, start, end, prefix, split=SPLIT, implementation=implementation)
