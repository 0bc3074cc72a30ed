"""Per-sample and batch gradients of a per-sample loss w.r.t. the trainable adapter tree.

    per_sample_grads(loss_i, trainable, frozen, params, config, batch) = jit(vmap(grad(loss_i)))
      -> tree shaped like `trainable` with a leading N axis
    batch_grad(...) = grad of sum_i loss_i -> tree shaped like `trainable`  (== sum of the above)

`loss_i` and `config` are static: a `functools.partial(loss, **hyper)` is keyed by (function, args,
keywords), so rebuilding the same partial reuses the compiled function (keyword values must be
hashable). `batch` is a dict of arrays with a leading N axis (docs/architecture.md); every entry is
mapped over. microbatch=k computes k samples at a time (lax.map), to bound activation memory.
"""
from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from jaxhack.models.config import Qwen3Config

_SAMPLE_AXES = (None, None, None, None, 0)  # (trainable, frozen, params, config, sample)
_CANONICAL_LOSSES: dict = {}


def _canonical(loss_i: Callable) -> Callable:
    """One object per (function, args, keywords), so jit's static-argument cache hits."""
    if isinstance(loss_i, functools.partial):
        try:
            key = (loss_i.func, loss_i.args, tuple(sorted(loss_i.keywords.items())))
            hash(key)
        except TypeError:
            raise TypeError(f"loss hyper-parameters must be hashable (they are static): {loss_i}") from None
        return _CANONICAL_LOSSES.setdefault(key, loss_i)
    return loss_i


def _check_batch(batch: dict) -> int:
    leaves = jax.tree.leaves(batch)
    chex.assert_equal_shape_prefix(leaves, 1)
    return leaves[0].shape[0]


def _map_samples(fn, batch, microbatch):
    if microbatch is None:
        return jax.vmap(fn)(batch)
    return jax.lax.map(fn, batch, batch_size=microbatch)


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("microbatch",))
def _per_sample_grads(loss_i, trainable, frozen, params, config, batch, microbatch=None):
    grad_i = jax.grad(loss_i)
    return _map_samples(lambda sample: grad_i(trainable, frozen, params, config, sample), batch, microbatch)


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("microbatch",))
def _per_sample_losses(loss_i, trainable, frozen, params, config, batch, microbatch=None):
    return _map_samples(lambda sample: loss_i(trainable, frozen, params, config, sample), batch, microbatch)


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("microbatch",))
def _batch_loss_and_grad(loss_i, trainable, frozen, params, config, batch, microbatch=None):
    def total(tr):
        losses = _map_samples(lambda sample: loss_i(tr, frozen, params, config, sample), batch, microbatch)
        return jnp.sum(losses), losses
    (loss, losses), grad = jax.value_and_grad(total, has_aux=True)(trainable)
    return loss, losses, grad


def per_sample_grads(loss_i: Callable, trainable, frozen, params, config: Qwen3Config, batch: dict,
                     microbatch: int | None = None):
    """d loss_i(sample n) / d trainable for every row n: trainable-shaped tree, leaves [N, ...]."""
    _check_batch(batch)
    return _per_sample_grads(_canonical(loss_i), trainable, frozen, params, config, batch,
                             microbatch=microbatch)


def per_sample_losses(loss_i: Callable, trainable, frozen, params, config: Qwen3Config, batch: dict,
                      microbatch: int | None = None) -> jax.Array:
    """[N] loss of every row."""
    _check_batch(batch)
    return _per_sample_losses(_canonical(loss_i), trainable, frozen, params, config, batch,
                              microbatch=microbatch)


def batch_loss_and_grad(loss_i: Callable, trainable, frozen, params, config: Qwen3Config, batch: dict,
                        microbatch: int | None = None):
    """(sum_n loss_n [], per-row losses [N], grad of the sum: trainable-shaped tree)."""
    _check_batch(batch)
    return _batch_loss_and_grad(_canonical(loss_i), trainable, frozen, params, config, batch,
                                microbatch=microbatch)


def batch_grad(loss_i: Callable, trainable, frozen, params, config: Qwen3Config, batch: dict,
               microbatch: int | None = None):
    """Gradient of sum_n loss_i(sample n) w.r.t. trainable (a trainable-shaped tree)."""
    return batch_loss_and_grad(loss_i, trainable, frozen, params, config, batch, microbatch)[2]
