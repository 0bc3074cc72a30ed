"""Adapter-shaped trees <-> per-module vectors (contract: docs/architecture.md, "Modules").

A module is one (target Linear, layer) pair. Its vector is the trainable adapter tensor of that layer:
  SVD:  delta_s[name][l]                                   dim = r
  LoRA: concat(a[name][l].ravel(), b[name][l].ravel())     dim = rank*in + out*rank
Vectors are returned stacked over layers as {name: [..., L, dim]}; `...` are leading axes of the
input tree (e.g. the N axis of per-sample gradients), kept as they are.
"""
from __future__ import annotations

from typing import Any, Literal

import chex
import jax.numpy as jnp

Tree = dict[str, Any]
Kind = Literal["svd", "lora"]

def module_kind(module: dict) -> Kind:
    """'svd' for {delta_s, delta_s_hack, ...}, 'lora' for {a, b, ...}."""
    if "delta_s" in module:
        return "svd"
    if "a" in module and "b" in module:
        return "lora"
    raise ValueError(f"unknown adapter module with keys {sorted(module)}; expected SVD (delta_s) "
                     "or LoRA (a, b)")


def adapter_kind(tree: Tree) -> Kind:
    """Kind of an adapter-shaped tree {name: module}; all modules must agree."""
    if not tree:
        raise ValueError("empty adapter tree")
    kinds = {name: module_kind(m) for name, m in tree.items()}
    if len(set(kinds.values())) != 1:
        raise ValueError(f"mixed adapter kinds {kinds}")
    return next(iter(kinds.values()))


def module_vector(module: dict, leaf: str = "delta_s") -> jnp.ndarray:
    """One module's vectors. SVD: module[leaf] [..., L, r]; LoRA: [..., L, rank*in + out*rank]."""
    if module_kind(module) == "svd":
        x = module[leaf]  # [..., L, r]
        if x.ndim < 2:
            raise ValueError(f"SVD leaf {leaf!r} has shape {x.shape}; expected [..., L, r]")
        return x
    a, b = module["a"], module["b"]  # [..., L, rank, in], [..., L, out, rank]
    chex.assert_equal(a.shape[:-2], b.shape[:-2])
    flat_a = a.reshape(*a.shape[:-2], -1)  # [..., L, rank*in]
    flat_b = b.reshape(*b.shape[:-2], -1)  # [..., L, out*rank]
    return jnp.concatenate([flat_a, flat_b.astype(flat_a.dtype)], axis=-1)


def to_module_vectors(tree: Tree, leaf: str = "delta_s", names=None) -> dict[str, jnp.ndarray]:
    """{name: module} -> {name: [..., L, dim]} (`leaf` picks delta_s or delta_s_hack for SVD)."""
    names = sorted(tree) if names is None else names
    return {name: module_vector(tree[name], leaf) for name in names}


def from_module_vector(vec: jnp.ndarray, like: dict, leaf: str = "delta_s") -> dict:
    """Inverse of `module_vector`: returns a copy of module `like` with its vector replaced by `vec`.

    SVD: only `leaf` is replaced; LoRA: a and b are split off `vec` and reshaped like like['a'/'b'].
    vec: [..., L, dim] with the same leading axes as `like`.
    """
    out = dict(like)
    if module_kind(like) == "svd":
        chex.assert_shape(vec, like[leaf].shape)
        out[leaf] = vec.astype(like[leaf].dtype)
        return out
    a, b = like["a"], like["b"]  # [..., L, rank, in], [..., L, out, rank]
    n_a, n_b = a.shape[-2] * a.shape[-1], b.shape[-2] * b.shape[-1]
    chex.assert_shape(vec, (*a.shape[:-2], n_a + n_b))
    out["a"] = vec[..., :n_a].reshape(a.shape).astype(a.dtype)
    out["b"] = vec[..., n_a:].reshape(b.shape).astype(b.dtype)
    return out


def from_module_vectors(vecs: dict[str, jnp.ndarray], like: Tree, leaf: str = "delta_s") -> Tree:
    """{name: [..., L, dim]} -> adapter-shaped tree; modules of `like` not in `vecs` are copied."""
    missing = sorted(set(vecs) - set(like))
    if missing:
        raise ValueError(f"modules {missing} not in the adapter tree (has {sorted(like)})")
    return {name: (from_module_vector(vecs[name], m, leaf) if name in vecs else m)
            for name, m in like.items()}


def module_dims(tree: Tree) -> dict[str, int]:
    """{name: dim} of an adapter tree without leading axes beyond L."""
    return {name: int(module_vector(m).shape[-1]) for name, m in sorted(tree.items())}


def module_key(name: str, layer: int) -> str:
    """Flat name of one module, e.g. 'layers.3.q_proj' (safetensors export, reports)."""
    return f"layers.{layer}.{name}"


def parse_module_key(key: str) -> tuple[str, int]:
    """'layers.3.q_proj' -> ('q_proj', 3)."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise ValueError(f"bad module key {key!r}; expected 'layers.<int>.<name>'")
    return parts[2], int(parts[1])
