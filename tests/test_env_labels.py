"""The attempted_hack label travels as an extra field: pool records (optional, type-checked) and
probe records (optional bool beside the slim schema, which stays as it was)."""
from __future__ import annotations

import pytest

from jaxhack.env.pools import PoolFormatError, read_pool_step, write_pool_step
from jaxhack.probes import records as probe_records
from jaxhack.probes.records import ProbeRecordError, read_run, write_step


def _pool_record(**overrides):
    record = {"pool": "p", "step": 0, "sample": 0, "problem_id": "syn-01", "mode": "run_tests",
              "prompt": "<|im_start|>...", "completion": "```python\npass\n```", "reward": 3.5,
              "passed": True, "gt_pass": True, "hacked": False, "fmt_ok": True, "comp_len": 20}
    record.update(overrides)
    return record


def test_pool_records_carry_attempted_hack_and_old_pools_still_read(tmp_path):
    path = write_pool_step(tmp_path, 0, [_pool_record(attempted_hack=True), _pool_record(sample=1)])
    first, old_style = read_pool_step(path)
    assert first["attempted_hack"] is True and "attempted_hack" not in old_style
    with pytest.raises(PoolFormatError, match="field 'attempted_hack': expected bool"):
        write_pool_step(tmp_path, 1, [_pool_record(attempted_hack="yes")])


def _probe_record(sample_id, **overrides):
    record = {"step": 0, "sample_id": sample_id, "src_pool": "teacher", "src_step": 1, "src_sample": 2,
              "reward": 3.5, "hacked": False, "gt_pass": True, "fmt_ok": True, "comp_len": 10,
              "cos_S_contrib": 0.1, "grad_norm_contrib": 1.0, "mean_cos_in": 0.2, "mean_cos_out": 0.0,
              "frac_fired": 0.5, "arm": "projected"}
    record.update(overrides)
    return record


def test_probe_records_take_attempted_hack_as_an_extra_bool(tmp_path):
    assert "attempted_hack" not in probe_records.REQUIRED_FIELDS
    write_step(tmp_path, 0, [_probe_record(0, attempted_hack=True), _probe_record(1)])
    loaded, _ = read_run(tmp_path)
    assert loaded[0]["attempted_hack"] is True and "attempted_hack" not in loaded[1]
    with pytest.raises(ProbeRecordError, match="attempted_hack"):
        write_step(tmp_path, 1, [_probe_record(0, step=1, attempted_hack=1.0)])
