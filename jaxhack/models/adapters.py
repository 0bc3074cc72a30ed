"""Adapters applied inside every target Linear (layouts: docs/architecture.md, math: docs/adapters.md).

SVD-delta: torch W = U diag(S) Vh ([out,in]); y += ((x Vh^T) * (delta_s + delta_s_hack)) U^T.
LoRA:      y += scale * (x A^T) B^T, B = 0 at init, scale = alpha / rank.

An adapter is split into a frozen tree (never differentiated) and a trainable tree (always fp32);
`merge(trainable, frozen)` gives the per-module dict that `qwen3.forward(adapters=...)` takes.
Every module entry is stacked over the L decoder layers (leading axis), like the base params.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxhack.models.config import TARGET_MODULES, module_shapes

SVD_CACHE_VERSION = "jaxhack-svd-v1"  # part of the hash: bump it if the cached content changes meaning

Tree = dict[str, Any]


def adapter_delta(x: jax.Array, adapter: dict) -> jax.Array:
    """The adapter's additive output for one layer's module. x: [..., d_in] -> [..., d_out]."""
    if "delta_s" in adapter:
        s = (adapter["delta_s"] + adapter["delta_s_hack"]).astype(x.dtype)  # [r]
        h = jnp.einsum("...i,ri->...r", x, adapter["vh"].astype(x.dtype))  # [..., r]
        h = checkpoint_name(h, "adapter_h")  # saved by the "linear" remat policy
        return jnp.einsum("...r,or->...o", h * s, adapter["u"].astype(x.dtype))
    if "a" in adapter:
        h = jnp.einsum("...i,ri->...r", x, adapter["a"].astype(x.dtype))  # [..., rank]
        out = jnp.einsum("...r,or->...o", h, adapter["b"].astype(x.dtype))
        return out * adapter["scale"].astype(x.dtype)
    raise ValueError(f"unknown adapter with keys {sorted(adapter)}; expected SVD (delta_s) or LoRA (a, b)")


def add_adapter_delta(y: jax.Array, x: jax.Array, adapter: dict | None, delta_zero: bool = False) -> jax.Array:
    """y + the adapter's delta for input x (None: y). delta_zero (SVD only, the caller's promise that
    delta_s + delta_s_hack == 0): the exact delta_s = 0 path of `zero_delta_tap`."""
    if adapter is None:
        return y
    if delta_zero:
        return zero_delta_tap(y, x, adapter)
    return y + adapter_delta(x, adapter).astype(y.dtype)


def zero_delta_tap(y: jax.Array, x: jax.Array, adapter: dict) -> jax.Array:
    """y + adapter_delta(x, adapter) for an SVD adapter whose delta_s + delta_s_hack is exactly 0.

    At s = 0 the adapter adds nothing to the forward and nothing to the input's gradient
    (((dy U) * s) Vh = 0); the only non-zero derivative is d/ds = sum_t (x Vh^T) * (dy U). So only
    h = x Vh^T (forward) and dy U (backward) are computed: the same values as the general path when
    s = 0, without its (h * s) U^T and ((dy U) * s) Vh matmuls. Wrong for s != 0: the caller decides
    (a static flag, e.g. probes at delta_s = 0), nothing checks the values inside jit.
    y: [..., d_out]; x: [..., d_in] -> y unchanged, with the delta_s gradient attached.
    """
    if "delta_s" not in adapter:
        raise ValueError("the delta_s = 0 path is for SVD adapters (delta_s), got keys "
                         f"{sorted(adapter)}")
    s = (adapter["delta_s"] + adapter["delta_s_hack"]).astype(x.dtype)  # [r]
    h = jnp.einsum("...i,ri->...r", x, adapter["vh"].astype(x.dtype))  # [..., r]
    h = checkpoint_name(h, "adapter_h")  # saved by the "linear" remat policy
    return _zero_tap(y, jax.lax.stop_gradient(h), adapter["u"].astype(x.dtype), s)


@jax.custom_vjp
def _zero_tap(y, h, u, s):
    return y


def _zero_tap_fwd(y, h, u, s):
    return y, (h, u, s)


def _zero_tap_bwd(residuals, dy):
    h, u, s = residuals
    g = jnp.einsum("...o,or->...r", dy.astype(h.dtype), u)  # [..., r] = dy U
    ds = jnp.sum((g * h).reshape(-1, h.shape[-1]), axis=0)  # [r], as the general path's mul transpose
    return dy, None, None, ds.astype(s.dtype)


_zero_tap.defvjp(_zero_tap_fwd, _zero_tap_bwd)


# ----------------------------------------------------------------------------------------------
# shapes and tree helpers

def module_dims(params: Tree, targets=TARGET_MODULES) -> dict[str, tuple[int, int, int]]:
    """(L, d_in, d_out) of every target Linear, read from the stacked params (w: [L, d_in, d_out])."""
    layers = params["layers"]
    unknown = [t for t in targets if t not in layers]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; choose from {TARGET_MODULES}")
    return {name: tuple(int(d) for d in layers[name].shape) for name in targets}


def _check_against_config(dims: dict, config) -> None:
    shapes = module_shapes(config)
    for name, (L, d_in, d_out) in dims.items():
        chex.assert_equal((L, d_in, d_out), (config.num_hidden_layers, *shapes[name]))


def merge(trainable: Tree, frozen: Tree) -> Tree:
    """Per-module adapter dict for `qwen3.forward`: {name: {**frozen[name], **trainable[name]}}."""
    if set(trainable) != set(frozen):
        raise ValueError(f"trainable modules {sorted(trainable)} != frozen modules {sorted(frozen)}")
    return {name: {**frozen[name], **trainable[name]} for name in trainable}


def adapter_kind(tree: Tree) -> str:
    """'svd' or 'lora' for a trainable, frozen or merged adapter tree."""
    keys = set().union(*(set(m) for m in tree.values())) if tree else set()
    if keys & {"delta_s", "delta_s_hack", "u", "vh"}:
        return "svd"
    if keys & {"a", "b", "scale"}:
        return "lora"
    raise ValueError(f"not an adapter tree (module keys {sorted(keys)})")


def zeros_like_trainable(trainable: Tree) -> Tree:
    """The zero adapter (the base model for SVD; for LoRA a = b = 0)."""
    return jax.tree.map(jnp.zeros_like, trainable)


# ----------------------------------------------------------------------------------------------
# SVD adapter

def weight_hash(w: Any) -> str:
    """sha256 (hex) of the exact bytes, shape and dtype of one stacked weight w [L, d_in, d_out].

    The SVD cache is keyed by this, so a cached SVD can only ever be reused for bit-identical W.
    """
    a = np.ascontiguousarray(np.asarray(w))
    h = hashlib.sha256()
    h.update(f"{SVD_CACHE_VERSION}|{a.dtype.str}|{a.dtype.name}|{a.shape}|".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


@jax.jit
def _svd_one(w_l: jax.Array):
    """SVD of one layer's torch weight W = w_l^T [out, in] in fp32 (on the default device).
    Returns u [out, r], s [r], vh [r, in] with W = u diag(s) vh, r = min(in, out)."""
    return jnp.linalg.svd(w_l.T.astype(jnp.float32), full_matrices=False)


def _compute_svd(w: Any, label: str, progress) -> dict[str, np.ndarray]:
    """Layer-by-layer fp32 SVD of w [L, d_in, d_out]; factors stacked on the host (numpy fp32)."""
    L = w.shape[0]
    us, ss, vhs = [], [], []
    for layer in range(L):
        u, s, vh = _svd_one(jnp.asarray(w[layer]))
        us.append(np.asarray(u)), ss.append(np.asarray(s)), vhs.append(np.asarray(vh))
        if progress is not None:
            progress.set_postfix_str(f"{label} layer {layer}")
            progress.update(1)
    return {"u": np.stack(us), "s": np.stack(ss), "vh": np.stack(vhs)}


def _save_cache(path: Path, factors: dict[str, np.ndarray]) -> None:
    """Write to a temporary sibling, then rename: a cache entry exists only once complete."""
    from jaxhack.checkpoint import save_pytree

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_pytree(tmp / "factors", factors)
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():  # another process finishing the same entry first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def svd_factors(w: Any, cache_dir: str | Path | None = None, label: str = "W",
                progress=None) -> tuple[dict[str, np.ndarray], str]:
    """fp32 SVD factors of every layer of one stacked weight w [L, d_in, d_out] (w = W^T).

    Returns ({"u": [L,out,r], "s": [L,r], "vh": [L,r,in]} host fp32 arrays with W = u diag(s) vh,
    source) where source is "cache" (read from `cache_dir/<weight_hash(w)>/`) or "computed"
    (then written there when cache_dir is given). Without cache_dir nothing is read or written.
    """
    chex.assert_rank(w, 3)
    L, d_in, d_out = w.shape
    r = min(d_in, d_out)
    expected = {"u": (L, d_out, r), "s": (L, r), "vh": (L, r, d_in)}
    entry = None if cache_dir is None else Path(cache_dir) / weight_hash(w)
    if entry is not None and entry.is_dir():
        from jaxhack.checkpoint import restore_pytree

        factors = restore_pytree(entry / "factors", as_jax=False)
        chex.assert_trees_all_equal_shapes(factors, {k: np.zeros(s) for k, s in expected.items()})
        if progress is not None:
            progress.update(L)
        return {k: np.asarray(v, np.float32) for k, v in factors.items()}, "cache"
    factors = _compute_svd(w, label, progress)
    chex.assert_trees_all_equal_shapes(factors, {k: np.zeros(s) for k, s in expected.items()})
    if entry is not None:
        _save_cache(entry, factors)
    return factors, "computed"


def init_svd_adapter(params: Tree, config, targets=TARGET_MODULES, cache_dir: str | Path | None = None,
                     dtype=None, return_sources: bool = False, progress: bool = True):
    """SVD-delta adapter for every target Linear.

    frozen:    {name: {"u": [L,out,r], "vh": [L,r,in]}} in `dtype` (default: the weight's dtype).
    trainable: {name: {"delta_s": [L,r], "delta_s_hack": [L,r]}} fp32 zeros, r = min(in, out).
    The SVD is fp32, layer by layer (GPU when present), cached under `cache_dir/<hash of W>/`
    (e.g. checkpoints/NAME/svd_cache). Returns (trainable, frozen), plus {name: "cache"|"computed"}
    when return_sources.
    """
    from tqdm.auto import tqdm

    dims = module_dims(params, targets)
    _check_against_config(dims, config)
    trainable, frozen, sources = {}, {}, {}
    total = sum(L for L, _, _ in dims.values())
    with tqdm(total=total, desc="svd", unit="layer", leave=False, disable=not progress) as bar:
        for name, (L, d_in, d_out) in dims.items():
            w = params["layers"][name]  # [L, d_in, d_out]
            factors, sources[name] = svd_factors(w, cache_dir, label=name, progress=bar)
            out_dtype = w.dtype if dtype is None else dtype
            frozen[name] = {"u": jnp.asarray(factors["u"], out_dtype),  # [L, out, r]
                            "vh": jnp.asarray(factors["vh"], out_dtype)}  # [L, r, in]
            r = min(d_in, d_out)
            trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32),
                               "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    return (trainable, frozen, sources) if return_sources else (trainable, frozen)


# ----------------------------------------------------------------------------------------------
# LoRA adapter

def init_lora_adapter(params: Tree, config, key: jax.Array, rank: int = 8, alpha: float = 16.0,
                      targets=TARGET_MODULES):
    """LoRA for every target Linear: y += (alpha / rank) (x A^T) B^T.

    trainable: {name: {"a": [L,rank,in], "b": [L,out,rank]}} fp32; A ~ U(-1/sqrt(in), 1/sqrt(in))
    (torch's kaiming_uniform_(a=sqrt(5)) bound for fan_in = in, as PEFT), B = 0.
    frozen:    {name: {"scale": [L]}} fp32, alpha / rank.
    """
    dims = module_dims(params, targets)
    _check_against_config(dims, config)
    sizes = [L * rank * d_in for L, d_in, _ in dims.values()]
    # one draw for all modules (one compile, not one per shape), split and scaled per module
    unit = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    offsets = np.cumsum([0] + sizes)
    trainable, frozen = {}, {}
    for i, (name, (L, d_in, d_out)) in enumerate(dims.items()):
        bound = 1.0 / np.sqrt(d_in)
        trainable[name] = {
            "a": unit[offsets[i]:offsets[i + 1]].reshape(L, rank, d_in) * bound,  # [L, rank, in]
            "b": jnp.zeros((L, d_out, rank), jnp.float32),  # [L, out, rank]
        }
        frozen[name] = {"scale": jnp.full((L,), alpha / rank, jnp.float32)}  # [L]
    return trainable, frozen
