"""Loss reductions (masks, PPO clip, K3 KL, normalisations), advantages, log-prob alignment, batches."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.models import adapters, qwen3
from jaxhack.models.config import TINY
from jaxhack.grads import batch as rl_batch
from jaxhack.grads import losses

CONFIG = dataclasses.replace(TINY, vocab_size=128)




# --- pure reductions ----------------------------------------------------------------------------

MASK = np.array([False, False, True, True, True, False])
LOGP = np.array([0.0, -0.3, -1.0, -2.0, -0.5, -4.0], np.float32)


def test_nll_masks_and_means():
    assert float(losses.nll_from_logprobs(LOGP, MASK)) == pytest.approx(3.5 / 3)
    garbage = LOGP.copy()
    garbage[~MASK] = [-np.inf, np.nan, 1e30]  # prompt / pad positions may hold anything
    assert float(losses.nll_from_logprobs(garbage, MASK)) == float(losses.nll_from_logprobs(LOGP, MASK))
    grad = np.asarray(jax.jit(jax.grad(losses.nll_from_logprobs))(jnp.asarray(garbage), MASK))
    np.testing.assert_array_equal(grad, np.where(MASK, -1 / 3, 0.0).astype(np.float32))
    assert float(losses.nll_from_logprobs(LOGP, np.zeros(6, bool))) == 0.0  # empty completion


def test_reinforce_is_scaled_nll():
    value = losses.reinforce_from_logprobs(LOGP, MASK, jnp.float32(0.75), group_size=8)
    assert float(value) == pytest.approx(-0.75 * (-3.5 / 3) / 8)
    assert float(losses.reinforce_from_logprobs(LOGP, MASK, jnp.float32(-2.0), 4)) == pytest.approx(-2.0 * 3.5 / 3 / 4)


def _grpo_reference(logp, mask, adv, old, ref, eps_lo, eps_hi, beta, denom):
    """Straightforward numpy version of the Phase-3 per-token loss, summed over the mask."""
    total = 0.0
    for t in np.flatnonzero(mask):
        rho = np.exp(np.float64(logp[t]) - old[t])
        pg = -min(rho * adv, np.clip(rho, 1 - eps_lo, 1 + eps_hi) * adv)
        d = np.float64(ref[t]) - logp[t]
        total += pg + beta * (np.exp(d) - d - 1)
    return total / denom


@pytest.mark.parametrize("adv", [1.3, -0.7])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_matches_reference_in_and_out_of_clip(adv, eps_high):
    old = LOGP + np.array([0, 0, 0.5, -0.5, 0.05, 9.0], np.float32)  # rho far outside/inside the clip
    ref = LOGP + np.array([0, 0, 0.2, -0.1, 0.0, 3.0], np.float32)
    kw = dict(group_size=4, max_new=7, prompts_per_step=3, clip_eps=0.2, clip_eps_high=eps_high, beta=0.05)
    value = jax.jit(functools.partial(losses.grpo_from_logprobs, **kw))(LOGP, MASK, jnp.float32(adv), old, ref)
    expected = _grpo_reference(LOGP, MASK, adv, old, ref, 0.2, 0.2 if eps_high is None else eps_high,
                               0.05, 4 * 7 * 3)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    pg, kl = jax.jit(losses.grpo_token_terms, static_argnums=(5, 6))(LOGP, MASK, jnp.float32(adv), old, ref,
                                                                      0.2, eps_high)
    assert np.all(np.asarray(pg)[~MASK] == 0) and np.all(np.asarray(kl)[~MASK] == 0)
    np.testing.assert_array_equal(np.asarray(kl)[MASK] > 0, (ref != LOGP)[MASK])  # K3 > 0 iff ref != logp


def test_grpo_clip_stops_gradient_when_ratio_is_past_the_clip():
    # A > 0 and rho = e^0.5 > 1 + eps: the clipped term is the min, so d loss / d logp = 0 (no KL)
    mask = np.array([True])
    g = jax.jit(jax.grad(lambda lp: losses.grpo_from_logprobs(lp, mask, jnp.float32(1.0), jnp.array([-1.5]),
                                                      lp, group_size=1, max_new=1, prompts_per_step=1,
                                                      beta=0.0)))(jnp.array([-1.0]))
    assert float(g[0]) == 0.0
    # inside the clip at rho = 1: gradient -A, i.e. plain policy gradient
    g = jax.jit(jax.grad(lambda lp: losses.grpo_from_logprobs(lp, mask, jnp.float32(2.0), jnp.array([-1.0]),
                                                      jnp.array([-1.0]), group_size=1, max_new=1,
                                                      prompts_per_step=1, beta=0.3)))(jnp.array([-1.0]))
    assert float(g[0]) == pytest.approx(-2.0)


def test_centered_advantages():
    r = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    np.testing.assert_allclose(np.asarray(losses.centered_advantages(r, group_size=3)),
                               [-1, 0, 1, -1, -1, 2], atol=1e-6)
    ids = jnp.array([7, 2, 7, 2, 2, 7])  # groups {0,2,5} and {1,3,4}
    np.testing.assert_allclose(np.asarray(losses.centered_advantages(r, group_ids=ids)),
                               [1 - 17 / 3, 2 - 22 / 3, 3 - 17 / 3, 10 - 22 / 3, 10 - 22 / 3, 13 - 17 / 3],
                               rtol=1e-6)
    with pytest.raises(ValueError):
        losses.centered_advantages(r, group_size=4)
    with pytest.raises(ValueError):
        losses.centered_advantages(r)


# --- batches ------------------------------------------------------------------------------------

def test_make_batch_right_and_left():
    prompts, comps = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    right = rl_batch.make_batch(prompts, comps, pad_id=0, padding="right", pad_multiple=4)
    assert right["tokens"].shape == (2, 8) and right["tokens"].dtype == np.int32
    np.testing.assert_array_equal(right["tokens"][0], [5, 6, 7, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(right["completion_mask"][1], [0, 1, 1, 1, 0, 0, 0, 0])
    left = rl_batch.make_batch(prompts, comps, pad_id=0, padding="left", length=6)
    np.testing.assert_array_equal(left["tokens"][1], [0, 0, 8, 11, 12, 13])
    np.testing.assert_array_equal(left["attention_mask"][0], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(left["completion_mask"][0], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(rl_batch.completion_lengths(left), [2, 3])
    placed = rl_batch.place_completion_values(left, [[-0.5, -1.5], [-1, -2, -3]])
    np.testing.assert_array_equal(placed[1], [0, 0, 0, -1, -2, -3])
    with pytest.raises(ValueError, match="shorter"):
        rl_batch.make_batch(prompts, comps, length=4)
    with pytest.raises(ValueError, match="completion tokens"):
        rl_batch.place_completion_values(left, [[-0.5], [-1, -2, -3]])


# --- model-level log-probs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


def test_sequence_logprobs_alignment_and_nll(params):
    b = rl_batch.make_batch([[3, 4, 5], [6, 7]], [[8, 9, 10], [11]], padding="left")
    tokens, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"])
    logp = np.asarray(losses.reference_logprobs(params, CONFIG, tokens, mask, chunk=4))
    hidden, _ = jax.jit(qwen3.forward, static_argnums=1)(params, CONFIG, tokens, mask)
    full = np.asarray(jax.nn.log_softmax(qwen3.lm_logits(params, CONFIG, hidden), axis=-1))  # [N,T,V]
    tok = b["tokens"]
    expected = np.zeros(tok.shape, np.float32)
    expected[:, 1:] = np.take_along_axis(full[:, :-1], tok[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
    assert np.all(logp[:, 0] == 0)


def test_reference_is_zero_svd_adapter_exactly(params):
    b = rl_batch.make_batch([[3, 4, 5], [6]], [[8, 9], [11, 12, 13]], padding="right", length=6)
    tokens, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"])
    tr, fr = adapters.init_svd_adapter(params, CONFIG, targets=("v_proj", "up_proj"))
    with_zero = losses.sequence_logprobs(params, CONFIG, adapters.merge(tr, fr), tokens, mask, chunk=4)
    ref = losses.reference_logprobs(params, CONFIG, tokens, mask, chunk=4)
    assert np.array_equal(np.asarray(with_zero), np.asarray(ref))
    bumped = jax.tree.map(lambda x: x + 0.2, tr)
    moved = losses.sequence_logprobs(params, CONFIG, adapters.merge(bumped, fr), tokens, mask, chunk=4)
    assert np.max(np.abs(np.asarray(moved) - np.asarray(ref))) > 1e-5


def _naive_token_logprobs(params, hidden, targets):
    logits = qwen3.lm_logits(params, CONFIG, hidden)  # fp32 [B,T,V]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def test_token_logprobs_gradient_matches_full_logits(params):
    """The chunked head (remat + custom backward) has the gradient of the plain full-vocab log-softmax:
    exactly up to fp32 rounding for fp32 hidden states; within bf16 rounding of that for bf16 ones."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((2, 7, CONFIG.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 7)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)

    def chunked(h):
        return jnp.sum(weights * qwen3.token_logprobs(params, CONFIG, h, targets, chunk=3))

    def naive(h):
        return jnp.sum(weights * _naive_token_logprobs(params, h.astype(jnp.float32), targets))

    g_ref = np.asarray(jax.grad(naive)(hidden))
    np.testing.assert_allclose(np.asarray(jax.grad(chunked)(hidden)), g_ref, rtol=1e-5, atol=1e-6)
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    g_bf16 = jax.grad(lambda h: jnp.sum(weights * qwen3.token_logprobs(params_bf16, CONFIG, h, targets, chunk=3)))(
        hidden.astype(jnp.bfloat16))
    assert g_bf16.dtype == jnp.bfloat16
    g_ref_bf16 = np.asarray(jax.grad(lambda h: jnp.sum(weights * _naive_token_logprobs(
        jax.tree.map(lambda x: x.astype(jnp.float32), params_bf16), h, targets)))(
        hidden.astype(jnp.bfloat16).astype(jnp.float32)))
    rel = np.linalg.norm(np.asarray(g_bf16, np.float32) - g_ref_bf16) / np.linalg.norm(g_ref_bf16)
    assert 0 < rel < 1e-2, rel


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_scanned_layers(params, remat):
    """scan_layers=False runs the same layer function unrolled: same hidden states and the same
    adapter gradients (up to fp32 reassociation)."""
    b = rl_batch.make_batch([[3, 4, 5], [6, 7]], [[8, 9, 10], [11]], padding="right")
    tokens, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"])
    tr, fr = adapters.init_svd_adapter(params, CONFIG, targets=("q_proj", "down_proj"))
    tr = jax.tree.map(lambda x: x + 0.05, tr)

    def total(trainable, scan_layers):
        hidden, _ = qwen3.forward(params, CONFIG, tokens, mask, adapters=adapters.merge(trainable, fr),
                                  remat=remat, scan_layers=scan_layers)
        return jnp.sum(jnp.sin(hidden))

    for_scan = jax.jit(jax.value_and_grad(total), static_argnums=1)
    (v_scan, g_scan), (v_unroll, g_unroll) = for_scan(tr, True), for_scan(tr, False)
    np.testing.assert_allclose(float(v_unroll), float(v_scan), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g_unroll), jax.tree.leaves(g_scan)):
        a, c = np.asarray(a), np.asarray(c)
        assert np.linalg.norm(a - c) <= 1e-5 * np.linalg.norm(c), (np.linalg.norm(a - c), np.linalg.norm(c))


