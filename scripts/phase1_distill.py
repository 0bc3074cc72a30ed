"""Phase 1 NLL distillation probe over a teacher pool (../shared/seed/spec2.md, "Phase 1").

    python scripts/phase1_distill.py --ckpt tiny --pool runs/teacher_pool --v-hack runs/v_hack_svd \
        --steps 20 --out runs/p1

Per-sample cos(NLL grad, v_hack), split pure-hack vs hack+correct (Welch t-test); the projected arm
reports cos_in / cos_out / frac_fired per step. Writes the slim probe records, run.json and
phase1_split.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxhack.probes.phase1 import format_split, split_pure_vs_correct  # noqa: E402
from jaxhack.probes.phase2 import ReplaySettings, load_replay_pool, run_replay  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phase2_replay import add_replay_args, setup  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True, help="teacher pool directory")
    ap.add_argument("--per-step", type=int, default=8, help="samples per probe step")
    ap.add_argument("--arm", default="projected", choices=("vanilla", "projected"))
    add_replay_args(ap)
    args = ap.parse_args(argv)

    params, config, tokenizer, desc, trainable, frozen, v_hack = setup(args, "svd")
    settings = ReplaySettings(arm=args.arm, loss_mode="nll", steps=args.steps, per_pool=args.per_step,
                              lr=args.lr, seed=args.seed, gate=args.gate, overshoot=args.overshoot,
                              max_completion_tokens=args.max_completion_tokens,
                              max_prompt_tokens=args.max_prompt_tokens, remat=args.remat)
    records = run_replay([load_replay_pool(args.pool)], params, config, tokenizer, trainable, frozen,
                         v_hack, settings, args.out, run_info={"model": desc, "phase": 1})
    split = split_pure_vs_correct(records)
    Path(args.out, "phase1_split.json").write_text(json.dumps(split, indent=2, default=float) + "\n")
    print(format_split(split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
