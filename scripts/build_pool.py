"""Build a template rollout pool (no model): hack completions for a teacher pool, clean / wrong /
unformatted completions for a base pool, all graded by the real sandboxed grader.

    python scripts/build_pool.py --problems bundled|PATH.jsonl --mode run_tests --kind teacher|base \
        --steps 20 --per-step 8 --out DIR [--seed 0] [--group-size 1] [--tokenizer byte|HF_DIR]

Writes DIR/step_NNN.jsonl.gz and DIR/pool.json (see jaxhack/env/pools.py and docs/environment.md),
then prints the pool's summary (hack_rate, pass_rate, mean_reward, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.env.grader import RewardConfig  # noqa: E402
from jaxhack.env.hints import MODES  # noqa: E402
from jaxhack.env.pools import build_template_pool  # noqa: E402
from jaxhack.env.problems import ProblemFormatError, load_problems  # noqa: E402
from jaxhack.env.sandbox import SandboxLimits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="bundled", help='problems jsonl, or "bundled"')
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--kind", required=True, choices=("teacher", "base"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=1,
                        help="consecutive samples sharing one problem (per-step gives GRPO-style groups)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", default=None, help="pool name in the records (default: OUT's name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hack-correct-fraction", type=float, default=0.1)
    parser.add_argument("--base-correct-fraction", type=float, default=0.25)
    parser.add_argument("--base-unformatted-fraction", type=float, default=0.1)
    parser.add_argument("--format-reward", type=float, default=RewardConfig.format_reward)
    parser.add_argument("--pass-reward", type=float, default=RewardConfig.pass_reward)
    parser.add_argument("--wall-s", type=float, default=SandboxLimits.wall_s)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tokenizer", default=None,
                        help='"byte" or a local HF tokenizer dir: comp_len in tokens (default: characters)')
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    try:
        problems = load_problems(args.problems)
    except (ProblemFormatError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer:
        from jaxhack.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    try:
        meta = build_template_pool(
            problems, args.out, mode=args.mode, kind=args.kind, steps=args.steps,
            per_step=args.per_step, group_size=args.group_size, seed=args.seed,
            hack_correct_fraction=args.hack_correct_fraction,
            base_correct_fraction=args.base_correct_fraction,
            base_unformatted_fraction=args.base_unformatted_fraction,
            rewards=RewardConfig(args.format_reward, args.pass_reward),
            limits=SandboxLimits(wall_s=args.wall_s, cpu_s=int(args.wall_s)),
            max_workers=args.workers, tokenizer=tokenizer, progress=not args.no_progress,
            pool_name=args.name,
            extra_meta={"problems_source": str(args.problems)},
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(meta["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
