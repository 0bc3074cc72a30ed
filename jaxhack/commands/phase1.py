"""Phase 1 NLL distillation probe over a teacher pool (../shared/seed/spec2.md, "Phase 1").

    jaxhack phase1 --ckpt tiny --pool runs/teacher_pool --v-hack runs/v_hack_svd \
        --steps 20 --out runs/p1
    (or: python scripts/phase1_distill.py ...)

Per-sample cos(NLL grad, v_hack), split pure-hack vs hack+correct (Welch t-test); the projected arm
reports cos_in / cos_out / frac_fired per step. Writes the slim probe records, run.json and
phase1_split.json (read by `jaxhack analyze --phase1 OUT`). Same run-directory rule as phase2.
"""
from __future__ import annotations

import json

from jaxhack.commands import script_main
from jaxhack.commands.phase2 import add_probe_arguments, check_probe_args, load_pools, probe_settings, probe_setup
from jaxhack.io import atomic_directory
from jaxhack.probes.phase1 import format_split, split_pure_vs_correct
from jaxhack.probes.phase2 import run_replay
from jaxhack.projection.arms import PHASE1_ARMS

SPLIT_FILE = "phase1_split.json"


def add_arguments(ap) -> None:
    ap.add_argument("--pool", required=True, help="teacher pool directory")
    ap.add_argument("--per-step", type=int, default=8, help="samples per probe step")
    ap.add_argument("--arm", default="projected", choices=PHASE1_ARMS, help="probe arm")
    add_probe_arguments(ap)


def run(args) -> int:
    check_probe_args(args, "--per-step", args.per_step)
    pools, notes = load_pools("--pool", [args.pool], args.allow_partial)
    params, config, tokenizer, desc, trainable, frozen, v_hack = probe_setup(args, "svd")
    settings = probe_settings(args, args.arm, "nll", args.per_step)
    info = {"model": desc, "v_hack": str(args.v_hack), "phase": 1, **({"partial_inputs": notes} if notes else {})}
    with atomic_directory(args.out) as work:
        records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, work,
                             run_info=info)
        split = split_pure_vs_correct(records)
        (work / SPLIT_FILE).write_text(json.dumps(split, indent=2, default=float) + "\n")
    print(format_split(split))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
