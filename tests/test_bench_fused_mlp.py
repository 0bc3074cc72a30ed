"""scripts/bench_fused_mlp.py: the persistent MLP kernel's stream-K split covers every unit of work once
and its reductions find each block's contributors; the kernel (its phases run by the interpreter)
computes the MLP block within bf16 rounding of the split path, deterministically; bad arguments are
one-line errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_script


def _script():
    return load_script("bench_fused_mlp")


@pytest.mark.parametrize("units,num_k,programs", [(3040, 40, 132), (3040, 152, 132), (16, 2, 5), (17, 4, 3)])
def test_stream_k_split_covers_each_unit_once(units, num_k, programs):
    bench = _script()
    owners = np.full(units, -1)
    for p in range(programs):
        u0, u1 = bench._program_units(p, units, programs)
        assert (owners[u0:u1] == -1).all()
        owners[u0:u1] = p
        assert u1 // num_k - u0 // num_k + 1 <= bench._max_segments(units, num_k, programs)
    assert (owners >= 0).all() and (np.diff(owners) >= 0).all()
    assert [bench._owner(u, units, programs) for u in range(units)] == owners.tolist()


def _inputs(B, D, F, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(k[0], (B, D)).astype(jnp.bfloat16),
            (1 + 0.1 * jax.random.normal(k[1], (D,))).astype(jnp.bfloat16),
            (0.05 * jax.random.normal(k[2], (D, 2 * F))).astype(jnp.bfloat16),
            (0.05 * jax.random.normal(k[3], (F, D))).astype(jnp.bfloat16))


def test_kernel_equals_the_mlp_block_within_bf16_rounding():
    """Against the block in fp32 on the same bf16 inputs: the kernel's error is of the split path's
    size (both round to bf16 on the way), and two runs give the same bits (fixed reduction order)."""
    bench = _script()
    h, norm, w_gate_up, w_down = _inputs(16, 256, 512)
    exact = bench.reference_mlp(*(a.astype(jnp.float32) for a in (h, norm, w_gate_up, w_down)), eps=1e-6)
    split = bench.reference_mlp(h, norm, w_gate_up, w_down, eps=1e-6)
    run = lambda: bench.fused_mlp(h, norm, w_gate_up, w_down, eps=1e-6, programs=5,  # noqa: E731
                                  implementation="interpret", block_f=64, block_d=64)
    got = run()
    assert got.dtype == jnp.bfloat16 and got.shape == h.shape
    delta = np.asarray(exact) - np.asarray(h, np.float32)  # what the block adds to the residual

    def rel(x):
        return np.linalg.norm(np.asarray(x, np.float32) - np.asarray(exact)) / np.linalg.norm(delta)
    assert rel(got) < 3 * rel(split) + 1e-3
    assert rel(got) < 2e-2
    np.testing.assert_array_equal(np.asarray(run()), np.asarray(got))


def test_bench_small_writes_the_three_implementations(tmp_path):
    out = tmp_path / "mlp.jsonl"
    assert _script().main(["--small", "--implementation", "interpret", "--layers", "1", "--runs", "1",
                           "--batch", "16", "--hbm-tbps", "0.001", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in records] == ["xla", "fused", "phased"]
    for r in records:
        assert r["deterministic"] and r["rel_diff_vs_xla"] < 2e-2 and r["us"] > 0
        assert r["fraction_of_bandwidth"] == pytest.approx(
            (256 * 512 * 2 + 512 * 256) * 2 / (r["us"] * 1e-6 * 1e9), rel=1e-2)


def test_bad_arguments_are_refused(capsys):
    bench = _script()
    with pytest.raises(ValueError, match="multiples of the tiles"):
        bench.fused_mlp(*_inputs(16, 256, 96), eps=1e-6, programs=2, implementation="interpret")
    with pytest.raises(ValueError, match="programs for"):
        bench.fused_mlp(*_inputs(16, 128, 128), eps=1e-6, programs=64, implementation="interpret")
    for argv, message in ([["--batch", "24"], "--batch [24]: expected multiples of 16"],
                          [["--layers", "0"], "--layers must be >= 1, got 0"],
                          [[], "the Pallas kernels need a GPU (backend: cpu)"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
