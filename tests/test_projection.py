"""hack_projection (optax), cosines and module flattening on small synthetic adapter trees."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxhack.projection import cosines, modules
from jaxhack.projection.optax_projection import (chain_with_projection, find_projection_state,
                                                 freeze_lora_a, hack_projection, null_abs_cos, null_cos_sd,
                                                 projected_adamw, projection_metrics, update_metrics)
from jaxhack.projection.v_hack import random_v_hack

L = 3
SVD_DIMS = {"q_proj": 12, "down_proj": 20}          # r per module
LORA_SHAPES = {"q_proj": (2, 6, 5), "o_proj": (2, 4, 7)}  # (rank, in, out)


def normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def svd_tree(seed, lead=()):
    rng = np.random.default_rng(seed)  # numpy: jax.random compiles slowly on a loaded 2-core CPU
    return {name: {"delta_s": normal(rng, (*lead, L, r)), "delta_s_hack": normal(rng, (*lead, L, r))}
            for name, r in sorted(SVD_DIMS.items())}


def lora_tree(seed, lead=()):
    rng = np.random.default_rng(seed)
    return {name: {"a": normal(rng, (*lead, L, rank, d_in)), "b": normal(rng, (*lead, L, d_out, rank))}
            for name, (rank, d_in, d_out) in sorted(LORA_SHAPES.items())}


def v_for(tree, k, seed=0):
    dims = {n: (L, d) for n, d in modules.module_dims(tree).items()}
    return random_v_hack(dims, seed=seed, k=k)["V"]


# ------------------------------------------------------------------ modules

def test_module_vectors_round_trip_svd_and_lora():
    for tree in (svd_tree(0, lead=(4,)), lora_tree(1, lead=(4,))):
        vecs = modules.to_module_vectors(tree)
        for name, v in vecs.items():
            assert v.shape[:2] == (4, L)
        back = modules.from_module_vectors(vecs, tree)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, tree)
    lt = lora_tree(1)
    v = modules.to_module_vectors(lt)["q_proj"]  # [L, rank*in + out*rank]
    np.testing.assert_array_equal(v[1, : 2 * 6], lt["q_proj"]["a"][1].ravel())
    np.testing.assert_array_equal(v[1, 2 * 6:], lt["q_proj"]["b"][1].ravel())
    assert modules.module_key("q_proj", 3) == "layers.3.q_proj"
    assert modules.parse_module_key("layers.3.q_proj") == ("q_proj", 3)


# ------------------------------------------------------------------ projection

@pytest.mark.parametrize("kind", ["svd", "lora"])
def test_one_sided_erase_leaves_no_hackward_coefficient(kind):
    tree = svd_tree(2) if kind == "svd" else lora_tree(2)
    V = v_for(tree, k=3)
    # make most coefficients positive so the projection really fires
    g_vec = {n: v + 2.0 * jnp.sum(V[n], axis=1) for n, v in modules.to_module_vectors(tree).items()}
    grads = modules.from_module_vectors(g_vec, tree)
    tx = hack_projection(V, mode="erase", gate="one_sided")
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    out_vec = modules.to_module_vectors(out)
    for n in V:
        c_in = np.einsum("lkd,ld->lk", V[n], g_vec[n])
        c_out = np.einsum("lkd,ld->lk", V[n], out_vec[n])
        assert float(np.max(c_in)) > 0.5
        assert float(np.max(c_out)) <= 1e-6                        # no hack-ward part left
        np.testing.assert_allclose(c_out, np.minimum(c_in, 0.0), atol=1e-5)  # negatives untouched
        removed = g_vec[n] - out_vec[n]                              # lies in span(V)
        in_span = np.einsum("lk,lkd->ld", np.einsum("lkd,ld->lk", V[n], removed), V[n])
        np.testing.assert_allclose(removed, in_span, atol=1e-5)
        assert float(np.max(state.cos_out[n] - state.cos_in[n])) < 0
    assert float(state.mean_cos_out) < float(state.mean_cos_in)
    assert float(state.frac_fired) == 1.0
    if kind == "svd":
        for n in out:
            assert not np.any(out[n]["delta_s_hack"])              # not trained outside route


def test_measure_is_bit_identical_and_reports():
    tree = svd_tree(3)
    V = v_for(tree, k=2)
    tx = hack_projection(V, mode="measure")
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    for n in tree:
        assert out[n]["delta_s"].dtype == tree[n]["delta_s"].dtype
        np.testing.assert_array_equal(np.asarray(out[n]["delta_s"]), np.asarray(tree[n]["delta_s"]))
        assert not np.any(out[n]["delta_s_hack"])
    expect = cosines.gradient_cosines(V, tree)
    np.testing.assert_allclose(state.mean_cos_in, expect["cos"], atol=1e-6)
    assert float(state.mean_cos_in) == float(state.mean_cos_out)
    assert float(state.frac_fired) == 0.0 and float(state.removed_norm) == 0.0
    lt = lora_tree(3)
    tx = hack_projection(v_for(lt, k=2), mode="measure")
    out, _ = tx.update(lt, tx.init(lt))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, lt)


def test_route_puts_exactly_the_removed_part_on_delta_s_hack():
    tree = svd_tree(4)
    V = v_for(tree, k=2)
    erase = hack_projection(V, mode="erase")
    route = hack_projection(V, mode="route")
    e_out, _ = erase.update(tree, erase.init(tree))
    r_out, r_state = route.update(tree, route.init(tree))
    for n in tree:
        g = tree[n]["delta_s"]
        np.testing.assert_array_equal(r_out[n]["delta_s"], e_out[n]["delta_s"])
        np.testing.assert_allclose(r_out[n]["delta_s_hack"], g - e_out[n]["delta_s"], atol=1e-6)
        np.testing.assert_allclose(r_out[n]["delta_s"] + r_out[n]["delta_s_hack"], g, atol=1e-6)
        assert float(np.abs(r_out[n]["delta_s_hack"]).max()) > 0
    assert float(r_state.removed_norm) > 0
    with pytest.raises(ValueError, match="route"):
        lt = lora_tree(4)
        tx = hack_projection(v_for(lt, k=1), mode="route")
        tx.update(lt, tx.init(lt))


def test_gates_no_gate_and_reverse():
    tree = svd_tree(5)
    V = v_for(tree, k=2)
    g = modules.to_module_vectors(tree)
    for gate, expect in (("no_gate", lambda c: 0 * c), ("anti_one_sided", lambda c: np.maximum(c, 0)),
                         ("reverse", lambda c: np.where(c > 0, -c, c)),  # the reference: c_use = 2c
                         ("one_sided", lambda c: np.minimum(c, 0))):
        tx = hack_projection(V, gate=gate)
        out = modules.to_module_vectors(tx.update(tree, tx.init(tree))[0])
        for n in V:
            c_in = np.einsum("lkd,ld->lk", V[n], g[n])
            c_out = np.einsum("lkd,ld->lk", V[n], out[n])
            np.testing.assert_allclose(c_out, expect(c_in), atol=1e-5, err_msg=gate)
    tx = hack_projection(V, gate="one_sided", overshoot=2.0)  # overshoot flips the positive part
    out = modules.to_module_vectors(tx.update(tree, tx.init(tree))[0])
    for n in V:
        c_in = np.einsum("lkd,ld->lk", V[n], g[n])
        c_out = np.einsum("lkd,ld->lk", V[n], out[n])
        np.testing.assert_allclose(c_out, np.where(c_in > 0, -c_in, c_in), atol=1e-5)
    with pytest.raises(ValueError):
        hack_projection(V, gate="sideways")


def test_update_placement_leaves_adam_updates_without_hackward_part():
    params = jax.tree.map(jnp.zeros_like, svd_tree(6))
    V = v_for(params, k=3)
    opt = chain_with_projection(optax.adamw(1e-2, weight_decay=0.1), V, placement="update")
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    for i in range(4):
        grads = svd_tree(100 + i)
        grads = {n: {**m, "delta_s": m["delta_s"] + 3.0 * jnp.sum(V[n], 1)} for n, m in grads.items()}
        params, state, updates = step(params, state, grads)
        for n in V:
            # an update moves along -g: its hack-ward coefficient is <v, -u>; none may remain positive
            c = np.einsum("lkd,ld->lk", V[n], -updates[n]["delta_s"])
            assert float(np.max(c)) <= 1e-6
            assert not np.any(updates[n]["delta_s_hack"])
        m = projection_metrics(state)
        assert float(m["frac_fired"]) > 0 and float(m["mean_cos_in"]) > float(m["mean_cos_out"])
    # without the projection the same chain does produce hack-ward updates (the test can fail)
    plain = optax.adamw(1e-2)
    u, _ = plain.update(grads, plain.init(params), params)
    assert max(float(np.max(np.einsum("lkd,ld->lk", V[n], -u[n]["delta_s"]))) for n in V) > 1e-3


def test_gradient_placement_jitted_step_returns_state_metrics():
    params = jax.tree.map(jnp.zeros_like, svd_tree(7))
    V = v_for(params, k=1)
    opt = chain_with_projection(optax.adamw(1e-3), V, placement="gradient", mode="erase")
    assert isinstance(opt, optax.GradientTransformation)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        s = find_projection_state(state)
        return optax.apply_updates(params, updates), state, (s.mean_cos_in, s.mean_cos_out, s.frac_fired, s.cos_in)

    state = opt.init(params)
    grads = svd_tree(8)
    grads = {n: {**m, "delta_s": m["delta_s"] + 5.0 * V[n][:, 0]} for n, m in grads.items()}
    params, state, (ci, co, ff, per_module) = step(params, state, grads)
    assert float(ci) > 0.3 and float(co) <= 1e-6 and float(ff) == 1.0
    assert per_module["q_proj"].shape == (L,)
    expect = cosines.gradient_cosines(V, grads)
    np.testing.assert_allclose(ci, expect["cos"], atol=1e-5)


def test_zero_gradient_gives_no_nan():
    zeros = jax.tree.map(jnp.zeros_like, svd_tree(9))
    V = v_for(zeros, k=2)
    for mode in ("erase", "route", "measure"):
        tx = hack_projection(V, mode=mode)
        out, state = jax.jit(tx.update)(zeros, tx.init(zeros))
        for leaf in jax.tree.leaves((out, state)):
            assert not np.any(np.isnan(leaf)), mode
        assert float(state.mean_cos_in) == 0.0
    r = jax.jit(lambda t: cosines.per_sample_cosines(V, t))(
        jax.tree.map(lambda x: jnp.zeros((5, *x.shape)), zeros))
    for key, val in r.items():
        assert val.shape == (5,) and not np.any(np.isnan(val)) and not np.any(val), key
    grad_fn = jax.jit(jax.grad(lambda t: cosines.gradient_cosines(V, t)["cos"]))  # safe under grad too
    assert not any(np.any(np.isnan(x)) for x in jax.tree.leaves(grad_fn(zeros)))


# ------------------------------------------------------------------ cosines

def test_cosines_per_module_per_sample_and_z():
    tree = svd_tree(10, lead=(6,))  # 6 samples
    V = v_for(jax.tree.map(lambda x: x[0], tree), k=2)
    r = jax.jit(lambda t: cosines.per_sample_cosines(V, t))(tree)
    assert r["cos_S_contrib"].shape == (6,)
    for i in range(6):  # brute force for sample i
        cos_m, z_m, f_m, sq = [], [], [], 0.0
        for n in sorted(V):
            for l in range(L):
                g = np.asarray(tree[n]["delta_s"][i, l], np.float64)
                v = np.asarray(V[n][l], np.float64)
                cos_m.append(v[0] @ g / np.linalg.norm(g))
                z_m.append(cos_m[-1] * np.sqrt(g.size))
                f_m.append(np.linalg.norm(np.maximum(v @ g, 0)) / np.linalg.norm(g))
                sq += g @ g
        np.testing.assert_allclose(r["cos_S_contrib"][i], np.mean(cos_m), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["z"][i], np.mean(z_m), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["hackward_frac"][i], np.mean(f_m), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["grad_norm_contrib"][i], np.sqrt(sq), rtol=1e-5)
    # a gradient along +v1 has cos 1; along -v1 cos -1 and no hack-ward fraction
    along = {n: {"delta_s": V[n][:, 0], "delta_s_hack": V[n][:, 0]} for n in V}
    assert abs(float(cosines.gradient_cosines(V, along)["cos"]) - 1.0) < 1e-5
    anti = jax.tree.map(lambda x: -x, along)
    res = cosines.gradient_cosines(V, anti)
    assert abs(float(res["cos"]) + 1.0) < 1e-5 and float(res["hackward_frac"]) < 1e-6


def test_dropped_rows_are_ignored_in_means():
    tree = svd_tree(11)
    V = v_for(tree, k=1)
    V_drop = {n: v.at[0].set(0.0) if n == "q_proj" else v for n, v in V.items()}  # layer 0 dropped
    stats = cosines.module_cosines(V_drop, modules.to_module_vectors(tree))
    assert not bool(stats["valid"]["q_proj"][0]) and bool(stats["valid"]["q_proj"][1])
    kept = [stats["cos"][n][l] for n in sorted(V) for l in range(L) if not (n == "q_proj" and l == 0)]
    np.testing.assert_allclose(cosines.aggregate(stats)["cos"], np.mean(kept), rtol=1e-5)


# ------------------------------------------------------------------ issue 13: verdict inputs

def test_overprojection_is_a_per_module_count_not_a_negative_mean():
    """An honest one-sided erase of a gradient whose modules mostly point away from v_hack has a
    clearly negative mean cos_out (the old rule called that a bug) but over-projects no module;
    overshoot 2 does over-project the modules that fired."""
    tree = svd_tree(11)
    V = v_for(tree, k=1)
    g = {n: v - 1.5 * jnp.linalg.norm(v, axis=-1, keepdims=True) * V[n][:, 0] for n, v in
         modules.to_module_vectors(tree).items()}
    g["q_proj"] = g["q_proj"].at[0].set(g["q_proj"][0] + 4.0 * jnp.linalg.norm(g["q_proj"][0]) * V["q_proj"][0, 0])
    grads = modules.from_module_vectors(g, tree)
    tx = hack_projection(V, mode="erase", gate="one_sided")
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    m = projection_metrics(state)
    assert float(m["mean_cos_out"]) < -0.05           # the old mean rule would say "bug"
    assert float(m["n_overprojected"]) == 0.0
    assert float(m["frac_fired"]) > 0 and 0 < float(m["removed_frac"]) < 1
    tx = hack_projection(V, mode="erase", gate="one_sided", overshoot=2.0)
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert float(projection_metrics(state)["n_overprojected"]) == 1.0  # only q_proj layer 0 fired


def test_clip_runs_after_projection_over_what_is_trained():
    """A large hack-ward gradient: the clipped step of delta_s has the full clip norm (the old chain
    clipped first, over a tree holding delta_s_hack's duplicate: the delta_s step was <= 1/sqrt(2))."""
    params = jax.tree.map(jnp.zeros_like, svd_tree(12))
    V = v_for(params, k=1)
    grads = svd_tree(13)
    grads = {n: {"delta_s": 100 * m["delta_s"], "delta_s_hack": 100 * m["delta_s"]} for n, m in grads.items()}
    opt = chain_with_projection(optax.sgd(1.0), V, clip=optax.clip_by_global_norm(1.0), mode="erase")
    u, _ = opt.update(grads, opt.init(params), params)
    norm = np.sqrt(sum(float(jnp.sum(jnp.square(m["delta_s"]))) for m in u.values()))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-5)
    assert not any(np.any(m["delta_s_hack"]) for m in u.values())
    # update placement: the duplicate is zeroed before the clip too
    opt = projected_adamw(V, 1e-2, mode="erase", placement="update", max_grad_norm=1.0)
    u, st = opt.update(grads, opt.init(params), params)
    assert not any(np.any(m["delta_s_hack"]) for m in u.values())


