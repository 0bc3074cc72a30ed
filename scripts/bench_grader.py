"""Grading throughput on CPU: distinct canonical solutions, one loophole mode, one grade_batch call.

    python scripts/bench_grader.py [--problems PATH] [--n 80] [--mode run_tests] [--workers N]
                                   [--label TEXT] [--out docs/results/bench_grader_cpu.jsonl]

Each completion is the canonical solution of a different problem, so every one costs an oracle run
and a flawed-grader run (plus one reference run per problem: the cache is cleared first). Prints one
json line (completions/s, sandbox isolation in use, CPU count) and appends it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.env import grader  # noqa: E402
from jaxhack.env.grader import GradeRequest, grade_batch  # noqa: E402
from jaxhack.env.problems import ProblemFormatError, load_problems  # noqa: E402
from jaxhack.env.templates import clean_completion  # noqa: E402

DEFAULT_PROBLEMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "leetcode_medhard_dev.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=str(DEFAULT_PROBLEMS), help='problems jsonl, or "bundled"')
    parser.add_argument("--n", type=int, default=80, help="completions (distinct problems, cycled)")
    parser.add_argument("--mode", default="run_tests")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_grader_cpu.jsonl"))
    args = parser.parse_args(argv)
    try:
        problems = load_problems(args.problems)
    except (ProblemFormatError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    requests = [GradeRequest(problems[i % len(problems)], args.mode,
                             clean_completion(problems[i % len(problems)])) for i in range(args.n)]
    from jaxhack.env.sandbox import sandbox_identity

    isolation = sandbox_identity().isolation if hasattr(sandbox_identity(), "isolation") else "uid"
    grader._reference_cache.clear()
    start = time.monotonic()
    grades = grade_batch(requests, max_workers=args.workers)
    seconds = time.monotonic() - start
    row = {"bench": "grader", "label": args.label, "mode": args.mode, "n": args.n,
           "distinct_problems": min(args.n, len(problems)), "seconds": round(seconds, 3),
           "completions_per_s": round(args.n / seconds, 2),
           "gt_pass": sum(g.gt_pass for g in grades), "passed": sum(g.passed for g in grades),
           "isolation": isolation, "cpus": os.cpu_count(), "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
