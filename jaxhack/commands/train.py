"""Phase 3 training run: sample -> grade -> Dr.GRPO (+K3 KL to the base model) -> optax chain
(clip, hack projection, adamw) -> orbax checkpoints (docs/phase3.md).

    jaxhack train --preset smoke --arm projected --run-dir out/p3/smoke
    jaxhack train --preset fast --ckpt qwen3-4b --arm vanilla --run-dir out/p3/fast
    jaxhack train --preset fast --ckpt random-4b --svd-random-bases true \
        --v-hack random --steps 3 --run-dir out/p3/bench      # GPU benchmark with random weights
    jaxhack train ... --resume                                 # continue a killed run
    (or: python scripts/phase3_train.py ...)

Every TrainConfig field is a flag (--group-size, --prompts-per-step, --lr, --mix-teacher DIR,
--mix-per-group K, --eval-every N, --ckpt-every N, ...); flags override the preset. Writes
RUN/{run.json, metrics.jsonl, eval.jsonl, v_hack/, rollouts/, ckpt/step_NNNNNN/, done.json}.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxhack.commands import fail, script_main
from jaxhack.io import read_jsonl
from jaxhack.rl.config import add_config_args, config_from_args
from jaxhack.rl.run import METRICS_FILE
from jaxhack.rl.trainer import train


def timing_report(run_dir: Path) -> str:
    """Mean seconds per step split into generation / grading / update (step 0, which compiles,
    reported separately)."""
    metrics = read_jsonl(run_dir / METRICS_FILE)
    if not metrics:
        return "no steps"
    keys = ("time_generation_s", "time_grading_s", "time_update_s", "time_step_s")
    first = metrics[0]
    lines = [f"step {first['step']} (incl. compilation): " + ", ".join(f"{k[5:-2]} {first[k]:.2f}s" for k in keys)]
    rest = metrics[1:]
    if rest:
        lines.append(f"steps {rest[0]['step']}..{rest[-1]['step']} mean: "
                     + ", ".join(f"{k[5:-2]} {np.mean([m[k] for m in rest]):.2f}s" for k in keys))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps of this invocation (no done.json)")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    try:
        cfg = config_from_args(args)
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        return fail(err)
    print(timing_report(Path(cfg.run_dir)))
    print(json.dumps(summary, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
