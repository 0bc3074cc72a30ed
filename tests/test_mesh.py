"""jaxhack.parallel.mesh: mesh specs, their one-line errors, and the --mesh flag (one CPU device here;
the multi-device runs are in tests/test_mesh_runs.py)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxhack.parallel import mesh as M
from jaxhack.rl.config import RESUME_FREE_FIELDS, make_config


@pytest.mark.parametrize("spec, axes", [(None, None), ("", None), ("data=8", {"data": 8}),
                                        (" data = 2 ", {"data": 2}), ("data=4,fsdp=1", {"data": 4})])
def test_parse(spec, axes):
    assert M.parse_mesh_spec(spec) == axes


@pytest.mark.parametrize("spec, words", [("data", "axis=size"), ("model=2", "unknown axis"),
                                         ("data=two", "integer"), ("data=0", ">= 1"),
                                         ("data=2,data=2", "twice"), ("data=4,fsdp=2", "not implemented")])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(ValueError, match=words) as err:
        M.parse_mesh_spec(spec)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=words):
        make_config("smoke", mesh=spec)


def test_more_devices_than_visible():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"needs {n + 1} devices but only {n}"):
        M.make_mesh(f"data={n + 1}")
    mesh = M.make_mesh(f"data={n}")
    assert mesh.shape["data"] == n and M.make_mesh(None) is None


def test_rows_and_host_round_trip():
    mesh = M.make_mesh("data=1")
    assert M.round_rows(7, None) == 7 and M.round_rows(7, mesh) == 7
    x = np.arange(12.0).reshape(4, 3)
    g = M.to_global(x, M.row_sharded(mesh))
    np.testing.assert_array_equal(M.to_host(g), x)
    assert M.is_primary()


def test_mesh_is_not_part_of_the_resume_identity():
    assert "mesh" in RESUME_FREE_FIELDS


def test_cli_bad_mesh_is_a_user_error(capsys):
    from jaxhack.cli import main
    assert main(["train", "--mesh", "data=x", "--run-dir", "/tmp/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "mesh" in err[0]


def test_cli_too_many_devices_is_a_user_error(tmp_path, capsys):
    from jaxhack.cli import main
    run_dir = tmp_path / "run"
    assert main(["train", "--mesh", f"data={len(jax.devices()) + 1}", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devices" in err[0]
    assert not run_dir.exists()
