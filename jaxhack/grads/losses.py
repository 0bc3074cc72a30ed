"""Per-sample losses over adapter trees (signature and batch layout: docs/architecture.md).

Every loss has the signature `loss_i(trainable, frozen, params, config, sample) -> scalar`, where
`sample` is one row of a padded batch (no N axis); hyper-parameters are keyword-only and bound with
`functools.partial` (they are static under jit). The sum of a loss over the samples of a batch is
the batch loss, so the batch gradient is exactly the sum of the per-sample gradients.

Formulas (docs/adapters.md, ../shared/DESIGN.md), m_t = completion_mask, n = sum_t m_t:
  nll:       L_i = -sum_t m_t logp_t / n
  reinforce: L_i = -A_i sum_t m_t logp_t / n / G                              (Phase 2, Dr.GRPO)
  grpo:      L_i = sum_t m_t [-min(rho_t A_i, clip(rho_t, 1-eps, 1+eps_high) A_i)
                              + beta (exp(d_t) - d_t - 1)] / (G max_new prompts_per_step)
             rho_t = exp(logp_t - old_logp_t), d_t = ref_logp_t - logp_t        (Phase 3)
`grpo_batch_loss` is the sum of `grpo_loss` over a batch in one forward: the loss the Phase 3
learner (`rl/learner.py`) differentiates.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.grads.microbatch import length_microbatches, put_rows, take_rows
from jaxhack.grads.shared_prompt import LAYOUT_KEYS, shared_prompt_logprobs
from jaxhack.models import qwen3
from jaxhack.models.adapters import merge
from jaxhack.models.config import Qwen3Config


# ----------------------------------------------------------------------------------------------
# log-probs

@functools.partial(jax.jit, static_argnames=("config", "remat", "chunk", "attention", "scan_layers",
                                             "delta_zero"))
def sequence_logprobs(params, config: Qwen3Config, adapters, tokens: jax.Array, attention_mask: jax.Array,
                      remat: str = "none", chunk: int = 256, attention: str = "masked",
                      scan_layers: bool = True, delta_zero: bool = False) -> jax.Array:
    """[N,T] fp32: entry t is log p(tokens[t] | tokens[<t]); entry 0 is 0.

    adapters: merged adapter dict (`adapters.merge`) or None for the base model.
    attention: "masked" (any padding) or "causal" (fused kernel; right-padded rows only), see
    qwen3.forward. scan_layers: lax.scan over layers (fast compile) or unrolled (see qwen3.forward).
    delta_zero: the SVD adapter's delta_s + delta_s_hack is exactly 0 (probes at the base model):
    the exact fast path of qwen3.forward (same values and delta_s gradients, fewer matmuls).
    """
    chex.assert_rank([tokens, attention_mask], 2)
    hidden, _ = qwen3.forward(params, config, tokens, attention_mask, adapters=adapters, remat=remat,
                              attention=attention, scan_layers=scan_layers, delta_zero=delta_zero)
    logp_next = qwen3.token_logprobs(params, config, hidden[:, :-1], tokens[:, 1:], chunk=chunk)  # [N,T-1]
    return jnp.pad(logp_next, ((0, 0), (1, 0)))


def reference_logprobs(params, config: Qwen3Config, tokens, attention_mask,
                       remat: str = "none", chunk: int = 256, attention: str = "masked", *,
                       microbatch: int | None = None, length_multiple: int | None = None,
                       max_tokens: int | None = None) -> jax.Array:
    """[N,T] log-probs of the zero-adapter reference, i.e. the base model (exact, DESIGN.md):
    `batched_logprobs` without adapters."""
    return batched_logprobs(params, config, None, tokens, attention_mask, remat, chunk, attention,
                            microbatch=microbatch, length_multiple=length_multiple, max_tokens=max_tokens)


def batched_logprobs(params, config: Qwen3Config, adapters, tokens, attention_mask,
                     remat: str = "none", chunk: int = 256, attention: str = "masked", *,
                     microbatch: int | None = None, length_multiple: int | None = None,
                     max_tokens: int | None = None) -> jax.Array:
    """[N,T] `sequence_logprobs` of N rows (adapters: merged adapter dict or None), a few rows at a time.

    microbatch: rows per forward (None: all N at once); the rows are put back in order.
    length_multiple (needs right-padded rows and microbatch): length-bucketed micro-batches
    (`grads.microbatch.length_microbatches`): rows sorted by real length, each micro-batch cut to its
    longest row rounded up to this multiple; positions past a row's cut are 0 (they are padding).
    max_tokens (with length_multiple): a micro-batch of T positions holds at most max_tokens // T rows."""
    n, T = tokens.shape
    step = n if microbatch is None else microbatch
    if length_multiple is None or microbatch is None:
        parts = [sequence_logprobs(params, config, adapters, jnp.asarray(tokens[i:i + step]),
                                   jnp.asarray(attention_mask[i:i + step]), remat=remat, chunk=chunk,
                                   attention=attention) for i in range(0, n, step)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    host = {"tokens": np.asarray(tokens), "attention_mask": np.asarray(attention_mask)}
    parts = []
    for rows, t in length_microbatches(host["attention_mask"].sum(1), microbatch, multiple=length_multiple,
                                       max_len=T, max_tokens=max_tokens):
        mb = take_rows(host, rows, t)
        parts.append((rows, t, sequence_logprobs(params, config, adapters, jnp.asarray(mb["tokens"]),
                                                 jnp.asarray(mb["attention_mask"]), remat=remat, chunk=chunk,
                                                 attention=attention)))  # [microbatch, t], dispatched
    return jnp.asarray(put_rows(np.zeros((n, T), np.float32), parts))


def sample_logprobs(trainable, frozen, params, config: Qwen3Config, sample: dict,
                    remat: str = "none", chunk: int = 256, attention: str = "masked",
                    scan_layers: bool = True, delta_zero: bool = False) -> jax.Array:
    """[T] log-probs of one sample (row of a batch) under the merged adapter."""
    chex.assert_rank([sample["tokens"], sample["attention_mask"]], 1)
    logp = sequence_logprobs(params, config, merge(trainable, frozen), sample["tokens"][None],
                             sample["attention_mask"][None], remat=remat, chunk=chunk,
                             attention=attention, scan_layers=scan_layers, delta_zero=delta_zero)
    return logp[0]


# ----------------------------------------------------------------------------------------------
# reductions from log-probs (pure, shared by the per-sample losses)

def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1)


