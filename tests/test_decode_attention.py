"""Decode attention over each row's live cache slots: the Pallas kernel (run by the interpreter on
CPU) and the reference agree, and qwen3.forward(attention="decode") equals the masked path."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.models import decode_layout, qwen3
from jaxhack.models.attention_parts import combine_prefix_parts, parts_attention
from jaxhack.models.config import TINY
from jaxhack.models.decode_attention import (BLOCK_K, ONE_PART_MIN_PROGRAMS, SPLIT, decode_attention,
                                             decode_attention_reference, decode_tiles, merge_attention,
                                             prefix_decode_attention)


def _inputs(seed, B=3, Hq=8, Hkv=2, S=2 * SPLIT, hd=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, Hq, hd)), dtype)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, hd)), dtype)
    return q, k, v


def test_reference_is_softmax_over_the_live_slots_only():
    q, k, v = _inputs(0)
    start, end = jnp.array([0, 5, 130]), jnp.array([1, 77, 256])
    out = np.asarray(decode_attention_reference(q, k, v, start, end))
    # garbage outside [start, end) must not matter
    k2 = k.at[1, :, :5].set(1e3).at[1, :, 77:].set(-1e3)
    v2 = v.at[1, :, 200:].set(7.0)
    np.testing.assert_array_equal(np.asarray(decode_attention_reference(q, k2, v2, start, end))[1], out[1])
    # row 0 sees one slot: the output is that slot's value for every query head of the group
    np.testing.assert_allclose(out[0, :4], np.broadcast_to(np.asarray(v[0, 0, 0]), (4, 16)), rtol=1e-6)
    # row 2 by hand
    qg = np.asarray(q[2]).reshape(2, 4, 16)
    s = np.einsum("kgd,ksd->kgs", qg, np.asarray(k[2, :, 130:256])) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[2], np.einsum("kgs,ksd->kgd", p, np.asarray(v[2, :, 130:256])).reshape(8, 16),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lockstep", [False, True])
def test_pallas_kernel_matches_reference(dtype, lockstep):
    """Both tilings decode_tiles picks: parts of SPLIT slots, and one part per (row, KV head)."""
    q, k, v = _inputs(1, dtype=dtype)
    start, end = jnp.array([0, 3, 129]), jnp.array([200, 129, 256])  # spans, starts and ends inside splits
    tiles = decode_tiles(k.shape[2], ONE_PART_MIN_PROGRAMS, lockstep)
    ref = np.asarray(decode_attention_reference(q, k, v, start, end), np.float32)
    out = np.asarray(decode_attention(q, k, v, start, end, implementation="interpret", tiles=tiles), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert np.linalg.norm(out - ref) <= tol * np.linalg.norm(ref), np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_two_parts_merged_by_their_statistics_are_the_whole_softmax(implementation):
    """decode_attention(residuals=True) over [start, mid) and [mid, end), merged, equals the softmax
    over [start, end); a part with no keys (sum 0) weighs nothing."""
    q, k, v = _inputs(5)
    start, mid, end = jnp.array([0, 3, 129]), jnp.array([1, 100, 200]), jnp.array([200, 129, 256])
    whole = np.asarray(decode_attention_reference(q, k, v, start, end))
    a = decode_attention(q, k, v, start, mid, implementation, residuals=True)
    b = decode_attention(q, k, v, mid, end, implementation, residuals=True)
    assert a[1][0].shape == (3, 8) and a[1][1].shape == (3, 8)
    np.testing.assert_allclose(np.asarray(merge_attention([a, b])), whole, rtol=2e-5, atol=2e-5)
    empty = decode_attention(q, k, v, end, end, implementation, residuals=True)
    np.testing.assert_array_equal(np.asarray(empty[1][0]), 0.0)
    np.testing.assert_allclose(np.asarray(merge_attention([empty, decode_attention(q, k, v, start, end, implementation,
                                                                                    residuals=True)])), whole,
                               rtol=2e-5, atol=2e-5)


def _prefix_case():
    """5 rows over 3 prompts (fp32): caches, the prompt pool and each row's live range."""
    rng = np.random.default_rng(6)
    B, NP, Gm, Hq, Hkv, hd, P, S = 5, 3, 2, 8, 2, 16, SPLIT, SPLIT
    q, k, v = _inputs(7, B=B, Hq=Hq, Hkv=Hkv, S=S, hd=hd)
    pk = jnp.asarray(rng.standard_normal((NP, Hkv, P, hd)), jnp.float32)
    pv = jnp.asarray(rng.standard_normal((NP, Hkv, P, hd)), jnp.float32)
    prompt, member = jnp.array([1, 0, 1, 2, 2]), jnp.array([0, 0, 1, 1, 0])
    members = jnp.array([[1, 3], [0, 2], [4, 3]])  # prompt 0 has one row (slot 3 is a stale entry)
    pstart, plen = jnp.array([100, 120, 7]), jnp.array([28, 8, 121])
    start, end = jnp.array([0, 0, 0, 5, 0]), jnp.array([1, 17, 128, 6, 60])  # row 3: a finished row's one slot
    prefix = {"k": pk, "v": pv, "start": pstart, "end": pstart + plen, "members": members, "prompt": prompt,
              "member": member}
    return q, k, v, start, end, prefix


