"""Length-bucketed micro-batches (jaxhack.grads.microbatch): the plan, and that the bucketed reference pass
and Phase 3 gradient equal the whole padded batch's (tiny fp32 model)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from helpers import random_params
from jaxhack.models.adapters import init_svd_adapter
from jaxhack.models.config import TINY
from jaxhack.grads.batch import make_batch
from jaxhack.grads.losses import grpo_batch_loss, sequence_logprobs
from jaxhack.grads.microbatch import length_microbatches, put_rows, rows_at, take_rows

CONFIG = dataclasses.replace(TINY, vocab_size=128)


def test_plan_covers_every_row_once_sorted_by_length():
    lengths = np.asarray([30, 5, 17, 40, 9, 33, 2])
    plan = length_microbatches(lengths, microbatch=3, multiple=8, max_len=40)
    rows = np.concatenate([r for r, _ in plan])
    assert sorted(rows[rows >= 0].tolist()) == list(range(7)) and (rows == -1).sum() == 2
    for r, T in plan:
        real = r[r >= 0]
        assert len(r) == 3 and T % 8 == 0 or T == 40
        assert lengths[real].max() <= T < lengths[real].max() + 8
    assert [T for _, T in plan] == [16, 40, 40]  # (2, 5, 9) -> 16; (17, 30, 33) -> 40 (capped); (40) -> 40


def test_token_budget_plan_holds_many_short_rows_and_few_long_ones():
    """max_tokens: a micro-batch of T positions holds min(microbatch, max_tokens // T) rows (at least 1),
    padded with -1 to that count, so there is one shape per T; every row is covered once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, 50)
    plan = length_microbatches(lengths, microbatch=4, multiple=8, max_len=40, max_tokens=32)
    rows = np.concatenate([r for r, _ in plan])
    assert sorted(rows[rows >= 0].tolist()) == list(range(50))
    shapes = {}
    for r, T in plan:
        real = r[r >= 0]
        assert len(real) >= 1 and lengths[real].max() <= T < lengths[real].max() + 8 or T == 40
        assert len(r) == rows_at(T, 4, 32) == max(1, min(4, 32 // T))
        assert len(r) * T <= 32 or len(r) == 1
        shapes.setdefault(T, set()).add(len(r))
    assert all(len(v) == 1 for v in shapes.values())
    assert shapes[8] == {4} and shapes[16] == {2} and shapes[40] == {1}  # short rows 4 at a time, long ones alone
    # only the last micro-batch of each T can have padding rows
    for T in shapes:
        parts = [r for r, t in plan if t == T]
        assert all((r >= 0).all() for r in parts[:-1])
    # without a budget: always 4 rows
    assert {len(r) for r, _ in length_microbatches(lengths, microbatch=4, multiple=8, max_len=40)} == {4}


def test_bucketed_reference_and_gradient_equal_the_padded_batch():
    params = random_params(CONFIG)
    trainable, frozen = init_svd_adapter(params, CONFIG, ("q_proj", "down_proj"), progress=False)
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (3, 6, 4, 2, 5)]
    comps = [rng.integers(3, 128, n).tolist() for n in (2, 9, 1, 5, 3)]
    batch = make_batch(prompts, comps, pad_id=0, padding="right", length=16)
    batch.update(advantage=rng.standard_normal(5).astype(np.float32),
                 old_logp=np.zeros((5, 16), np.float32), use_current=np.ones(5, bool))
    ref_whole = np.asarray(sequence_logprobs(params, CONFIG, None, jnp.asarray(batch["tokens"]),
                                             jnp.asarray(batch["attention_mask"]), attention="causal"))
    plan = length_microbatches(batch["attention_mask"].sum(1), microbatch=2, multiple=4, max_len=16)
    assert len({T for _, T in plan}) > 1  # really different lengths
    ref = np.zeros_like(ref_whole)
    for rows, T in plan:
        mb = take_rows({"tokens": batch["tokens"], "attention_mask": batch["attention_mask"]}, rows, T)
        out = np.asarray(sequence_logprobs(params, CONFIG, None, jnp.asarray(mb["tokens"]),
                                           jnp.asarray(mb["attention_mask"]), attention="causal"))
        ref[rows[rows >= 0], :T] = out[rows >= 0]
    m = batch["attention_mask"]
    np.testing.assert_allclose(ref[m], ref_whole[m], rtol=1e-5, atol=1e-6)
    batch["ref_logp"] = ref_whole
    loss_fn = functools.partial(grpo_batch_loss, group_size=2, max_new=10, prompts_per_step=3)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss_whole, _), g_whole = grad_fn(trainable, frozen, params, CONFIG, jax.tree.map(jnp.asarray, batch))
    budget = length_microbatches(batch["attention_mask"].sum(1), microbatch=4, multiple=4, max_len=16, max_tokens=16)
    assert {len(r) for r, _ in budget} == {2, 1}  # 2 rows at 8 positions, 1 at 16
    for p in (plan, budget):
        loss, g = 0.0, jax.tree.map(jnp.zeros_like, trainable)
        for rows, T in p:
            (l, _), gi = grad_fn(trainable, frozen, params, CONFIG,
                                 jax.tree.map(jnp.asarray, take_rows(batch, rows, T)))
            loss, g = loss + l, jax.tree.map(jnp.add, g, gi)
        np.testing.assert_allclose(loss, loss_whole, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_whole)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert float(np.abs(g_whole["q_proj"]["delta_s"]).max()) > 0


