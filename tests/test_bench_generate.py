"""scripts/bench_generate.py refuses bad sizes with one line naming the flag, before building a model
(`--new-tokens 0` used to fall back to the default silently, `--batches x` to raise a traceback)."""
from __future__ import annotations

import pytest

from helpers import load_script


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--batches", "4,x"], "--batches '4,x': expected comma-separated integers"),
    (["--batches", ","], "--batches: give at least one value"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--prompt-len", "-3"], "--prompt-len must be >= 1, got -3"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0, got 0.0"),
    (["--hbm-tbps", "-1"], "--hbm-tbps must be > 0, got -1.0"),
])
def test_bad_sizes_are_one_line_errors(argv, message, capsys):
    bench = load_script("bench_generate")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--small", "--skip-torch", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_decode_kernel_choice_is_one_line_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("JAXHACK_DECODE_KERNEL", "fast")
    bench = load_script("bench_generate")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--small", "--skip-torch", "--batches", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "JAXHACK_DECODE_KERNEL='fast'; expected one of fused, split, fused-interpret" in err and "Traceback" not in err


def test_roofline_floor_takes_the_longer_of_reads_and_flops_per_part():
    """At Qwen3-4B shape on an H200 (4.8 TB/s, 989 TFLOP/s): batch 64's matmuls are read-bound, so the
    roofline is the bandwidth floor; at batch 256 their FLOPs take longer than their reads, so the
    roofline floor is longer than the bandwidth one by exactly that difference (session 17's 7.11 ms
    against 6.71 ms)."""
    from jaxhack.models.config import QWEN3_4B
    bench = load_script("bench_generate")
    for batch, compute_bound in ((64, False), (256, True)):
        bw = bench.bandwidth_floor(QWEN3_4B, batch, 128, 1024, 4.8)
        roof = bench.roofline_floor(QWEN3_4B, batch, 128, 1024, 4.8, 989.0)
        reads_s = bw["weight_gb"] * 1e9 / 4.8e12
        flops_s = 2 * bench.param_count(QWEN3_4B) * batch / 989e12
        assert roof["weights_compute_bound"] is compute_bound
        assert roof["weights_s"] == pytest.approx(max(reads_s, flops_s), rel=1e-12)
        assert roof["attention_s"] == pytest.approx(bw["kv_read_gb_per_step"] * 1e9 / 4.8e12, rel=1e-12)
        extra = max(0.0, flops_s - reads_s)
        assert roof["floor_s_per_step"] == pytest.approx(bw["floor_s_per_step"] + extra, rel=1e-12)
    assert 6.6e-3 < bw["floor_s_per_step"] < 6.8e-3 and 7.0e-3 < roof["floor_s_per_step"] < 7.2e-3
    # an H100 (3.35 TB/s): batch 256's reads take longer than its FLOPs, the two floors agree
    h100 = bench.roofline_floor(QWEN3_4B, 256, 128, 1024, 3.35, 989.0)
    assert not h100["weights_compute_bound"]
    assert h100["floor_s_per_step"] == pytest.approx(bench.bandwidth_floor(QWEN3_4B, 256, 128, 1024, 3.35)["floor_s_per_step"])
