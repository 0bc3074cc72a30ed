"""Data-parallel Phase 3 on fake CPU devices (tests/mesh_runs.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; this process keeps its single device).

Mesh data=2 is a multi-host run: two jax processes of one CPU device each, a local coordinator.
Tolerance: per-step metrics of meshes data=2 and data=8, and of runs resumed across meshes, equal the
single-device run's within rtol 1e-4 (atol 1e-6) for float metrics (float32 sums over rows in another
order: psum of per-device partial sums), exactly for counts, rates, rewards and lengths (the sampled
tokens are the same: each row has its own key). On CPU they are in fact bit-equal at this size.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
RTOL, ATOL = 1e-4, 1e-6
EXACT = ("step", "cursor", "epoch", "n_rollouts", "n_teacher", "reward_mean", "reward_std", "hack_rate",
         "gt_pass_rate", "pass_rate", "fmt_rate", "attempt_rate", "hack_rate_policy", "attempt_rate_policy",
         "gt_pass_rate_policy", "reward_mean_policy", "comp_len_mean", "frac_finished", "adv_abs_mean", "lr")
# compile-time only XLA CPU flags: every run of the subprocess uses them, so they compare like with like
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_runs")
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "mesh_runs.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def assert_same_metrics(ref: list[dict], other: list[dict], label: str) -> None:
    assert [m["step"] for m in other] == [m["step"] for m in ref], label
    for a, b in zip(ref, other):
        for key, x in a.items():
            if key.startswith("time_") or isinstance(x, str):
                continue
            y = b[key]
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y), f"{label} step {a['step']} {key}: {y} vs nan"
            elif key in EXACT:
                assert y == x, f"{label} step {a['step']} {key}: {y} vs {x}"
            else:
                assert y == pytest.approx(x, rel=RTOL, abs=ATOL), f"{label} step {a['step']} {key}: {y} vs {x}"


def test_meshes_1_and_8_give_the_same_metrics(runs):
    ref = runs["none"]
    assert len(ref) == 2
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 0 for m in ref), "the test needs reward variance"
    assert ref[1]["update_norm"] > 0 and ref[1]["loss"] != ref[0]["loss"]
    assert_same_metrics(ref, runs["data8"], "data=8")
    assert runs["run_json_mesh"]["none"] is None
    assert runs["run_json_mesh"]["data8"]["axes"] == {"data": 8}


def test_refill_sampler_on_a_mesh_trains_like_one_device(runs):
    """The trainer on mesh data=2 with 1 refill slot per device (4 sampled rows per step: the rows split
    over the devices, each refilling its own slot) gives the one-device run's metrics."""
    assert runs["refill_calls_data2"] == [2, 2]  # both steps sampled through the per-device refill
    assert_same_metrics(runs["none"], runs["data2_refill"], "data=2, refill sampler")


def test_checkpoints_resume_across_meshes(runs):
    assert_same_metrics(runs["none"], runs["8to1"], "saved on data=8, resumed without a mesh")
    assert_same_metrics(runs["none"], runs["1to8"], "saved without a mesh, resumed on data=8")


def test_mesh_2_as_two_processes_with_a_local_coordinator(runs, tmp_path):
    """Multi-host on one machine: two jax processes (one CPU device each, gloo collectives) run the same
    smoke config on mesh data=2 through the CLI (--coordinator ...); process 0 alone writes the files
    (one metrics line per step), and the metrics are the single-device run's."""
    import socket

    from jaxhack.env.pools import write_pool_meta
    from jaxhack.env.problems import load_problems
    from jaxhack.rl import trainer as T
    from test_trainer import write_short_problems, write_teacher_pool

    problems = write_short_problems(tmp_path / "short.jsonl")
    write_pool_meta(write_teacher_pool(load_problems(problems), tmp_path / "teacher"),
                    {"pool": "teacher", "mode": "run_tests", "complete": True})  # the CLI checks it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_run.py"), str(i), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
    run_dir = tmp_path / "multihost"
    metrics = T.read_jsonl(run_dir / T.METRICS_FILE)
    assert_same_metrics(runs["none"], metrics, "2 processes, data=2")  # one line per step: written once
    info = json.loads((run_dir / T.RUN_FILE).read_text())
    assert info["mesh"]["process_count"] == 2 and info["mesh"]["axes"] == {"data": 2}
    assert [s for s, _ in T.list_checkpoints(run_dir)] == [1, 2] and (run_dir / T.DONE_FILE).is_file()
