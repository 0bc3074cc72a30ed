"""Batched autoregressive sampling with a KV cache (design: docs/sampler.md).

Two schedules, the same tokens (each row draws its t-th token with fold_in(fold_in(key, t), row)):
- "groups" (this module): one jitted program per row group (at most `max_rows` rows; one group by
  default): a prefill of the group's distinct prompts (a GRPO group's G rows share one) in token
  chunks, each row's copy written to its cache slots 0..P-1, then a
  `lax.while_loop` of T=1 decode forwards (slot P+t at step t) that stops once every row of the
  group is done; rows that have finished read no KV cache, but the group decodes until its longest
  row is done.
- "refill" (`refill.py`, continuous batching; the default when there are more prompts than
  `max_rows`): `max_rows` decode slots; when a row finishes, its slot is refilled with the next
  pending prompt (`refill_rows` rows at a time, each distinct prompt prefilled once), so finished
  rows stop costing decode steps.
Shapes are static: the prompt length is rounded up to a bucket and the batch is padded to a bucket
(groups) or fixed at `max_rows` slots (refill), so repeated calls reuse the compiled programs (jax.jit
caches them per (bucket P, batch, distinct prompts per program U, max_new, model config, cache dtype,
adapter tree structure, prefill chunk); sampling mode, temperature, top_p, EOS ids and pad id are traced values).

`logprobs` are log-probabilities of the sampled tokens under the *unscaled* model distribution
(temperature 1, no top-p truncation): log_softmax(logits)[token]. That is the policy log-prob that
GRPO's `old_logp` needs, independent of the sampling temperature used to explore.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxhack.models import decode_layout, qwen3
from jaxhack.models.config import Qwen3Config
from jaxhack.models.decode_attention import SPLIT
from jaxhack.rl.lend import decode_weights
from jaxhack.rl.refill import device_parts, distinct_prompts, generate_slots, generate_slots_on_devices
from jaxhack.rl.sampling import (GREEDY, MAX_EOS_IDS, NUCLEUS, SAMPLER_COMPILER_OPTIONS, TEMPERATURE,  # noqa: F401
                                 batch_bucket, next_tokens, prefill_prompts, row_keys, sample_from_logits)
from jaxhack.parallel import mesh as meshlib

SAMPLER_FORMS = decode_layout.DECODE_FORMS  # generate(form=...): how SVD-adapted Linears are computed


@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: np.ndarray  # [B, max_new] int32; pad_id after a sequence's EOS (the EOS itself is kept)
    lengths: np.ndarray  # [B] int32; completion length, counting the EOS token if one was emitted
    logprobs: np.ndarray  # [B, max_new] float32; log p(token) at temperature 1; 0 after the end
    prompt_lengths: np.ndarray  # [B] int32
    finished: np.ndarray  # [B] bool; True when the sequence emitted an EOS
    decode_steps: int = 0  # decode forwards run (over the whole slot batch / each row group), for benchmarks

    @property
    def completion_mask(self) -> np.ndarray:
        """[B, max_new] bool: real completion tokens (EOS included)."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def prompt_bucket(length: int, multiple: int = 64) -> int:
    """Prompt length rounded up to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, -(-length // multiple) * multiple)


def refill_slots(n: int, max_rows: int | None, devices: int = 1) -> int:
    """Decode slots per device of the refill schedule for n rows on `devices` devices: max_rows, or
    fewer when the largest device part (`refill.device_parts`) fits in a smaller batch bucket."""
    largest = int(np.diff(device_parts(n, devices)).max())
    return batch_bucket(largest) if max_rows is None else min(max_rows, batch_bucket(largest))


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


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "done", "eos", "logits", "cache", "mask", "tokens", "logprobs"], meta_fields=[])
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry (B rows of one group, S cache slots, prompt bucket P)."""
    step: jax.Array  # [] int32: t, the next token's index (cache slot P + t)
    done: jax.Array  # [B] bool: the row has stopped (EOS, its max_lengths cap, or batch padding)
    eos: jax.Array  # [B] bool: the row emitted an EOS
    logits: jax.Array  # [B,V] fp32: next-token logits
    cache: dict  # {"k","v": L-tuples of [B,Hkv,S,hd]}
    mask: jax.Array  # [B,S] bool: slots holding a real token
    tokens: jax.Array  # [B,max_new] int32 (pad_id where not generated)
    logprobs: jax.Array  # [B,max_new] f32


