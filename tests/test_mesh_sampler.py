"""The refill sampler on a mesh (tests/mesh_sampler_run.py in a subprocess with 4 fake CPU devices):
each device refills its own slots from its part of the rows and the tokens are one device's."""
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
    out = tmp_path_factory.mktemp("mesh_sampler") / "results.json"
    # compile-time-only CPU flags (as tests/test_mesh_runs.py): every result of the subprocess uses them
    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(HERE.parent),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "mesh_sampler_run.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_mesh_refill_gives_one_devices_rows_in_fewer_steps_than_groups(results):
    one, refill, groups = results["one"], results["mesh_refill"], results["mesh_groups"]
    lengths, caps = np.asarray(one["lengths"]), np.asarray(results["caps"])
    assert any(one["finished"]) and (lengths < caps).any() and (lengths == caps).any()  # EOS and caps both
    for other in (refill, groups, results["mesh_refill_factored"]):
        np.testing.assert_array_equal(other["tokens"], one["tokens"])
        np.testing.assert_array_equal(other["lengths"], one["lengths"])
        np.testing.assert_array_equal(other["finished"], one["finished"])
        np.testing.assert_allclose(other["logprobs"], one["logprobs"], atol=2e-4)
    # 4 devices x 2 slots: the largest device's count, fewer than one device's 2 slots and the mesh's groups
    assert refill["decode_steps"] < one["decode_steps"]
    assert refill["decode_steps"] < groups["decode_steps"]


def test_each_device_refills_its_part_on_its_own_weights(results):
    """The two refill calls on the mesh (exact and factored) ran one part per device, each on the
    weights' shard of that device and with that device as the default for new arrays."""
    expected = [[d, d] for d in results["devices"]] * 2  # JSON: pairs come back as lists
    assert results["placed"] == sorted(expected)
