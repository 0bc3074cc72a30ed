"""Pieces both sampler schedules share (docs/sampler.md): token choice per row, the chunked prefill,
and one decode step's token bookkeeping. `sampler.py` (row groups) and `refill.py` (slot refill) call
the same functions, so a row's tokens cannot depend on which schedule ran it.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxhack.models import qwen3
from jaxhack.models.config import Qwen3Config

GREEDY, TEMPERATURE, NUCLEUS = 0, 1, 2  # sampling modes (a traced int: one program serves all three)
MAX_EOS_IDS = 8  # EOS ids are passed as a fixed-size array padded with -1 (changing them never recompiles)

# XLA options for the sampler's compiled programs (prefill and decode loop; `jax.jit(compiler_options=)`,
# so they hold for these programs only, whatever XLA_FLAGS says). With a few rows per matmul, XLA's
# Triton gemm fusions stream the weights more slowly than cuBLAS: on an H200 the Phase 3 sampler took
# 23.8 against 24.9 s (exact form) and 18.0 against 19.2 s (factored), generation at batch 64 reached
# 59.2% against 57.7% of the bandwidth ceiling. The learner keeps XLA's default: with Triton gemm off
# its update took 20.5-20.9 against 17.7 s (docs/benchmarks.md, session 10). Ignored off GPUs.
SAMPLER_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def batch_bucket(batch: int) -> int:
    """Batch size rounded up to a power of two up to 64, then to a multiple of 64 (fewer compiled
    shapes: row groups, refill slots, the refill sampler's prompt pool)."""
    if batch <= 64:
        return 1 << max(0, (batch - 1).bit_length())
    return -(-batch // 64) * 64


def sample_from_logits(logits: jax.Array, keys: jax.Array, mode: jax.Array, temperature: jax.Array,
                       top_p: jax.Array) -> jax.Array:
    """Pick one token per row. logits: [B, V] fp32; keys: [B] PRNG keys, one per row -> [B] int32.

    mode GREEDY: argmax. TEMPERATURE: sample softmax(logits / temperature). NUCLEUS: as TEMPERATURE,
    restricted to the smallest set of most-likely tokens whose probability mass reaches top_p (ties at
    the boundary are kept). `lax.switch` runs only the selected branch, so greedy/temperature decoding
    does not pay for the vocabulary sort. Each row draws with its own key, so a row's token does not
    depend on which other rows share the batch (row groups, batch padding, refill slots).
    """
    chex.assert_rank(logits, 2)
    categorical = jax.vmap(lambda k, row: jax.random.categorical(k, row))  # [B] keys, [B,V] -> [B]

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def with_temperature(logits):
        return categorical(keys, logits / temperature).astype(jnp.int32)

    def nucleus(logits):
        scaled = logits / temperature  # [B,V]
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B,V] descending
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B,V] mass of strictly better
        n_keep = jnp.sum(mass_before < top_p, axis=-1)  # [B] >= 1 (the top token has mass_before 0)
        threshold = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)  # [B,1]
        truncated = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        return categorical(keys, truncated).astype(jnp.int32)

    return jax.lax.switch(mode, (greedy, with_temperature, nucleus), logits)


def row_keys(key: jax.Array, steps: jax.Array, row_ids: jax.Array) -> jax.Array:
    """[B] keys fold_in(fold_in(key, step), row id): a row's randomness at its step t depends on
    (key, t, its index in the caller's list) only. steps: [] (every row at the same step) or [B]."""
    steps = jnp.broadcast_to(steps, row_ids.shape)
    return jax.vmap(lambda t, i: jax.random.fold_in(jax.random.fold_in(key, t), i))(steps, row_ids)


def next_tokens(logits, keys, live, eos, pad_id, mode, temperature, top_p):
    """One decode step's tokens. logits [B,V] fp32; keys [B]; live [B] bool (the row's token this step
    is real); eos [MAX_EOS_IDS] int32 padded with -1. Returns (token [B] int32, pad_id where not live;
    logp [B] f32, log_softmax(logits)[token] at temperature 1, 0 where not live; hit_eos [B] bool)."""
    token = sample_from_logits(logits, keys, mode, temperature, top_p)  # [B]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    token = jnp.where(live, token, pad_id)
    logp = jnp.where(live, logp, 0.0)
    hit_eos = live & jnp.any(token[:, None] == eos[None, :], axis=-1)
    return token, logp, hit_eos


def prefill(params, adapters, prompt_tokens, mask, cache, config: Qwen3Config, chunk: int):
    """Run the [B,P] prompts through the model in token chunks of `chunk` (P % chunk == 0), writing cache
    slots 0..P-1. Chunk i attends to slots [0, (i+1) chunk) only (`key_len`), so the activations are
    O(B chunk F) and the scores O(B Hq chunk P), never O(B P S); the cache may be longer than P (the
    slots past key_len are never read). Returns (next-token logits [B,V] fp32 from the last prompt
    slot, which left padding makes a real token, cache)."""
    P = prompt_tokens.shape[1]
    for start in range(0, P, chunk):
        hidden, cache = qwen3.forward(params, config, prompt_tokens[:, start:start + chunk], mask,
                                      adapters=adapters, cache=cache, cache_index=start, key_len=start + chunk)
    return qwen3.lm_logits(params, config, hidden[:, -1]), cache


def prefill_prompts(params, adapters, prompt_tokens, prompt_mask, source, config: Qwen3Config, chunk: int,
                    cache_dtype):
    """Prefill U distinct prompts once for R rows (the G rows of a GRPO group share theirs).
    prompt_tokens, prompt_mask: [U,P] left-padded; source: [R] int32, each row's prompt among the U.
    Returns (next-token logits [R,V] fp32, mask [R,P], cache {"k","v": L-tuples of [R,Hkv,P,hd]}): each
    row its own copy of its prompt's."""
    U, P = prompt_tokens.shape
    chex.assert_shape(prompt_mask, (U, P))
    chex.assert_rank(source, 1)
    cache = qwen3.init_cache(config, U, P, cache_dtype)  # [U,Hkv,P,hd] per layer
    logits, cache = prefill(params, adapters, prompt_tokens, prompt_mask, cache, config, chunk)
    return logits[source], prompt_mask[source], jax.tree.map(lambda c: c[source], cache)
