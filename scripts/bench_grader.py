"""Grading throughput on CPU: distinct canonical solutions, one loophole mode, one grade_batch call.

    python scripts/bench_grader.py [--problems PATH] [--n 80] [--mode run_tests] [--workers N]
                                   [--label TEXT] [--out docs/results/bench_grader_cpu.jsonl]

Each completion is the canonical solution of a different problem, so every one costs an oracle run
and a flawed-grader run (plus one reference run per problem: the cache is cleared first). Prints one
json line and appends it to --out: wall completions/s, the CPU seconds the grading used (grader and
sandboxed children, user + sys), the throughput that CPU cost allows on this machine's cores when
nothing else runs (n * cpus / cpu_s: comparable across a loaded machine's runs, unlike wall time),
the 1-minute load average, and the sandbox isolation in use.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.commands import checks  # noqa: E402
from jaxhack.env import grader  # noqa: E402
from jaxhack.env.hints import MODES  # noqa: E402
from jaxhack.env.grader import GradeRequest, grade_batch  # noqa: E402
from jaxhack.env.problems import ProblemFormatError, load_problems  # noqa: E402
from jaxhack.env.templates import clean_completion  # noqa: E402
from jaxhack.io import UserError  # noqa: E402

DEFAULT_PROBLEMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "leetcode_medhard_dev.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=str(DEFAULT_PROBLEMS), help='problems jsonl, or "bundled"')
    parser.add_argument("--n", type=int, default=80, help="completions (distinct problems, cycled)")
    parser.add_argument("--mode", default="run_tests", choices=MODES, help="the grader's loophole mode")
    parser.add_argument("--workers", type=int, default=None, help="parallel sandbox runs (default: the CPU count)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_grader_cpu.jsonl"))
    args = parser.parse_args(argv)
    try:
        checks.at_least(args, ("n", "workers"))  # --workers 0 used to mean the default silently
        problems = load_problems(args.problems)
    except (ProblemFormatError, OSError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    requests = [GradeRequest(problems[i % len(problems)], args.mode,
                             clean_completion(problems[i % len(problems)])) for i in range(args.n)]
    from jaxhack.env.sandbox import sandbox_identity

    isolation = sandbox_identity().isolation if hasattr(sandbox_identity(), "isolation") else "uid"
    grader._reference_cache.clear()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    grades = grade_batch(requests, max_workers=args.workers)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, usage))
    row = {"bench": "grader", "label": args.label, "mode": args.mode, "n": args.n,
           "distinct_problems": min(args.n, len(problems)), "seconds": round(seconds, 3),
           "completions_per_s": round(args.n / seconds, 2),
           "cpu_s": round(cpu, 2), "cpu_s_per_completion": round(cpu / args.n, 4),
           "cpu_bound_completions_per_s_on_cpus": round(args.n * (os.cpu_count() or 1) / cpu, 2),
           "load_avg_1m": round(os.getloadavg()[0], 2),
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
