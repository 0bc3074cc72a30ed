"""Benchmark inputs shared by scripts/bench_probe.py, bench_probe_parts.py, bench_decode_step.py and
profile_kernels.py (one builder of the random Qwen3-4B-shape probe inputs and the jitted probe step;
never used for results). The FLOP floor's derivation: docs/benchmarks.md."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxhack.grads import losses
from jaxhack.grads.per_sample import per_sample_grads
from jaxhack.models.config import QWEN3_4B
from jaxhack.models.random_init import random_params, random_svd_adapter
from jaxhack.projection.cosines import per_sample_cosines
from jaxhack.projection.v_hack import random_v_hack

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def config_for(small: bool):
    return dataclasses.replace(QWEN3_4B, **SMALL) if small else QWEN3_4B


def flop_floor(config, G: int, P: int, C: int) -> dict:
    """Fewest FLOPs an exact per-sample delta_s gradient step needs (derivation: docs/benchmarks.md).

    Per token (all T = P + C positions; every position feeds the completion through attention):
      forward   x W (2 P_lin), h = x Vh^T (2 P_vh), (h * s) U^T (2 P_u)
      backward  dy W^T (2 P_lin), dy U (2 P_u), ((dy U) * s) Vh (2 P_vh); ds = sum_t h * (dy U) is
                elementwise.
    Folding U diag(s) Vh into a merged weight would skip the adapter matmuls, but in bf16 it rounds
    small delta_s away (8-bit mantissa), so it is not an exact implementation and not the floor.
    Attention: causal QK^T and PV forward 2 T^2 Hq hd per layer (half the square), backward twice
    that. LM head: forward + input gradient at completion positions only (4 D V per token).
    """
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    qd, kvd = config.q_dim, config.kv_dim
    dims = [(D, qd), (D, kvd), (D, kvd), (qd, D), (D, F), (D, F), (F, D)]  # (in, out)
    p_lin = L * sum(i * o for i, o in dims)
    p_vh = L * sum(i * min(i, o) for i, o in dims)
    p_u = L * sum(min(i, o) * o for i, o in dims)
    T = P + C
    linear = G * T * 4 * (p_lin + p_vh + p_u)
    attention = G * L * 3 * (2 * T * T * config.num_attention_heads * config.head_dim)
    lm_head = G * C * 4 * D * config.vocab_size
    total = linear + attention + lm_head
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": total,
            "p_lin": p_lin, "p_vh": p_vh, "p_u": p_u}


def probe_inputs(config, G: int, P: int, C: int):
    """Random probe inputs (seed 0): bf16 params, random-basis SVD adapter, random v_hack (k=1) and a
    batch of G sequences of P prompt + C completion tokens with centered advantages.
    Returns (params, trainable, frozen, v_hack, batch)."""
    T = P + C
    kp, ka, kt, kr = jax.random.split(jax.random.PRNGKey(0), 4)
    params = random_params(config, kp, jnp.bfloat16)
    trainable, frozen = random_svd_adapter(params, ka, jnp.bfloat16)
    v_hack = random_v_hack({n: (m["delta_s"].shape[0], m["delta_s"].shape[1]) for n, m in trainable.items()},
                           seed=0, k=1)
    batch = {"tokens": jax.random.randint(kt, (G, T), 0, config.vocab_size, jnp.int32),
             "attention_mask": jnp.ones((G, T), bool),
             "completion_mask": jnp.broadcast_to(jnp.arange(T) >= P, (G, T)),
             "advantage": losses.centered_advantages(jax.random.uniform(kr, (G,)) * 4, group_size=G)}
    return params, trainable, frozen, v_hack, batch


def probe_step(config, v_hack, loss):
    """jit(step)(trainable, frozen, params, batch) -> (per-sample cosines, batch gradient)."""
    @jax.jit
    def step(tr, fr, p, b):
        g_i = per_sample_grads(loss, tr, fr, p, config, b)
        return per_sample_cosines(v_hack, g_i), jax.tree.map(lambda x: x.sum(0), g_i)

    return step


