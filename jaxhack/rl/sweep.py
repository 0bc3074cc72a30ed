"""Phase 3 sweep: seeds x arms, one run dir per (arm, seed), the seed's cost ceiling, a summary table
(docs/phase3.md, "Sweep"). `run_sweep` is the sequential backend (one process); the Ray backend
(`jaxhack.rl.sweep_ray`) shares the run dirs, the ceiling verdict and the summary writer below.

Order: arm-major (every seed of the first arm, then the next arm, ...), each run in OUT/ARM/seed_S.
A run with RUN/done.json is skipped; an unfinished one is resumed from its last checkpoint (the
trainer is always called with resume=True).

Cost ceiling (../shared/seed/spec2.md: "If after 3 seeds x 1 arm we see no separation, stop. Don't
burn the other 6 runs"). Separation, concretely: hacking emerged in the first arm, i.e. in at least
one of its first `ceiling_seeds` seeds the run's peak hack rate reached `hack_threshold`, where the
peak is `ceiling_metric` of the run summary (default: the max over the run of the 5-step moving
average of the policy rollouts' hack rate, teacher rows excluded). With the first arm = vanilla,
no separation means there is no hacking for projection to suppress, so the other arms cannot
separate from it: the sweep stops after those runs, says so and writes OUT/STOPPED.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxhack.io import atomic_write_text
from jaxhack.rl.config import ARM_NAMES, TrainConfig
from jaxhack.rl.h1 import final_rate, h1_table
from jaxhack.rl.run import DONE_FILE, RUN_FILE
from jaxhack.rl.trainer import train

DEFAULT_CEILING_METRIC = "train_hack_rate_max_windowed"
STOPPED_FILE, SUMMARY_MD, SUMMARY_JSON = "STOPPED.md", "summary.md", "summary.json"


def run_dir_for(out: str | Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed_{seed}"


def read_done(run_dir: Path) -> dict | None:
    """The summary in RUN/done.json, or None when the run has not finished."""
    path = Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["summary"]


def separated(summaries: Sequence[dict], hack_threshold: float, metric: str = DEFAULT_CEILING_METRIC) -> bool:
    """True when some run's `metric` (its peak hack rate) reached hack_threshold."""
    values = [s.get(metric) for s in summaries]
    return any(v is not None and not math.isnan(v) and v >= hack_threshold for v in values)


def _final(summary: dict, name: str) -> float:
    """Final hack / gt-pass rate of a run: the last eval when there is one, else the training
    window (policy rollouts of the last 5 steps)."""
    return final_rate(summary, name)


ARM_OPTION_FIELDS = {"placement": str, "gate": str, "overshoot": float, "k": int}


def parse_arm(spec: str) -> tuple[str, dict]:
    """An arm spec: ARM or ARM+field=value[+field=value] (fields: placement, gate, overshoot, k),
    e.g. "projected+placement=update". Returns (arm, TrainConfig overrides); ValueError if invalid."""
    arm, *options = spec.split("+")
    if arm not in ARM_NAMES:
        raise ValueError(f"unknown arm {arm!r} in {spec!r}; expected from {ARM_NAMES}")
    overrides = {}
    for option in options:
        field, sep, value = option.partition("=")
        if not sep or field not in ARM_OPTION_FIELDS:
            raise ValueError(f"arm option {option!r} in {spec!r}: expected FIELD=VALUE with FIELD in "
                             f"{sorted(ARM_OPTION_FIELDS)}")
        overrides[field] = ARM_OPTION_FIELDS[field](value)
    return arm, overrides


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def summary_table(runs: Sequence[dict], arms: Sequence[str]) -> tuple[str, list[dict]]:
    """Markdown table of final hack rate and gt pass rate per arm (mean ± sample std over the
    finished seeds) and the rows as dicts."""
    rows = []
    for arm in arms:
        done = [r for r in runs if r["arm"] == arm and r["summary"] is not None and r["finished"]]
        hack = _mean_std([_final(r["summary"], "hack_rate") for r in done])
        gt = _mean_std([_final(r["summary"], "gt_pass_rate") for r in done])
        peak = _mean_std([float(r["summary"].get(DEFAULT_CEILING_METRIC, float("nan"))) for r in done])
        rows.append({"arm": arm, "n_seeds": len(done), "seeds": [r["seed"] for r in done],
                     "hack_rate_mean": hack[0], "hack_rate_std": hack[1], "gt_pass_rate_mean": gt[0],
                     "gt_pass_rate_std": gt[1], "peak_hack_rate_mean": peak[0]})

    def fmt(mean, std):
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    lines = ["| arm | seeds | final hack rate | final gt pass rate | peak hack rate (5-step window) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['n_seeds']} | {fmt(r['hack_rate_mean'], r['hack_rate_std'])} | "
                     f"{fmt(r['gt_pass_rate_mean'], r['gt_pass_rate_std'])} | "
                     f"{fmt(r['peak_hack_rate_mean'], float('nan'))} |")
    return "\n".join(lines) + "\n", rows


