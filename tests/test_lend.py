"""Lent weights (jaxhack/rl/lend.py): the decode layout's inverse rebuilds the stacked arrays bit for
bit, and generate(lend_weights=True) frees the caller's stacked copies while it samples, gives the same
tokens, and puts equal arrays back (also when sampling fails)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhack.models import adapters as adapterlib
from jaxhack.models import decode_layout, qwen3
from jaxhack.models.config import TINY
from jaxhack.rl import lend, refill, sampler

CONFIG = dataclasses.replace(TINY, eos_token_ids=(2,))
PROMPTS = [[5, 17, 33], [1, 9, 8, 7, 100, 200], [4] * 5 + [11, 12, 13], [7, 7, 7, 7], [300, 2, 9]]


def _params():
    p = qwen3.init_params(CONFIG, jax.random.PRNGKey(0), jnp.float32)
    p["lm_head"] = p["lm_head"] * 40.0  # clear winners, so a changed weight would change the tokens
    return p


def _adapter(params, kind, targets=None):
    kw = {} if targets is None else {"targets": targets}
    if kind == "lora":
        trainable, frozen = adapterlib.init_lora_adapter(params, CONFIG, jax.random.PRNGKey(3), rank=4, **kw)
        trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    else:
        trainable, frozen = adapterlib.init_svd_adapter(params, CONFIG, progress=False, **kw)
        trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    return trainable, frozen


def _host(tree):
    return jax.tree.map(np.asarray, tree)


SOME = ("k_proj", "up_proj", "o_proj")


@pytest.mark.parametrize("kind, targets, form", [
    ("svd", None, "exact"), ("svd", SOME, "exact"), ("svd", None, "factored"), ("svd", SOME, "factored"),
    ("svd", None, "dense"), ("svd", SOME, "dense"), ("lora", None, "exact"), ("lora", None, "dense"),
    (None, None, "exact")])
def test_stacked_from_decode_inverts_decode_layers_exactly(kind, targets, form):
    """Every array the layout holds comes back bit for bit: the stacked weights (all of them in the
    exact and dense forms; all but the factored modules' in the factored form) and the SVD bases (held
    by the exact and factored layouts, not by the dense one, which holds W and the dense changes)."""
    params = _params()
    merged = None if kind is None else adapterlib.merge(*_adapter(params, kind, targets))
    layers, layer_adapters = decode_layout.decode_layers(params, merged, form=form)
    widths = tuple((name, w.shape[-1]) for name, w in params["layers"].items())
    stacked, bases = decode_layout.stacked_from_decode(layers, layer_adapters, widths)
    factored_modules = set(merged or ()) if form == "factored" and kind == "svd" else set()
    assert set(stacked) == set(params["layers"]) - factored_modules
    for name, w in stacked.items():
        assert w.dtype == params["layers"][name].dtype
        np.testing.assert_array_equal(np.asarray(w), np.asarray(params["layers"][name]), err_msg=name)
    assert set(bases) == (set(merged) if kind == "svd" and form != "dense" else set())
    if form == "dense" and kind == "svd":  # no copy of the bases in the layout (they stay with the caller)
        assert all("u" not in la[name] and "vh" not in la[name] for la in layer_adapters for name in merged)
    for name, module in bases.items():
        for key in ("u", "vh"):
            np.testing.assert_array_equal(np.asarray(module[key]), np.asarray(merged[name][key]), err_msg=name)


@pytest.mark.parametrize("schedule, form", [("refill", "exact"), ("groups", "factored"), ("refill", "dense")])
def test_generate_lending_frees_the_stacked_copies_and_puts_equal_ones_back(schedule, form):
    params = _params()
    trainable, frozen = _adapter(params, "svd")
    kw = dict(max_new_tokens=6, key=jax.random.PRNGKey(1), temperature=1.0, max_rows=2, schedule=schedule,
              refill_rows=1, form=form)
    kept = sampler.generate(params, CONFIG, PROMPTS, adapters=adapterlib.merge(trainable, frozen), **kw)
    before_params, before_frozen = _host(params), _host(frozen)
    old_layers, old_u = dict(params["layers"]), frozen["q_proj"]["u"]
    seen = {}
    merged = adapterlib.merge(trainable, frozen)
    original_round = refill._round_jit if schedule == "refill" else sampler._generate_jit

    def watching(*a, **k):  # the caller's stacked arrays while the sampler runs
        seen["deleted"] = {name: w.is_deleted() for name, w in old_layers.items()} | {"u": old_u.is_deleted()}
        return original_round(*a, **k)

    target = (refill, "_round_jit") if schedule == "refill" else (sampler, "_generate_jit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(*target, watching)
        lent = sampler.generate(params, CONFIG, PROMPTS, adapters=merged, lend_weights=True, **kw)
    np.testing.assert_array_equal(lent.tokens, kept.tokens)
    np.testing.assert_array_equal(lent.logprobs, kept.logprobs)
    # while sampling: the stacked weights the layout holds, and the bases, were freed (not the factored
    # form's weights, which its layout does not hold, nor the dense form's bases)
    factored = form == "factored"
    assert seen["deleted"]["u"] == (form != "dense")
    for name in old_layers:
        assert seen["deleted"][name] == (not (factored and name in merged)), name
    # after: equal arrays in the same dicts; the trainer's copy of the bases is put back from the merge
    assert old_layers["input_norm"].is_deleted() and old_u.is_deleted() == (form != "dense")
    lend.put_back_bases(frozen, merged)
    jax.tree.map(np.testing.assert_array_equal, _host(params), before_params)
    jax.tree.map(np.testing.assert_array_equal, _host(frozen), before_frozen)


def test_lent_weights_come_back_when_sampling_fails(monkeypatch):
    params = _params()
    trainable, frozen = _adapter(params, "svd")
    merged = adapterlib.merge(trainable, frozen)
    before = _host((params, merged))

    def failing(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(refill, "_round_jit", failing)
    with pytest.raises(KeyboardInterrupt):
        sampler.generate(params, CONFIG, PROMPTS, adapters=merged, max_new_tokens=4, key=jax.random.PRNGKey(1),
                         max_rows=2, schedule="refill", lend_weights=True)
    jax.tree.map(np.testing.assert_array_equal, _host((params, merged)), before)


def test_full_preset_slots_follow_the_copies_held():
    """The `full` preset's 152 slots assume one copy of the weights; turning lending off without naming
    sample_rows falls back to the slots two copies leave room for; a given sample_rows is kept."""
    from jaxhack.rl.config import FULL_SAMPLE_ROWS_TWO_COPIES, make_config

    assert (make_config("full").lend_weights, make_config("full").sample_rows) == (True, 152)
    assert make_config("full", lend_weights=False).sample_rows == FULL_SAMPLE_ROWS_TWO_COPIES == 96
    assert make_config("full", lend_weights=False, sample_rows=120).sample_rows == 120
    assert make_config("smoke", lend_weights=False).sample_rows == make_config("smoke").sample_rows
