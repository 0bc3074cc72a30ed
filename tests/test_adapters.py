"""SVD-delta and LoRA adapters: shapes, exact zero-adapter equality, SVD cache keying, reconstruction."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.models import adapters, qwen3
from jaxhack.models.config import TINY

CONFIG = TINY
L = CONFIG.num_hidden_layers




@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


@pytest.fixture(scope="module")
def svd_adapter(params):
    return adapters.init_svd_adapter(params, CONFIG)


@functools.partial(jax.jit, static_argnums=1)
def _logits(params, config, adapter_tree, ids, mask):
    hidden, _ = qwen3.forward(params, config, ids, mask, adapters=adapter_tree)
    return qwen3.lm_logits(params, config, hidden)


def _tokens():
    ids = jnp.asarray(np.random.default_rng(5).integers(3, CONFIG.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), bool).at[1, :3].set(False)  # row 1 left-padded
    return ids, mask


def test_svd_shapes_and_dtypes(params, svd_adapter):
    trainable, frozen = svd_adapter
    dims = qwen3.module_shapes(CONFIG)
    assert set(trainable) == set(frozen) == set(adapters.TARGET_MODULES)
    for name, (d_in, d_out) in dims.items():
        r = min(d_in, d_out)
        assert frozen[name]["u"].shape == (L, d_out, r)
        assert frozen[name]["vh"].shape == (L, r, d_in)
        for leaf in ("delta_s", "delta_s_hack"):
            assert trainable[name][leaf].shape == (L, r)
            assert trainable[name][leaf].dtype == jnp.float32
            assert not np.any(np.asarray(trainable[name][leaf]))
    assert adapters.adapter_kind(trainable) == "svd" == adapters.adapter_kind(frozen)
    # frozen factors follow the requested dtype; the trainable tree stays fp32
    tr16, fr16 = adapters.init_svd_adapter(params, CONFIG, targets=("k_proj",), dtype=jnp.bfloat16)
    assert fr16["k_proj"]["u"].dtype == jnp.bfloat16 and fr16["k_proj"]["vh"].dtype == jnp.bfloat16
    assert tr16["k_proj"]["delta_s"].dtype == jnp.float32
    assert set(tr16) == {"k_proj"}


def test_zero_adapters_equal_base_exactly(params, svd_adapter):
    ids, mask = _tokens()
    base = np.asarray(_logits(params, CONFIG, None, ids, mask))
    trainable, frozen = svd_adapter
    with_svd = np.asarray(_logits(params, CONFIG, adapters.merge(trainable, frozen), ids, mask))
    assert np.array_equal(with_svd, base)
    lora_tr, lora_fr = adapters.init_lora_adapter(params, CONFIG, jax.random.PRNGKey(1), rank=4,
                                                  targets=("v_proj", "gate_proj"))
    with_lora = np.asarray(_logits(params, CONFIG, adapters.merge(lora_tr, lora_fr), ids, mask))
    assert np.array_equal(with_lora, base)
    # and a nonzero delta_s does change the output (the adapter is really wired in)
    bumped = jax.tree.map(lambda x: x + 0.1, trainable)
    changed = np.asarray(_logits(params, CONFIG, adapters.merge(bumped, frozen), ids, mask))
    assert np.max(np.abs(changed - base)) > 1e-4


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "gate_proj", "down_proj"])
def test_svd_reconstructs_w(params, name):
    w = params["layers"][name]  # [L, in, out]
    factors, source = adapters.svd_factors(w)
    assert source == "computed"
    W = np.asarray(w).transpose(0, 2, 1)  # torch layout [L, out, in]
    recon = np.einsum("lor,lr,lri->loi", factors["u"], factors["s"], factors["vh"])
    rel = np.linalg.norm(recon - W) / np.linalg.norm(W)
    assert rel < 1e-4, rel
    assert np.all(np.diff(factors["s"], axis=-1) <= 0)  # descending singular values


def test_svd_delta_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6), np.float32)  # [B,T,in]
    u = rng.standard_normal((4, 3), np.float32)  # [out, r]
    vh = rng.standard_normal((3, 6), np.float32)  # [r, in]
    ds = rng.standard_normal(3, np.float32)
    out = jax.jit(adapters.adapter_delta)(x, {"u": u, "vh": vh, "delta_s": ds, "delta_s_hack": 2 * ds})
    expected = np.asarray(x) @ (np.asarray(u) @ np.diag(3 * np.asarray(ds)) @ np.asarray(vh)).T
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_lora_init_and_formula(params):
    trainable, frozen = adapters.init_lora_adapter(params, CONFIG, jax.random.PRNGKey(2), rank=4, alpha=8,
                                                   targets=("q_proj", "down_proj"))
    assert adapters.adapter_kind(trainable) == "lora"
    assert set(trainable) == {"q_proj", "down_proj"}
    d_in, d_out = qwen3.module_shapes(CONFIG)["down_proj"]
    a, b = trainable["down_proj"]["a"], trainable["down_proj"]["b"]
    assert a.shape == (L, 4, d_in) and b.shape == (L, d_out, 4)
    assert a.dtype == b.dtype == jnp.float32
    assert not np.any(np.asarray(b))
    bound = 1 / np.sqrt(d_in)
    assert np.max(np.abs(np.asarray(a))) <= bound and np.max(np.abs(np.asarray(a))) > 0.8 * bound
    np.testing.assert_array_equal(np.asarray(frozen["down_proj"]["scale"]), np.full(L, 2.0))
    # formula on one layer, with a nonzero b
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, d_in), np.float32)
    b1 = rng.standard_normal((d_out, 4), np.float32)
    out = jax.jit(adapters.adapter_delta)(x, {"a": a[0], "b": b1, "scale": frozen["down_proj"]["scale"][0]})
    expected = 2.0 * np.asarray(x) @ np.asarray(a[0]).T @ np.asarray(b1).T
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_merge_and_kind_errors(svd_adapter):
    trainable, frozen = svd_adapter
    merged = adapters.merge(trainable, frozen)
    assert set(merged["q_proj"]) == {"u", "vh", "delta_s", "delta_s_hack"}
    with pytest.raises(ValueError, match="modules"):
        adapters.merge({"q_proj": trainable["q_proj"]}, frozen)
    with pytest.raises(ValueError, match="not an adapter"):
        adapters.adapter_kind({"q_proj": {"w": 1}})
    with pytest.raises(ValueError, match="unknown target"):
        adapters.module_dims({"layers": {}}, targets=("qq_proj",))


def test_weight_hash_keys_bytes_shape_dtype(params):
    w = np.asarray(params["layers"]["k_proj"])
    h = adapters.weight_hash(w)
    assert h == adapters.weight_hash(w.copy())
    w2 = w.copy()
    w2[1, 3, 5] = np.nextafter(w2[1, 3, 5], np.float32(1))  # one ulp in one element
    assert adapters.weight_hash(w2) != h
    assert adapters.weight_hash(w.reshape(L, -1, 16)) != h  # same bytes, other shape
    assert adapters.weight_hash(w.view(np.int32)) != h  # same bytes, other dtype
    assert adapters.weight_hash(jnp.asarray(w)) == h  # device arrays hash by content too


def test_svd_cache_hit_and_invalidation(params, tmp_path, monkeypatch):
    calls = []
    real_svd = adapters._svd_one

    def counting_svd(w_l):
        calls.append(w_l.shape)
        return real_svd(w_l)

    monkeypatch.setattr(adapters, "_svd_one", counting_svd)
    targets = ("k_proj", "down_proj")
    cache = tmp_path / "svd_cache"
    tr1, fr1, src1 = adapters.init_svd_adapter(params, CONFIG, targets, cache_dir=cache, return_sources=True)
    assert src1 == {"k_proj": "computed", "down_proj": "computed"}
    assert len(calls) == 2 * L
    assert len(list(cache.iterdir())) == 2

    tr2, fr2, src2 = adapters.init_svd_adapter(params, CONFIG, targets, cache_dir=cache, return_sources=True)
    assert src2 == {"k_proj": "cache", "down_proj": "cache"}
    assert len(calls) == 2 * L  # no SVD ran
    for name in targets:
        for leaf in ("u", "vh"):
            assert np.array_equal(np.asarray(fr1[name][leaf]), np.asarray(fr2[name][leaf]))

    # one changed element of k_proj: fresh SVD for k_proj only, and a new cache entry
    layers = dict(params["layers"], k_proj=params["layers"]["k_proj"].at[1, 3, 5].add(1e-3))
    changed = dict(params, layers=layers)
    _, fr3, src3 = adapters.init_svd_adapter(changed, CONFIG, targets, cache_dir=cache, return_sources=True)
    assert src3 == {"k_proj": "computed", "down_proj": "cache"}
    assert len(calls) == 3 * L
    assert len(list(cache.iterdir())) == 3
    assert not np.array_equal(np.asarray(fr3["k_proj"]["u"]), np.asarray(fr1["k_proj"]["u"]))