def check_sweep(arms: Sequence[str], seeds: Sequence[int]) -> None:
    """ValueError before anything runs: no arms/seeds, a bad arm spec, a repeated value."""
    if not arms or not seeds:
        raise ValueError("need at least one arm and one seed")
    for arm in arms:
        parse_arm(arm)
    if len(set(arms)) != len(arms) or len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate arms or seeds: {list(arms)} {list(seeds)}")


def run_config(base: TrainConfig, out: str | Path, arm: str, seed: int) -> TrainConfig:
    """The TrainConfig of run (arm spec, seed) of a sweep in `out`."""
    arm_name, overrides = parse_arm(arm)
    return dataclasses.replace(base, arm=arm_name, seed=seed, run_dir=str(run_dir_for(out, arm, seed)), **overrides)


def ceiling_applies(ceiling: bool, arms: Sequence[str]) -> bool:
    return ceiling and len(arms) > 1


def ceiling_verdict(first_arm_runs: Sequence[dict], arms: Sequence[str], hack_threshold: float,
                    metric: str = DEFAULT_CEILING_METRIC) -> tuple[bool, str]:
    """(stopped, reason) after the first `ceiling_seeds` runs of the first arm (run records with
    "seed" and "summary"): stop when none of them separated (reached hack_threshold)."""
    if separated([r["summary"] or {} for r in first_arm_runs], hack_threshold, metric):
        return False, ""
    peaks = {r["seed"]: (r["summary"] or {}).get(metric) for r in first_arm_runs}
    return True, (f"cost ceiling: after {len(first_arm_runs)} seed(s) of the first arm ({arms[0]!r}) no "
                  f"separation: {metric} per seed {peaks} stayed below "
                  f"hack_threshold={hack_threshold}, so there is no hacking for the other "
                  f"arms ({', '.join(arms[1:])}) to suppress. Stopped without running them "
                  f"(seed spec2.md: \"Don't burn the other runs\"). Pass --no-ceiling to "
                  f"run them anyway.")


