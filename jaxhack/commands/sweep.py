"""Phase 3 sweep: seeds x arms, one run in OUT/ARM/seed_S each, skips finished runs, resumes
unfinished ones, applies the seed's cost ceiling, writes OUT/summary.md and OUT/summary.json
(docs/phase3.md, "Sweep" and "Sweep across GPUs / a cluster").

    jaxhack sweep --out out/p3/sweep --arms vanilla,projected,lora_projected --seeds 0,1,2 \
        --preset full --ckpt qwen3-4b [--hack-threshold 0.1] [--ceiling-seeds 3] [--no-ceiling]
    (or: python scripts/sweep.py ...)

Backends: `--backend local` (default) runs the runs one after another in this process (one GPU);
`--backend ray` runs each run as a Ray task on --gpus-per-run GPUs (default: the mesh's device
count, 1 without a mesh, 0 on a cluster without GPUs), on a local Ray started here or the cluster at
--ray-address; a failed run is retried once, and the summary lists runs that failed twice (exit
status 1). Needs `pip install -e '.[ray]'`. On CPU, --fake-devices N gives each run one of N fake
XLA devices. --compile-cache DIR (ray default: OUT/jax_cache) shares compiled programs between runs.

Cost ceiling: after the first `--ceiling-seeds` seeds of the first arm, if no seed's peak hack rate
(max over the run of the 5-step moving average of the policy hack rate) reached --hack-threshold,
the sweep stops (nothing to suppress) and says so in OUT/STOPPED.md and the summary.
All TrainConfig flags (--preset, --steps, --lr, ...) apply to every run; the model is loaded once.
"""
from __future__ import annotations

import os
from pathlib import Path

from jaxhack.commands import checks, parse_list, script_main
from jaxhack.commands.train import config_checked, describe_preset, one_line, tracking_checked
from jaxhack.io import UserError, check_writable
from jaxhack.rl.config import ARM_NAMES, add_config_args
from jaxhack.rl.run import MODEL_SEED
from jaxhack.rl.sweep import parse_arm, run_sweep
from jaxhack.tracking import add_tracking_args
from jaxhack.rl.sweep_ray import FAULT_ENV, enable_compile_cache, import_ray, parse_faults, run_sweep_ray


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
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: one run after another in this process; ray: one Ray task per run")
    parser.add_argument("--ray-address", default=None,
                        help="ray: address of a running cluster (e.g. auto or HOST:6379); default: start a local Ray")
    parser.add_argument("--gpus-per-run", type=float, default=None,
                        help="ray: GPUs per run (default: the mesh's device count, else 1; 0 without GPUs)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="ray: CPUs reserved per run")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray, local Ray only: CPUs it may use")
    parser.add_argument("--fake-devices", type=int, default=0,
                        help="ray on CPU: N fake XLA devices as N GPU slots (one per run)")
    parser.add_argument("--compile-cache", default=None,
                        help="JAX persistent compilation cache dir shared by the runs; 'none' disables "
                             "(default: OUT/jax_cache with --backend ray, none with local)")
    parser.add_argument("--progress-every", type=float, default=10.0,
                        help="ray: seconds between refreshes of the per-run progress lines")
    add_config_args(parser, skip=("arm", "seed", "run_dir"))
    describe_preset(parser)
    add_tracking_args(parser)


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
    if args.backend == "ray":  # the driver never computes: checks that load arrays (--v-hack) must
        import jax             # not initialize (and preallocate) the GPUs the workers will use
        jax.config.update("jax_platforms", "cpu")
    base = config_checked(args)
    tracking = tracking_checked(args)
    check_writable(args.out)
    cache = args.compile_cache or (str(args.out / "jax_cache") if args.backend == "ray" else "none")
    cache = None if cache == "none" else cache
    common = dict(ceiling=not args.no_ceiling, ceiling_seeds=args.ceiling_seeds, hack_threshold=args.hack_threshold)
    if args.backend == "ray":
        result = run_ray(args, base, arms, seeds, cache, dict(common, tracking=tracking))
    else:
        if args.fake_devices or args.ray_address or args.gpus_per_run is not None:
            raise UserError("--ray-address / --gpus-per-run / --fake-devices need --backend ray")
        enable_compile_cache(cache)
        params, config, tokenizer, _ = checks.load_model_checked(base.ckpt, base.tokenizer, MODEL_SEED, base.dtype)
        try:
            result = run_sweep(base, args.out, arms, seeds, model=(params, config, tokenizer), tracking=tracking,
                                   **common)
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            raise UserError(one_line(err)) from None
    if result["stopped"]:
        print(f"sweep STOPPED (exit status 3): {result['reason']}")
        return 3
    if result.get("failed"):
        names = ", ".join(f"{r['arm']} seed {r['seed']}" for r in result["failed"])
        print(f"sweep: {len(result['failed'])} run(s) failed twice (exit status 1): {names}; "
              f"rerun the same command to resume them (errors in {args.out}/summary.json)")
        return 1
    return 0


def run_ray(args, base, arms: list, seeds: list, cache: str | None, common: dict) -> dict:
    """--backend ray: the model is loaded by each worker, not here (checked to exist first)."""
    try:
        import_ray()
        faults = parse_faults(os.environ.get(FAULT_ENV))
    except (ImportError, ValueError) as err:
        raise UserError(one_line(err)) from None
    checks.check_ckpt(base.ckpt)
    if args.fake_devices < 0 or (args.gpus_per_run is not None and args.gpus_per_run < 0):
        raise UserError("--fake-devices and --gpus-per-run must be >= 0")
    try:
        return run_sweep_ray(base, args.out, arms, seeds, address=args.ray_address, num_cpus=args.num_cpus,
                             gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                             fake_devices=args.fake_devices, compile_cache=cache, faults=faults,
                             progress_every=args.progress_every, **common)
    except (FileExistsError, FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(one_line(err)) from None


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
