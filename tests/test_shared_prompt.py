"""The shared-prompt learner layout (jaxhack.grads.shared_prompt): each GRPO group's prompt runs once on
a packed buffer, and the log-probs, the reference pass and the Phase 3 update equal the per-row layout's
(tiny fp32 model, CPU)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.grads.batch import make_batch
from jaxhack.grads.losses import sequence_logprobs
from jaxhack.grads.shared_prompt import group_layout, group_microbatches, shared_prompt_logprobs
from jaxhack.models.adapters import init_svd_adapter, merge
from jaxhack.models.config import TINY
from jaxhack.models.packed_rows import gather_rows, gather_slots
from jaxhack.projection.arms import ARMS
from jaxhack.projection.v_hack import random_v_hack
from jaxhack.rl import learner
from jaxhack.rl.config import make_config

CONFIG = dataclasses.replace(TINY, vocab_size=128)
G = 3


def grouped_batch(prompt_lens=(5, 9, 2), comp_lens=(4, 1, 7, 3, 0, 6, 2, 5, 1), pad_rows=0, length=24):
    """Right-padded rows, G per prompt (row 4 has an empty completion), plus `pad_rows` trainer-style
    padding rows (the first prompt, no completion)."""
    rng = np.random.default_rng(0)
    prompts, comps = [], []
    for g, P in enumerate(prompt_lens):
        prompt = rng.integers(3, 128, P).tolist()
        for j in range(G):
            prompts.append(prompt)
            comps.append(rng.integers(3, 128, comp_lens[g * G + j]).tolist())
    prompts += [prompts[0]] * pad_rows
    comps += [[]] * pad_rows
    batch = make_batch(prompts, comps, pad_id=0, padding="right", length=length)
    batch["prompt_len"] = np.asarray([len(p) for p in prompts], np.int32)
    return batch


@pytest.fixture(scope="module")
def model():
    params = random_params(CONFIG, seed=3)
    trainable, frozen = init_svd_adapter(params, CONFIG, progress=False)
    return params, jax.tree.map(lambda x: x + 0.05, trainable), frozen


def test_layout_packs_each_prompt_once_and_maps_rows_back():
    batch = grouped_batch()
    lay = group_layout(batch["tokens"], batch["attention_mask"], batch["prompt_len"], G, multiple=8)
    # group 0: prompt 5 + completions 4 + 1 + 7 = 17 real slots (+1 pad slot) -> Tp 24
    assert lay["packed_tokens"].shape == (3, 24) and lay["packed_mask"].sum(1).tolist() == [17, 18, 10]
    toks = batch["tokens"]
    for r in range(9):  # every real position of every row reads its own token from the packed buffer
        g, j = divmod(r, G)
        n = int(batch["attention_mask"][r].sum())
        np.testing.assert_array_equal(lay["packed_tokens"][g][lay["row_source"][g, j, :n]], toks[r, :n])
        np.testing.assert_array_equal(lay["packed_positions"][g][lay["row_source"][g, j, :n]], np.arange(n))
        assert (lay["row_source"][g, j, n:] == 23).all()  # right padding reads the pad slot
        # the LM head scores each slot from the slot before it in this row (a completion's first token:
        # the prompt's last slot)
        np.testing.assert_array_equal(lay["packed_pred"][g][lay["row_source"][g, j, 1:n]], lay["row_source"][g, j, :n - 1])
    np.testing.assert_array_equal(lay["out_row"][0, :5], 0)  # prompt slots take row 0's output
    np.testing.assert_array_equal(lay["out_row"][0, 5:17], [0] * 4 + [1] + [2] * 7)


def test_packed_gathers_have_the_plain_gathers_gradients():
    """`packed_rows`: the custom gradients (gathers by the inverse maps) equal the plain gathers'
    (scatter-adds) for cotangents that are 0 at the rows' right padding, what attention gives there;
    including a group with an empty row and prompts of different lengths."""
    batch = grouped_batch()
    lay = group_layout(batch["tokens"], batch["attention_mask"], batch["prompt_len"], G, multiple=8)
    Bg, Tp = lay["packed_tokens"].shape
    T = lay["row_source"].shape[2]
    rng = np.random.default_rng(5)
    packed = jnp.asarray(rng.standard_normal((Bg, Tp, 2, 3)), jnp.float32)
    real = jnp.asarray(lay["row_source"] < Tp - 1)[..., None, None]  # [Bg,G,T,1,1] real row positions
    d_rows = jnp.asarray(rng.standard_normal((Bg, G, T, 2, 3)), jnp.float32) * real
    src, readers = jnp.asarray(lay["row_source"]), jnp.asarray(lay["slot_readers"])
    plain_rows = jax.vmap(lambda a, i: a[i])
    out, vjp = jax.vjp(lambda a: gather_rows(a, src, readers), packed)
    ref, ref_vjp = jax.vjp(lambda a: plain_rows(a, src), packed)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_allclose(vjp(d_rows)[0], ref_vjp(d_rows)[0], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(vjp(d_rows)[0]).max()) > 0
    # the outputs back: every slot's output comes from one row position; the rest get cotangent 0
    rows = jnp.asarray(rng.standard_normal((Bg, G, T, 2, 3)), jnp.float32)
    o_row, o_pos, r_slot = (jnp.asarray(lay[k]) for k in ("out_row", "out_pos", "row_slot"))
    d_packed = jnp.asarray(rng.standard_normal((Bg, Tp, 2, 3)), jnp.float32) * jnp.asarray(lay["packed_mask"])[..., None, None]
    out, vjp = jax.vjp(lambda r: gather_slots(r, o_row, o_pos, r_slot), rows)
    ref, ref_vjp = jax.vjp(lambda r: jax.vmap(lambda o, a, b: o[a, b])(r, o_row, o_pos), rows)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(vjp(d_packed)[0], ref_vjp(d_packed)[0])
    # the inverse maps: a slot read by row g at position t <=> row_source[g, t] is that slot
    for b in range(Bg):
        for g in range(G):
            for t in range(T):
                s = int(lay["row_source"][b, g, t])
                assert (lay["slot_readers"][b, s, g] == t) == (s < Tp - 1)
                taken = int(lay["row_slot"][b, g, t])
                assert taken == Tp or (lay["out_row"][b, taken], lay["out_pos"][b, taken]) == (g, t)


def test_rows_of_a_group_must_share_their_prompt():
    batch = grouped_batch()
    batch["tokens"][4, 1] += 1  # row 4 is in group 1
    with pytest.raises(ValueError, match="rows 3..5: a group's rows must share one prompt"):
        group_layout(batch["tokens"], batch["attention_mask"], batch["prompt_len"], G)


def test_logprobs_and_gradients_equal_the_per_row_forward(model):
    params, trainable, frozen = model
    batch = grouped_batch()
    lay = jax.tree.map(jnp.asarray, group_layout(batch["tokens"], batch["attention_mask"], batch["prompt_len"],
                                                 G, multiple=8))
    tokens, mask, m = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]), batch["completion_mask"]

    def per_row(tr):
        return sequence_logprobs(params, CONFIG, merge(tr, frozen), tokens, mask, attention="causal")

    def shared(tr):
        return shared_prompt_logprobs(params, CONFIG, merge(tr, frozen), tokens, lay)

    np.testing.assert_allclose(np.asarray(shared(trainable))[m], np.asarray(per_row(trainable))[m], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(shared(trainable))[:, 0], 0.0)  # as sequence_logprobs
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(m.shape) * m, jnp.float32)
    g_row = jax.grad(lambda tr: jnp.sum(per_row(tr) * weights))(trainable)
    g_shared = jax.grad(lambda tr: jnp.sum(shared(tr) * weights))(trainable)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_row)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert float(np.abs(g_row["q_proj"]["delta_s"]).max()) > 0


def test_microbatches_hold_whole_groups_and_leave_out_padding_rows():
    batch = grouped_batch(pad_rows=2)
    plan = group_microbatches(batch, G, microbatch=3, multiple=8, max_tokens=None)
    rows = np.concatenate([r for r, _, _ in plan])
    assert sorted(rows.tolist()) == list(range(9))  # 3 groups, one per micro-batch; rows 9-10 left out
    assert all(len(r) == G and r[0] % G == 0 for r, _, _ in plan)
    two = group_microbatches(batch, G, microbatch=3, multiple=8, max_tokens=None, devices=2)  # a mesh of 2
    assert len(two) == 2 and all(len(r) == 2 * G for r, _, _ in two)  # 1 group per device; an empty one fills
    assert sorted(np.concatenate([r for r, _, _ in two]).tolist()) == [-1] * G + list(range(9))
    assert all(lay["row_source"].shape[0] == 2 for _, _, lay in two)  # the layout's groups split like the rows
    batch["tokens"][10, 5] = 7
    batch["attention_mask"][10, 5] = True  # a padding row with a completion cannot be left out
    with pytest.raises(ValueError, match="rows 9.. have completions"):
        group_microbatches(batch, G, microbatch=3, multiple=8)


def test_update_and_reference_equal_the_rows_layout(model):
    """The trainer's reference pass and jitted update (rl/learner) with update_layout shared_prompt give
    the rows layout's reference log-probs, new adapter and metrics."""
    params, trainable, frozen = model
    batch = grouped_batch(pad_rows=2)
    n = len(batch["tokens"])
    rng = np.random.default_rng(2)
    batch.update(advantage=rng.standard_normal(n).astype(np.float32), old_logp=np.zeros(batch["tokens"].shape,
                 np.float32), use_current=np.ones(n, bool))
    results = {}
    for layout in ("rows", "shared_prompt"):
        cfg = make_config("smoke", group_size=G, prompts_per_step=3, microbatch=3, microbatch_tokens=48,
                          length_multiple=8, update_layout=layout)
        ref = np.asarray(learner.reference_logp(params, CONFIG, batch, cfg))
        v_hack = random_v_hack({name: a["delta_s"].shape for name, a in trainable.items()}, seed=0, k=1)
        optimizer, update = learner.cached_update_fn(cfg, v_hack, ARMS[cfg.arm].projection, CONFIG)
        new, _, metrics = update(trainable, optimizer.init(trainable), frozen, params, dict(batch, ref_logp=ref))
        results[layout] = (ref, new, metrics)
    (ref_r, new_r, met_r), (ref_s, new_s, met_s) = results["rows"], results["shared_prompt"]
    m = batch["completion_mask"]
    np.testing.assert_allclose(ref_s[m], ref_r[m], atol=1e-5)
    for a, b in zip(jax.tree.leaves(new_s), jax.tree.leaves(new_r)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert abs(float(met_s["loss"]) - float(met_r["loss"])) <= 1e-5 * max(1.0, abs(float(met_r["loss"])))
    assert float(met_s["n_tokens"]) == float(met_r["n_tokens"]) == m.sum()
    assert not np.allclose(jax.tree.leaves(new_r)[0], jax.tree.leaves(trainable)[0])  # the update moved


def test_full_preset_uses_the_shared_prompt_layout():
    from jaxhack.rl.config import ConfigError

    assert make_config("full").update_layout == make_config("full", mesh="data=2").update_layout == "shared_prompt"
    assert make_config("full", update_layout="rows").update_layout == "rows"
    with pytest.raises(ConfigError, match="update_layout 'packed'"):
        make_config("full", update_layout="packed")


def test_causal_attention_told_row_lengths_keeps_every_real_position():
    """qwen3.causal_attention(lengths=): the same outputs at each row's real positions as without them
    (right padding, causal), and finite everywhere, an all-padding row (length 0) included."""
    from jaxhack.models import qwen3

    rng = np.random.default_rng(5)
    B, T, Hq, Hkv, hd = 3, 10, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, hd)), jnp.float32) for h in (Hq, Hkv, Hkv))
    lengths = jnp.asarray([10, 4, 0])
    full = np.asarray(qwen3.causal_attention(q, k, v))
    told = np.asarray(qwen3.causal_attention(q, k, v, lengths=lengths))
    assert np.isfinite(told).all()
    for b, n in enumerate([10, 4, 0]):
        np.testing.assert_allclose(told[b, :n], full[b, :n], rtol=1e-6, atol=1e-6)
    assert not np.allclose(told[1, 4:], full[1, 4:])  # past its length a row no longer reads its padding
