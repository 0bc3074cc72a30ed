"""Cosines between gradients and v_hack (math: shared/DESIGN.md, "Math"; docs/projection.md).

Sign convention: g is the gradient of the LOSS (the optimizer steps along -g). v_hack rows are
hack-ward: a positive coefficient <v, g> > 0 means the step -g moves towards the hack.

Per module m (one target Linear in one layer), with V_m [k, dim] (orthonormal rows, v_m1 the top one):
  cos_m = <v_m1, g_m> / |g_m|                 signed top-1 cosine
  f_m   = |relu(V_m g_m)| / |g_m|             hack-ward fraction of the gradient norm (all k rows)
  z_m   = cos_m * sqrt(dim_m)                 a random direction in dim_m dims has cos ~ N(0, 1/dim_m)
All are 0 (never NaN) where |g_m| = 0. Aggregates are means over modules whose top row is valid
(non-zero; rows dropped by the noise floor are stored as zero rows); the global gradient norm is the
norm over all module vectors (SVD: delta_s only, since delta_s_hack's gradient is a copy of it).
Everything is vectorized over leading axes of the gradient tree (e.g. the per-sample N axis).
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from jaxhack.projection.modules import to_module_vectors

HIGHEST = jax.lax.Precision.HIGHEST


def directions(v_hack: dict) -> dict[str, jax.Array]:
    """{name: [L, k, dim]} from either a plain direction dict or a v_hack bundle {"V", "S", "mask"}."""
    return v_hack["V"] if "V" in v_hack else v_hack


def coefficients(v: jax.Array, g: jax.Array) -> jax.Array:
    """c = V g per layer. v: [L, k, dim]; g: [..., L, dim] -> [..., L, k] (fp32)."""
    chex.assert_rank(v, 3)
    chex.assert_equal(g.shape[-2:], (v.shape[0], v.shape[2]))
    return jnp.einsum("lkd,...ld->...lk", v.astype(jnp.float32), g.astype(jnp.float32),
                      precision=HIGHEST)


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean norm along `axis` in fp32, with a finite (zero) gradient at x = 0."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis)
    ok = sq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (no NaN, also under grad)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def module_cosines(v_hack: dict, vecs: dict[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
    """Per-module statistics. vecs: {name: [..., L, dim]} (see modules.to_module_vectors).

    Returns {"cos", "hackward_frac", "z", "norm": {name: [..., L]}, "valid": {name: [L] bool}}.
    """
    V = directions(v_hack)
    missing = sorted(set(V) - set(vecs))
    if missing:
        raise ValueError(f"v_hack modules {missing} have no gradient (gradient has {sorted(vecs)})")
    out: dict[str, dict[str, jax.Array]] = {"cos": {}, "hackward_frac": {}, "z": {}, "norm": {}, "valid": {}}
    for name in sorted(V):
        v, g = V[name], vecs[name]
        c = coefficients(v, g)  # [..., L, k]
        norm = safe_norm(g)  # [..., L]
        cos = _safe_div(c[..., 0], norm)
        out["cos"][name] = cos
        out["hackward_frac"][name] = _safe_div(safe_norm(jax.nn.relu(c)), norm)
        out["z"][name] = cos * jnp.sqrt(jnp.float32(v.shape[-1]))
        out["norm"][name] = norm
        out["valid"][name] = jnp.any(v[:, 0, :] != 0, axis=-1)  # [L]
    return out


def module_mean(per_module: dict[str, jax.Array], valid: dict[str, jax.Array]) -> jax.Array:
    """Mean over valid modules. per_module: {name: [..., L]}; valid: {name: [L]} -> [...]."""
    names = sorted(per_module)
    x = jnp.concatenate([per_module[n] for n in names], axis=-1)  # [..., M]
    w = jnp.concatenate([valid[n] for n in names], axis=-1).astype(x.dtype)  # [M]
    return _safe_div(jnp.sum(x * w, axis=-1), jnp.sum(w))


def aggregate(stats: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Means over modules (cos, hackward_frac, z) and the global norm; all shaped [...]."""
    valid = stats["valid"]
    names = sorted(stats["norm"])
    sq = sum(jnp.sum(jnp.square(stats["norm"][n]), axis=-1) for n in names)
    return {
        "cos": module_mean(stats["cos"], valid),
        "hackward_frac": module_mean(stats["hackward_frac"], valid),
        "z": module_mean(stats["z"], valid),
        "grad_norm": jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0),
    }


def gradient_cosines(v_hack: dict, grads: dict[str, Any], leaf: str = "delta_s") -> dict[str, Any]:
    """Cosines of an adapter-shaped gradient tree (leading axes allowed) against v_hack.

    Returns {"modules": module_cosines(...), "cos", "hackward_frac", "z", "grad_norm": [...]}.
    """
    V = directions(v_hack)
    stats = module_cosines(V, to_module_vectors(grads, leaf, names=sorted(V)))
    return {"modules": stats, **aggregate(stats)}


def per_sample_cosines(v_hack: dict, per_sample_grads: dict[str, Any], leaf: str = "delta_s"
                       ) -> dict[str, jax.Array]:
    """Probe-record fields for per-sample gradients (leading axis N):
    cos_S_contrib [N] (mean over modules of cos_m), grad_norm_contrib [N] (global norm),
    hackward_frac [N], z [N] (mean over modules of cos_m * sqrt(dim_m))."""
    r = gradient_cosines(v_hack, per_sample_grads, leaf)
    return {"cos_S_contrib": r["cos"], "grad_norm_contrib": r["grad_norm"],
            "hackward_frac": r["hackward_frac"], "z": r["z"]}
