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
from jaxhack.io import atomic_write_text, check_writable, iter_jsonl


class InputError(ValueError):
    """Bad input; the message names file, line and field."""


def decoded_lines(path: Path):
    """The file's lines as text; InputError naming the line of the first invalid UTF-8 byte."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path} line {line_no}: not valid UTF-8 (byte {raw[err.start]:#04x} at "
                                 f"column {err.start + 1})") from None


def check_encodable(obj, where: str, field: str = "") -> None:
    """InputError for a string that cannot be written back as UTF-8 (a lone surrogate such as a
    "\\ud800" escape), checked before any grading."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"{where}: field {field or '?'!r}: not valid text ({err.reason}, "
                             f"character {err.start + 1})") from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            check_encodable(key, where, field or "key")
            check_encodable(value, where, f"{field}.{key}" if field else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            check_encodable(value, where, f"{field}[{i}]")


def read_completions(path: Path, problems_by_id: dict) -> list[tuple[dict, GradeRequest]]:
    """(input object, GradeRequest) per line; InputError names file, line and field."""
    rows = []
    for where, obj in iter_jsonl(decoded_lines(path), path, InputError):
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a json object, got {type(obj).__name__}")
        check_encodable(obj, where)
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
    parser.add_argument("--completions", required=True, type=Path, help="jsonl of {problem_id, mode, completion}")
    parser.add_argument("--out", required=True, type=Path, help="graded jsonl to write")
    parser.add_argument("--format-reward", type=float, default=RewardConfig.format_reward,
                        help="reward for a well-formatted completion")
    parser.add_argument("--pass-reward", type=float, default=RewardConfig.pass_reward,
                        help="reward for passing the (possibly hacked) tests")
    parser.add_argument("--wall-s", type=float, default=SandboxLimits.wall_s, help="sandbox wall-clock limit")
    parser.add_argument("--cpu-s", type=int, default=SandboxLimits.cpu_s, help="sandbox CPU-seconds limit")
    parser.add_argument("--workers", type=int, default=None, help="parallel sandbox runs (default: CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    check_writable(args.out)
    if args.workers is not None and args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}")
    if args.wall_s <= 0 or args.cpu_s < 1:
        return fail("--wall-s must be > 0 and --cpu-s >= 1")
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
