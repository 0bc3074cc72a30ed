"""Probe record schema (seed's slim schema) and its writer / reader.

One probe step writes `OUT/step_NNN.cos.jsonl.gz`: one JSON object per line, one line per sample of
the step's batch. A run directory also holds `OUT/run.json` (arm, loss_mode, ...), written by
`write_run_info`. Both are written atomically (temporary file in the same directory + os.replace).

Field types (exact names from spec2 "Save discipline" / DESIGN.md "probe record"):

    step, sample_id, src_step, src_sample, comp_len      int (not bool), >= 0
    src_pool, arm                                        str, non-empty
    hacked, gt_pass, fmt_ok                              bool
    reward, grad_norm_contrib, frac_fired                float (an int is accepted), finite
    cos_S_contrib, mean_cos_in, mean_cos_out             float or NaN (JSON null)
    optional: adv (float, finite), hackward_frac, z      (float or NaN)
    optional: attempted_hack                             bool (the completion carries the mode's
                                                         exploit; see jaxhack.env.grader)
    optional step-level: n_overprojected, removed_frac   float, finite, >= 0 (modules over-projected;
                                                         removed / incoming gradient norm)
    optional step-level: update_cos                      float or NaN (cos of v_hack with -update)

NaN is allowed only in the cosine-like fields above (a cosine is undefined when the gradient it is
taken of is exactly zero, e.g. a sample with advantage 0, or a batch whose rewards are all equal).
NaN is stored as JSON null, so files are strict JSON. Ranges: cosines in [-1, 1],
frac_fired and hackward_frac in [0, 1], grad_norm_contrib >= 0 (small float slack allowed).

Step-level fields (mean_cos_in, mean_cos_out, frac_fired, arm) are the same on every record of a
step; the writer and the reader both check that, and that sample_id is unique within a step.

numpy scalars (np.integer, np.floating, np.bool_) are accepted by the writer and converted to
Python values; anything else of the wrong type is an error naming the field and the expected type.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np

from jaxhack.io import atomic_write_bytes

INT_FIELDS = ("step", "sample_id", "src_step", "src_sample", "comp_len")
STR_FIELDS = ("src_pool", "arm")
BOOL_FIELDS = ("hacked", "gt_pass", "fmt_ok")
FINITE_FLOAT_FIELDS = ("reward", "grad_norm_contrib", "frac_fired")
NAN_ALLOWED_FLOAT_FIELDS = ("cos_S_contrib", "mean_cos_in", "mean_cos_out")
REQUIRED_FIELDS = (
    "step", "sample_id", "src_pool", "src_step", "src_sample", "reward", "hacked", "gt_pass",
    "fmt_ok", "comp_len", "cos_S_contrib", "grad_norm_contrib", "mean_cos_in", "mean_cos_out",
    "frac_fired", "arm",
)
OPTIONAL_FINITE_FLOAT_FIELDS = ("adv", "n_overprojected", "removed_frac")
OPTIONAL_NAN_ALLOWED_FLOAT_FIELDS = ("hackward_frac", "z", "update_cos")
OPTIONAL_BOOL_FIELDS = ("attempted_hack",)
OPTIONAL_FIELDS = OPTIONAL_FINITE_FLOAT_FIELDS + OPTIONAL_NAN_ALLOWED_FLOAT_FIELDS + OPTIONAL_BOOL_FIELDS
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

COSINE_FIELDS = ("cos_S_contrib", "mean_cos_in", "mean_cos_out")
UNIT_INTERVAL_FIELDS = ("frac_fired", "hackward_frac")
NON_NEGATIVE_FLOAT_FIELDS = ("grad_norm_contrib", "n_overprojected", "removed_frac")
STEP_LEVEL_FIELDS = ("mean_cos_in", "mean_cos_out", "frac_fired", "arm")
RANGE_SLACK = 1e-5  # float32 rounding may put a cosine at 1.0000001

STEP_FILE_PATTERN = re.compile(r"^step_(\d+)\.cos\.jsonl\.gz$")
RUN_INFO_NAME = "run.json"


class ProbeRecordError(ValueError):
    """A probe record or file that does not follow the schema; the message says where and what.

    Message layout: "PATH:LINE: field 'F': DETAIL" when reading a file, "PATH: record I: field 'F':
    DETAIL" when writing records; parts that are unknown are left out.
    """

    def __init__(self, detail: str, path=None, line=None, field=None, record_index=None):
        location = ""
        if path is not None:
            location = f"{path}:{line}: " if line is not None else f"{path}: "
        if record_index is not None:
            location += f"record {record_index}: "
        field_text = f"field '{field}': " if field is not None else ""
        super().__init__(f"{location}{field_text}{detail}")
        self.detail = detail
        self.path = path
        self.line = line
        self.field = field
        self.record_index = record_index

    def located(self, path, line=None, record_index=None) -> "ProbeRecordError":
        """The same error with a file location (and line or record index)."""
        return ProbeRecordError(self.detail, path=path, line=line, field=self.field, record_index=record_index)


def step_file_name(step: int) -> str:
    """`step_NNN.cos.jsonl.gz` (at least 3 digits)."""
    return f"step_{step:03d}.cos.jsonl.gz"


def describe_value(value) -> str:
    """Type and short repr of a value, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def convert_int(value, field: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ProbeRecordError(f"expected int, got {describe_value(value)}", field=field)
    return int(value)


def convert_str(value, field: str) -> str:
    if not isinstance(value, str) or value == "":
        raise ProbeRecordError(f"expected non-empty str, got {describe_value(value)}", field=field)
    return value


def convert_bool(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProbeRecordError(f"expected bool (true/false), got {describe_value(value)}", field=field)
    return bool(value)


def convert_float(value, field: str, nan_allowed: bool) -> float:
    """float of an int/float (not bool); None means NaN where NaN is allowed."""
    if value is None and nan_allowed:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        expected = "float or null (NaN)" if nan_allowed else "finite float"
        raise ProbeRecordError(f"expected {expected}, got {describe_value(value)}", field=field)
    number = float(value)
    if math.isinf(number) or (math.isnan(number) and not nan_allowed):
        expected = "float or null (NaN)" if nan_allowed else "finite float (NaN not allowed here)"
        raise ProbeRecordError(f"expected {expected}, got {number}", field=field)
    return number


def check_range(record: dict) -> None:
    """Value ranges of the numeric fields; raises ProbeRecordError naming the field."""
    for field in INT_FIELDS:
        if record[field] < 0:
            raise ProbeRecordError(f"expected int >= 0, got {record[field]}", field=field)
    for field in COSINE_FIELDS:
        if math.isnan(record[field]):
            continue
        if abs(record[field]) > 1.0 + RANGE_SLACK:
            raise ProbeRecordError(f"expected cosine in [-1, 1], got {record[field]}", field=field)
    for field in UNIT_INTERVAL_FIELDS:
        if field not in record or math.isnan(record[field]):
            continue
        if not -RANGE_SLACK <= record[field] <= 1.0 + RANGE_SLACK:
            raise ProbeRecordError(f"expected value in [0, 1], got {record[field]}", field=field)
    for field in NON_NEGATIVE_FLOAT_FIELDS:
        if field in record and record[field] < 0:
            raise ProbeRecordError(f"expected value >= 0, got {record[field]}", field=field)


def validate_record(record) -> dict:
    """Checked copy of one probe record with Python types (NaN for null cosine fields).

    Raises ProbeRecordError (no location; callers add file and line) for a missing required field,
    an unknown field, a wrong type, NaN where not allowed, or a value out of range.
    """
    if not isinstance(record, dict):
        raise ProbeRecordError(f"expected a JSON object (dict), got {describe_value(record)}")
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        raise ProbeRecordError("required field missing", field=missing[0])
    unknown = sorted(field for field in record if field not in ALL_FIELDS)
    if unknown:
        raise ProbeRecordError(
            f"unknown field (allowed: the slim schema plus {', '.join(OPTIONAL_FIELDS)})", field=unknown[0]
        )
    checked = {}
    for field in INT_FIELDS:
        checked[field] = convert_int(record[field], field)
    for field in STR_FIELDS:
        checked[field] = convert_str(record[field], field)
    for field in BOOL_FIELDS:
        checked[field] = convert_bool(record[field], field)
    for field in FINITE_FLOAT_FIELDS:
        checked[field] = convert_float(record[field], field, nan_allowed=False)
    for field in NAN_ALLOWED_FLOAT_FIELDS:
        checked[field] = convert_float(record[field], field, nan_allowed=True)
    for field in OPTIONAL_FINITE_FLOAT_FIELDS:
        if field in record:
            checked[field] = convert_float(record[field], field, nan_allowed=False)
    for field in OPTIONAL_NAN_ALLOWED_FLOAT_FIELDS:
        if field in record:
            checked[field] = convert_float(record[field], field, nan_allowed=True)
    for field in OPTIONAL_BOOL_FIELDS:
        if field in record:
            checked[field] = convert_bool(record[field], field)
    check_range(checked)
    return {field: checked[field] for field in ALL_FIELDS if field in checked}


def same_value(a, b) -> bool:
    """Equality that treats NaN == NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_step_consistency(records: list[dict]) -> tuple[int, str] | None:
    """Index and field of the first record that breaks step consistency, or None if consistent.

    Consistent: every record has the first record's step and step-level fields
    (mean_cos_in, mean_cos_out, frac_fired, arm), and sample_id values are unique.
    """
    if not records:
        return None
    first = records[0]
    seen_sample_ids = set()
    for index, record in enumerate(records):
        for field in ("step",) + STEP_LEVEL_FIELDS:
            if not same_value(record[field], first[field]):
                return index, field
        if record["sample_id"] in seen_sample_ids:
            return index, "sample_id"
        seen_sample_ids.add(record["sample_id"])
    return None


def consistency_message(records: list[dict], index: int, field: str) -> str:
    if field == "sample_id":
        return f"duplicate sample_id {records[index]['sample_id']} within the step"
    return (
        f"step-level value {records[index][field]!r} differs from the step's first record "
        f"({records[0][field]!r}); it must be the same on every record of a step"
    )


def record_to_json_line(record: dict) -> str:
    """Strict-JSON line of a validated record (NaN -> null)."""
    encoded = {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in record.items()}
    return json.dumps(encoded, allow_nan=False, sort_keys=False)


def write_step(out_dir, step: int, records) -> Path:
    """Validate `records` and write them to OUT/step_NNN.cos.jsonl.gz atomically; returns the path.

    Every record must pass `validate_record`, carry `step`, and agree on the step-level fields;
    sample_id must be unique. Nothing is written if any record fails (the error names the record
    index and field).
    """
    step = convert_int(step, "step")
    records = list(records)
    path = Path(out_dir) / step_file_name(step)
    if not records:
        raise ProbeRecordError("no records to write for this step", path=path)
    checked_records = []
    for index, record in enumerate(records):
        try:
            checked = validate_record(record)
        except ProbeRecordError as error:
            raise error.located(path, record_index=index) from None
        if checked["step"] != step:
            raise ProbeRecordError(
                f"expected step {step} (the step being written), got {checked['step']}",
                path=path, field="step", record_index=index,
            )
        checked_records.append(checked)
    inconsistency = check_step_consistency(checked_records)
    if inconsistency is not None:
        index, field = inconsistency
        raise ProbeRecordError(
            consistency_message(checked_records, index, field), path=path, field=field, record_index=index
        )
    text = "".join(record_to_json_line(record) + "\n" for record in checked_records)
    atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    return path


def write_run_info(out_dir, info: dict) -> Path:
    """Write OUT/run.json atomically (strict JSON, sorted keys); returns the path."""
    if not isinstance(info, dict):
        raise TypeError(f"run info must be a dict, got {type(info).__name__}")
    path = Path(out_dir) / RUN_INFO_NAME
    text = json.dumps(info, indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    return path


def refuse_json_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name} (NaN must be written as null)")


def read_step_file(path: Path, expected_step: int) -> list[dict]:
    """Validated records of one step file; errors name the file, line (1-based) and field."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as step_file:
            lines = step_file.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ProbeRecordError(f"cannot read gzip text: {error}", path=path) from None
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ProbeRecordError("empty line (expected one JSON object per line)", path=path, line=line_number)
        try:
            raw = json.loads(line, parse_constant=refuse_json_constant)
        except ValueError as error:
            raise ProbeRecordError(f"invalid JSON: {error}", path=path, line=line_number) from None
        try:
            record = validate_record(raw)
        except ProbeRecordError as error:
            raise error.located(path, line_number) from None
        if record["step"] != expected_step:
            raise ProbeRecordError(
                f"expected step {expected_step} (from the file name), got {record['step']}",
                path=path, line=line_number, field="step",
            )
        records.append(record)
    if not records:
        raise ProbeRecordError("file has no records", path=path)
    inconsistency = check_step_consistency(records)
    if inconsistency is not None:
        index, field = inconsistency
        raise ProbeRecordError(
            consistency_message(records, index, field), path=path, line=index + 1, field=field
        )
    return records


def read_run_info(out_dir) -> dict:
    """Contents of OUT/run.json, or {} when there is none."""
    path = Path(out_dir) / RUN_INFO_NAME
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ProbeRecordError(f"invalid JSON: {error}", path=path) from None
    if not isinstance(info, dict):
        raise ProbeRecordError(f"expected a JSON object, got {describe_value(info)}", path=path)
    return info


def list_step_files(out_dir) -> list[tuple[int, Path]]:
    """(step, path) of every step_NNN.cos.jsonl.gz in `out_dir`, by step."""
    directory = Path(out_dir)
    found = []
    for path in directory.iterdir():
        match = STEP_FILE_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_run(out_dir) -> tuple[list[dict], dict]:
    """(records of all steps sorted by (step, sample_id), run info from OUT/run.json or {}).

    Raises FileNotFoundError if `out_dir` is missing or holds no step files, ProbeRecordError for
    any record or file that breaks the schema, and for two files of the same step number.
    """
    directory = Path(out_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"run directory not found: {directory}")
    step_files = list_step_files(directory)
    if not step_files:
        raise FileNotFoundError(f"no step_NNN.cos.jsonl.gz files in {directory}")
    records = []
    seen_steps = {}
    for step, path in step_files:
        if step in seen_steps:
            raise ProbeRecordError(f"step {step} also stored in {seen_steps[step].name}", path=path)
        seen_steps[step] = path
        records.extend(read_step_file(path, step))
    records.sort(key=lambda record: (record["step"], record["sample_id"]))
    return records, read_run_info(directory)
