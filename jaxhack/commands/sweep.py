"""Phase 3 sweep: seeds x arms, runs in order in OUT/ARM/seed_S, skips finished runs, resumes
unfinished ones, applies the seed's cost ceiling, writes OUT/summary.md (docs/phase3.md).

    jaxhack sweep --out out/p3/sweep --arms vanilla,projected,lora_projected --seeds 0,1,2 \
        --preset full --ckpt qwen3-4b [--hack-threshold 0.1] [--ceiling-seeds 3] [--no-ceiling]
    (or: python scripts/sweep.py ...)

Cost ceiling: after the first `--ceiling-seeds` seeds of the first arm, if no seed's peak hack rate
(max over the run of the 5-step moving average of the policy hack rate) reached --hack-threshold,
the sweep stops (nothing to suppress) and says so in OUT/STOPPED.md and the summary.
All TrainConfig flags (--preset, --steps, --lr, ...) apply to every run; the model is loaded once.
"""
from __future__ import annotations

from pathlib import Path

from jaxhack.commands import fail, script_main
from jaxhack.models.load import load_model
from jaxhack.rl.config import ARM_NAMES, add_config_args, config_from_args
from jaxhack.rl.run import MODEL_SEED
from jaxhack.rl.sweep import parse_arm, run_sweep


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--arms", default="vanilla,projected,lora_projected",
                        help=f"comma-separated, in run order; from {ARM_NAMES}, each optionally with "
                             "+placement=update / +gate=G / +overshoot=X / +k=N (e.g. projected+placement=update)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    parser.add_argument("--hack-threshold", type=float, default=0.1)
    parser.add_argument("--ceiling-seeds", type=int, default=3)
    parser.add_argument("--no-ceiling", action="store_true", help="run every arm whatever the first shows")
    add_config_args(parser, skip=("arm", "seed", "run_dir"))


def run(args) -> int:
    arms = [a for a in args.arms.split(",") if a]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        for arm in arms:
            parse_arm(arm)  # ARM or ARM+placement=update (+gate=, +overshoot=, +k=)
        base = config_from_args(args)
    except ValueError as err:
        return fail(err)
    params, config, tokenizer, _ = load_model(base.ckpt, base.dtype, base.tokenizer, seed=MODEL_SEED)
    result = run_sweep(base, args.out, arms, seeds, ceiling=not args.no_ceiling,
                       ceiling_seeds=args.ceiling_seeds, hack_threshold=args.hack_threshold,
                       model=(params, config, tokenizer))
    return 3 if result["stopped"] else 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
