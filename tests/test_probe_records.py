"""Probe record schema: round trip, atomic writes, and errors that name file, line and field."""

import gzip
import json
import math

import numpy as np
import pytest

from jaxhack.probes import records as probe_records
from jaxhack.probes.records import ProbeRecordError, read_run, write_run_info, write_step


def make_record(step=0, sample_id=0, **overrides):
    record = {
        "step": step, "sample_id": sample_id, "src_pool": "teacher_pool", "src_step": 3, "src_sample": 5,
        "reward": 3.5, "hacked": True, "gt_pass": False, "fmt_ok": True, "comp_len": 120,
        "cos_S_contrib": 0.42, "grad_norm_contrib": 1.7, "mean_cos_in": 0.31, "mean_cos_out": 0.02,
        "frac_fired": 0.6, "arm": "projected",
    }
    record.update(overrides)
    return record


def write_gz_lines(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def test_round_trip_with_numpy_scalars_nan_and_extras(tmp_path):
    step_records = [
        make_record(7, 0, cos_S_contrib=np.float32(0.25), reward=np.float64(3.5), comp_len=np.int64(99),
                    hacked=np.bool_(True), adv=1.625, z=2.5, hackward_frac=0.75),
        make_record(7, 1, src_pool="base_pool", hacked=False, reward=0, cos_S_contrib=float("nan"),
                    adv=-1.625, z=None),
    ]
    path = write_step(tmp_path, 7, step_records)
    info = {"arm": "projected", "loss_mode": "grpo", "gate": "one_sided"}
    write_run_info(tmp_path, info)
    assert path.name == "step_007.cos.jsonl.gz"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["run.json", "step_007.cos.jsonl.gz"]

    loaded, loaded_info = read_run(tmp_path)
    assert loaded_info == info
    assert [record["sample_id"] for record in loaded] == [0, 1]
    first, second = loaded
    assert first["cos_S_contrib"] == pytest.approx(0.25) and type(first["cos_S_contrib"]) is float
    assert first["comp_len"] == 99 and type(first["comp_len"]) is int
    assert first["hacked"] is True and first["adv"] == 1.625 and first["hackward_frac"] == 0.75
    assert second["reward"] == 0.0 and type(second["reward"]) is float
    assert math.isnan(second["cos_S_contrib"]) and math.isnan(second["z"])
    assert "hackward_frac" not in second
    # strict JSON on disk: NaN is stored as null
    raw_lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert json.loads(raw_lines[1])["cos_S_contrib"] is None
    assert "NaN" not in raw_lines[1]


def test_records_sorted_across_step_files(tmp_path):
    write_step(tmp_path, 12, [make_record(12, 1), make_record(12, 0)])
    write_step(tmp_path, 2, [make_record(2, 0)])
    loaded, info = read_run(tmp_path)
    assert [(record["step"], record["sample_id"]) for record in loaded] == [(2, 0), (12, 0), (12, 1)]
    assert info == {}


@pytest.mark.parametrize(
    "overrides, removed, field, expected_text",
    [
        ({}, "cos_S_contrib", "cos_S_contrib", "required field missing"),
        ({"reward": "3.5"}, None, "reward", "expected finite float"),
        ({"reward": float("nan")}, None, "reward", "NaN not allowed"),
        ({"hacked": 1}, None, "hacked", "expected bool"),
        ({"comp_len": 12.0}, None, "comp_len", "expected int"),
        ({"sample_id": True}, None, "sample_id", "expected int"),
        ({"src_pool": ""}, None, "src_pool", "expected non-empty str"),
        ({"mean_cos_in": 1.5}, None, "mean_cos_in", "[-1, 1]"),
        ({"frac_fired": 1.2}, None, "frac_fired", "[0, 1]"),
        ({"grad_norm_contrib": -0.1}, None, "grad_norm_contrib", ">= 0"),
        ({"adv": float("inf")}, None, "adv", "finite float"),
        ({"cos_s_contrib": 0.1}, None, "cos_s_contrib", "unknown field"),
    ],
)
def test_write_step_rejects_bad_record_and_writes_nothing(tmp_path, overrides, removed, field, expected_text):
    bad = make_record(4, 1)
    bad.update(overrides)
    if removed:
        del bad[removed]
    with pytest.raises(ProbeRecordError) as caught:
        write_step(tmp_path, 4, [make_record(4, 0), bad])
    message = str(caught.value)
    assert f"field '{field}'" in message
    assert expected_text in message
    assert "step_004.cos.jsonl.gz: record 1: field" in message
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file left


def test_write_step_rejects_step_mismatch_inconsistency_duplicates_and_empty(tmp_path):
    with pytest.raises(ProbeRecordError, match="expected step 3"):
        write_step(tmp_path, 3, [make_record(4, 0)])
    with pytest.raises(ProbeRecordError, match="field 'mean_cos_in'.*same on every record"):
        write_step(tmp_path, 3, [make_record(3, 0), make_record(3, 1, mean_cos_in=0.5)])
    with pytest.raises(ProbeRecordError, match="duplicate sample_id 0"):
        write_step(tmp_path, 3, [make_record(3, 0), make_record(3, 0)])
    with pytest.raises(ProbeRecordError, match="no records"):
        write_step(tmp_path, 3, [])
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_file_atomically(tmp_path):
    write_step(tmp_path, 1, [make_record(1, 0, reward=1.0)])
    write_step(tmp_path, 1, [make_record(1, 0, reward=2.0)])
    loaded, _ = read_run(tmp_path)
    assert [record["reward"] for record in loaded] == [2.0]
    assert [entry.name for entry in tmp_path.iterdir()] == ["step_001.cos.jsonl.gz"]


def test_reader_error_names_file_line_and_field(tmp_path):
    good = json.dumps(make_record(5, 0))
    bad_type = json.dumps(make_record(5, 1, reward="high"))
    path = tmp_path / "step_005.cos.jsonl.gz"
    write_gz_lines(path, [good, bad_type])
    with pytest.raises(ProbeRecordError) as caught:
        read_run(tmp_path)
    assert f"{path}:2: field 'reward': expected finite float" in str(caught.value)
    assert caught.value.line == 2 and caught.value.field == "reward"

    missing = make_record(5, 1)
    del missing["arm"]
    write_gz_lines(path, [good, good.replace('"sample_id": 0', '"sample_id": 2'), json.dumps(missing)])
    with pytest.raises(ProbeRecordError, match=r"step_005\.cos\.jsonl\.gz:3: field 'arm': required field missing"):
        read_run(tmp_path)


def test_reader_rejects_invalid_json_nan_token_wrong_step_and_corrupt_gzip(tmp_path):
    path = tmp_path / "step_000.cos.jsonl.gz"
    write_gz_lines(path, [json.dumps(make_record(0, 0)), "{not json"])
    with pytest.raises(ProbeRecordError, match=r"step_000\.cos\.jsonl\.gz:2: invalid JSON"):
        read_run(tmp_path)
    write_gz_lines(path, [json.dumps(make_record(0, 0)).replace("0.42", "NaN")])
    with pytest.raises(ProbeRecordError, match=r":1: invalid JSON.*NaN"):
        read_run(tmp_path)
    write_gz_lines(path, [json.dumps(make_record(9, 0))])
    with pytest.raises(ProbeRecordError, match=r":1: field 'step': expected step 0 \(from the file name\)"):
        read_run(tmp_path)
    write_gz_lines(path, [json.dumps(make_record(0, 0)), json.dumps(make_record(0, 1, frac_fired=0.1))])
    with pytest.raises(ProbeRecordError, match=r":2: field 'frac_fired'"):
        read_run(tmp_path)
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ProbeRecordError, match=r"step_000\.cos\.jsonl\.gz: cannot read gzip"):
        read_run(tmp_path)


