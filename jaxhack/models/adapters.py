"""Adapters applied inside every target Linear (layouts: docs/architecture.md).

SVD-delta: torch W = U diag(S) Vh ([out,in]); y += ((x Vh^T) * (delta_s + delta_s_hack)) U^T.
LoRA:      y += scale * (x A^T) B^T, B = 0 at init.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def adapter_delta(x: jax.Array, adapter: dict) -> jax.Array:
    """The adapter's additive output for one layer's module. x: [..., d_in] -> [..., d_out]."""
    if "delta_s" in adapter:
        s = (adapter["delta_s"] + adapter["delta_s_hack"]).astype(x.dtype)  # [r]
        h = jnp.einsum("...i,ri->...r", x, adapter["vh"].astype(x.dtype))  # [..., r]
        return jnp.einsum("...r,or->...o", h * s, adapter["u"].astype(x.dtype))
    if "a" in adapter:
        h = jnp.einsum("...i,ri->...r", x, adapter["a"].astype(x.dtype))  # [..., rank]
        out = jnp.einsum("...r,or->...o", h, adapter["b"].astype(x.dtype))
        return out * adapter["scale"].astype(x.dtype)
    raise ValueError(f"unknown adapter with keys {sorted(adapter)}; expected SVD (delta_s) or LoRA (a, b)")