def _generate_impl(params, adapters, prompt_tokens, prompt_mask, source, row_active, row_ids, row_max_new, eos,
                   pad_id, key, mode, temperature, top_p, *, config: Qwen3Config, max_new: int, cache_dtype,
                   prefill_chunk: int):
    """params, adapters: the decode layout (`lend.decode_weights`); prompt_tokens, prompt_mask: [U,P], the
    group's distinct prompts (`refill.distinct_prompts`); source: [B] int32, each row's prompt among the U;
    row_active: [B] bool (False for batch-padding rows); row_ids:
    [B] int32, each row's index in the caller's prompt list (its sampling key is fold_in(step key, id));
    row_max_new: [B] int32, a row stops after this many tokens (as after an EOS, but not `finished`); eos: [MAX_EOS_IDS] int32 padded with -1; pad_id, mode, temperature, top_p: scalars.
    Returns tokens [B,max_new] int32, logprobs [B,max_new] f32, lengths [B] int32, finished [B] bool, decode steps run [] int32."""
    U, P = prompt_tokens.shape
    B = source.shape[0]
    S = -(-(P + max_new) // SPLIT) * SPLIT  # slots past P + max_new stay masked out
    chex.assert_shape(prompt_mask, (U, P))
    chex.assert_shape([source, row_active, row_ids, row_max_new], (B,))
    chex.assert_shape(eos, (MAX_EOS_IDS,))

    logits, row_mask, cache = prefill_prompts(params, adapters, prompt_tokens, prompt_mask, source, config,
                                              prefill_chunk, cache_dtype)  # [B,V], [B,P], [B,Hkv,P,hd]
    cache = jax.tree.map(lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, S - P), (0, 0))), cache)  # [B,Hkv,S,hd]
    mask = jnp.concatenate([row_mask, jnp.zeros((B, S - P), bool)], axis=1)  # [B,S]

    def cond(state: DecodeState):
        return (state.step < max_new) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        t = state.step
        live = ~state.done  # [B] this step's token is real
        token, logp, hit_eos = next_tokens(state.logits, row_keys(key, t, row_ids), live, eos, pad_id, mode,
                                           temperature, top_p)
        done = state.done | hit_eos | (t + 1 >= row_max_new)
        slot = P + t
        mask = jax.lax.dynamic_update_slice(state.mask, live[:, None], (0, slot))
        hidden, cache = qwen3.forward(params, config, token[:, None], mask, adapters=adapters, cache=state.cache,
                                      cache_index=slot, attention="decode")  # hidden [B,1,D]
        return DecodeState(step=t + 1, done=done, eos=state.eos | hit_eos, logits=qwen3.lm_logits(params, config, hidden[:, 0]),
                           cache=cache, mask=mask, tokens=state.tokens.at[:, t].set(token),
                           logprobs=state.logprobs.at[:, t].set(logp))

    init = DecodeState(step=jnp.int32(0), done=~row_active, eos=jnp.zeros((B,), bool), logits=logits, cache=cache, mask=mask,
                       tokens=jnp.full((B, max_new), pad_id, jnp.int32),
                       logprobs=jnp.zeros((B, max_new), jnp.float32))
    final = jax.lax.while_loop(cond, body, init)
    lengths = jnp.sum(final.mask[:, P:P + max_new], axis=-1).astype(jnp.int32)  # [B]
    return final.tokens, final.logprobs, lengths, final.eos & row_active, final.step


