"""The shared-prompt learner on a mesh (tests/mesh_shared_prompt_run.py in a subprocess with 4 fake CPU
devices): whole groups per device, and the reference log-probs, the new adapter and the metrics equal the
one-device per-row layout's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_shared_prompt") / "results.json"
    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")  # compile-time-only CPU flags, as the other mesh tests
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "mesh_shared_prompt_run.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["shared_mesh", "rows_mesh"])
def test_mesh_learner_equals_one_device_rows_layout(results, name):
    one, other = results["rows_one"], results[name]
    m = np.asarray(results["completion_mask"], bool)
    np.testing.assert_allclose(np.asarray(other["ref"])[m], np.asarray(one["ref"])[m], atol=1e-5)
    for a, b in zip(other["new"], one["new"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert other["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    assert other["n_tokens"] == one["n_tokens"] == m.sum()
    assert not np.allclose(one["new"][0], results["old"][0])  # the update moved the adapter
