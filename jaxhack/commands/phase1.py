"""Phase 1 NLL distillation probe over a teacher pool (../shared/seed/spec2.md, "Phase 1").

    jaxhack phase1 --ckpt tiny --pool runs/teacher_pool --v-hack runs/v_hack_svd \
        --steps 20 --out runs/p1
    (or: python scripts/phase1_distill.py ...)

Per-sample cos(NLL grad, v_hack), split pure-hack vs hack+correct (Welch t-test); the projected arm
reports cos_in / cos_out / frac_fired per step. Writes the slim probe records, run.json and
phase1_split.json (read by `jaxhack analyze --phase1 OUT`). Same run-directory rule as phase2, and the
same run configs: run.json's "config" records every input, `--config RUN/run.json --out NEW` reruns it
(flags given explicitly override the file; docs/analysis.md, "Run configs").
"""
from __future__ import annotations

import json

from jaxhack.commands import checks, script_main
from jaxhack.commands.phase2 import (PROBE_DEFAULTS, add_probe_arguments, check_probe_args, config_file_fields,
                                     load_pools, probe_run_info, probe_settings, probe_setup, probe_values)
from jaxhack.io import atomic_directory
from jaxhack.probes.phase1 import format_split, split_pure_vs_correct
from jaxhack.probes.phase2 import run_replay
from jaxhack.projection.arms import PHASE1_ARMS

SPLIT_FILE = "phase1_split.json"


PHASE1_DEFAULTS = {**PROBE_DEFAULTS, "loss_mode": "nll", "arm": "projected", "per_pool": 8}


def add_arguments(ap) -> None:
    ap.add_argument("--config", default=None, metavar="FILE",
                    help="a Phase 1 run's run.json (rerun it; give a new --out) or a JSON / YAML file of its "
                         "\"config\" fields; flags given explicitly override the file")
    ap.add_argument("--pool", default=None, help="teacher pool directory (required unless --config gives it)")
    ap.add_argument("--per-step", type=int, default=None,
                    help=f"samples per probe step (default: {PHASE1_DEFAULTS['per_pool']})")
    ap.add_argument("--arm", default=None, choices=PHASE1_ARMS,
                    help=f"probe arm (default: {PHASE1_DEFAULTS['arm']})")
    add_probe_arguments(ap)


def phase1_values(args) -> dict:
    """Every input of the run: defaults <- the --config file <- flags given explicitly. The config's
    fields are Phase 2's (`probes.replay_config`): replay_dirs holds the one pool, per_pool is
    --per-step, loss_mode is nll."""
    renamed = {"per_pool": "per_step"}
    args.replay_dirs = [args.pool] if args.pool else None
    values = probe_values(args, PHASE1_DEFAULTS, config_file_fields(args, "phase1", renamed), renamed=renamed)
    dirs = values.get("replay_dirs") or []
    if len(dirs) != 1:
        raise checks.UserError("--pool is required (or --config FILE that gives replay_dirs)" if not dirs else
                               f"--config {args.config}: replay_dirs: Phase 1 takes one (teacher) pool, got {len(dirs)}")
    if values["loss_mode"] != "nll" or values["arm"] not in PHASE1_ARMS:
        raise checks.UserError(f"--config {args.config}: Phase 1 is the NLL probe with arm one of {list(PHASE1_ARMS)}; "
                               f"got loss_mode {values['loss_mode']!r}, arm {values['arm']!r}")
    return values


def run(args) -> int:
    values = phase1_values(args)
    check_probe_args(values, "--per-step", args.out, args.force)
    pools, notes = load_pools("--pool", values["replay_dirs"], values["allow_partial"])
    params, config, tokenizer, desc, trainable, frozen, v_hack, adapter = probe_setup(values, "svd")
    settings = probe_settings(values)
    info = probe_run_info(args, 1, desc, values, settings, adapter, notes)
    with atomic_directory(args.out) as work:
        records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, work,
                             run_info=info)
        split = split_pure_vs_correct(records)
        (work / SPLIT_FILE).write_text(json.dumps(split, indent=2, default=float) + "\n")
    print(format_split(split))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