_STATIC = ("config", "max_new", "cache_dtype", "prefill_chunk")
_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC, compiler_options=SAMPLER_COMPILER_OPTIONS)


@functools.lru_cache(maxsize=8)
def _sharded_generate(mesh):
    """`_generate_impl` under shard_map over the mesh's data axis: each device runs the whole sampler
    (prefill, decode loop with its own early stop, the Pallas decode kernel on a GPU) on its own rows;
    params, adapters and the scalars are replicated. Rows are independent (per-row keys), so the
    tokens do not depend on the sharding."""
    rows, rep = P(meshlib.DATA), P()

    def run(params, adapters, tokens, mask, source, active, ids, caps, eos, pad_id, key, mode, temperature, top_p,
            **static):
        def body(*args):
            *out, steps = _generate_impl(*args, **static)
            return (*out, steps[None])  # [1] per device -> [D]: each device's decode steps

        # tokens, mask [D*U,P]: each device's own distinct prompts; source [B]: indices into them
        return jax.shard_map(body, mesh=mesh, in_specs=(rep, rep) + (rows,) * 6 + (rep,) * 6,
                             out_specs=(rows,) * 5, check_vma=False)(
            params, adapters, tokens, mask, source, active, ids, caps, eos, pad_id, key, mode, temperature, top_p)

    return jax.jit(run, static_argnames=_STATIC, compiler_options=SAMPLER_COMPILER_OPTIONS)