def test_remat_policies_give_the_same_gradients(params):
    """Rematerialisation changes what is stored, never the result: every policy's adapter gradient
    equals the no-remat gradient (fp32)."""
    b = rl_batch.make_batch([[3, 4, 5], [6, 7]], [[8, 9, 10], [11]], padding="right")
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    tr, fr = adapters.init_svd_adapter(params, CONFIG, targets=("k_proj", "o_proj", "up_proj"))
    tr = jax.tree.map(lambda x: x + 0.05, tr)
    sample = {k: v[0] for k, v in batch.items()}

    def grad_for(remat):
        return jax.grad(functools.partial(losses.nll_loss, remat=remat))(tr, fr, params, CONFIG, sample)

    ref = grad_for("none")
    assert set(qwen3.REMAT_POLICIES) == {"none", "full", "dots", "linear"}
    for remat in ("full", "dots", "linear"):
        for a, c in zip(jax.tree.leaves(grad_for(remat)), jax.tree.leaves(ref)):
            a, c = np.asarray(a), np.asarray(c)
            assert np.linalg.norm(a - c) <= 1e-5 * np.linalg.norm(c), (remat, np.linalg.norm(a - c))


# --- the trained loss is the tested loss ---------------------------------------------------------

def _grpo_batch(rng, n=4, T=12):
    """A right-padded batch with every loss field (old_logp off the sampler for half the rows)."""
    prompts = [[int(t) for t in rng.integers(1, 100, size=3 + i % 2)] for i in range(n)]
    comps = [[int(t) for t in rng.integers(1, 100, size=2 + i)] for i in range(n)]
    b = rl_batch.make_batch(prompts, comps, padding="right", length=T)
    m = b["completion_mask"]
    b["old_logp"] = np.where(m, rng.normal(-3.0, 0.3, m.shape), 0.0).astype(np.float32)
    b["ref_logp"] = np.where(m, rng.normal(-3.0, 0.3, m.shape), 0.0).astype(np.float32)
    b["advantage"] = rng.normal(size=n).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_grpo_batch_loss_is_the_sum_of_the_per_sample_grpo_loss(params):
    """grads.losses.grpo_batch_loss (what rl/learner.py differentiates) == sum over rows of
    grpo_loss (the per-sample loss the reference tests above check), value and gradient."""
    batch = _grpo_batch(np.random.default_rng(0))
    tr, fr = adapters.init_svd_adapter(params, CONFIG, targets=("q_proj", "down_proj"))
    tr = jax.tree.map(lambda x: x + 0.05, tr)  # away from the reference, so KL and its gradient are non-zero
    hyper = dict(group_size=2, max_new=8, prompts_per_step=2, clip_eps=0.2, clip_eps_high=0.28, beta=0.04,
                 chunk=4)

    def batch_loss(t):
        return losses.grpo_batch_loss(t, fr, params, CONFIG, batch, attention="masked", **hyper)

    def summed(t):
        per = [losses.grpo_loss(t, fr, params, CONFIG, jax.tree.map(lambda x: x[i], batch), **hyper)
               for i in range(batch["tokens"].shape[0])]
        return sum(per)

    (loss, aux), g_batch = jax.value_and_grad(batch_loss, has_aux=True)(tr)
    ref, g_ref = jax.value_and_grad(summed)(tr)
    assert abs(float(loss)) > 1e-4
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_batch, g_ref)
    assert float(aux["n_tokens"]) == float(jnp.sum(batch["completion_mask"]))
    # use_current: old_logp := stop_gradient(logp), so every ratio is exactly 1 and nothing is clipped
    cur = dict(batch, use_current=jnp.ones(batch["tokens"].shape[0], bool))
    _, aux_cur = losses.grpo_batch_loss(tr, fr, params, CONFIG, cur, attention="masked", **hyper)
    assert float(aux_cur["ratio_sum"]) == float(aux_cur["n_tokens"]) and float(aux_cur["clipped"]) == 0.0


