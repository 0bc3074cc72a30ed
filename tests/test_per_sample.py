"""Per-sample gradients: vmap == loop, sum == batch gradient, finite differences, padding, masks, LoRA."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.models import adapters
from jaxhack.models.config import TINY
from jaxhack.grads import batch as rl_batch
from jaxhack.grads import losses, per_sample

CONFIG = dataclasses.replace(TINY, vocab_size=128)
TARGETS = ("q_proj", "down_proj")  # attention + MLP, square and non-square (fewer = faster compiles)
PAD = 0
# rows of 8, 8, 8 and 5 tokens with different prompt / completion splits; T = 10
PROMPTS = [[5, 6, 7, 8, 30], [9, 10], [11, 12, 13, 14], [15, 16, 17]]
COMPLETIONS = [[20, 21, 22], [23, 24, 25, 26, 27, 29], [28, 31, 32, 33], [34, 35]]
T = 10
NLL = functools.partial(losses.nll_loss)




def as_jax(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def row(batch, i):
    return {k: v[i] for k, v in batch.items()}


def randomized(tree, seed, scale):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def unit(tree):
    norm = np.sqrt(sum(np.vdot(x, x) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) / norm), tree)


def tree_dot(a, b):
    return sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_trees_close(a, b, rtol=1e-5, rel_atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rel_atol * max(np.abs(y).max(), 1e-12))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def svd(params):
    """SVD adapter with random nonzero delta_s / delta_s_hack (so the gradients are not at the base)."""
    trainable, frozen = adapters.init_svd_adapter(params, CONFIG, TARGETS)
    return randomized(trainable, seed=1, scale=0.3), frozen


@pytest.fixture(scope="module")
def right():
    return as_jax(rl_batch.make_batch(PROMPTS, COMPLETIONS, pad_id=PAD, padding="right", length=T))


@pytest.fixture(scope="module")
def left():
    return as_jax(rl_batch.make_batch(PROMPTS, COMPLETIONS, pad_id=PAD, padding="left", length=T))


@pytest.fixture(scope="module")
def single_grad():
    """Gradient of one sample on its own (no vmap, no batch axis)."""
    return jax.jit(jax.grad(NLL), static_argnums=3)


def unpadded_row(i):
    alone = as_jax(rl_batch.make_batch(PROMPTS[i:i + 1], COMPLETIONS[i:i + 1]))
    return row(alone, 0)


@pytest.fixture(scope="module")
def nll_grads_right(params, svd, right):
    return per_sample.per_sample_grads(NLL, *svd, params, CONFIG, right)


def test_per_sample_equals_loop_and_sums_to_batch(params, svd, right, single_grad, nll_grads_right):
    trainable, frozen = svd
    g = nll_grads_right
    assert jax.tree.structure(g) == jax.tree.structure(trainable)
    for x, t in zip(jax.tree.leaves(g), jax.tree.leaves(trainable)):
        assert x.shape == (len(PROMPTS), *t.shape) and x.dtype == jnp.float32
    # a Python loop of single-sample gradients, each on the sequence alone and unpadded (rows 0-2:
    # 8 tokens, one compile); with the sum check below this pins row 3 too
    for i in range(3):
        sample = unpadded_row(i)
        assert sample["tokens"].shape == (8,)
        g_i = single_grad(trainable, frozen, params, CONFIG, sample)
        assert_trees_close(jax.tree.map(lambda x: x[i], g), g_i)
    total = per_sample.batch_grad(NLL, trainable, frozen, params, CONFIG, right)
    assert_trees_close(jax.tree.map(lambda x: x.sum(0), g), total)
    # the rows really differ (a broadcast bug would make them equal)
    q = np.asarray(g["q_proj"]["delta_s"])
    assert np.linalg.norm(q[0] - q[1]) > 1e-3 * np.linalg.norm(q[0])
    # delta_s and delta_s_hack enter the forward only through their sum: equal gradients
    assert_trees_equal(g["down_proj"]["delta_s"], g["down_proj"]["delta_s_hack"])


def test_delta_s_gradient_matches_finite_differences(params, svd, right, nll_grads_right):
    trainable, frozen = svd
    g = nll_grads_right
    losses_at = lambda tr: np.asarray(per_sample.per_sample_losses(NLL, tr, frozen, params, CONFIG, right),
                                      np.float64)
    h = 1e-2
    # (a) a random direction over every delta_s leaf (delta_s_hack held fixed)
    v = randomized(trainable, seed=7, scale=1.0)
    v = unit({m: {"delta_s": v[m]["delta_s"], "delta_s_hack": jnp.zeros_like(v[m]["delta_s_hack"])} for m in v})
    step = lambda sign: jax.tree.map(lambda t, d: t + sign * h * d, trainable, v)
    fd = (losses_at(step(+1)) - losses_at(step(-1))) / (2 * h)  # [N]
    analytic = np.array([tree_dot(jax.tree.map(lambda x: x[i], g), v) for i in range(len(PROMPTS))])
    np.testing.assert_allclose(fd, analytic, rtol=2e-3, atol=2e-3 * np.abs(analytic).max())
    # (b) the largest single coordinates of sample 0's delta_s gradient
    ds = np.asarray(g["q_proj"]["delta_s"][0])  # [L, r]
    for flat in np.argsort(-np.abs(ds).ravel())[:2]:
        layer, k = np.unravel_index(flat, ds.shape)
        bump = lambda sign: {**trainable, "q_proj": {**trainable["q_proj"],
                             "delta_s": trainable["q_proj"]["delta_s"].at[layer, k].add(sign * h)}}
        fd_k = (losses_at(bump(+1))[0] - losses_at(bump(-1))[0]) / (2 * h)
        assert fd_k == pytest.approx(ds[layer, k], rel=5e-3)


def test_padding_side_and_unpadded_agree(params, svd, right, left, single_grad, nll_grads_right):
    trainable, frozen = svd
    g_left = per_sample.per_sample_grads(NLL, trainable, frozen, params, CONFIG, left)
    assert_trees_close(g_left, nll_grads_right)
    loss_r = per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, right)
    loss_l = per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, left)
    np.testing.assert_allclose(np.asarray(loss_l), np.asarray(loss_r), rtol=1e-5)
    for i in range(3):  # the rows of 8 tokens, alone and unpadded
        g_alone = single_grad(trainable, frozen, params, CONFIG, unpadded_row(i))
        assert_trees_close(jax.tree.map(lambda x: x[i], g_left), g_alone)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_token_ids_change_nothing(params, svd, right, left, nll_grads_right, side):
    trainable, frozen = svd
    b = right if side == "right" else left
    pads = ~np.asarray(b["attention_mask"])
    tokens = np.asarray(b["tokens"]).copy()
    tokens[pads] = np.random.default_rng(3).integers(1, CONFIG.vocab_size, pads.sum())
    other = dict(b, tokens=jnp.asarray(tokens))
    assert_trees_equal(per_sample.per_sample_grads(NLL, trainable, frozen, params, CONFIG, other),
                       per_sample.per_sample_grads(NLL, trainable, frozen, params, CONFIG, b))
    assert np.array_equal(np.asarray(per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, other)),
                          np.asarray(per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, b)))
    # whereas changing a completion token does change that row's loss
    tokens[0, np.flatnonzero(np.asarray(b["completion_mask"][0]))[-1]] += 1
    changed = per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, dict(b, tokens=jnp.asarray(tokens)))
    assert float(changed[0]) != float(per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, b)[0])


def test_reinforce_is_scaled_nll_with_microbatches(params, svd, right):
    """Phase 2: L_i = A_i / G * NLL_i, so its per-sample gradients are A_i / G times the NLL ones (the
    function is the NLL one times a constant); checked on the loss values, through the lax.map path."""
    trainable, frozen = svd
    G = len(PROMPTS)
    adv = losses.centered_advantages(jnp.array([3.5, 0.25, 0.5, 3.0]), group_size=G)
    np.testing.assert_allclose(np.asarray(adv), [1.6875, -1.5625, -1.3125, 1.1875], rtol=1e-6)
    loss = functools.partial(losses.reinforce_loss, group_size=G)
    values = per_sample.per_sample_losses(loss, trainable, frozen, params, CONFIG, dict(right, advantage=adv),
                                          microbatch=2)
    nll = per_sample.per_sample_losses(NLL, trainable, frozen, params, CONFIG, right)
    np.testing.assert_allclose(np.asarray(values), np.asarray(adv) / G * np.asarray(nll), rtol=1e-5)
    # rebuilding the same partial reuses the compiled function
    again = functools.partial(losses.reinforce_loss, group_size=G)
    assert per_sample._canonical(again) is per_sample._canonical(loss)


def test_grpo_at_the_sampling_policy_is_scaled_policy_gradient(params, svd, right, nll_grads_right):
    """With old_logp = ref_logp = logp the ratio is 1 (no clip) and the K3 gradient vanishes, so the
    per-sample gradient is A_i * n_i / (G * max_new * prompts_per_step) * the NLL gradient.
    (Computed 2 samples at a time through lax.map; the reference NLL gradients are vmapped.)"""
    trainable, frozen = svd
    logp = losses.sequence_logprobs(params, CONFIG, adapters.merge(trainable, frozen), right["tokens"],
                                    right["attention_mask"])
    adv = jnp.array([1.0, -0.5, 0.25, -0.75])
    sample_batch = dict(right, advantage=adv, old_logp=logp, ref_logp=logp)
    G, max_new, pps = 4, 6, 2
    loss = functools.partial(losses.grpo_loss, group_size=G, max_new=max_new, prompts_per_step=pps,
                             clip_eps=0.2, beta=0.04)
    g = per_sample.per_sample_grads(loss, trainable, frozen, params, CONFIG, sample_batch, microbatch=2)
    n = np.asarray(right["completion_mask"]).sum(1)
    scale = np.asarray(adv) * n / (G * max_new * pps)
    expected = jax.tree.map(lambda x: x * scale.reshape(-1, *([1] * (x.ndim - 1))), nll_grads_right)
    assert_trees_close(g, expected, rtol=1e-4)


def test_lora_gradients(params, right):
    targets = ("down_proj",)
    trainable, frozen = adapters.init_lora_adapter(params, CONFIG, jax.random.PRNGKey(0), rank=4, alpha=8,
                                                   targets=targets)
    g = per_sample.per_sample_grads(NLL, trainable, frozen, params, CONFIG, right)
    for name in targets:  # B = 0: dL/dA = 0 exactly, dL/dB != 0
        assert not np.any(np.asarray(g[name]["a"]))
        assert np.all(np.linalg.norm(np.asarray(g[name]["b"]).reshape(len(PROMPTS), -1), axis=1) > 0)
    # with a random nonzero B, the per-sample gradient along a random direction in A matches FD
    trainable = {m: {"a": t["a"], "b": randomized(t["b"], seed=2, scale=0.2)} for m, t in trainable.items()}
    g = per_sample.per_sample_grads(NLL, trainable, frozen, params, CONFIG, right)
    assert all(np.any(np.asarray(g[m]["a"])) for m in targets)
    v = unit({m: {"a": randomized(t["a"], seed=5, scale=1.0), "b": jnp.zeros_like(t["b"])}
              for m, t in trainable.items()})
    h = 1e-2
    at = lambda sign: np.asarray(per_sample.per_sample_losses(
        NLL, jax.tree.map(lambda t, d: t + sign * h * d, trainable, v), frozen, params, CONFIG, right), np.float64)
    fd = (at(+1) - at(-1)) / (2 * h)
    analytic = np.array([tree_dot(jax.tree.map(lambda x: x[i], g), v) for i in range(len(PROMPTS))])
    np.testing.assert_allclose(fd, analytic, rtol=2e-3, atol=2e-3 * np.abs(analytic).max())


def test_delta_zero_path_equals_general_path(params, svd, right):
    """At delta_s + delta_s_hack == 0 the delta_zero fast path (no adapter forward term, no adapter
    activation-gradient term) gives the general path's per-sample gradients (fp32, under the
    "linear" remat policy the probes use)."""
    trainable = adapters.zeros_like_trainable(svd[0])
    frozen = svd[1]
    batch = {**right, "advantage": jnp.asarray([1.0, -0.5, 2.0, -2.5])}
    loss = functools.partial(losses.reinforce_loss, group_size=4, remat="linear")
    fast = functools.partial(losses.reinforce_loss, group_size=4, remat="linear", delta_zero=True)
    g_general = per_sample.per_sample_grads(loss, trainable, frozen, params, CONFIG, batch)
    g_fast = per_sample.per_sample_grads(fast, trainable, frozen, params, CONFIG, batch)
    assert_trees_close(g_fast, g_general, rtol=1e-5, rel_atol=1e-6)
    assert float(np.abs(np.asarray(g_general["q_proj"]["delta_s"])).max()) > 0  # not trivially zero
    assert float(np.abs(np.asarray(g_general["down_proj"]["delta_s_hack"])).max()) > 0
    # the fast path really drops the adapter's terms: away from delta_s = 0 it differs (same compile)
    g_fast = per_sample.per_sample_grads(fast, svd[0], frozen, params, CONFIG, batch)
    g_general = per_sample.per_sample_grads(loss, svd[0], frozen, params, CONFIG, batch)
    assert not np.allclose(g_fast["q_proj"]["delta_s"], g_general["q_proj"]["delta_s"], rtol=1e-3)


def test_delta_zero_path_rejects_lora(params):
    trainable, frozen = adapters.init_lora_adapter(params, CONFIG, jax.random.PRNGKey(0), targets=TARGETS)
    batch = as_jax(rl_batch.make_batch(PROMPTS[:1], COMPLETIONS[:1]))
    with pytest.raises(ValueError, match="SVD"):
        losses.sample_logprobs(trainable, frozen, params, CONFIG, row(batch, 0), delta_zero=True)