def test_row_plan_token_budget_is_per_device_and_splits_evenly(monkeypatch):
    """rl.learner.row_plan on D devices: microbatch and the token budget are per device (each device's
    block of rows, R / D, holds at most `microbatch` rows and the budget's tokens), R a multiple of D."""
    from jaxhack.parallel import mesh as meshlib
    from jaxhack.rl import learner

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 41, 37)
    batch = {"tokens": np.zeros((37, 40), np.int32), "attention_mask": np.arange(40)[None, :] < lengths[:, None]}
    one = learner.row_plan(batch, 4, 8, None, microbatch_tokens=32)
    assert [len(r) for r, _ in one] == [rows_at(T, 4, 32) for _, T in one]
    monkeypatch.setattr(meshlib, "data_size", lambda mesh: 3)
    three = learner.row_plan(batch, 4, 8, "mesh", microbatch_tokens=32)
    rows = np.concatenate([r for r, _ in three])
    assert sorted(rows[rows >= 0].tolist()) == list(range(37))
    for r, T in three:
        assert len(r) == 3 * rows_at(T, 4, 32)  # per device: 4 rows, 32 tokens
        assert (len(r) // 3) * T <= max(32, T)  # (one row of more than 32 tokens goes alone)
    # the rule before session 11 (3 x the rows and tokens of one device as one budget, then padded to a
    # multiple of 3) gave some device more than its 32 tokens on these lengths
    old = length_microbatches(lengths, 12, multiple=8, max_len=40, max_tokens=96)
    assert any(-(-len(r) // 3) * T > 32 for r, T in old)


def test_put_rows_writes_each_result_at_its_rows_and_drops_empty_rows():
    out = np.full((4, 6), -1.0, np.float32)
    parts = [(np.array([2, -1]), 3, np.array([[1, 2, 3], [9, 9, 9]], np.float32)),  # row -1: padding, dropped
             (np.array([0, 3]), 6, np.arange(12, dtype=np.float32).reshape(2, 6))]
    put_rows(out, parts)
    np.testing.assert_array_equal(out[2], [1, 2, 3, -1, -1, -1])  # past its cut: untouched
    np.testing.assert_array_equal(out[0], np.arange(6))
    np.testing.assert_array_equal(out[3], np.arange(6, 12))
    np.testing.assert_array_equal(out[1], -1)
