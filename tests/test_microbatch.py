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
from jaxhack.grads.microbatch import length_microbatches, take_rows

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
    loss, g = 0.0, jax.tree.map(jnp.zeros_like, trainable)
    for rows, T in plan:
        (l, _), gi = grad_fn(trainable, frozen, params, CONFIG, jax.tree.map(jnp.asarray, take_rows(batch, rows, T)))
        loss, g = loss + l, jax.tree.map(jnp.add, g, gi)
    np.testing.assert_allclose(loss, loss_whole, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert float(np.abs(g_whole["q_proj"]["delta_s"]).max()) > 0