def test_read_run_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no step_NNN"):
        read_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_run(tmp_path / "absent")
    write_step(tmp_path, 0, [make_record(0, 0)])
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ProbeRecordError, match="run.json: expected a JSON object"):
        read_run(tmp_path)


def test_run_info_is_strict_json(tmp_path):
    path = write_run_info(tmp_path, {"arm": "vanilla", "lr": 7e-5})
    assert json.loads(path.read_text()) == {"arm": "vanilla", "lr": 7e-5}
    with pytest.raises(ValueError):
        write_run_info(tmp_path, {"arm": "vanilla", "bad": float("nan")})
    assert json.loads(path.read_text()) == {"arm": "vanilla", "lr": 7e-5}  # old file untouched
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["run.json"]


def test_schema_field_names_match_design():
    assert probe_records.REQUIRED_FIELDS == (
        "step", "sample_id", "src_pool", "src_step", "src_sample", "reward", "hacked", "gt_pass", "fmt_ok",
        "comp_len", "cos_S_contrib", "grad_norm_contrib", "mean_cos_in", "mean_cos_out", "frac_fired", "arm",
    )
    typed = (probe_records.INT_FIELDS + probe_records.STR_FIELDS + probe_records.BOOL_FIELDS
             + probe_records.FINITE_FLOAT_FIELDS + probe_records.NAN_ALLOWED_FLOAT_FIELDS)
    assert sorted(typed) == sorted(probe_records.REQUIRED_FIELDS)