def test_update_cosine_measures_the_adam_leak():
    """Gradient placement: the projected gradient w has no hack-ward part, but Adam's first step is
    ~sign(w), which here has one (v is built from sign(w)); update_cos sees that leak, and update
    placement closes it."""
    params = jax.tree.map(jnp.zeros_like, svd_tree(14))
    w = modules.to_module_vectors(svd_tree(15))  # {name: [L, dim]}
    V = {}
    for n, x in w.items():
        x = np.asarray(x)
        s = np.sign(x)
        v = s - (np.sum(s * x, -1, keepdims=True) / np.sum(x * x, -1, keepdims=True)) * x  # v _|_ w
        V[n] = jnp.asarray((v / np.linalg.norm(v, axis=-1, keepdims=True))[:, None, :], jnp.float32)
    grads = modules.from_module_vectors({n: w[n] + 3.0 * V[n][:, 0] for n in w}, params)
    leaks = {}
    for placement in ("gradient", "update"):
        opt = projected_adamw(V, 1e-2, mode="erase", placement=placement, max_grad_norm=0.0)
        u, state = opt.update(grads, opt.init(params), params)
        leaks[placement] = float(update_metrics(V, u)["update_cos"])
        assert float(projection_metrics(state)["mean_cos_in"]) > 0.3
    assert leaks["gradient"] > 0.1 and leaks["update"] <= 1e-6