def strict_json(value):
    """`value` with every NaN / inf float replaced by None (summary.json is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def finish_sweep(out: Path, arms: Sequence[str], seeds: Sequence[int], runs: list[dict], stopped: bool,
                 reason: str, hack_threshold: float, ceiling_metric: str, log: Callable[[str], None] = print,
                 extra: dict | None = None) -> dict:
    """Write OUT/summary.md, OUT/summary.json (strict JSON: NaN -> null) and OUT/STOPPED.md when
    stopped; returns {"runs", "stopped", "reason", "table", "rows", "h1"}. extra: more top-level
    summary.json fields (the backend, failed runs, placement)."""
    table, rows = summary_table(runs, arms)
    h1_text, h1_rows = h1_table(runs, arms)
    if h1_text:
        table += "\n## H1 test\n\n" + h1_text
    header = f"# Phase 3 sweep: {out}\n\narms {list(arms)}, seeds {list(seeds)}\n\n"
    if stopped:
        header += f"**STOPPED**: {reason}\n\n"
        atomic_write_text(out / STOPPED_FILE, reason + "\n")
    failed = [r for r in runs if r.get("failed")]
    if failed:
        header += "**FAILED runs** (rerun the same command to resume them): " + "; ".join(
            f"{r['arm']} seed {r['seed']}: {r['status']}" for r in failed) + "\n\n"
    text = header + table
    atomic_write_text(out / SUMMARY_MD, text)
    record = {"arms": list(arms), "seeds": list(seeds), "stopped": stopped, "reason": reason, "rows": rows,
              "h1": h1_rows, "runs": runs, "hack_threshold": hack_threshold, "ceiling_metric": ceiling_metric,
              **(extra or {})}
    atomic_write_text(out / SUMMARY_JSON, json.dumps(strict_json(json.loads(json.dumps(record, default=str))),
                                                     indent=2, sort_keys=True, allow_nan=False) + "\n")
    log(text)
    if stopped:
        log(f"[sweep] {reason}")
    return {"runs": runs, "stopped": stopped, "reason": reason, "table": table, "rows": rows, "h1": h1_rows}


def tracking_kwargs(tracking, out: Path, arm: str, seed: int) -> dict:
    """{"tracking": settings} naming the run ARM/seed_S in the sweep's group (the out dir's name), or {}."""
    if tracking is None:
        return {}
    return {"tracking": tracking.with_tags(group=Path(out).resolve().name, name=f"{arm}/seed_{seed}")}


def run_sweep(base: TrainConfig, out: str | Path, arms: Sequence[str], seeds: Sequence[int],
              train_fn: Callable | None = None, ceiling: bool = True, ceiling_seeds: int = 3,
              hack_threshold: float = 0.1, ceiling_metric: str = DEFAULT_CEILING_METRIC, model=None,
              log: Callable[[str], None] = print, tracking=None) -> dict:
    """Run every (arm, seed) in order in this process (`--backend local`); returns {"runs",
    "stopped", "reason", "table", "rows", "h1"}.

    train_fn(cfg, resume=True, model=model) -> summary (default jaxhack.rl.trainer.train; tests
    inject a cheap fake). model: a preloaded (params, config, tokenizer) shared by all runs.
    tracking: jaxhack.tracking.TrackingSettings forwarded to every run, grouped by the sweep's
    directory name and named ARM/seed_S (the trainer adds the arm:/seed:/preset: tags).
    """
    check_sweep(arms, seeds)
    if train_fn is None:
        train_fn = train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STOPPED_FILE).unlink(missing_ok=True)
    runs: list[dict] = []
    stopped, reason = False, ""
    n_check = min(ceiling_seeds, len(seeds))
    for a_index, arm in enumerate(arms):
        for seed in seeds:
            run_dir = run_dir_for(out, arm, seed)
            summary = read_done(run_dir)
            if summary is not None:
                status = "skipped (done)"
            else:
                status = "resumed" if (run_dir / RUN_FILE).is_file() else "ran"
                log(f"[sweep] {arm} seed {seed}: {status} -> {run_dir}")
                t0 = time.time()
                cfg = run_config(base, out, arm, seed)
                returned = train_fn(cfg, resume=True, model=model, **tracking_kwargs(tracking, out, arm, seed))
                summary = read_done(run_dir) or returned
                status += f" in {time.time() - t0:.0f}s"
            finished = read_done(run_dir) is not None
            runs.append({"arm": arm, "seed": seed, "run_dir": str(run_dir), "status": status,
                         "finished": finished, "summary": summary})
            log(f"[sweep] {arm} seed {seed}: {status}; " + json.dumps(summary, sort_keys=True))
            first_arm_runs = [r for r in runs if r["arm"] == arms[0]]
            if ceiling_applies(ceiling, arms) and a_index == 0 and len(first_arm_runs) == n_check:
                stopped, reason = ceiling_verdict(first_arm_runs, arms, hack_threshold, ceiling_metric)
                if stopped:
                    break
        if stopped:
            break
    return finish_sweep(out, arms, seeds, runs, stopped, reason, hack_threshold, ceiling_metric, log,
                        extra={"backend": "local"})
