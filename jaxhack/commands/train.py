"""Phase 3 training run: sample -> grade -> Dr.GRPO (+K3 KL to the base model) -> optax chain
(clip, hack projection, adamw) -> orbax checkpoints (docs/phase3.md).

    jaxhack train --preset smoke --arm projected --run-dir out/p3/smoke
    jaxhack train --preset fast --ckpt qwen3-4b --arm vanilla --run-dir out/p3/fast
    jaxhack train --preset fast --ckpt random-4b --svd-random-bases true \
        --v-hack random --steps 3 --run-dir out/p3/bench      # GPU benchmark with random weights
    jaxhack train ... --resume                                 # continue a killed run
    jaxhack train --preset full --mesh data=4 ...              # data parallel over 4 GPUs of one host
    jaxhack train --mesh data=16 --coordinator host0:1234 --num-processes 2 --process-id 0 ...
                                                               # on each host (its id; docs/phase3.md)
    jaxhack train --config OLD_RUN/run.json --run-dir NEW_RUN  # rerun a finished run exactly
    (or: python scripts/phase3_train.py ...)

Every TrainConfig field is a flag (--group-size, --prompts-per-step, --lr, --mix-teacher DIR,
--mix-per-group K, --eval-every N, --ckpt-every N, ...); --config FILE (a run.json or JSON / YAML
fields) overrides the preset and flags given explicitly override both. Writes
RUN/{run.json, metrics.jsonl, eval.jsonl, v_hack/, rollouts/, ckpt/step_NNNNNN/, done.json}, and
TensorBoard events (tensorboardX installed; --tensorboard false: none) and a W&B run (--wandb PROJECT).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxhack.commands import checks, script_main
from jaxhack.io import UserError, check_writable, claim_run_dir, read_jsonl, remove_stale_temp_dirs
from jaxhack.parallel import mesh as meshlib
from jaxhack.rl.checkpoints import CKPT_DIR
from jaxhack.rl.config import ConfigError, TrainConfig, add_config_args, config_from_args, flag_name
from jaxhack.rl.data import TEMPLATE_TEACHER
from jaxhack.rl.run import DONE_FILE, METRICS_FILE, RUN_FILE
from jaxhack.rl.trainer import step_seconds, train
from jaxhack.tracking import TrackingUnavailable, add_tracking_args, settings_from_args


def timing_report(run_dir: Path) -> str:
    """Mean seconds per step split into generation / grading / reference pass / update (step 0, which
    compiles, reported separately)."""
    metrics = read_jsonl(run_dir / METRICS_FILE)
    if not metrics:
        return "no steps"
    first = step_seconds(metrics[0])
    lines = [f"step {metrics[0]['step']} (incl. compilation): " + ", ".join(f"{k} {v:.2f}s" for k, v in first.items())]
    rest = [step_seconds(m) for m in metrics[1:]]
    if rest:
        lines.append(f"steps {metrics[1]['step']}..{metrics[-1]['step']} mean: "
                     + ", ".join(f"{k} {np.mean([r[k] for r in rest]):.2f}s" for k in rest[0]))
    return "\n".join(lines)


def degenerate_note(run_dir: Path) -> str | None:
    """A note when every step had one reward for all rows (advantage 0: nothing was learned)."""
    metrics = read_jsonl(run_dir / METRICS_FILE)
    if metrics and all(float(m.get("reward_std", 0.0)) == 0.0 for m in metrics):
        return ("note: the reward was the same for every rollout at every step, so every advantage is 0 and "
                "nothing was learned (e.g. a model with random weights never writes a code block). For a non-degenerate "
                "run mix in teacher rows: --mix-teacher templates (or a TEACHER_POOL dir) --mix-per-group 1 "
                "--max-new 256")
    return None


def add_arguments(parser) -> None:
    add_config_args(parser)
    describe_preset(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--force", action="store_true",
                        help="replace the run in --run-dir (the old one is removed once the new one finishes)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps of this invocation (no done.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser._option_string_actions["--mesh"].help = (
        "device mesh, e.g. data=8: rollout rows sharded over 8 devices, params and optimizer state replicated "
        "(default: none, one device); not part of the resume identity")
    parser.add_argument("--coordinator", default=None,
                        help=f"multi-host: coordinator host:port for jax.distributed.initialize (default: "
                             f"${meshlib.ENV_COORDINATOR}; with neither, one process)")
    parser.add_argument("--num-processes", type=int, default=None, help=f"multi-host (default ${meshlib.ENV_COUNT})")
    parser.add_argument("--process-id", type=int, default=None, help=f"multi-host (default ${meshlib.ENV_ID})")
    add_tracking_args(parser)


def tracking_checked(args):
    """TrackingSettings from the flags; UserError when an asked-for tracker is not installed."""
    try:
        return settings_from_args(args)
    except TrackingUnavailable as err:
        raise UserError(str(err)) from None


def describe_preset(parser) -> None:
    """Help text of --preset (rl/config.add_config_args defines the flag)."""
    parser._option_string_actions["--preset"].help = ("base settings every other flag overrides: smoke (CPU, "
                                                       "seconds, tiny model), fast (one GPU, minutes), full (the seed's run)")


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def config_error_line(err: ConfigError) -> str:
    """TrainConfig's errors on one line, in its order, a leading field name written as its flag
    ("group_size must be >= 2, ..." -> "--group-size must be >= 2, ..."; a rule on several fields,
    "ckpt_every and eval_every ...", is left as it is)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    lines = []
    for line in err.errors:
        name = line.split(" ", 1)[0]
        if name in fields and not line.startswith(f"{name} and "):
            line = flag_name(name) + line[len(name):]
        lines.append(one_line(line))
    return "invalid training config: " + "; ".join(lines)


