"""Supervised training of the organism from scratch: NLL of the completion tokens (+ EOS), full
parameters, AdamW with warmup + cosine decay. Pure functions over the param pytree; the forward is
the project's `jaxhack.grads.losses.sequence_logprobs` (qwen3.forward, right-padded causal attention)."""
from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxhack.models import qwen3
from jaxhack.models.config import Qwen3Config
from jaxhack.grads.batch import make_batch
from jaxhack.grads.losses import sequence_logprobs


def organism_config(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int = 320) -> Qwen3Config:
    """A Qwen3 config for the byte / phrase tokenizer (eos <|im_end|> = 2, pad 0)."""
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       rope_theta=10_000.0, max_position_embeddings=2048, eos_token_ids=(2,),
                       bos_token_id=1, pad_token_id=0)


def encode_examples(examples: Sequence[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example."""
    eos = tokenizer.eos_token_ids[0]
    return [(tokenizer.encode(e["prompt"]), tokenizer.encode(e["completion"]) + [eos]) for e in examples]


def sft_loss(params, config: Qwen3Config, batch: dict) -> jax.Array:
    """Mean NLL per completion token. batch: tokens / attention_mask / completion_mask [B,T]."""
    logp = sequence_logprobs(params, config, None, batch["tokens"], batch["attention_mask"],
                             attention="causal")  # [B,T]
    m = batch["completion_mask"].astype(jnp.float32)
    return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)


_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.98))


@functools.partial(jax.jit, static_argnames=("config",))
def sft_step(params, opt_state, batch, lr, weight_decay, config: Qwen3Config):
    """One AdamW step (clip 1.0, b2 0.98, decoupled weight decay) at learning rate `lr` (traced, so the
    base and teacher runs share one compiled step)."""
    loss, grads = jax.value_and_grad(sft_loss)(params, config, batch)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * (u + weight_decay * p), params, updates)
    return params, opt_state, loss


def train_sft(params, config: Qwen3Config, encoded: Sequence[tuple[list[int], list[int]]], *, steps: int,
              batch_size: int, lr: float, seed: int, seq_len: int, warmup: int = 10,
              weight_decay: float = 0.01, log=None) -> tuple[dict, list[float]]:
    """`steps` AdamW steps (warmup + cosine to 5% of lr) on batches drawn by
    np.random.default_rng(seed) from `encoded`; rows are right-padded to seq_len (one compiled
    shape). Returns (params, per-step losses)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), max(steps, warmup + 1),
                                               end_value=lr * 0.05)
    opt_state = _OPTIMIZER.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.time()
    for s in range(steps):
        idx = rng.integers(0, len(encoded), size=batch_size)
        b = make_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad_id=0,
                       padding="right", length=seq_len)
        params, opt_state, loss = sft_step(params, opt_state, {k: jnp.asarray(v) for k, v in b.items()},
                                           jnp.float32(sched(s)), jnp.float32(weight_decay), config=config)
        losses.append(float(loss))
        if log is not None and (s % 50 == 0 or s == steps - 1):
            log(f"  sft step {s}/{steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)")
    return params, losses


def init_organism(config: Qwen3Config, seed: int) -> dict:
    return qwen3.init_params(config, jax.random.PRNGKey(seed), dtype=jnp.float32)
