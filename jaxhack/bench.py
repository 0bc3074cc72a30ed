"""Benchmark inputs shared by scripts/bench_probe.py, bench_probe_parts.py, bench_decode_step.py and
profile_kernels.py: the small config, deterministic hash-uniform inputs that jaxhack and the PyTorch
peers build identically, the probe inputs and jitted probe step, the FLOP floor (derivation:
docs/benchmarks.md) and the gradient comparison. Never used for results."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxhack.models.config import QWEN3_4B

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def config_for(small: bool, layers: int | None = None):
    """The small test config or Qwen3-4B's; `layers` overrides the depth (diagnostics)."""
    config = dataclasses.replace(QWEN3_4B, **SMALL) if small else QWEN3_4B
    return dataclasses.replace(config, num_hidden_layers=layers) if layers else config


HASH_MUL = 0x045D9F3B


def _hash_bits(idx, xp):
    """A 32-bit integer hash of int32 indices (wrapping int32 arithmetic, the same in jax and torch)."""
    x = idx * HASH_MUL
    x = x ^ (x >> 16)
    x = x * HASH_MUL
    x = x ^ (x >> 16)
    x = x * HASH_MUL
    return x ^ (x >> 16)


def hash_uniform_jax(shape, offset: int, scale: float, dtype):
    """Deterministic uniform(-scale*sqrt3, scale*sqrt3) (std = scale) values of element offset + i, i the
    flat index in `shape`: bit-identical to `hash_uniform_torch`, so both sides get the same inputs
    without moving 18 GB between processes."""
    import jax.numpy as jnp

    n = int(np.prod(shape))
    idx = jnp.arange(n, dtype=jnp.int32) + jnp.int32(offset % (1 << 31))
    u = (_hash_bits(idx, jnp) & 0xFFFFFF).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24)) - jnp.float32(0.5)
    return (u * jnp.float32(scale * 12 ** 0.5)).astype(dtype).reshape(shape)


def hash_uniform_torch(shape, offset: int, scale: float, dtype, device):
    import torch

    n = int(np.prod(shape))
    idx = torch.arange(n, dtype=torch.int32, device=device) + (offset % (1 << 31))
    u = (_hash_bits(idx, torch) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24)) - 0.5
    return (u * torch.tensor(scale * 12 ** 0.5, dtype=torch.float32)).to(dtype).reshape(shape)


def leaf_offset(name: str) -> int:
    """A distinct element offset per parameter (name hash), so leaves do not share values."""
    import zlib

    return (zlib.crc32(name.encode()) & 0x3FFF) << 17


def flop_floor(config, G: int, P: int, C: int, delta_zero: bool = False) -> dict:
    """Fewest FLOPs an exact per-sample delta_s gradient step needs (derivation: docs/benchmarks.md).

    Per token (all T = P + C positions; every position feeds the completion through attention):
      forward   x W (2 P_lin), h = x Vh^T (2 P_vh), (h * s) U^T (2 P_u)
      backward  dy W^T (2 P_lin), dy U (2 P_u), ((dy U) * s) Vh (2 P_vh); ds = sum_t h * (dy U) is
                elementwise.
    Folding U diag(s) Vh into a merged weight would skip the adapter matmuls, but in bf16 it rounds
    small delta_s away (8-bit mantissa), so it is not an exact implementation and not the floor.
    Attention: causal QK^T and PV forward 2 T^2 Hq hd per layer (half the square), backward twice
    that. LM head: forward + input gradient at completion positions only (4 D V per token).
    delta_zero (probes at delta_s = 0): the adapter's forward term (h * s) U^T and its activation
    gradient ((dy U) * s) Vh are exactly zero, so only x Vh^T and dy U remain: 4 p_lin + 2 p_vh + 2 p_u.
    """
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    qd, kvd = config.q_dim, config.kv_dim
    dims = [(D, qd), (D, kvd), (D, kvd), (qd, D), (D, F), (D, F), (F, D)]  # (in, out)
    p_lin = L * sum(i * o for i, o in dims)
    p_vh = L * sum(i * min(i, o) for i, o in dims)
    p_u = L * sum(min(i, o) * o for i, o in dims)
    T = P + C
    linear = G * T * (4 * p_lin + 2 * p_vh + 2 * p_u) if delta_zero else G * T * 4 * (p_lin + p_vh + p_u)
    attention = G * L * 3 * (2 * T * T * config.num_attention_heads * config.head_dim)
    lm_head = G * C * 4 * D * config.vocab_size
    total = linear + attention + lm_head
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": total,
            "p_lin": p_lin, "p_vh": p_vh, "p_u": p_u}