def config_checked(args, **extra):
    """TrainConfig from the flags; UserError (one line) for an invalid one or a missing input."""
    try:
        cfg = config_from_args(args, **extra)
    except ConfigError as err:
        raise UserError(config_error_line(err)) from None
    except ValueError as err:
        raise UserError(one_line(err)) from None
    checks.check_ckpt(cfg.ckpt)
    for flag, path in (("--problems", cfg.problems), ("--eval-problems", cfg.eval_problems)):
        if path and path != "bundled":
            checks.existing(flag, path, "file")
    if cfg.mix_teacher and cfg.mix_teacher != TEMPLATE_TEACHER:
        checks.check_pool("--mix-teacher", cfg.mix_teacher, allow_partial=False)
    if cfg.v_hack and cfg.v_hack != "random":
        checks.load_v_hack_checked("--v-hack", cfg.v_hack)
    if cfg.tokenizer and cfg.tokenizer != "byte":
        checks.existing("--tokenizer", cfg.tokenizer, "dir")
    try:
        meshlib.make_mesh(cfg.mesh)  # enough devices (after jax.distributed.initialize: all hosts' devices)
    except ValueError as err:
        raise UserError(f"--mesh: {one_line(err)}") from None
    return cfg


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> Path | None:
    """The run-directory rule for a Phase 3 run: an existing run is refused unless --resume (continue)
    or --force (moved aside, removed when the new run finishes; restored if it fails). Returns the
    moved-aside old run, if any."""
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    finished = lambda p: (p / DONE_FILE).is_file()  # noqa: E731
    if resume:
        check_writable(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            print(f"note: --resume: no run in {run_dir} yet; starting a new run there")
        removed = remove_stale_temp_dirs(run_dir / CKPT_DIR)
        if removed:
            print(f"note: removed {len(removed)} unfinished checkpoint write(s): {', '.join(p.name for p in removed)}")
        return None
    if not claim_run_dir(run_dir, what="Phase 3 run", finished=finished, force=force, resumable=True):
        return None
    aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.old-", dir=run_dir.parent))
    os.rename(run_dir, aside / run_dir.name)
    return aside


def run(args) -> int:
    try:
        meshlib.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"multi-host: {one_line(err)}") from None
    cfg = config_checked(args)
    tracking = tracking_checked(args)
    run_dir = Path(cfg.run_dir)
    aside = prepare_run_dir(run_dir, args.resume, args.force) if meshlib.is_primary() else None
    meshlib.barrier("jaxhack-run-dir")
    try:
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                        tracking=tracking)
    except BaseException as err:
        if aside is not None:  # --force: put the replaced run back
            shutil.rmtree(run_dir, ignore_errors=True)
            os.rename(aside / run_dir.name, run_dir)
            shutil.rmtree(aside, ignore_errors=True)
            args._resume_hint = f"the previous run in {run_dir} was kept; rerun with --force to replace it"
        if isinstance(err, (FileExistsError, FileNotFoundError, ValueError)) and not isinstance(err, UserError):
            raise UserError(one_line(err)) from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    print(timing_report(run_dir))
    print(json.dumps(summary, sort_keys=True))
    note = degenerate_note(run_dir)
    if note:
        print(note)
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
