"""Batched autoregressive sampling with a KV cache (design: docs/sampler.md).

One call = one jitted program: a prefill forward over the left-padded prompt batch (cache slots
0..P-1), then a `lax.while_loop` of T=1 decode forwards (slot P+t at step t) that stops early once
every sequence has emitted an EOS. Shapes are static: the prompt length is rounded up to a bucket and
the batch is padded to a bucket, so repeated calls with different prompt lengths reuse the compiled
program (jax.jit caches it per (bucket P, bucket B, max_new, model config, cache dtype, adapter tree
structure); sampling mode, temperature, top_p, EOS ids and pad id are traced values).

`logprobs` are log-probabilities of the sampled tokens under the *unscaled* model distribution
(temperature 1, no top-p truncation): log_softmax(logits)[token]. That is the policy log-prob that
GRPO's `old_logp` needs, independent of the sampling temperature used to explore.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.models import qwen3
from jaxhack.models.config import Qwen3Config
from jaxhack.models.decode_attention import SPLIT

# Incremented each time the generation program is traced (tests use it to detect recompilation).
TRACE_COUNT = 0


@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: np.ndarray  # [B, max_new] int32; pad_id after a sequence's EOS (the EOS itself is kept)
    lengths: np.ndarray  # [B] int32; completion length, counting the EOS token if one was emitted
    logprobs: np.ndarray  # [B, max_new] float32; log p(token) at temperature 1; 0 after the end
    prompt_lengths: np.ndarray  # [B] int32
    finished: np.ndarray  # [B] bool; True when the sequence emitted an EOS

    @property
    def completion_mask(self) -> np.ndarray:
        """[B, max_new] bool: real completion tokens (EOS included)."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def prompt_bucket(length: int, multiple: int = 64) -> int:
    """Prompt length rounded up to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, -(-length // multiple) * multiple)


def batch_bucket(batch: int) -> int:
    """Batch size rounded up to a power of two up to 64, then to a multiple of 64."""
    if batch <= 64:
        return 1 << max(0, (batch - 1).bit_length())
    return -(-batch // 64) * 64


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int):
    """Left-pad `prompts` into [batch, length] tokens + mask; rows past len(prompts) are all pad."""
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        if n:
            tokens[i, length - n:] = np.asarray(prompt, np.int32)
            mask[i, length - n:] = True
    return tokens, mask


GREEDY, TEMPERATURE, NUCLEUS = 0, 1, 2  # sampling modes (a traced int: one program serves all three)
MAX_EOS_IDS = 8  # EOS ids are passed as a fixed-size array padded with -1 (changing them never recompiles)


def sample_from_logits(logits: jax.Array, key: jax.Array, mode: jax.Array, temperature: jax.Array,
                       top_p: jax.Array) -> jax.Array:
    """Pick one token per row. logits: [B, V] fp32 -> [B] int32.

    mode GREEDY: argmax. TEMPERATURE: sample softmax(logits / temperature). NUCLEUS: as TEMPERATURE,
    restricted to the smallest set of most-likely tokens whose probability mass reaches top_p (ties at
    the boundary are kept). `lax.switch` runs only the selected branch, so greedy/temperature decoding
    does not pay for the vocabulary sort.
    """
    chex.assert_rank(logits, 2)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def with_temperature(logits):
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def nucleus(logits):
        scaled = logits / temperature  # [B,V]
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B,V] descending
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B,V] mass of strictly better
        n_keep = jnp.sum(mass_before < top_p, axis=-1)  # [B] >= 1 (the top token has mass_before 0)
        threshold = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)  # [B,1]
        truncated = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        return jax.random.categorical(key, truncated, axis=-1).astype(jnp.int32)

    return jax.lax.switch(mode, (greedy, with_temperature, nucleus), logits)


def _generate_impl(params, adapters, prompt_tokens, prompt_mask, row_active, eos, pad_id, key, mode,
                   temperature, top_p, *, config: Qwen3Config, max_new: int, cache_dtype):
    """prompt_tokens, prompt_mask: [B,P]; row_active: [B] bool (False for batch-padding rows);
    eos: [MAX_EOS_IDS] int32 padded with -1; pad_id, mode, temperature, top_p: scalars.
    Returns tokens [B,max_new] int32, logprobs [B,max_new] f32, lengths [B] int32, finished [B] bool."""
    global TRACE_COUNT
    TRACE_COUNT += 1
    B, P = prompt_tokens.shape
    S = -(-(P + max_new) // SPLIT) * SPLIT  # slots past P + max_new stay masked out
    chex.assert_shape(prompt_mask, (B, P))
    chex.assert_shape(row_active, (B,))
    chex.assert_shape(eos, (MAX_EOS_IDS,))

    # per-layer (fused) weight copies, made once here rather than sliced on every decode step
    layers, layer_adapters = qwen3.decode_layers(params, adapters)
    params, adapters = {**params, "layers": layers}, layer_adapters
    cache = qwen3.init_cache(config, B, S, cache_dtype)  # {"k","v": L-tuples of [B,Hkv,S,hd]}
    mask = jnp.concatenate([prompt_mask, jnp.zeros((B, S - P), bool)], axis=1)  # [B,S]
    hidden, cache = qwen3.forward(params, config, prompt_tokens, mask, adapters=adapters, cache=cache,
                                  cache_index=0)  # hidden [B,P,D]
    logits = qwen3.lm_logits(params, config, hidden[:, -1])  # [B,V] (left padding: last slot is real)

    def cond(carry):
        t, done = carry[0], carry[1]
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, done, logits, cache, mask, out_tokens, out_logp, key = carry
        key, step_key = jax.random.split(key)
        token = sample_from_logits(logits, step_key, mode, temperature, top_p)  # [B]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        live = ~done  # [B] this step's token is real
        token = jnp.where(live, token, pad_id)
        logp = jnp.where(live, logp, 0.0)
        out_tokens = out_tokens.at[:, t].set(token)
        out_logp = out_logp.at[:, t].set(logp)
        done = done | (live & jnp.any(token[:, None] == eos[None, :], axis=-1))
        slot = P + t
        mask = jax.lax.dynamic_update_slice(mask, live[:, None], (0, slot))
        hidden, cache = qwen3.forward(params, config, token[:, None], mask, adapters=adapters, cache=cache,
                                      cache_index=slot, attention="decode")  # hidden [B,1,D]
        logits = qwen3.lm_logits(params, config, hidden[:, 0])  # [B,V]
        return t + 1, done, logits, cache, mask, out_tokens, out_logp, key

    init = (jnp.int32(0), ~row_active, logits, cache, mask,
            jnp.full((B, max_new), pad_id, jnp.int32), jnp.zeros((B, max_new), jnp.float32), key)
    _, done, _, _, mask, out_tokens, out_logp, _ = jax.lax.while_loop(cond, body, init)
    lengths = jnp.sum(mask[:, P:P + max_new], axis=-1).astype(jnp.int32)  # [B]
    return out_tokens, out_logp, lengths, done & row_active


_generate_jit = jax.jit(_generate_impl, static_argnames=(
    "config", "max_new", "cache_dtype"))


def generate(params: dict, config: Qwen3Config, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, key: jax.Array, adapters: dict | None = None,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
             pad_id: int = 0, cache_dtype=None, prompt_multiple: int = 64) -> SampleResult:
    """Sample `max_new_tokens` continuations of every prompt (lists of token ids, any lengths >= 1).

    adapters: merged per-module adapter dict as `qwen3.forward` takes, or None for the base model.
    temperature == 0 means greedy. top_p < 1 enables nucleus sampling. eos_token_ids: None means
    config.eos_token_ids; [] disables stopping. cache_dtype: KV cache dtype (default: params dtype).
    """
    n = len(prompts)
    if n == 0:
        raise ValueError("generate: empty prompt list")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    prompt_lengths = np.asarray([len(p) for p in prompts], np.int32)
    if prompt_lengths.min() < 1:
        raise ValueError(f"generate: prompt {int(prompt_lengths.argmin())} is empty")
    eos_ids = [int(e) for e in (config.eos_token_ids if eos_token_ids is None else eos_token_ids)]
    if len(eos_ids) > MAX_EOS_IDS:
        raise ValueError(f"generate: at most {MAX_EOS_IDS} EOS ids supported, got {len(eos_ids)}")
    eos = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    P = prompt_bucket(int(prompt_lengths.max()), prompt_multiple)
    B = batch_bucket(n)
    tokens, mask = left_pad(prompts, P, B, pad_id)
    row_active = np.arange(B) < n
    if cache_dtype is None:
        cache_dtype = params["embed"].dtype
    # token ids are traced: drop them from the static config so changing them never recompiles
    model_config = dataclasses.replace(config, eos_token_ids=(), bos_token_id=None, pad_token_id=None)
    mode = GREEDY if temperature == 0.0 else (NUCLEUS if top_p < 1.0 else TEMPERATURE)
    out_tokens, out_logp, lengths, finished = _generate_jit(
        params, adapters, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(row_active), jnp.asarray(eos),
        jnp.int32(pad_id), key, jnp.int32(mode), jnp.float32(1.0 if mode == GREEDY else temperature),
        jnp.float32(top_p), config=model_config, max_new=int(max_new_tokens),
        cache_dtype=jnp.dtype(cache_dtype))
    return SampleResult(tokens=np.asarray(out_tokens)[:n], lengths=np.asarray(lengths)[:n],
                        logprobs=np.asarray(out_logp)[:n], prompt_lengths=prompt_lengths,
                        finished=np.asarray(finished)[:n])


def decode_completions(result: SampleResult, tokenizer) -> list[str]:
    """Completion texts of a SampleResult: each row's tokens up to its length, the EOS dropped."""
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    texts = []
    for row, n in zip(result.tokens, result.lengths):
        ids = [int(t) for t in row[: int(n)]]
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


def sampling_source(params: dict, config: Qwen3Config, tokenizer, *, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, adapters=None,
                    batch_size: int = 64):
    """A completion source for `jaxhack.env.pools.build_pool`: samples each slot's prompt from the
    model (KV-cache `generate`), in batches of `batch_size`; the key of a batch is derived from
    (seed, step, first sample), so a pool is reproducible."""
    eos = list(getattr(tokenizer, "eos_token_ids", ()) or config.eos_token_ids)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def source(slots) -> list[str]:
        completions = []
        for start in range(0, len(slots), batch_size):
            chunk = slots[start: start + batch_size]
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), chunk[0].step),
                                     chunk[0].sample)
            result = generate(params, config, [tokenizer.encode(s.prompt) for s in chunk], adapters=adapters,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              key=key, eos_token_ids=eos, pad_id=pad_id)
            completions += decode_completions(result, tokenizer)
        return completions

    return source
