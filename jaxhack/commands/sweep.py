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

from jaxhack.commands import checks, script_main
from jaxhack.commands.train import config_checked, describe_preset, one_line, tracking_checked
from jaxhack.io import UserError, check_writable
from jaxhack.rl.config import ARM_NAMES, add_config_args
from jaxhack.rl.run import MODEL_SEED
from jaxhack.rl.sweep import parse_arm, run_sweep
from jaxhack.tracking import add_tracking_args


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="sweep directory (one OUT/ARM/seed_S per run)")
    parser.add_argument("--arms", default="vanilla,projected,lora_projected",
                        help=f"comma-separated, in run order; from {ARM_NAMES}, each optionally with "
                             "+placement=update / +gate=G / +overshoot=X / +k=N (e.g. projected+placement=update)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    parser.add_argument("--hack-threshold", type=float, default=0.1,
                        help="cost ceiling: the first arm's peak hack rate must reach this")
    parser.add_argument("--ceiling-seeds", type=int, default=3, help="cost ceiling: seeds of the first arm to look at")
    parser.add_argument("--no-ceiling", action="store_true", help="run every arm whatever the first shows")
    add_config_args(parser, skip=("arm", "seed", "run_dir"))
    describe_preset(parser)
    add_tracking_args(parser)


def parse_list(flag: str, text: str, kind=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"{flag}: give at least one value (comma-separated)")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None


def run(args) -> int:
    arms = parse_list("--arms", args.arms)
    seeds = parse_list("--seeds", args.seeds, int)
    for arm in arms:  # ARM or ARM+placement=update (+gate=, +overshoot=, +k=)
        try:
            parse_arm(arm)
        except ValueError as err:
            raise UserError(f"--arms: {one_line(err)}") from None
    if len(set(seeds)) != len(seeds) or len(set(arms)) != len(arms):
        raise UserError("--arms and --seeds must not repeat a value")
    checks.positive("--ceiling-seeds", args.ceiling_seeds)
    base = config_checked(args)
    tracking = tracking_checked(args)
    check_writable(args.out)
    params, config, tokenizer, _ = checks.load_model_checked(base.ckpt, base.tokenizer, MODEL_SEED, base.dtype)
    try:
        result = run_sweep(base, args.out, arms, seeds, ceiling=not args.no_ceiling,
                           ceiling_seeds=args.ceiling_seeds, hack_threshold=args.hack_threshold,
                           model=(params, config, tokenizer), tracking=tracking)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise UserError(one_line(err)) from None
    if result["stopped"]:
        print(f"sweep STOPPED (exit status 3): {result['reason']}")
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