def row_groups(n: int, max_rows: int | None) -> tuple[list[tuple[int, int]], int]:
    """Split n prompts into consecutive groups of near-equal size, each <= max_rows (None: one group).
    Returns ([(start, stop)], B) where B is the padded batch of every group: batch_bucket(n) for one
    group (max_rows None), else the group size rounded up to a multiple of 8, capped at max_rows, so the KV cache is never larger than max_rows rows and all groups share one
    compiled program."""
    if max_rows is None:
        return [(0, n)], batch_bucket(n)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if n <= max_rows:
        return [(0, n)], min(batch_bucket(n), max_rows)
    n_groups = -(-n // max_rows)
    size = -(-n // n_groups)
    return [(a, min(a + size, n)) for a in range(0, n, size)], min(-(-size // 8) * 8, max_rows)


def generate(params: dict, config: Qwen3Config, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, key: jax.Array, adapters: dict | None = None,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_ids: Sequence[int] | None = None,
             pad_id: int = 0, cache_dtype=None, prompt_multiple: int = 64, max_rows: int | None = None,
             prefill_chunk: int | None = 256, max_lengths: Sequence[int] | None = None,
             schedule: str = "auto", refill_rows: int = 8, mesh=None, form: str = "exact",
             lend_weights: bool = False) -> SampleResult:
    """Sample `max_new_tokens` continuations of every prompt (lists of token ids, any lengths >= 1).

    adapters: merged per-module adapter dict as `qwen3.forward` takes, or None for the base model.
    temperature == 0 means greedy. top_p < 1 enables nucleus sampling. eos_token_ids: None means
    config.eos_token_ids; [] disables stopping. cache_dtype: KV cache dtype (default: params dtype).
    max_rows: at most this many rows decode together (groups run one after another; the KV cache and
    all activations are bounded by max_rows rows whatever len(prompts)); None: all rows at once.
    prefill_chunk: prompt tokens per prefill forward (None: the whole prompt bucket at once); rounded
    down to a divisor of the prompt bucket. Neither changes the tokens: row i's randomness is
    fold_in(fold_in(key, step), i), whatever the grouping.
    max_lengths: optional per-prompt cap on new tokens (<= max_new_tokens): row i stops after
    max_lengths[i] tokens as if it had emitted an EOS there (but `finished` stays False). Traced, so
    it never recompiles (benchmarks force completion lengths with it).
    schedule: "groups" (row groups of <= max_rows, each decoding until its longest row is done),
    "refill" (`refill.py`: max_rows decode slots, a finished row's slot takes the next pending row,
    refill_rows rows at a time, each of their distinct prompts prefilled once) or "auto": refill when
    max_rows is set and there are more prompts than max_rows per device, else groups. The schedule
    changes the cost, not the tokens.
    mesh: a `jax.sharding.Mesh` with a `data` axis of D devices (`jaxhack.parallel.mesh`): the rows of
    each group are sharded over it (`_sharded_generate`); max_rows is then per device (a group has at
    most max_rows * D rows) and the group's batch is padded to a multiple of D. params / adapters
    should already be replicated on the mesh. None: one device, as before. The refill schedule on a
    mesh (one process's devices): the rows are cut into D consecutive parts and each device refills its
    own max_rows slots from its part (`refill.generate_slots_on_devices`); with several processes the
    mesh runs row groups ("auto") and "refill" is refused.
    form: "exact" (every Linear as in training: x W + the adapter's delta) or "factored" (each
    SVD-adapted Linear from its factors, ((x Vh^T) * (S + delta)) U^T: 43% fewer weight bytes per
    decode step at Qwen3-4B; equal to "exact" when u / vh are the weights' SVD, up to the rounding of
    the factors, `decode_layout.decode_layers`) or "dense" (x W + x dW with dW = (U diag(delta) Vh)^T built
    once per call: the exact form's function with the adapter's product associated the other way, 15%
    fewer weight bytes and 4 instead of 9 matmuls per layer per decode step). The form changes the decode
    cost and, in bf16, the logits: "factored" by about the size of bf16 quantisation of the weights,
    "dense" by the rounding of the adapter's change; LoRA adapters and the base model are always exact.
    lend_weights: sample from one copy of the weights (`rl.lend`): the arrays of params["layers"] and
    the adapters' u / vh that the decode layout holds exactly are deleted while sampling and rebuilt,
    bit for bit, into the same dicts before returning (or raising). Other references to them die.
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
    if schedule not in ("auto", "groups", "refill"):
        raise ValueError(f"generate: schedule must be 'auto', 'groups' or 'refill', got {schedule!r}")
    if refill_rows < 1:
        raise ValueError(f"generate: refill_rows must be >= 1, got {refill_rows}")
    if form not in SAMPLER_FORMS:
        raise ValueError(f"generate: form must be one of {SAMPLER_FORMS}, got {form!r}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be >= 1, got {prefill_chunk}")
    prompt_lengths = np.asarray([len(p) for p in prompts], np.int32)
    if prompt_lengths.min() < 1:
        raise ValueError(f"generate: prompt {int(prompt_lengths.argmin())} is empty")
    eos_ids = [int(e) for e in (config.eos_token_ids if eos_token_ids is None else eos_token_ids)]
    if len(eos_ids) > MAX_EOS_IDS:
        raise ValueError(f"generate: at most {MAX_EOS_IDS} EOS ids supported, got {len(eos_ids)}")
    eos = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    P = prompt_bucket(int(prompt_lengths.max()), prompt_multiple)
    chunk = P if prefill_chunk is None else max(c for c in range(1, min(prefill_chunk, P) + 1) if P % c == 0)
    D = meshlib.data_size(mesh)
    groups, B = row_groups(n, None if max_rows is None else max_rows * D)
    B = meshlib.round_rows(B, mesh)
    caps = np.full((n,), max_new_tokens, np.int32) if max_lengths is None else np.asarray(max_lengths, np.int32)
    if caps.shape != (n,) or caps.min() < 1:
        raise ValueError(f"generate: max_lengths must be {n} ints >= 1")
    if cache_dtype is None:
        cache_dtype = params["embed"].dtype
    # token ids are traced: drop them from the static config so changing them never recompiles
    model_config = dataclasses.replace(config, eos_token_ids=(), bos_token_id=None, pad_token_id=None)
    mode = GREEDY if temperature == 0.0 else (NUCLEUS if top_p < 1.0 else TEMPERATURE)
    one_process = jax.process_count() == 1
    if schedule == "refill" and mesh is not None and not one_process:
        raise ValueError("generate: the refill schedule runs on one process's devices; with several processes "
                         "use schedule 'groups' or 'auto'")
    if schedule == "auto":
        schedule = "refill" if max_rows is not None and n > max_rows * D and one_process else "groups"
    # the decode layout, built once for every group / refill round (lend_weights: the stacked copies freed meanwhile)
    with decode_weights(params, adapters, form=form, lend=lend_weights) as (dparams, dadapters):
        if schedule == "refill":
            slots = refill_slots(n, max_rows, D)
            tokens, mask = left_pad(prompts, P, n, pad_id)
            args = (dparams, dadapters, tokens, mask, np.minimum(caps, max_new_tokens), eos, pad_id, key, mode,
                    1.0 if mode == GREEDY else temperature, top_p)
            kwargs = dict(config=model_config, max_new=int(max_new_tokens), cache_dtype=jnp.dtype(cache_dtype),
                          prefill_chunk=chunk, slots=slots, refill_rows=refill_rows)
            if mesh is None:
                out_tokens, out_logp, lengths, finished, steps = generate_slots(*args, **kwargs)
            else:
                out_tokens, out_logp, lengths, finished, steps = generate_slots_on_devices(list(mesh.devices.flat),
                                                                                            *args, **kwargs)
            return SampleResult(tokens=out_tokens, lengths=lengths, logprobs=out_logp, prompt_lengths=prompt_lengths,
                                finished=finished, decode_steps=steps)
        outs, steps = [], 0
        for start, stop in groups:
            tokens, mask = left_pad(prompts[start:stop], P, B, pad_id)
            tokens, mask, source, _ = distinct_prompts(tokens, mask, B // D, pad_id)  # [D*U,P] x2, [B]: per device
            row_active = np.arange(B) < stop - start
            row_ids = np.arange(start, start + B, dtype=np.int32)
            row_max_new = np.full((B,), max_new_tokens, np.int32)
            row_max_new[:stop - start] = np.minimum(caps[start:stop], max_new_tokens)
            static = dict(config=model_config, max_new=int(max_new_tokens), cache_dtype=jnp.dtype(cache_dtype),
                          prefill_chunk=chunk)
            scalars = (np.int32(pad_id), key, np.int32(mode), np.float32(1.0 if mode == GREEDY else temperature),
                       np.float32(top_p))
            if mesh is None:
                out = _generate_jit(dparams, dadapters, *(jnp.asarray(x) for x in (tokens, mask, source, row_active,
                                                                                   row_ids, row_max_new, eos)),
                                    *(jnp.asarray(x) for x in scalars), **static)
                outs.append([np.asarray(x)[:stop - start] for x in out[:4]])  # blocks: one group's cache at a time
                steps += int(out[4])
            else:
                rows, rep = meshlib.row_sharded(mesh), meshlib.replicated(mesh)
                out = _sharded_generate(mesh)(
                    dparams, dadapters, *(meshlib.to_global(x, rows) for x in (tokens, mask, source, row_active,
                                                                              row_ids, row_max_new)),
                    meshlib.to_global(eos, rep), *(meshlib.to_global(x, rep) for x in scalars), **static)
                outs.append([meshlib.to_host(x)[:stop - start] for x in out[:4]])
                steps += int(meshlib.to_host(out[4]).max())  # [D]: each device's own decode loop
        out_tokens, out_logp, lengths, finished = (np.concatenate(parts) for parts in zip(*outs))
        return SampleResult(tokens=out_tokens, lengths=lengths, logprobs=out_logp, prompt_lengths=prompt_lengths,
                            finished=finished, decode_steps=steps)


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
