"""Phase 1 NLL distillation probe over a teacher pool (../shared/seed/spec2.md, "Phase 1").

    jaxhack phase1 --ckpt tiny --pool runs/teacher_pool --v-hack runs/v_hack_svd \
        --steps 20 --out runs/p1
    (or: python scripts/phase1_distill.py ...)

Per-sample cos(NLL grad, v_hack), split pure-hack vs hack+correct (Welch t-test); the projected arm
reports cos_in / cos_out / frac_fired per step. Writes the slim probe records, run.json and
phase1_split.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxhack.commands import fail, script_main
from jaxhack.commands.phase2 import add_probe_arguments, probe_settings
from jaxhack.probes.phase1 import format_split, split_pure_vs_correct
from jaxhack.probes.phase2 import load_probe_setup, load_replay_pool, run_replay
from jaxhack.projection.arms import PHASE1_ARMS


def add_arguments(ap) -> None:
    ap.add_argument("--pool", required=True, help="teacher pool directory")
    ap.add_argument("--per-step", type=int, default=8, help="samples per probe step")
    ap.add_argument("--arm", default="projected", choices=PHASE1_ARMS)
    add_probe_arguments(ap)


def run(args) -> int:
    try:
        params, config, tokenizer, desc, trainable, frozen, v_hack = load_probe_setup(
            args.ckpt, args.v_hack, "svd", args.seed)
    except (ValueError, FileNotFoundError) as err:
        return fail(err)
    settings = probe_settings(args, args.arm, "nll", args.per_step)
    records = run_replay([load_replay_pool(args.pool)], params, config, tokenizer, trainable, frozen,
                         v_hack, settings, args.out, run_info={"model": desc, "phase": 1})
    split = split_pure_vs_correct(records)
    Path(args.out, "phase1_split.json").write_text(json.dumps(split, indent=2, default=float) + "\n")
    print(format_split(split))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
