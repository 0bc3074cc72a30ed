"""Grade a file of completions with the sandboxed grader.

    jaxhack grade --problems P.jsonl|bundled --completions C.jsonl --out G.jsonl
                  [--format-reward 0.5] [--pass-reward 3.0] [--wall-s 30] [--cpu-s 30]
                  [--workers N]

C.jsonl: one json object per line with problem_id (str or int), mode (a loophole mode or "none")
and completion (str); other fields are copied through. G.jsonl: each input object plus fmt_ok,
passed, gt_pass, hacked, attempted_hack, reward and grade_detail. The summary line printed at the end
includes "sandbox_isolation": "namespaces" (per-run namespaces), or "uid" / "none" when the machine
refused namespaces and the grader fell back (announced loudly on stderr too). Bad input stops before
any grading, with a message naming the file, line and field (exit status 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxhack.env.grader import GradeRequest, RewardConfig, grade_batch
from jaxhack.env.hints import MODES
from jaxhack.env.pools import summarize_records
from jaxhack.env.problems import ProblemFormatError, load_problems
from jaxhack.env.sandbox import SandboxLimits, sandbox_identity
from jaxhack.commands import fail, script_main
from jaxhack.io import atomic_write_text, iter_jsonl


class InputError(ValueError):
    """Bad input; the message names file, line and field."""


def read_completions(path: Path, problems_by_id: dict) -> list[tuple[dict, GradeRequest]]:
    """(input object, GradeRequest) per line; InputError names file, line and field."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for where, obj in iter_jsonl(f, path, InputError):
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a json object, got {type(obj).__name__}")
            problem_id = obj.get("problem_id")
            if not isinstance(problem_id, (str, int)) or isinstance(problem_id, bool):
                raise InputError(f"{where}: field 'problem_id': expected str or int, got {problem_id!r:.80}")
            if str(problem_id) not in problems_by_id:
                raise InputError(f"{where}: field 'problem_id': {problem_id!r} is not in the problems file")
            mode = obj.get("mode")
            if mode not in MODES:
                raise InputError(f"{where}: field 'mode': expected one of {list(MODES)}, got {mode!r:.80}")
            completion = obj.get("completion")
            if not isinstance(completion, str):
                raise InputError(f"{where}: field 'completion': expected str, got {completion!r:.80}")
            rows.append((obj, GradeRequest(problems_by_id[str(problem_id)], mode, completion)))
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--problems", required=True, help='problems jsonl, or "bundled"')
    parser.add_argument("--completions", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--format-reward", type=float, default=RewardConfig.format_reward)
    parser.add_argument("--pass-reward", type=float, default=RewardConfig.pass_reward)
    parser.add_argument("--wall-s", type=float, default=SandboxLimits.wall_s)
    parser.add_argument("--cpu-s", type=int, default=SandboxLimits.cpu_s)
    parser.add_argument("--workers", type=int, default=None, help="parallel sandbox runs (default: CPUs)")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    try:
        problems = {p.id: p for p in load_problems(args.problems)}
        rows = read_completions(args.completions, problems)
    except (ProblemFormatError, InputError, OSError) as err:
        return fail(err)

    grades = grade_batch([request for _, request in rows],
                         RewardConfig(args.format_reward, args.pass_reward),
                         SandboxLimits(wall_s=args.wall_s, cpu_s=args.cpu_s),
                         max_workers=args.workers, progress=not args.no_progress)
    out_rows = []
    for (obj, _), grade in zip(rows, grades):
        out = dict(obj)
        out.update(fmt_ok=grade.fmt_ok, passed=grade.passed, gt_pass=grade.gt_pass,
                   hacked=grade.hacked, attempted_hack=grade.attempted_hack, reward=grade.reward,
                   grade_detail=grade.detail)
        out_rows.append(out)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    summary = summarize_records(out_rows)
    summary["sandbox_isolation"] = sandbox_identity().isolation
    print(json.dumps(summary))
    return 0



def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
