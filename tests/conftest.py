"""Shared test fixtures: tiny random Hugging Face Qwen3 checkpoints built with transformers.

All are session-scoped and written under pytest's tmp_path_factory (built once per test run and xdist
worker, ~1 s each).
- tiny_hf_dir:          untied, fp32, single model.safetensors (config.TINY shapes, seed 0)
- tiny_hf_dir_tied:     tied embeddings, fp32, single file (seed 1)
- tiny_hf_dir_sharded:  same weights as tiny_hf_dir, saved in several shards + index json
- tiny_params:          (params, config) converted from tiny_hf_dir, fp32 jax arrays
Also (below): one JAX persistent compilation cache for the run, shared by the xdist workers, removed at
exit; compile-time-only XLA flags; the xdist groups and the order the workers take the test files in.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import jaxhack without an install

# One JAX persistent compilation cache for the test session, set in the environment before jax is
# imported, so the subprocesses the tests start (tests/mesh_runs.py, the two-process run, Ray workers,
# scripts) use it too. In-process jit caches only serve calls of the same function object (the
# trainer's update is cached per run settings, learner.cached_update_fn; scripts/bench_phase3.py builds
# one per mesh line); an equal program built again (other settings that do not change it, another
# call, another process) is loaded from here instead of compiled. A hit is the executable a compile of
# the same program (same XLA flags and devices) gives, so no test checks anything different.
# A JAX_COMPILATION_CACHE_DIR already set is used as it is.
#
# Under pytest-xdist (pyproject.toml's addopts: -n 2) the controller process imports this file first and
# its workers inherit its environment, so the workers and their subprocesses share this one cache, made
# once per test run (mkdtemp: never one left by an earlier run) and removed when the controller exits.
# Several processes then read and write it at once. JAX writes an entry in place (no temporary file and
# rename): a reader can see it half-written, which JAX reports as a warning and compiles again. A size
# bound makes JAX hold a file lock (<cache>/.lockfile) around every read and write, so no process ever
# reads a half-written entry; 4 GiB is far above what the suite writes, so nothing is evicted.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="jaxhack-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    atexit.register(shutil.rmtree, _jax_cache, True)

# Compile-time-only XLA flags, the ones tests/test_mesh_runs.py already gives its subprocesses: LLVM
# compiles the suite's tiny programs at -O0 without its expensive passes. Compiling is most of the
# suite's CPU time: on tests/test_losses.py + tests/test_sampler.py they cut the CPU time by ~40%. Every
# process of the run (xdist workers, subprocesses, Ray and organism workers) inherits them, so programs
# compared with each other are compiled alike; the comparisons with torch / NumPy keep their tolerances.
# An XLA_FLAGS that already sets an optimization level is left as it is.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

# ---- pytest-xdist: pyproject.toml's addopts run the suite on 2 worker processes ----------------------
# (-n 2 --dist loadgroup --no-loadscope-reorder; `-n 0` runs it in this one process, where nothing of
# this section applies.) Each worker builds its own session and module fixtures, so each test file is one
# xdist group (its module fixtures are built once), and the files whose tests use an expensive session
# fixture of this file (SHARED_SESSION_FIXTURES) form one group (it is built once). The groups go to the
# workers in the order of SLOW_FILES (the slowest files, measured, first: the two workers then end about
# together), then in file order.
SHARED_SESSION_FIXTURES = ("probe_inputs",)
SLOW_FILES = ("test_organism_rise.py", "test_sampler.py", "test_fused_decode.py", "test_sweep_ray.py",
              "test_mesh_sampler.py", "test_trainer.py", "test_mesh_runs.py", "test_run_dirs.py", "test_bench_phase3.py",
              "test_decode_attention.py", "test_losses.py", "test_probes.py", "test_shared_prompt.py",
              "test_mesh_shared_prompt.py", "test_env_grader.py", "test_per_sample.py", "test_projection.py",
              "test_check_sampler_form.py", "test_lend.py", "test_microbatch.py")  # session 20's --durations, slowest first
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # on a GPU machine each worker would otherwise preallocate most of the GPU's memory for itself
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if not XDIST_WORKER:
        return
    group = {item.path: item.path.name for item in items}
    for item in items:
        for name in SHARED_SESSION_FIXTURES:
            if name in item.fixturenames:
                group[item.path] = name
    rank = {}
    for path, name in group.items():
        rank[name] = min(rank.get(name, len(SLOW_FILES)),
                         SLOW_FILES.index(path.name) if path.name in SLOW_FILES else len(SLOW_FILES))
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(group[item.path]))
    items.sort(key=lambda item: rank[group[item.path]])  # stable: in file order within a rank


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_untied")
    make_tiny_hf_model(out, seed=0, tie=False)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir_tied(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_tied")
    make_tiny_hf_model(out, seed=1, tie=True)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir_sharded(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_sharded")
    make_tiny_hf_model(out, seed=0, tie=False, max_shard_size="100KB")
    return out


@pytest.fixture(scope="session")
def tiny_params(tiny_hf_dir):
    import jax

    from jaxhack.models.convert import load_hf_params

    params, config = load_hf_params(tiny_hf_dir, dtype="float32", progress=False)
    return jax.device_put(params), config


@pytest.fixture(scope="session")
def probe_inputs(tmp_path_factory) -> dict:
    """Small finished inputs for the CLI tests (tests/test_run_dirs.py, tests/test_cli_errors.py):
    template teacher / base pools (1 step x 4) and an SVD v_hack of the tiny model, all written by
    `jaxhack.cli.main` in-process. Tests must copy them before changing them."""
    from jaxhack.cli import main

    root = tmp_path_factory.mktemp("probe_inputs")
    for kind in ("teacher", "base"):
        assert main(["pool", "--mode", "run_tests", "--kind", kind, "--steps", "1", "--per-step", "4",
                     "--out", str(root / f"{kind}_pool"), "--no-progress"]) == 0
    assert main(["extract", "--ckpt", "tiny", "--pairs-from", "pools", "--teacher", str(root / "teacher_pool"),
                 "--base", str(root / "base_pool"), "--max-prompt-tokens", "32", "--max-len", "64",
                 "--out", str(root / "v_hack_svd")]) == 0
    small = ["--max-prompt-tokens", "32", "--max-completion-tokens", "32"]
    assert main(["phase2", "--replay-dirs", f"{root / 'teacher_pool'},{root / 'base_pool'}", "--steps", "2",
                 "--per-pool", "2", "--v-hack", str(root / "v_hack_svd"), "--out", str(root / "p2"), *small]) == 0
    return {"root": root, "teacher": root / "teacher_pool", "base": root / "base_pool",
            "v_hack": root / "v_hack_svd", "p2": root / "p2", "small": small}
