"""A model organism of reward hacking: a small Qwen3 policy trained in-repo that learns to hack under
GRPO, and the experiment around it (docs/organism.md).

    jaxhack organism build --out DIR [--size cpu|gpu|gpu-16x16|test]
    jaxhack organism run --out DIR [--size cpu|gpu|gpu-16x16|test] [--seeds 0,1,2] [--arms vanilla,projected]
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("build", "run"), help="build the organism (cached), or run "
                        "the experiment on it (builds first when needed)")
    parser.add_argument("--out", default="runs/organism", help="output directory (default: %(default)s)")
    parser.add_argument("--size", default="cpu", choices=("cpu", "gpu", "gpu-16x16", "test"),
                        help="organism and experiment size (default: %(default)s)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (run; default: the size's)")
    parser.add_argument("--arms", default=None, help="comma-separated arms (run; default: the size's)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (run; default: the size's)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="Phase 3 runs trained at once, each in its own process (default: the size's; gpu 4)")
    parser.add_argument("--grade-workers", type=int, default=None, help="parallel grader runs (default: CPUs)")
    parser.add_argument("--tiny", action="store_true", help="the size's code path at tiny scale (smoke check)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="run: replace the results of an experiment in --out "
                        "that has other settings (rerunning with the same settings resumes it)")


def run(args) -> int:
    from jaxhack.commands import checks, parse_list
    from jaxhack.io import UserError
    from jaxhack.organism.experiment import organism_main
    from jaxhack.rl.config import ARM_NAMES

    if args.seeds is not None:
        args.seeds = tuple(parse_list("--seeds", args.seeds, int))
    if args.arms is not None:
        args.arms = tuple(parse_list("--arms", args.arms))
        bad = [a for a in args.arms if a not in ARM_NAMES]
        if bad:
            raise UserError(f"--arms: unknown arm(s) {bad}; expected some of {list(ARM_NAMES)}")
    checks.at_least(args, ("steps", "jobs", "grade_workers"))
    return organism_main(args)
