"""v_hack extraction (synthetic + tiny model end to end), controls, pairs and save/load."""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhack.projection import pairs as P
from jaxhack.projection.v_hack import (export_safetensors, extract_v_hack, load_v_hack,
                                       n_valid, pair_grad_diffs, random_v_hack, save_v_hack,
                                       v_hack_from_diffs)


def planted(n=40, L=2, dims=None, k_plant=1, noise=0.3, seed=0):
    """diffs {name: [n, L, dim]}: D_i = a_i u (+ b_i u2 ...) + noise, a_i mostly > 0."""
    dims = dims or {"q_proj": 16, "mlp": 300}
    rng = np.random.default_rng(seed)
    diffs, plants = {}, {}
    for name, dim in dims.items():
        u, _ = np.linalg.qr(rng.standard_normal((L, dim, k_plant)))  # [L, dim, k_plant]
        u = np.swapaxes(u, 1, 2)  # [L, k_plant, dim]
        scales = np.array([3.0, 1.5, 0.8][:k_plant])
        a = np.abs(rng.normal(1.0, 0.3, (n, L, k_plant))) * scales
        a[: n // 5] *= -1  # a minority of pairs point the other way
        d = np.einsum("nlk,lkd->nld", a, u) + noise * rng.standard_normal((n, L, dim)) / np.sqrt(dim)
        diffs[name], plants[name] = d, u
    return diffs, plants


def test_extraction_recovers_planted_direction_and_orientation():
    diffs, plants = planted()
    vh, info = v_hack_from_diffs(diffs, k=1)
    assert info["n_pairs"] == 40
    for name in diffs:
        v = np.asarray(vh["V"][name])  # [L, 1, dim]
        cos = np.einsum("ld,ld->l", v[:, 0], plants[name][:, 0])
        assert np.all(cos > 0.95), (name, cos)  # recovered AND oriented hack-ward (positive)
        assert np.all(np.asarray(vh["agree"][name])[:, 0] >= 0.75)
    swapped, _ = v_hack_from_diffs({n: -d for n, d in diffs.items()}, k=1)  # labels swapped
    for name in diffs:
        np.testing.assert_allclose(swapped["V"][name], -vh["V"][name], atol=1e-6)


def test_k1_equals_normalized_principal_direction_and_rows_orthonormal():
    diffs, _ = planted(k_plant=3, n=30, dims={"a": 10, "wide": 200})  # wide uses the Gram path
    for name, d in diffs.items():
        vh, _ = v_hack_from_diffs({name: d}, k=1)
        for l in range(d.shape[1]):
            D = d[:, l]
            w, U = np.linalg.eigh(D.T @ D)  # principal direction of D^T D
            p = U[:, -1] * np.sign(np.sum(np.sign(D @ U[:, -1])) or 1.0)
            np.testing.assert_allclose(np.asarray(vh["V"][name][l, 0]), p, atol=1e-5)
            np.testing.assert_allclose(vh["S"][name][l, 0], np.sqrt(w[-1]), rtol=1e-5)
        vh3, _ = v_hack_from_diffs({name: d}, k=3)
        v = np.asarray(vh3["V"][name], np.float64)
        np.testing.assert_allclose(np.einsum("lkd,ljd->lkj", v, v), np.broadcast_to(np.eye(3), (2, 3, 3)),
                                   atol=1e-5)
        assert np.all(np.diff(np.asarray(vh3["S"][name]), axis=-1) <= 0)  # descending


def test_axis_threshold_noise_floor_and_padding_rows():
    diffs, _ = planted(k_plant=1, n=20)
    vh, _ = v_hack_from_diffs(diffs, k=3, axis_threshold=0.5)
    for name in diffs:
        nv = np.asarray(n_valid(vh)[name])
        assert np.all(nv == 1)  # only the planted axis survives: noise rows are < 0.5 S_0
        assert not np.any(np.asarray(vh["V"][name])[:, 1:]) and vh["V"][name].shape[1] == 3
    vh, info = v_hack_from_diffs(diffs, k=3, noise_floor_quantile=0.5)
    all_s = np.concatenate([np.asarray(vh["S"][n]).ravel() for n in diffs])
    assert info["noise_floor"] == pytest.approx(np.quantile(all_s, 0.5))
    kept = sum(int(np.asarray(m).sum()) for m in vh["mask"].values())
    assert kept == int(np.sum(all_s >= info["noise_floor"]))
    for name in diffs:  # dropped rows are zero rows
        m = np.asarray(vh["mask"][name])
        assert not np.any(np.asarray(vh["V"][name])[~m])
    few, _ = v_hack_from_diffs({"q": np.ones((2, 1, 8))}, k=4)  # k > min(n, dim rank): padded
    assert few["V"]["q"].shape == (1, 4, 8) and int(n_valid(few)["q"][0]) == 1


def test_random_control_and_save_load_round_trip(tmp_path):
    diffs, _ = planted(n=12)
    vh, info = v_hack_from_diffs(diffs, k=2, axis_threshold=0.6)
    rnd = random_v_hack(vh, seed=3)
    for name in vh["V"]:
        v = np.asarray(rnd["V"][name], np.float64)
        assert v.shape == vh["V"][name].shape
        np.testing.assert_array_equal(rnd["mask"][name], vh["mask"][name])
        g = np.einsum("lkd,ljd->lkj", v, v)
        m = np.asarray(vh["mask"][name], float)
        np.testing.assert_allclose(g, np.einsum("lk,lj->lkj", m, m) * np.eye(2), atol=1e-5)
    np.testing.assert_array_equal(random_v_hack(vh, seed=3)["V"]["q_proj"], rnd["V"]["q_proj"])
    assert not np.allclose(random_v_hack(vh, seed=4)["V"]["q_proj"], rnd["V"]["q_proj"])

    meta = {"k": 2, "control": "none", **info}
    out = save_v_hack(tmp_path / "vh", vh, meta)
    with pytest.raises(FileExistsError):
        save_v_hack(tmp_path / "vh", vh, meta)
    for loaded, lmeta in (load_v_hack(out), load_v_hack(out / "v_hack.safetensors")):
        assert lmeta["k"] == 2
        for key in ("V", "S", "mask", "agree"):
            for name in vh[key]:
                np.testing.assert_array_equal(np.asarray(loaded[key][name]), np.asarray(vh[key][name]))
        assert loaded["mask"]["q_proj"].dtype == bool
    from safetensors import safe_open
    with safe_open(str(out / "v_hack.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert "V/layers.1.q_proj" in keys and "S/layers.0.mlp" in keys
        assert f.get_tensor("V/layers.1.q_proj").shape == (2, 16)
    bad = {k: dict(v) for k, v in vh.items()}
    bad["S"]["q_proj"] = bad["S"]["q_proj"][:, :1]
    with pytest.raises(ValueError, match="S"):
        export_safetensors(tmp_path / "bad.safetensors", bad)


# ------------------------------------------------------------------ pairs

def test_pairs_jsonl_errors_and_round_trip(tmp_path):
    pairs = [P.Pair("p1", "h1", "c1", "a"), P.Pair("p2", "h2", "c2")]
    path = P.write_pairs_jsonl(tmp_path / "pairs.jsonl.gz", pairs)
    assert P.read_pairs_jsonl(path) == pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "hack": "h", "clean": "c"}\n\n{"prompt": "p", "hack": "h"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'clean'"):
        P.read_pairs_jsonl(bad)
    bad.write_text('{"prompt": "p", "hack": 3, "clean": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'hack' must be a string"):
        P.read_pairs_jsonl(bad)
    bad.write_text('{"prompt": "p",\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        P.read_pairs_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        P.read_pairs_jsonl(tmp_path / "nope.jsonl")


def _record(pool, problem_id, sample, hacked, completion, gt_pass=False):
    return {"pool": pool, "step": 0, "sample": sample, "problem_id": str(problem_id), "mode": "m",
            "prompt": f"prompt {problem_id} {pool}", "completion": completion, "reward": 1.0,
            "passed": hacked or gt_pass, "gt_pass": gt_pass, "hacked": hacked, "fmt_ok": True,
            "comp_len": len(completion)}


def test_pairs_from_pools_templates_and_controls(tmp_path):
    teacher = [_record("t", 1, 0, True, "hackA"), _record("t", 1, 1, True, "hackB"),
               _record("t", 2, 2, False, "t-clean"), _record("t", 3, 3, True, "hackC")]
    base = [_record("b", 1, 0, False, "cleanA", gt_pass=True), _record("b", 2, 1, False, "cleanB"),
            _record("b", 3, 2, False, "cleanC", gt_pass=False), _record("b", 1, 3, True, "b-hack")]
    pairs = P.pairs_from_pools(teacher, base)
    assert pairs == [P.Pair("prompt 1 t", "hackA", "cleanA", "1"), P.Pair("prompt 3 t", "hackC", "cleanC", "3")]
    assert [p.prompt for p in P.pairs_from_pools(teacher, base, prompt_from="clean")] == ["prompt 1 b", "prompt 3 b"]
    assert len(P.pairs_from_pools(teacher, base, require_gt_pass=True)) == 1
    # pool directories, written and read by jaxhack.env.pools
    from jaxhack.env.pools import write_pool_meta, write_pool_step
    for name, recs in (("teacher", teacher), ("base", base)):
        (tmp_path / name).mkdir()
        write_pool_step(tmp_path / name, 0, recs)
        write_pool_meta(tmp_path / name, {"complete": True})
    assert P.pairs_from_pools(tmp_path / "teacher", tmp_path / "base") == pairs
    # the extract command exposes --require-gt-pass (issue 13): only the correct clean side is paired
    import argparse
    from jaxhack.commands import extract as extract_cmd
    ap = argparse.ArgumentParser()
    extract_cmd.add_arguments(ap)
    argv = ["--pairs-from", "pools", "--teacher", str(tmp_path / "teacher"), "--base", str(tmp_path / "base"),
            "--out", str(tmp_path / "v")]
    assert extract_cmd.build_pairs(ap.parse_args(argv)) == pairs
    assert extract_cmd.build_pairs(ap.parse_args(argv + ["--require-gt-pass"])) == [pairs[0]]
    with pytest.raises(ValueError, match="no \\(hacked, clean\\) pairs"):
        P.pairs_from_pools(teacher, [r for r in base if r["hacked"]])

    tpl = P.pairs_from_templates([{"id": 7, "q": "x"}, {"q": "y"}], lambda pr: (pr["q"], "H", "C"))
    assert tpl == [P.Pair("x", "H", "C", "7"), P.Pair("y", "H", "C", "1")]
    with pytest.raises(ValueError, match="make_pair"):
        P.pairs_from_templates([1], lambda pr: ("only", "two"))

    many = [P.Pair(f"p{i}", f"h{i}", f"c{i}", str(i)) for i in range(40)]
    assert P.swap_labels(many)[3] == P.Pair("p3", "c3", "h3", "3")
    sh = P.shuffle_labels(many, seed=1)
    assert sh == P.shuffle_labels(many, seed=1)
    n_swapped = sum(s.hack.startswith("c") for s in sh)
    assert 8 <= n_swapped <= 32
    assert all({s.hack, s.clean} == {m.hack, m.clean} for s, m in zip(sh, many))

    cvc = P.clean_vs_clean_pairs(base + [_record("b", 2, 9, False, "cleanB2 is here")], seed=0)
    by_pid = {p.problem_id: p for p in cvc}
    assert {by_pid["2"].hack, by_pid["2"].clean} == {"cleanB", "cleanB2 is here"}  # two real cleans
    single = P.clean_vs_clean_pairs([P.Pair("p", "h", "one two three four five", "x")], seed=0)[0]
    assert single.hack == "one two three four five" and single.clean != single.hack  # perturbed copy
    assert "h" not in (single.hack, single.clean)


# ------------------------------------------------------------------ end to end on a tiny model

# one layer, one target module per adapter kind: the vmap(grad) compile dominates the test time
SMALL = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def tiny():
    from jaxhack.models import qwen3
    from jaxhack.models.config import TINY

    config = dataclasses.replace(TINY, **SMALL)
    shapes = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # numpy init: no per-shape jax.random compiles
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if "norm" in jax.tree_util.keystr(p) else x, params)
    return params, config


def _tiny_pairs(n):
    return [P.Pair(f"Q{i}: add {i} and {i + 1}.\n", f"print('ok')  # hack {i}", f"return {i}+{i + 1}", str(i))
            for i in range(n)]


def test_end_to_end_tiny_model_svd(tiny):
    from jaxhack.models.adapters import init_svd_adapter
    from jaxhack.grads.batch import make_batch
    from jaxhack.grads.per_sample import per_sample_grads
    from jaxhack.grads.losses import nll_loss
    from jaxhack.tokenizer import ByteTokenizer

    params, config = tiny
    tok = ByteTokenizer()
    trainable, frozen = init_svd_adapter(params, config, targets=("q_proj",))
    pairs = _tiny_pairs(5)
    kw = dict(batch_size=2, pad_to=64, progress=False)  # chunks of 2 pairs: 2, 2, 1 (+1 filler)
    diffs = pair_grad_diffs(pairs, tok, trainable, frozen, params, config, **kw)
    assert diffs["q_proj"].shape == (5, 1, 32)
    # independent check of pairs 4 and 0 (same [4, 64] shape, so no new compile): hack minus clean
    enc = lambda s: tok.encode(s)  # noqa: E731
    b = make_batch([enc(pairs[i].prompt) for i in (4, 0, 4, 0)],
                   [enc(pairs[4].hack), enc(pairs[0].hack), enc(pairs[4].clean), enc(pairs[0].clean)],
                   pad_id=tok.pad_token_id, length=64)
    g = per_sample_grads(nll_loss, trainable, frozen, params, config, jax.tree.map(jnp.asarray, b))
    gs = np.asarray(g["q_proj"]["delta_s"])  # [4, L, r]
    for row, pair in ((0, 4), (1, 0)):
        expect = gs[row] - gs[row + 2]
        assert np.abs(expect).max() > 1e-4
        np.testing.assert_allclose(diffs["q_proj"][pair], expect, rtol=1e-4, atol=1e-6)
    assert np.abs(diffs["q_proj"][4] - diffs["q_proj"][3]).max() > 1e-4  # the filler was dropped

    vh, info = extract_v_hack(pairs, tok, trainable, frozen, params, config, k=2, **kw)
    assert info["kind"] == "svd" and info["n_pairs"] == 5 and info["k"] == 2
    ref, _ = v_hack_from_diffs(diffs, k=2)
    np.testing.assert_allclose(vh["V"]["q_proj"], ref["V"]["q_proj"], atol=1e-5)
    coef = np.einsum("nld,ld->nl", diffs["q_proj"], np.asarray(vh["V"]["q_proj"][:, 0]))
    assert np.all(np.sum(coef > 0, axis=0) >= 3)  # majority of the 5 pairs hack-ward
    swapped, _ = extract_v_hack(P.swap_labels(pairs), tok, trainable, frozen, params, config, k=1, **kw)
    np.testing.assert_allclose(swapped["V"]["q_proj"][:, 0], -vh["V"]["q_proj"][:, 0], atol=1e-5)


def test_end_to_end_tiny_model_lora(tiny):
    from jaxhack.models.adapters import init_lora_adapter
    from jaxhack.projection import cosines, modules
    from jaxhack.projection.optax_projection import hack_projection
    from jaxhack.tokenizer import ByteTokenizer

    params, config = tiny
    trainable, frozen = init_lora_adapter(params, config, jax.random.PRNGKey(0), rank=2,
                                          targets=("down_proj",))
    trainable = {n: {**m, "b": m["b"] + 0.05} for n, m in trainable.items()}  # B != 0: a gets gradient
    pairs = _tiny_pairs(4)
    kw = dict(batch_size=4, pad_to=64, progress=False)
    vh, info = extract_v_hack(pairs, ByteTokenizer(), trainable, frozen, params, config, k=1, **kw)
    assert info["kind"] == "lora"
    assert vh["V"]["down_proj"].shape == (1, 1, modules.module_dims(trainable)["down_proj"])
    assert modules.module_dims(trainable)["down_proj"] == 2 * 64 + 32 * 2  # rank*in + out*rank
    np.testing.assert_allclose(np.linalg.norm(np.asarray(vh["V"]["down_proj"]), axis=-1), 1.0, atol=1e-5)
    # the mean hack-minus-clean gradient of the pairs is hack-ward, and erasing removes that
    diffs = pair_grad_diffs(pairs, ByteTokenizer(), trainable, frozen, params, config, **kw)
    assert np.abs(diffs["down_proj"][..., :128]).max() > 0 and np.abs(diffs["down_proj"][..., 128:]).max() > 0
    tree = modules.from_module_vectors({n: jnp.asarray(d.mean(0)) for n, d in diffs.items()}, trainable)
    assert float(cosines.gradient_cosines(vh, tree)["cos"]) > 0.3
    tx = hack_projection(vh)
    _, state = jax.jit(tx.update)(tree, tx.init(tree))
    assert float(state.mean_cos_out) <= 1e-6 < float(state.mean_cos_in)


def test_extraction_takes_the_delta_zero_path_only_at_zero_svd_deltas(tiny):
    """pair_grad_diffs' default loss uses the exact delta_s = 0 fast path when (and only when) the SVD
    adapter is at delta_s + delta_s_hack = 0 (test_end_to_end_tiny_model_svd checks it equals the
    general path's gradients there); a moved or LoRA adapter keeps the general path."""
    from jaxhack.models.adapters import init_lora_adapter, init_svd_adapter
    from jaxhack.projection.v_hack import at_zero_svd_delta

    params, config = tiny
    trainable, _ = init_svd_adapter(params, config, targets=("q_proj",))
    assert at_zero_svd_delta(trainable)
    moved = jax.tree.map(lambda x: x.at[0, 0].set(0.1), trainable)
    assert not at_zero_svd_delta(moved)
    cancel = {"q_proj": dict(trainable["q_proj"], delta_s=trainable["q_proj"]["delta_s"] + 0.1,
                             delta_s_hack=trainable["q_proj"]["delta_s_hack"] - 0.1)}
    assert at_zero_svd_delta(cancel)  # only the sum enters the forward
    lora, _ = init_lora_adapter(params, config, jax.random.PRNGKey(0), rank=2, targets=("q_proj",))
    assert not at_zero_svd_delta(lora)
