"""Wall time of a full sweep extrapolated from a short one (issue 18; docs/phase3.md, "Sweep
across GPUs / a cluster"): a Ray sweep of the seed's layout run for a few steps gives each run's
setup time, first step (compile included) and steady step time; a full run of `full_steps` steps
takes setup + step_0 + (full_steps - 1) * steady, and the sweep takes, wave by wave (the cost
ceiling's first wave, then the rest), ceil(runs in the wave / concurrent runs) * the slowest run.
Eval passes and checkpoint writes beyond those in the measured steps are not included.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxhack.io import read_jsonl

SEED_SEQUENTIAL_HOURS = 65.0  # ../shared/seed/spec2.md: 9 runs x ~7 h on one GPU, sequential


def run_timing(run_dir: str | Path) -> dict:
    """{"setup_s", "step0_s", "steady_step_s", "steady_from", "steps"} of one run directory."""
    run_dir = Path(run_dir)
    steps = [m["time_step_s"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if not steps:
        raise ValueError(f"{run_dir}: no training step recorded in metrics.jsonl")
    later = steps[1:]
    return {"setup_s": float(info.get("setup_s", 0.0)), "step0_s": float(steps[0]), "steps": len(steps),
            "steady_step_s": float(np.median(later)) if later else float(steps[0]),
            "steady_from": f"median of steps 1..{len(steps) - 1}" if later else "step 0 (compile included)"}


def full_run_s(timing: dict, full_steps: int) -> float:
    return timing["setup_s"] + timing["step0_s"] + (full_steps - 1) * timing["steady_step_s"]


def extrapolate(summary: dict, full_steps: int = 200, seed_hours: float = SEED_SEQUENTIAL_HOURS) -> dict:
    """The estimate from a Ray sweep's summary.json (its runs, waves and concurrent runs)."""
    slots = int(summary["ray"]["concurrent_runs"])
    runs = {(r["arm"], r["seed"]): r for r in summary["runs"]}
    per_run = []
    for (arm, seed), r in runs.items():
        t = run_timing(r["run_dir"])
        place = (r.get("placement") or [{}])[-1]
        per_run.append({"arm": arm, "seed": seed, **t, "full_run_h": full_run_s(t, full_steps) / 3600,
                        "host": place.get("host"), "devices": place.get("devices"), "slots": place.get("slots"),
                        "gpu_ids": place.get("gpu_ids"), "pid": place.get("pid")})
    hours = {(p["arm"], p["seed"]): p["full_run_h"] for p in per_run}
    waves = [[tuple(k) for k in w if tuple(k) in hours] for w in summary["ray"]["waves"]]
    waves = [w for w in waves if w]
    slowest = max(hours.values())
    wall_waves = sum(math.ceil(len(w) / slots) * max(hours[k] for k in w) for w in waves)
    wall_flat = math.ceil(len(hours) / slots) * slowest
    return {"runs": len(hours), "concurrent_runs": slots, "full_steps": full_steps,
            "steps_measured": max(p["steps"] for p in per_run),
            "waves": [len(w) for w in waves], "per_run": per_run,
            "formula": "sum over waves of ceil(runs in wave / concurrent runs) * slowest full run; "
                       "full run = setup + step_0 + (full_steps - 1) * steady step",
            "full_run_h_max": slowest, "full_run_h_mean": float(np.mean(list(hours.values()))),
            "sweep_wall_h_ceiling_waves": wall_waves, "sweep_wall_h_one_wave": wall_flat,
            "sequential_h_measured": float(sum(hours.values())), "seed_sequential_h": seed_hours,
            "speedup_vs_seed": seed_hours / wall_waves if wall_waves else None,
            "measured_sweep_wall_s": summary["ray"].get("sweep_wall_s")}