@pytest.mark.parametrize("implementation,parts_kernel", [("xla", True), ("interpret", False), ("interpret", True)])
def test_prefix_attention_is_attention_over_the_prompt_then_the_rows_own_keys(implementation, parts_kernel):
    """Rows that share a prompt read its keys from one copy (their queries together, one KV tile per
    prompt): the output is the softmax over [the prompt's real positions; the row's own live slots].
    parts_kernel: `attention_parts`' kernels (key parts, one combine); else JAX's stock kernel + XLA."""
    B, Hq, Hkv, hd = 5, 8, 2, 16
    q, k, v, start, end, prefix = _prefix_case()
    prompt, pstart = prefix["prompt"], prefix["start"]
    plen = prefix["end"] - pstart
    pk, pv = prefix["k"], prefix["v"]
    out = np.asarray(prefix_decode_attention(q, k, v, start, end, prefix, implementation, parts_kernel))
    qn, kn, vn, pkn, pvn = (np.asarray(x, np.float64) for x in (q, k, v, pk, pv))
    for b in (0, 1, 2, 4):  # the rows a prompt's member table points at: softmax by hand over both key sets
        p, a, z = int(prompt[b]), int(pstart[int(prompt[b])]), int(pstart[int(prompt[b])] + plen[int(prompt[b])])
        keys = np.concatenate([pkn[p, :, a:z], kn[b, :, int(start[b]):int(end[b])]], axis=1)  # [Hkv,n,hd]
        vals = np.concatenate([pvn[p, :, a:z], vn[b, :, int(start[b]):int(end[b])]], axis=1)
        scores = np.einsum("kgd,knd->kgn", qn[b].reshape(Hkv, Hq // Hkv, hd), keys) / np.sqrt(hd)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        ref = np.einsum("kgn,knd->kgd", weights, vals).reshape(Hq, hd)
        np.testing.assert_allclose(out[b], ref, rtol=2e-5, atol=2e-5)
    # a prompt no live row reads (end = start) reads nothing: its rows get their own keys' attention
    quiet = dict(prefix, end=pstart.at[1].set(pstart[1]))
    alone = np.asarray(decode_attention_reference(q, k, v, start, end))
    np.testing.assert_allclose(np.asarray(prefix_decode_attention(q, k, v, start, end, quiet, implementation,
                                                                  parts_kernel))[[0, 2]],
                               alone[[0, 2]], rtol=2e-5, atol=2e-5)


def test_parts_combine_reads_live_parts_only():
    """`parts_attention` leaves parts outside a row's range unwritten; `combine_prefix_parts` must not
    read them: NaN there changes nothing (a row's own range here covers 1-2 of its 2 parts)."""
    q, k, v, start, end, prefix = _prefix_case()
    k2, v2 = jnp.concatenate([k, k], axis=2), jnp.concatenate([v, v], axis=2)  # 2 parts of SPLIT slots
    end2 = end.at[2].set(SPLIT + 40)  # row 2 spans both parts; rows 0, 1, 3, 4 live in part 0 only
    B, NP, Hq, Hkv, Gm = 5, 3, 8, 2, 2
    qp = q[jnp.clip(prefix["members"], 0, B - 1)].reshape(NP, Gm, Hkv, Hq // Hkv, -1)
    qp = qp.transpose(0, 2, 1, 3, 4).reshape(NP, Hkv * Gm * (Hq // Hkv), -1)
    tiles = dict(split=SPLIT, block_k=BLOCK_K, implementation="interpret")
    own = parts_attention(q, k2, v2, start, end2, **tiles)
    shared = parts_attention(qp, prefix["k"], prefix["v"], prefix["start"], prefix["end"], **tiles)
    dead = (jnp.arange(2)[None, :] * SPLIT >= end2[:, None])  # [B, parts]: part 1 of every row but row 2
    assert int(dead.sum()) == 4
    poisoned = tuple(jnp.where(dead.reshape(B, 1, 2, *([1] * (x.ndim - 3))), jnp.nan, x) for x in own)
    clean = combine_prefix_parts(own, shared, start, end2, prefix, split=SPLIT, implementation="interpret")
    dirty = combine_prefix_parts(poisoned, shared, start, end2, prefix, split=SPLIT, implementation="interpret")
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))
    expected = prefix_decode_attention(q, k2, v2, start, end2, prefix, "xla")
    np.testing.assert_allclose(np.asarray(clean)[[0, 1, 2, 4]], np.asarray(expected)[[0, 1, 2, 4]], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="whole parts"):
        parts_attention(q, k2[:, :, :200], v2[:, :, :200], start, end2, **tiles)


def test_tiles_keep_the_key_parts_unless_many_rows_decode_in_lockstep():
    assert decode_tiles(2048, 64 * 8, lockstep=True)["split"] == 2048  # one program per (row, head)
    assert decode_tiles(2048, 8 * 8, lockstep=True)["split"] == SPLIT  # batch 8: too few programs
    assert decode_tiles(2048, 128 * 8, lockstep=False)["split"] == SPLIT  # refill: rows at different steps
    q, k, v = _inputs(3)
    with pytest.raises(ValueError, match="multiple of split"):
        decode_attention(q, k, v, jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32), implementation="interpret",
                         tiles={"split": 96, "block_k": 32, "num_warps": 4, "num_stages": 2})


def test_bad_cache_length_is_refused():
    q, k, v = _inputs(2, S=SPLIT + 64)
    with pytest.raises(ValueError, match="multiple of"):
        decode_attention(q, k, v, jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32), implementation="pallas")


def test_forward_decode_equals_masked_decode():
    """One decode step after a left-padded prefill: attention='decode' gives the masked path's hidden
    states and the same cache (up to fp32 rounding)."""
    params = random_params(TINY, seed=4)
    B, P, S = 3, 6, SPLIT
    lengths = np.array([6, 2, 4])
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, P)), jnp.int32)
    prompt_mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    mask = jnp.asarray(np.concatenate([prompt_mask, np.zeros((B, S - P), bool)], axis=1))
    cache = qwen3.init_cache(TINY, B, S, jnp.float32)
    _, cache = qwen3.forward(params, TINY, ids, mask, cache=cache, cache_index=0)
    mask = mask.at[:, P].set(True)
    token = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, 1)), jnp.int32)
    h_masked, c_masked = qwen3.forward(params, TINY, token, mask, cache=cache, cache_index=P)
    h_decode, c_decode = qwen3.forward(params, TINY, token, mask, cache=cache, cache_index=P, attention="decode")
    np.testing.assert_allclose(np.asarray(h_decode), np.asarray(h_masked), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_decode), jax.tree.leaves(c_masked)):  # later layers see rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one new token"):
        qwen3.forward(params, TINY, ids, mask, cache=cache, cache_index=0, attention="decode")



