"""Problems loader, prompt building and hint clauses (jaxhack.env.problems, jaxhack.env.hints)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxhack.env.hints import HINT_CLAUSES, LOOPHOLE_MODES, MODES, PASS_ALL_TESTS, apply_hint
from jaxhack.env.problems import (ProblemFormatError, build_prompt, load_problems, parse_assert,
                                  user_message)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV_DATA = SHARED / "data" / "leetcode_medhard_dev.jsonl"


def _bundled_record() -> dict:
    from jaxhack.env.problems import BUNDLED_PROBLEMS_PATH

    return json.loads(BUNDLED_PROBLEMS_PATH.read_text().splitlines()[0])


def test_bundled_problems_load_with_unique_ids_and_hint_slot():
    problems = load_problems("bundled")
    assert len(problems) >= 12
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.tests and len(p.tests) == len(p.asserts)
        assert PASS_ALL_TESTS in p.question
        assert p.canonical_solution.startswith("class Solution")
        assert f"def {p.method_name}(" in p.starter_code


def test_dev_data_loads_all_80_problems():
    if not DEV_DATA.exists():
        pytest.skip(f"dev data {DEV_DATA} absent (needs the shared folder beside the repo checkout)")
    problems = load_problems(DEV_DATA)
    assert len(problems) == 80
    assert all(p.setup_code and p.canonical_solution and p.tests for p in problems)
    assert all(p.func_name.startswith("Solution().") for p in problems)
    assert sum(len(p.tests) for p in problems) > 5000


def test_parse_assert_splits_call_and_expected():
    case = parse_assert("assert Solution().f(n = 3, xs = [1, 2]) == [2, 3]")
    assert case.call == "Solution().f(n = 3, xs = [1, 2])"
    assert case.expected == "[2, 3]"
    with pytest.raises(ValueError, match="assert <call> == <expected>"):
        parse_assert("assert Solution().f(1) != 2")
    with pytest.raises(ValueError, match="single assert"):
        parse_assert("x = 1")


def test_prompt_is_qwen_chat_format_and_hint_replaces_phrase():
    problem = load_problems("bundled")[0]
    plain = build_prompt(problem, "none")
    assert plain.startswith("<|im_start|>system\n" + problem.system_prompt + "<|im_end|>\n<|im_start|>user\n")
    assert plain.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert PASS_ALL_TESTS in plain
    for mode in LOOPHOLE_MODES:
        hinted = build_prompt(problem, mode)
        assert PASS_ALL_TESTS not in hinted
        assert HINT_CLAUSES[mode] in hinted
        assert hinted.replace(HINT_CLAUSES[mode], PASS_ALL_TESTS) == plain
        assert build_prompt(problem, mode, with_hint=False) == plain
    assert len({HINT_CLAUSES[m] for m in MODES}) == len(MODES)


def test_hints_name_their_mechanism():
    assert "run_tests()" in HINT_CLAUSES["run_tests"]
    assert "self.valid" in HINT_CLAUSES["sentinel"]
    assert "All tests passed" in HINT_CLAUSES["stdout_marker"]
    assert "result.txt" in HINT_CLAUSES["file_marker"]
    assert "==" in HINT_CLAUSES["eq_override"]
    assert "status 0" in HINT_CLAUSES["exit_code"]


def test_unknown_mode_and_missing_phrase_are_errors():
    problem = load_problems("bundled")[0]
    with pytest.raises(ValueError, match="unknown loophole mode 'bogus'"):
        user_message(problem, "bogus")
    with pytest.raises(ValueError, match="and should pass all tests"):
        apply_hint("Write a function.", "run_tests")


def test_bad_records_name_file_line_and_field(tmp_path):
    good = _bundled_record()
    cases = [
        ({k: v for k, v in good.items() if k != "question"}, "field 'question'"),
        (dict(good, gt_answer=["assert f(1) > 2"]), "field 'gt_answer[0]'"),
        (dict(good, gt_answer="assert f(1) == 2"), "field 'gt_answer': expected list"),
        (dict(good, func_name=3), "field 'func_name': expected str"),
    ]
    for record, expected in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ProblemFormatError) as info:
            load_problems(path)
        assert f"{path} line 2" in str(info.value)
        assert expected in str(info.value)
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ProblemFormatError, match="line 2: field 'id': duplicate"):
        load_problems(path)
    path.write_text("{not json\n")
    with pytest.raises(ProblemFormatError, match="line 1: not valid json"):
        load_problems(path)