def nll_from_logprobs(logp: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Mean over completion tokens of -logp. logp, completion_mask: [T] -> scalar (0 if n = 0)."""
    chex.assert_equal_shape([logp, completion_mask])
    n = jnp.maximum(jnp.sum(completion_mask), 1)
    return -_masked_sum(logp, completion_mask) / n


def reinforce_from_logprobs(logp: jax.Array, completion_mask: jax.Array, advantage: jax.Array,
                            group_size: int) -> jax.Array:
    """-A * sum_t(logp m) / sum_t m / G. logp, completion_mask: [T]; advantage: [] -> scalar."""
    chex.assert_rank(advantage, 0)
    return advantage * nll_from_logprobs(logp, completion_mask) / group_size


def grpo_token_terms(logp: jax.Array, completion_mask: jax.Array, advantage: jax.Array,
                     old_logp: jax.Array, ref_logp: jax.Array, clip_eps: float = 0.2,
                     clip_eps_high: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip policy term and K3 KL term, both zero off the completion mask. All [T].

    pg_t = -min(rho A, clip(rho, 1-eps, 1+eps_high) A), rho = exp(logp - old_logp)
    kl_t = exp(d) - d - 1, d = ref_logp - logp
    The differences are masked before exp, so pad positions cannot produce inf/NaN (nor gradients).
    """
    chex.assert_equal_shape([logp, completion_mask, old_logp, ref_logp])
    chex.assert_rank(advantage, 0)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio_log = jnp.where(completion_mask, logp - old_logp, 0.0)
    rho = jnp.exp(ratio_log)
    pg = -jnp.minimum(rho * advantage, jnp.clip(rho, 1.0 - clip_eps, 1.0 + eps_high) * advantage)
    d = jnp.where(completion_mask, ref_logp - logp, 0.0)
    kl = jnp.exp(d) - d - 1.0
    return jnp.where(completion_mask, pg, 0.0), jnp.where(completion_mask, kl, 0.0)


def grpo_from_logprobs(logp, completion_mask, advantage, old_logp, ref_logp, *, group_size: int,
                       max_new: int, prompts_per_step: int, clip_eps: float = 0.2,
                       clip_eps_high: float | None = None, beta: float = 1e-3,
                       return_terms: bool = False):
    """Dr.GRPO token sum of pg + beta kl, / (G * max_new * prompts_per_step).

    One sample (logp, masks [T], advantage []) or a batch (logp, masks [M,T], advantage [M]): the
    batch value is the sum of the per-sample values (the denominator is a constant). With
    return_terms, returns (loss, pg, kl) with the per-token terms of `grpo_token_terms`."""
    if logp.ndim == 1:
        terms = grpo_token_terms
    else:
        chex.assert_rank(logp, 2)
        terms = jax.vmap(grpo_token_terms, in_axes=(0, 0, 0, 0, 0, None, None))
    pg, kl = terms(logp, completion_mask, advantage, old_logp, ref_logp, clip_eps, clip_eps_high)
    loss = jnp.sum(pg + beta * kl) / (group_size * max_new * prompts_per_step)
    return (loss, pg, kl) if return_terms else loss


# ----------------------------------------------------------------------------------------------
# per-sample losses: loss_i(trainable, frozen, params, config, sample) -> scalar

def nll_loss(trainable, frozen, params, config: Qwen3Config, sample: dict, *, remat: str = "none",
             chunk: int = 256, attention: str = "masked", scan_layers: bool = True,
             delta_zero: bool = False) -> jax.Array:
    """NLL: mean over completion tokens of -log p. sample: tokens, attention_mask, completion_mask [T].
    delta_zero=True: exact fast path when the SVD adapter's delta_s + delta_s_hack == 0 (v_hack
    extraction, Phase 1), see sequence_logprobs."""
    logp = sample_logprobs(trainable, frozen, params, config, sample, remat, chunk, attention, scan_layers,
                           delta_zero)
    return nll_from_logprobs(logp, sample["completion_mask"])


def reinforce_loss(trainable, frozen, params, config: Qwen3Config, sample: dict, *, group_size: int,
                   remat: str = "none", chunk: int = 256, attention: str = "masked",
                   scan_layers: bool = True, delta_zero: bool = False) -> jax.Array:
    """Phase 2: -A_i sum_t(logp m) / sum_t m / G; sample["advantage"]: [] (centered, see below).
    delta_zero=True: exact fast path when delta_s + delta_s_hack == 0 (Phase 2 probes at lr=0)."""
    logp = sample_logprobs(trainable, frozen, params, config, sample, remat, chunk, attention, scan_layers,
                           delta_zero)
    return reinforce_from_logprobs(logp, sample["completion_mask"], sample["advantage"], group_size)


def grpo_loss(trainable, frozen, params, config: Qwen3Config, sample: dict, *, group_size: int,
              max_new: int, prompts_per_step: int, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 1e-3, remat: str = "none",
              chunk: int = 256, attention: str = "masked", scan_layers: bool = True) -> jax.Array:
    """Phase 3 Dr.GRPO with PPO clip and K3 KL to the base model.
    sample: + advantage [], old_logp [T] (sampling policy), ref_logp [T] (`reference_logprobs`)."""
    logp = sample_logprobs(trainable, frozen, params, config, sample, remat, chunk, attention, scan_layers)
    return grpo_from_logprobs(logp, sample["completion_mask"], sample["advantage"], sample["old_logp"],
                              sample["ref_logp"], group_size=group_size, max_new=max_new,
                              prompts_per_step=prompts_per_step, clip_eps=clip_eps,
                              clip_eps_high=clip_eps_high, beta=beta)


def grpo_batch_loss(trainable, frozen, params, config: Qwen3Config, batch: dict, *, group_size: int,
                    max_new: int, prompts_per_step: int, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None, beta: float = 1e-3, remat: str = "none",
                    chunk: int = 256, attention: str = "causal"):
    """Phase 3: the sum over the rows of a (micro)batch of `grpo_loss`, in one forward, plus token
    sums for the metrics. Returns (loss [], aux {kl_sum, pg_sum, n_tokens, ratio_sum, clipped}).

    batch: tokens / attention_mask / completion_mask / old_logp / ref_logp [M,T], advantage [M];
    optional use_current [M] bool: on those rows old_logp := stop_gradient(logp) (rho == 1); with the
    `grads.shared_prompt.group_layout` arrays of its rows (M = whole groups) the log-probs come from
    `shared_prompt_logprobs` (each group's prompt once; the same values up to the summation order).
    attention "causal" needs right-padded rows (make_batch(padding="right"))."""
    if "row_source" in batch:  # the shared-prompt layout (grads.shared_prompt: the groups' packed buffers)
        layout = {k: batch[k] for k in LAYOUT_KEYS}
        logp = shared_prompt_logprobs(params, config, merge(trainable, frozen), batch["tokens"], layout,
                                      remat=remat, chunk=chunk)  # [M,T]
    else:
        logp = sequence_logprobs(params, config, merge(trainable, frozen), batch["tokens"],
                                 batch["attention_mask"], remat=remat, chunk=chunk, attention=attention)  # [M,T]
    old = batch["old_logp"]
    if "use_current" in batch:
        old = jnp.where(batch["use_current"][:, None], jax.lax.stop_gradient(logp), old)
    loss, pg, kl = grpo_from_logprobs(logp, batch["completion_mask"], batch["advantage"], old,
                                      batch["ref_logp"], group_size=group_size, max_new=max_new,
                                      prompts_per_step=prompts_per_step, clip_eps=clip_eps,
                                      clip_eps_high=clip_eps_high, beta=beta, return_terms=True)
    m = batch["completion_mask"]
    rho = jnp.exp(jnp.where(m, jax.lax.stop_gradient(logp) - old, 0.0))
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = m & ((rho < 1 - clip_eps) | (rho > 1 + eps_high))
    aux = {"kl_sum": jnp.sum(kl), "pg_sum": jnp.sum(pg), "n_tokens": jnp.sum(m).astype(jnp.float32),
           "ratio_sum": jnp.sum(jnp.where(m, rho, 0.0)), "clipped": jnp.sum(clipped).astype(jnp.float32)}
    return loss, jax.tree.map(jax.lax.stop_gradient, aux)


GRPO_AUX_KEYS = ("kl_sum", "pg_sum", "n_tokens", "ratio_sum", "clipped")


# ----------------------------------------------------------------------------------------------
# batch-level helpers

def centered_advantages(rewards: jax.Array, group_size: int | None = None,
                        group_ids: jax.Array | None = None) -> jax.Array:
    """A_i = r_i - mean of r over i's group (Dr.GRPO: no std division). rewards: [N] -> [N] fp32.

    Groups are either consecutive blocks of `group_size` rows or given by `group_ids` [N] (any ints).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    chex.assert_rank(rewards, 1)
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size or group_ids")
    if group_ids is None:
        if rewards.shape[0] % group_size:
            raise ValueError(f"{rewards.shape[0]} rewards are not a whole number of groups of {group_size}")
        grouped = rewards.reshape(-1, group_size)  # [N/G, G]
        return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    group_ids = jnp.asarray(group_ids)
    chex.assert_equal_shape([rewards, group_ids])
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [N,N]
    return rewards - (same @ rewards) / same.sum(axis=1)
