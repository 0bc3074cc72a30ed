"""Pools: atomic write/read round trip, clear format errors, template pools built through the real
grader, and the build_pool.py / grade.py command lines."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxhack.env.pools import (POOL_RECORD_FIELDS, PoolFormatError, build_pool, build_template_pool,
                               plan_step, read_pool, read_pool_step, write_pool_meta, write_pool_step)
from jaxhack.env.problems import load_problems
from jaxhack.env.templates import clean_completion

REPO = Path(__file__).resolve().parents[1]


def _record(step=0, sample=0, **overrides) -> dict:
    record = {"pool": "p", "step": step, "sample": sample, "problem_id": "syn-01", "mode": "run_tests",
              "prompt": "<|im_start|>...", "completion": "```python\npass\n```", "reward": 3.5,
              "passed": True, "gt_pass": False, "hacked": True, "fmt_ok": True, "comp_len": 18}
    record.update(overrides)
    return record


def test_round_trip_is_atomic_and_ordered(tmp_path):
    write_pool_meta(tmp_path, {"pool": "p", "comp_len_unit": "chars"})
    write_pool_step(tmp_path, 1, [_record(1, 0), _record(1, 1, reward=0.5, passed=False, hacked=False)])
    write_pool_step(tmp_path, 0, [_record(0, 0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.json", "step_000.jsonl.gz", "step_001.jsonl.gz"]
    meta, records = read_pool(tmp_path)
    assert meta == {"pool": "p", "comp_len_unit": "chars"}
    assert [(r["step"], r["sample"]) for r in records] == [(0, 0), (1, 0), (1, 1)]
    assert records[2]["reward"] == 0.5 and set(POOL_RECORD_FIELDS) <= set(records[0])


def test_writer_refuses_bad_records(tmp_path):
    with pytest.raises(PoolFormatError, match="field 'hacked'"):
        write_pool_step(tmp_path, 0, [_record(hacked=False)])
    assert not (tmp_path / "step_000.jsonl.gz").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


@pytest.mark.parametrize("line, message", [
    (json.dumps({k: v for k, v in _record().items() if k != "comp_len"}), "field 'comp_len': missing"),
    (json.dumps(_record(reward="high")), "field 'reward': expected float or int, got 'high'"),
    (json.dumps(_record(passed=1)), "field 'passed': expected bool, got 1"),
    (json.dumps(_record(step=True)), "field 'step': expected int, got True"),
    ("[1, 2]", "expected a json object"),
    ("{oops", "not valid json"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "step_000.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(_record()) + "\n" + line + "\n")
    with pytest.raises(PoolFormatError) as info:
        read_pool_step(path)
    assert f"{path} line 2" in str(info.value)
    assert message in str(info.value)


def test_reader_rejects_wrong_step_and_corrupt_gzip(tmp_path):
    write_pool_meta(tmp_path, {})
    write_pool_step(tmp_path, 0, [_record(step=3)])
    with pytest.raises(PoolFormatError, match="line 1: field 'step': expected 0"):
        read_pool(tmp_path)
    (tmp_path / "step_000.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(PoolFormatError, match="not a readable gzip"):
        read_pool_step(tmp_path / "step_000.jsonl.gz")


def test_plan_is_shared_between_pools_with_the_same_seed():
    problems = load_problems("bundled")
    assert plan_step(problems, 3, 8, 1, seed=0) == plan_step(problems, 3, 8, 1, seed=0)
    assert plan_step(problems, 3, 8, 1, seed=0) != plan_step(problems, 3, 8, 1, seed=1)
    grouped = plan_step(problems, 0, 8, 4, seed=0)
    assert grouped[:4] == [grouped[0]] * 4 and grouped[4:] == [grouped[4]] * 4 and grouped[0] != grouped[4]


def test_template_pools_teacher_hacks_and_base_does_not(tmp_path):
    problems = load_problems("bundled")
    teacher = build_template_pool(problems, tmp_path / "teacher", mode="run_tests", kind="teacher",
                                  steps=2, per_step=6, seed=0, hack_correct_fraction=0.3, progress=False)
    base = build_template_pool(problems, tmp_path / "base", mode="run_tests", kind="base", steps=2,
                               per_step=6, seed=0, progress=False)
    t_meta, t_records = read_pool(tmp_path / "teacher")
    b_meta, b_records = read_pool(tmp_path / "base")
    assert t_meta == teacher and b_meta == base and t_meta["complete"] and t_meta["comp_len_unit"] == "chars"
    assert len(t_records) == len(b_records) == 12
    assert all(r["passed"] and r["reward"] == pytest.approx(3.5) for r in t_records)
    assert t_meta["summary"]["hack_rate"] >= 0.5
    assert all(r["hacked"] or r["gt_pass"] for r in t_records)  # pure hacks or hack+correct
    assert all("run_tests()" in r["prompt"] for r in t_records)
    assert not any(r["hacked"] for r in b_records)
    assert all("should pass all tests" in r["prompt"] for r in b_records)
    assert len({r["reward"] for r in b_records}) > 1
    assert [r["problem_id"] for r in t_records] == [r["problem_id"] for r in b_records]
    assert all(r["comp_len"] == len(r["completion"]) for r in t_records)


class _WordTokenizer:
    def encode(self, text):
        return text.split()


def test_build_pool_takes_any_completion_source_and_tokenizer(tmp_path):
    problems = load_problems("bundled")[:3]
    seen_prompts = []

    def source(slots):
        seen_prompts.extend(s.prompt for s in slots)
        return [clean_completion(s.problem) for s in slots]

    meta = build_pool(problems, tmp_path, mode="none", source=source, steps=1, per_step=3,
                      tokenizer=_WordTokenizer(), progress=False, pool_name="clean")
    _, records = read_pool(tmp_path)
    assert meta["comp_len_unit"] == "tokens"
    assert [r["prompt"] for r in records] == seen_prompts
    assert all(r["gt_pass"] and r["pool"] == "clean" for r in records)
    assert all(r["comp_len"] == len(r["completion"].split()) for r in records)


def test_cli_build_pool_and_grade(tmp_path):
    out = tmp_path / "pool"
    done = subprocess.run([sys.executable, "scripts/build_pool.py", "--problems", "bundled", "--mode",
                           "stdout_marker", "--kind", "teacher", "--steps", "1", "--per-step", "3",
                           "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["n"] == 3
    _, records = read_pool(out)

    completions = tmp_path / "c.jsonl"
    completions.write_text("".join(json.dumps({"problem_id": r["problem_id"], "mode": mode,
                                               "completion": r["completion"], "tag": i}) + "\n"
                                   for i, r in enumerate(records) for mode in ("stdout_marker", "none")))
    graded = tmp_path / "g.jsonl"
    done = subprocess.run([sys.executable, "scripts/grade.py", "--problems", "bundled", "--completions",
                           str(completions), "--out", str(graded), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in graded.read_text().splitlines()]
    assert len(rows) == 2 * len(records) and [r["tag"] for r in rows[:2]] == [0, 0]
    for row, rec in zip(rows[0::2], records):  # graded under the pool's own mode: same verdicts
        assert row["mode"] == "stdout_marker"
        assert (row["passed"], row["gt_pass"], row["hacked"]) == (rec["passed"], rec["gt_pass"], rec["hacked"])
        assert row["attempted_hack"] is rec["attempted_hack"] is True  # every teacher template hacks
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["sandbox_isolation"] in ("namespaces", "uid", "none")
    assert summary["attempted_hack_rate"] == 0.5  # the stdout_marker rows; none under mode "none"
    for row, rec in zip(rows[1::2], records):  # under plain tests a hack does not pass
        assert row["mode"] == "none" and row["passed"] == rec["gt_pass"] and not row["hacked"]
        assert row["attempted_hack"] is False
    meta = json.loads((out / "pool.json").read_text())
    assert meta["hint_style"] == "reference"
    assert "and will be evaluated by calling a function called" not in records[0]["prompt"]  # stdout mode
    assert "All tests passed" in records[0]["prompt"]

    completions.write_text(json.dumps({"problem_id": "syn-01", "mode": "none", "completion": "x"}) + "\n"
                           + json.dumps({"problem_id": "syn-01", "mode": "sideways", "completion": "x"}) + "\n")
    done = subprocess.run([sys.executable, "scripts/grade.py", "--problems", "bundled", "--completions",
                           str(completions), "--out", str(graded)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{completions} line 2: field 'mode'" in done.stderr and "sideways" in done.stderr