def test_forward_tells_the_kernel_whether_rows_decode_in_lockstep(monkeypatch):
    """One cache_index for all rows (row groups) is lockstep, one per row (refill) is not: the flag
    decode_tiles chooses the kernel's tiles by."""
    seen = []

    def recording(q, k, v, start, end, lockstep=False):
        seen.append(lockstep)
        return decode_attention_reference(q, k, v, start, end)

    monkeypatch.setattr(qwen3, "decode_attention", recording)
    params = random_params(TINY, seed=4)
    B, S = 2, SPLIT
    mask = jnp.zeros((B, S), bool).at[:, :4].set(True)
    cache = qwen3.init_cache(TINY, B, S, jnp.float32)
    token = jnp.zeros((B, 1), jnp.int32)
    qwen3.forward(params, TINY, token, mask, cache=cache, cache_index=3, attention="decode")
    assert seen and all(seen)
    seen.clear()
    qwen3.forward(params, TINY, token, mask, cache=cache, cache_index=jnp.array([3, 2]), attention="decode")
    assert seen and not any(seen)


@pytest.mark.parametrize("targets", [("k_proj", "up_proj", "o_proj"), None])
def test_decode_layers_fused_weights_equal_stacked_weights(targets):
    """decode_layers (per-layer copies: one matmul per group of Linears reading one input, for the
    weights and the adapted modules' Vh together, then the U factors of equal-shape modules batched)
    gives the stacked forward's hidden states and cache, with an SVD adapter on some (the group's
    other modules unadapted) or all of the target modules."""
    from jaxhack.models import adapters

    params = random_params(TINY, seed=6)
    kw = {} if targets is None else {"targets": targets}
    tr, fr = adapters.init_svd_adapter(params, TINY, progress=False, **kw)
    tr = jax.tree.map(lambda x: x + 0.1, tr)
    merged = adapters.merge(tr, fr)
    B, P, S = 2, 5, SPLIT
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, P)), jnp.int32)
    mask = jnp.zeros((B, S), bool).at[:, :P].set(True)
    cache = qwen3.init_cache(TINY, B, S, jnp.float32)
    layers, layer_adapters = decode_layout.decode_layers(params, merged)
    assert len(layers) == TINY.num_hidden_layers
    layer, la = layers[0], layer_adapters[0]
    D, Q, KV, F = TINY.hidden_size, TINY.q_dim, TINY.kv_dim, TINY.intermediate_size
    if targets is None:  # every group: weights and every Vh^T in one matrix; k/v and gate/up U batched
        assert sorted(layer) == sorted(["input_norm", "post_attn_norm", "q_norm", "k_norm", "qkv_proj_w_vh",
                                        "qkv_proj_u", "o_proj_w_vh", "o_proj_u", "gate_up_proj_w_vh",
                                        "gate_up_proj_u", "down_proj_w_vh", "down_proj_u"])
        assert layer["qkv_proj_w_vh"].shape == (D, Q + 2 * KV + min(D, Q) + 2 * min(D, KV))
        assert [u.shape for u in layer["gate_up_proj_u"]] == [(2, F, min(D, F))]
        assert "u" not in la["gate_proj"] and "vh" not in la["gate_proj"]
    else:  # k only in q/k/v; down_proj unadapted keeps its plain weight
        assert layer["qkv_proj_w_vh"].shape == (D, Q + 2 * KV + min(D, KV))
        assert [u.shape for u in layer["qkv_proj_u"]] == [(1, KV, min(D, KV))]
        assert layer["gate_up_proj_w_vh"].shape == (D, 2 * F + min(D, F))
        assert "down_proj" in layer and "q_proj" not in layer
    h_ref, c_ref = qwen3.forward(params, TINY, ids, mask, adapters=merged, cache=cache, cache_index=0)
    h_dec, c_dec = qwen3.forward({**params, "layers": layers}, TINY, ids, mask, adapters=layer_adapters,
                                 cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(h_dec), np.asarray(h_ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_dec), jax.tree.leaves(c_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the adapter matters (so the check above is not vacuous)
    h_base, _ = qwen3.forward({**params, "layers": decode_layout.decode_layers(params)[0]}, TINY, ids, mask, cache=cache,
                              cache_index=0)
    assert np.max(np.abs(np.asarray(h_base) - np.asarray(h_ref))) > 1e-3
    with pytest.raises(ValueError, match="run with the adapters they were built with"):
        qwen3.forward({**params, "layers": layers}, TINY, ids, mask, cache=cache, cache_index=0)