def test_reference_logprobs_microbatched_equals_whole_batch(params):
    batch = _grpo_batch(np.random.default_rng(1), n=6)
    whole = losses.reference_logprobs(params, CONFIG, batch["tokens"], batch["attention_mask"], chunk=4,
                                      attention="causal")
    parts = losses.reference_logprobs(params, CONFIG, batch["tokens"], batch["attention_mask"], chunk=4,
                                      attention="causal", microbatch=2)
    assert parts.shape == whole.shape == batch["tokens"].shape
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-6, atol=1e-6)
    # length-bucketed micro-batches (rows sorted by length, each cut to its longest row rounded up to 4)
    bucketed = losses.reference_logprobs(params, CONFIG, batch["tokens"], batch["attention_mask"], chunk=4,
                                         attention="causal", microbatch=2, length_multiple=4)
    m = np.asarray(batch["attention_mask"])
    assert len({int(np.ceil(n / 4)) for n in m.sum(1)}) > 1  # rows of really different lengths
    np.testing.assert_allclose(np.asarray(bucketed)[m], np.asarray(whole)[m], rtol=1e-5, atol=1e-6)
    # with a token budget of 8: 2 rows at 4 positions, one at a time beyond
    budget = losses.reference_logprobs(params, CONFIG, batch["tokens"], batch["attention_mask"], chunk=4,
                                       attention="causal", microbatch=4, length_multiple=4, max_tokens=8)
    np.testing.assert_allclose(np.asarray(budget)[m], np.asarray(whole)[m], rtol=1e-5, atol=1e-6)
