"""Phase 3 sweep: seeds x arms, runs in order in OUT/ARM/seed_S, skips finished runs, resumes
unfinished ones, applies the seed's cost ceiling, writes OUT/summary.md (docs/phase3.md).

    python scripts/sweep.py --out out/p3/sweep --arms vanilla,projected,lora_projected --seeds 0,1,2 \
        --preset full --ckpt qwen3-4b [--hack-threshold 0.1] [--ceiling-seeds 3] [--no-ceiling]

Cost ceiling: after the first `--ceiling-seeds` seeds of the first arm, if no seed's peak hack rate
(max over the run of the 5-step moving average of the policy hack rate) reached --hack-threshold,
the sweep stops (nothing to suppress) and says so in OUT/STOPPED.md and the summary.
All TrainConfig flags (--preset, --steps, --lr, ...) apply to every run; the model is loaded once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.rl.config import ARM_NAMES, add_config_args, config_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--arms", default="vanilla,projected,lora_projected",
                        help=f"comma-separated, in run order; from {ARM_NAMES}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    parser.add_argument("--hack-threshold", type=float, default=0.1)
    parser.add_argument("--ceiling-seeds", type=int, default=3)
    parser.add_argument("--no-ceiling", action="store_true", help="run every arm whatever the first shows")
    add_config_args(parser, skip=("arm", "seed", "run_dir"))
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        bad = [a for a in arms if a not in ARM_NAMES]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; expected from {ARM_NAMES}")
        base = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from jaxhack.rl.sweep import run_sweep
    from jaxhack.rl.trainer import load_model

    model = load_model(base.ckpt, base.dtype, base.tokenizer)
    result = run_sweep(base, args.out, arms, seeds, ceiling=not args.no_ceiling,
                       ceiling_seeds=args.ceiling_seeds, hack_threshold=args.hack_threshold, model=model)
    return 3 if result["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
