"""Random weights at full size, for benchmarks and memory checks (never for results).

`random_params` builds the qwen3 param tree one leaf at a time (so the fp32 transients of a 4B model
never coexist on the device); `random_svd_adapter` gives SVD-adapter trees whose u / vh have the right
shapes and scale (columns / rows of unit expected norm) without running an SVD: the cost of a
forward or backward pass does not depend on the values. `random_orthonormal_svd_adapter` (Phase 3
`--svd-random-bases`, via `models.load.make_adapter`) gives exactly orthonormal random bases.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxhack.models import qwen3
from jaxhack.models.adapters import module_dims
from jaxhack.models.config import TARGET_MODULES
from jaxhack.models.config import Qwen3Config


def random_params(config: Qwen3Config, key: jax.Array, dtype=jnp.bfloat16) -> dict:
    shapes = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0), dtype=dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def leaf(k, shape, is_norm):
        x = jax.random.normal(k, shape, jnp.float32)
        return ((1.0 + 0.1 * x) if is_norm else 0.02 * x).astype(dtype)

    return treedef.unflatten([leaf(k, s.shape, "norm" in jax.tree_util.keystr(path))
                              for k, (path, s) in zip(keys, leaves)])


def random_svd_adapter(params: dict, key: jax.Array, dtype=jnp.bfloat16, targets=TARGET_MODULES):
    """(trainable, frozen) like adapters.init_svd_adapter, with u [L,out,r], vh [L,r,in] ~ Gaussian
    scaled to unit-norm columns / rows instead of the weights' SVD factors."""

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def gaussian(k, shape, norm_axis_len):
        return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(norm_axis_len)).astype(dtype)

    dims = module_dims(params, targets)
    trainable, frozen = {}, {}
    for name, k in zip(dims, jax.random.split(key, len(dims))):
        L, d_in, d_out = dims[name]
        r = min(d_in, d_out)
        ku, kv = jax.random.split(k)
        frozen[name] = {"u": gaussian(ku, (L, d_out, r), d_out), "vh": gaussian(kv, (L, r, d_in), d_in)}
        trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32),
                           "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    return trainable, frozen


@functools.partial(jax.jit, static_argnames=("rows", "cols", "dtype"))
def random_orthonormal(key, rows: int, cols: int, dtype) -> jax.Array:
    """[rows, cols] with orthonormal columns (rows >= cols), QR of a Gaussian, cast to dtype."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (rows, cols), jnp.float32))
    return q.astype(dtype)


def random_orthonormal_svd_adapter(params: dict, key: jax.Array, targets=TARGET_MODULES):
    """BENCHMARK ONLY: an SVD-shaped adapter whose frozen u [L,out,r] / vh [L,r,in] are random
    orthonormal bases instead of the SVD of W (skips the slow SVD of a random 4B model). Same
    shapes and dtypes as `init_svd_adapter`; built one layer at a time (fp32 QR of one layer)."""
    dims = module_dims(params, targets)
    trainable, frozen = {}, {}
    for m_index, (name, (L, d_in, d_out)) in enumerate(dims.items()):
        r = min(d_in, d_out)
        dtype = params["layers"][name].dtype
        us, vhs = [], []
        for layer in range(L):
            k = jax.random.fold_in(jax.random.fold_in(key, m_index), layer)
            ku, kv = jax.random.split(k)
            us.append(random_orthonormal(ku, d_out, r, dtype))  # [out, r]
            vhs.append(random_orthonormal(kv, d_in, r, dtype).T)  # [r, in]
        frozen[name] = {"u": jnp.stack(us), "vh": jnp.stack(vhs)}
        trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32),
                           "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    return trainable, frozen
