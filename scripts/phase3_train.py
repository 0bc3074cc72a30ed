"""Phase 3 training run: sample -> grade -> Dr.GRPO (+K3 KL to the base model) -> optax chain
(clip, hack projection, adamw) -> orbax checkpoints (docs/phase3.md).

    python scripts/phase3_train.py --preset smoke --arm projected --run-dir out/p3/smoke
    python scripts/phase3_train.py --preset fast --ckpt qwen3-4b --arm vanilla --run-dir out/p3/fast
    python scripts/phase3_train.py --preset fast --ckpt random-4b --svd-random-bases true \
        --v-hack random --steps 3 --run-dir out/p3/bench      # GPU benchmark with random weights
    python scripts/phase3_train.py ... --resume                 # continue a killed run

Every TrainConfig field is a flag (--group-size, --prompts-per-step, --lr, --mix-teacher DIR,
--mix-per-group K, --eval-every N, --ckpt-every N, ...); flags override the preset. Writes
RUN/{run.json, metrics.jsonl, eval.jsonl, v_hack/, rollouts/, ckpt/step_NNNNNN/, done.json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import numpy as np  # noqa: E402

from jaxhack.rl.config import add_config_args, config_from_args  # noqa: E402


def timing_report(run_dir: Path) -> str:
    """Mean seconds per step split into generation / grading / update (step 0, which compiles,
    reported separately)."""
    from jaxhack.rl.trainer import METRICS_FILE, read_jsonl

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps of this invocation (no done.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from jaxhack.rl.trainer import train

    try:
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(timing_report(Path(cfg.run_dir)))
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