def shared_inputs(config, G: int, P: int, C: int, seed: int = 0):
    """tokens [G,T] int and advantages [G] f32 (numpy), the same for jaxhack and PyTorch."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (G, P + C)).astype(np.int32)
    adv = (rng.random(G) * 4).astype(np.float32)
    return tokens, adv - adv.mean()


WEIGHT_STD, NORM_STD = 0.02, 0.1


def probe_inputs(config, G: int, P: int, C: int, dtype=None):
    """Probe inputs (deterministic, shared with the PyTorch side through `hash_uniform_*`): bf16 params
    (uniform, std 0.02; norms 1 +- 0.1), random-basis SVD adapter (u, vh uniform with unit expected column
    / row norms), random v_hack (k=1) and a batch of G sequences of P prompt + C completion tokens with
    centered advantages. Returns (params, trainable, frozen, v_hack, batch)."""
    import jax
    import jax.numpy as jnp

    from jaxhack.models import qwen3
    from jaxhack.models.config import module_shapes
    from jaxhack.projection.v_hack import random_v_hack

    dtype = dtype or jnp.bfloat16
    shapes = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0), dtype=dtype))

    bf16 = jnp.bfloat16  # values are rounded to bf16 first, so an fp32 run differs only in compute precision

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (1 + hash_uniform_jax(s.shape, leaf_offset(name), NORM_STD, jnp.float32).astype(bf16)).astype(dtype)
        return hash_uniform_jax(s.shape, leaf_offset(name), WEIGHT_STD, bf16).astype(dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    trainable, frozen = {}, {}
    for name, (d_in, d_out) in module_shapes(config).items():
        L, r = config.num_hidden_layers, min(d_in, d_out)
        frozen[name] = {"u": hash_uniform_jax((L, d_out, r), leaf_offset(name + ".u"), d_out ** -0.5, bf16).astype(dtype),
                        "vh": hash_uniform_jax((L, r, d_in), leaf_offset(name + ".vh"), d_in ** -0.5, bf16).astype(dtype)}
        trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32), "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    v_hack = random_v_hack({n: (m["delta_s"].shape[0], m["delta_s"].shape[1]) for n, m in trainable.items()},
                           seed=0, k=1)
    tokens, adv = shared_inputs(config, G, P, C)
    T = P + C
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones((G, T), bool),
             "completion_mask": jnp.broadcast_to(jnp.arange(T) >= P, (G, T)), "advantage": jnp.asarray(adv)}
    return params, trainable, frozen, v_hack, batch


def probe_step(config, v_hack, loss):
    """jit(step)(trainable, frozen, params, batch) -> (per-sample cosines, batch gradient)."""
    import jax

    from jaxhack.projection.cosines import per_sample_cosines
    from jaxhack.grads.per_sample import per_sample_grads

    @jax.jit
    def step(tr, fr, p, b):
        g_i = per_sample_grads(loss, tr, fr, p, config, b)
        return per_sample_cosines(v_hack, g_i), jax.tree.map(lambda x: x.sum(0), g_i)

    return step


def _grads_to_numpy(g_i) -> dict:
    """{module: [G, L, r] float32} from a per-sample gradient tree (delta_s leaves)."""
    return {name: np.asarray(m["delta_s"], np.float32) for name, m in g_i.items()}


def relative_error(ours: dict, theirs: dict) -> float:
    """max over (sample, module) of |theirs - ours| / |ours| over that module's [L, r] gradient."""
    worst = 0.0
    for name, a in ours.items():
        b = np.asarray(theirs[name], np.float64).reshape(a.shape[0], -1)
        a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
        err = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
        worst = max(worst, float(err.max()))
    return worst


def gradient_agreement(ours: dict, theirs: dict) -> dict:
    """Where two sets of per-sample gradients ({module: [G, L, r]}) differ: per module the largest
    relative error over samples (as `relative_error`) and the cosine of the worst sample's gradients,
    and per layer (worst module) the largest relative error over samples."""
    per_module, cos, worst_name, worst = {}, {}, None, -1.0
    for name, a in ours.items():
        b = np.asarray(theirs[name], np.float64).reshape(a.shape)
        a = np.asarray(a, np.float64)
        fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        err = np.linalg.norm(fb - fa, axis=1) / np.maximum(np.linalg.norm(fa, axis=1), 1e-30)
        i = int(err.argmax())
        per_module[name] = round(float(err[i]), 5)
        cos[name] = round(float(fa[i] @ fb[i] / max(np.linalg.norm(fa[i]) * np.linalg.norm(fb[i]), 1e-30)), 5)
        if err[i] > worst:
            worst, worst_name = float(err[i]), name
    a = np.asarray(ours[worst_name], np.float64)
    b = np.asarray(theirs[worst_name], np.float64).reshape(a.shape)
    per_layer = (np.linalg.norm(b - a, axis=2) / np.maximum(np.linalg.norm(a, axis=2), 1e-30)).max(0)
    return {"rel_err_per_module": per_module, "cos_worst_sample_per_module": cos, "worst_module": worst_name,
            "rel_err_per_layer_worst_module": [round(float(x), 4) for x in per_layer]}
