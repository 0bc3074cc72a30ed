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
from jaxhack.commands.phase2 import (PROBE_DEFAULTS, add_probe_arguments, check_probe_args, load_pools, probe_settings,
                                     probe_setup, probe_values)
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
    values = probe_values(args, {**PROBE_DEFAULTS, "loss_mode": "nll"}, renamed={"per_pool": "per_step"})
    check_probe_args(values, "--per-step", args.out, args.force)
    pools, notes = load_pools("--pool", [args.pool], values["allow_partial"])
    params, config, tokenizer, desc, trainable, frozen, v_hack, _ = probe_setup(values, "svd")
    settings = probe_settings(values)
    info = {"model": desc, "v_hack": str(values["v_hack"]), "phase": 1, **({"partial_inputs": notes} if notes else {})}
    with atomic_directory(args.out) as work:
        records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, work,
                             run_info=info)
        split = split_pure_vs_correct(records)
        (work / SPLIT_FILE).write_text(json.dumps(split, indent=2, default=float) + "\n")
    print(format_split(split))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