def test_freeze_lora_a_zeroes_a_only():
    lt = lora_tree(16)
    tx = freeze_lora_a()
    out, _ = tx.update(lt, tx.init(lt))
    for n, m in out.items():
        assert not np.any(m["a"]) and np.array_equal(m["b"], lt[n]["b"])


def test_null_baseline_matches_random_directions():
    tree = svd_tree(17)
    V = v_for(tree, k=2)
    rng = np.random.default_rng(1)
    means = []
    for i in range(400):
        g = {n: jnp.asarray(rng.standard_normal((L, d)), jnp.float32) for n, d in SVD_DIMS.items()}
        means.append(float(cosines.aggregate(cosines.module_cosines(V, g))["cos"]))
    np.testing.assert_allclose(np.std(means), null_cos_sd(V), rtol=0.15)
    expect = np.mean([np.sqrt(2 / d) for d in SVD_DIMS.values()])  # equal layers per module
    np.testing.assert_allclose(null_abs_cos(V), expect, rtol=1e-6)


def test_overprojection_count_ignores_the_norm_shrink_of_an_honest_erase_with_k_rows():
    """k = 3: erasing rows 2-3 shrinks |g|, so a negative top-1 cos_out is more negative than cos_in
    (a naive per-module cosine rule counts it); measured against |g_in| nothing is over-projected."""
    tree = svd_tree(18)
    V = v_for(tree, k=3)
    g = {n: v - 2.0 * V[n][:, 0] * jnp.linalg.norm(v, axis=-1, keepdims=True) / 4
         + 3.0 * (V[n][:, 1] + V[n][:, 2]) * jnp.linalg.norm(v, axis=-1, keepdims=True)
         for n, v in modules.to_module_vectors(tree).items()}
    grads = modules.from_module_vectors(g, tree)
    tx = hack_projection(V, mode="erase", gate="one_sided")
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    naive = sum(int(np.sum(np.asarray(state.cos_out[n]) < np.minimum(np.asarray(state.cos_in[n]), 0) - 1e-4))
                for n in V)
    assert naive > 0 and float(state.n_overprojected) == 0.0
