"""scripts/bench_decode_kernels.py: its split-K Pallas matmul (run by the interpreter) computes x @ W
in both weight layouts, and bad arguments are one-line errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_script


def _script():
    return load_script("bench_decode_kernels")


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_split_k_kernel_equals_the_matmul(layout):
    bench = _script()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    w = rng.standard_normal((256, 96) if layout == "kn" else (96, 256)).astype(np.float32)
    got = bench.skinny_matmul(jnp.asarray(x), jnp.asarray(w), layout, block_n=32, block_k=64, k_splits=2,
                              implementation="interpret")
    expected = x @ (w if layout == "kn" else w.T)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_bad_shapes_and_arguments_are_refused(capsys):
    bench = _script()
    x = jnp.zeros((24, 256))
    with pytest.raises(ValueError, match="power of two"):
        bench.skinny_matmul(x, jnp.zeros((256, 64)), implementation="interpret")
    with pytest.raises(ValueError, match="multiple of block_n"):
        bench.skinny_matmul(jnp.zeros((16, 256)), jnp.zeros((256, 48)), block_n=32, k_splits=1,
                            implementation="interpret")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rows", "24"])
    assert exit_info.value.code == 2
    assert "--rows [24]: expected powers of two" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batch", "64", "0"])
    assert exit_info.value.code == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--cache-len", "100"])
    assert exit_info.value.code == 2
    assert "--cache-len [100]: expected multiples of 128" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the kernel benchmarks' shared flags (checks.kernel_bench_flags)
        bench.main(["--hbm-tbps", "0"])
    assert exit_info.value.code == 2
    assert "--hbm-tbps must be > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--mosaic", "--small", "--implementation", "interpret"])
    assert exit_info.value.code == 2
    assert "--mosaic runs on a Hopper GPU only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the suite runs on a CPU
        bench.main([])
    assert exit_info.value.code == 2
    assert "the Pallas kernels need a GPU (backend: cpu)" in capsys.readouterr().err


def test_prefix_part_compares_the_prompt_pool_with_per_row_prompt_copies(tmp_path):
    """--part prefix (small shapes, the Pallas kernels run by the interpreter): both layouts give the
    whole softmax (bf16 against the fp32 reference) and the pool reads each group's prompt once."""
    import json

    out = tmp_path / "prefix.jsonl"
    assert _script().main(["--part", "prefix", "--small", "--implementation", "interpret", "--attention-calls", "1",
                           "--runs", "1", "--out", str(out)]) == 0
    rows, pool = (json.loads(line) for line in out.read_text().splitlines())
    assert (rows["impl"], pool["impl"]) == ("per_row_prompt_copies", "prompt_pool")
    assert rows["rel_err"] < 1e-2 and pool["rel_err"] < 1e-2
    per_token = 2 * 16 * 2 * 2  # Hkv x hd x (K, V) x bf16
    generated = pool["mean_generated"] * pool["slots"]
    np.testing.assert_allclose(pool["live_bytes"], (pool["mean_prompt"] * pool["prompts"] + generated) * per_token)
    assert rows["live_bytes"] > pool["live_bytes"] + (pool["group"] - 1) * pool["prompts"] * 64 * per_token


def test_stream_part_counts_one_read_for_the_sum_and_two_for_the_copy(tmp_path):
    """--part stream (small: 2 MB): the copy moves twice the bytes the sum reads, and each line's fraction
    is its bytes over time x --hbm-tbps."""
    import json

    out = tmp_path / "stream.jsonl"
    assert _script().main(["--part", "stream", "--small", "--implementation", "interpret", "--runs", "2",
                           "--hbm-tbps", "2.0", "--out", str(out)]) == 0
    read, copy = (json.loads(line) for line in out.read_text().splitlines())
    assert (read["kind"], copy["kind"]) == ("read", "copy") and read["gb"] == copy["gb"]
    assert read["bytes_moved"] == 2 * (1 << 20) and copy["bytes_moved"] == 2 * read["bytes_moved"]  # 1M bf16
    for rec in (read, copy):
        assert rec["tbps"] == pytest.approx(rec["bytes_moved"] / (rec["us"] * 1e-6) / 1e12, rel=1e-3)
        assert rec["fraction_of_bandwidth"] == pytest.approx(rec["tbps"] / 2.0, rel=1e-3)
