"""Phase 2 analysis: per-step cosine trajectories, per-sample buckets, the spec2 verification table
and the Phase 3 go/no-go verdict (spec2.md "Phase 2 verification", "Decision rules",
"Skip Phase 3 if"). Split by role: `tables` (loading, per-step
and per-sample tables), `verdict` (verification table, thresholds, decision), `plots`; this
module writes the report.

Entry point: `analyze_runs(dirs, report_path, plots_dir) -> summary` loads one run directory per
arm (records written by `jaxhack.probes.records.write_step`), writes report.md and PNG plots, and
returns a dict (verdict, verification rows, tables) that `format_summary` turns into text.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxhack.probes import stats
from jaxhack.probes.plots import (plot_advantages, plot_contrib_buckets, plot_cos_trajectory)
from jaxhack.probes.tables import (DEFAULT_GATE, DEFAULT_OVERSHOOT, PROJECTED_ARM, TINY_ADV, VANILLA_ARM,
                                   advantage_summary, behaviour_rows, bucket_rows, control_runs, find_run,
                                   hacked_vs_not_hacked, load_runs, run_gate, run_label, run_lr, run_null_sd,
                                   run_overshoot, step_column, step_rows, teacher_vs_base)
from jaxhack.probes.verdict import (NOT_AVAILABLE, SUCCESS, compare_controls, contrib_run, decide_verdict,
                                    discriminates, evaluate_contrib, evaluate_projection,
                                    evaluate_reward_range, evaluate_vanilla_cos_in)

# ---- report ------------------------------------------------------------------------------------
def markdown_cell(value) -> str:
    """Text of a table cell; a literal "|" (as in "|adv|") is escaped so it does not split the cell."""
    return str(value).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def verification_table_lines(verification: list[dict]) -> list[str]:
    return markdown_table(
        ["row", "metric", "arm", "observed", "status", "why"],
        [[row["row"], row["metric"], row["arm"], row["observed"], f"**{row['status']}**", "; ".join(row["reasons"])]
         for row in verification],
    )


def run_row(run: dict) -> list:
    """One readable Runs-table row from a run's run.json."""
    info, settings = run["info"], run["info"].get("settings", {})
    return [run["arm"], run["directory"], info.get("status", "?"), run["n_steps"], run["n_records"],
            info.get("loss_mode", "-"), info.get("group_size", "-"), settings.get("lr", "-"),
            settings.get("gate", "-"), info.get("model", "-")]


RANDOM_MODEL_NOTE = ("the model is a random tiny Qwen3 (untrained weights): these numbers show what the "
                     "pipeline computes, not what a trained model would show.")


def report_notes(runs, allow_partial: bool) -> list[str]:
    """Lines the report must state up front: a random model, partial inputs accepted."""
    notes = []
    if any("random" in str(run.info.get("model", "")) for run in runs):
        notes.append(RANDOM_MODEL_NOTE)
    for run in runs:
        notes += [str(n) for n in run.info.get("partial_inputs", [])]
        if run.info.get("status") not in ("done", None):
            notes.append(f"partial input: run {run.directory} has status {run.info.get('status')!r} "
                         f"(not finished), analysed with --allow-partial")
    return notes


class UnfinishedRunError(ValueError):
    """A run directory whose run.json does not say the run finished."""


def check_finished(dirs, allow_partial: bool) -> None:
    """UnfinishedRunError for a run directory whose run.json has a status other than "done" (a
    killed or failed probe run: run_replay writes "running" first), unless `allow_partial`."""
    from jaxhack.probes.records import read_run_info

    for directory in dirs:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory}: run directory not found")
        status = read_run_info(directory).get("status")  # None: records without a run.json status
        if status not in ("done", None) and not allow_partial:
            raise UnfinishedRunError(f"{directory}: run.json status is {status!r}, not 'done' (killed or "
                                     f"still running?); rerun it, or pass --allow-partial to analyse "
                                     f"the steps it wrote")


def read_phase1(directory) -> dict | None:
    """{"directory", "text", "split"} from a Phase 1 run directory's phase1_split.json, or None."""
    from jaxhack.probes.phase1 import format_split

    if directory is None:
        return None
    path = Path(directory) / "phase1_split.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Phase 1 results (run `jaxhack phase1 --out {directory}`)")
    split = json.loads(path.read_text(encoding="utf-8"))
    return {"directory": str(directory), "text": format_split(split), "split": split}


def report_lines(summary: dict, report_dir: Path) -> list[str]:
    fmt = stats.format_number
    lines = ["# Phase 2 probe analysis", ""]
    lines += [f"**Note:** {note}" for note in summary.get("notes", [])]
    lines += ["", "## Runs", ""]
    lines += markdown_table(
        ["arm", "directory", "status", "steps", "records", "loss", "group", "lr", "gate", "model"],
        [run_row(run) for run in summary["runs"]],
    )
    if summary.get("phase1"):
        lines += ["", "## Phase 1 (NLL distillation over the teacher pool)", "",
                  f"From `{summary['phase1']['directory']}`:", "", "```", summary["phase1"]["text"], "```"]
    lines += ["", f"## Phase 3 verdict: `{summary['verdict']}`", ""]
    lines += [f"- {reason}" for reason in summary["verdict_reasons"]]
    lines += [f"- warning: {warning}" for warning in summary["warnings"]]
    lines += ["", "## Phase 2 verification (spec2)", ""]
    lines += verification_table_lines(summary["verification"])
    lines += ["", "## cos_in / cos_out per step", ""]
    step_table = [[row["arm"], row["step"], row["n_samples"], fmt(row["cos_in"]), fmt(row["cos_out"]),
                   fmt(row["frac_fired"]), fmt(row["reward_min"]), fmt(row["reward_max"]), fmt(row["reward_range"]),
                   fmt(row["median_abs_adv"])]
                  for rows in summary["steps"].values() for row in rows]
    lines += markdown_table(["arm", "step", "n", "cos_in", "cos_out", "frac_fired", "r.min", "r.max", "r range",
                             "median abs adv"], step_table)
    lines += ["", "## cos_S_contrib by (src_pool, hacked)", ""]
    lines += markdown_table(
        ["arm", "src_pool", "hacked", "n", "n NaN", "mean", "std", "95% CI"],
        [[row["arm"], row["src_pool"], row["hacked"], row["n"], row["n_nan"], fmt(row["mean"]), fmt(row["std"]),
          f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]" if not math.isnan(row["ci_low"]) else "n/a"]
         for row in summary["buckets"]],
    )
    lines += ["", "Welch's t-tests (two-sided) of cos_S_contrib:", ""]
    lines += markdown_table(
        ["arm", "comparison", "n_a", "n_b", "mean_a", "mean_b", "t", "dof", "p"],
        [[row["arm"], f"{row['group_a']} vs {row['group_b']}", row["n_a"], row["n_b"], fmt(row["mean_a"]),
          fmt(row["mean_b"]), fmt(row["t"]), fmt(row["dof"], 1), stats.format_p_value(row["p"])]
         for row in summary["comparisons"]],
    )
    lines += ["", "## Advantages", ""]
    lines += markdown_table(
        ["arm", "n logged", "min", "max", "mean", "median abs", f"frac abs < {TINY_ADV:g}"],
        [[row["arm"], f"{row['n']}/{row['n_records']}", fmt(row["min"]), fmt(row["max"]), fmt(row["mean"]),
          fmt(row["median_abs"]), fmt(row["frac_tiny"])] for row in summary["advantages"]],
    )
    lines += diagnostics_lines(summary)
    lines += ["", "## Plots", ""]
    for name, path in summary["plots"].items():
        lines.append(f"![{name}]({os.path.relpath(path, report_dir)})")
    if "advantages" not in summary["plots"]:
        lines.append("(no advantage histogram: no record logged `adv`)")
    lines.append("")
    return lines


def diagnostics_lines(summary: dict) -> list[str]:
    """Issue 13 sections: which optimizer ran, per-step null z / over-projection / update cosine,
    controls side by side, behaviour buckets (docs/analysis.md)."""
    fmt = stats.format_number
    lines = ["", "## Diagnostics per step (null z, over-projection, Adam leak)", ""]
    lines += [f"- {run['arm']}: Phase 2 lr={run['lr']:g} ("
              + ("Adam on delta_s through the Phase 3 chain: the arms move" if run["lr"] > 0
                 else "pure probe: the adapter never moves, projected cos_in = vanilla cos_in") + ")"
              for run in summary["runs"]]
    lines += [""] + markdown_table(
        ["arm", "step", "cos_in", "z (cos_in / null sd)", "over-projected modules", "update cos", "removed frac"],
        [[row["arm"], row["step"], fmt(row["cos_in"]), fmt(row["z_in"], 2), fmt(row["n_overprojected"], 0),
          fmt(row["update_cos"]), fmt(row["removed_frac"])]
         for rows in summary["steps"].values() for row in rows])
    if summary["controls"]:
        lines += ["", "## Controls: real v_hack vs controls (vanilla arm)", ""]
        lines += markdown_table(
            ["run", "control", "steps", "mean cos_in", "mean z", "frac steps z > 2", "teacher - base (unsigned)",
             "p (teacher vs base)", "real beats it"],
            [[row["arm"], row["control"], row["n_steps"], fmt(row["mean_cos_in"]), fmt(row["mean_z"], 2),
              fmt(row["frac_steps_above_null"], 2), fmt(row["teacher_minus_base"]), stats.format_p_value(row["p"]),
              "-" if row["beats"] is None else ("yes" if row["beats"] else "**no**")] for row in summary["controls"]])
    if summary["behaviour"]:
        lines += ["", "## Unsigned cos_S_contrib by behaviour (attempted_hack)", ""]
        lines += markdown_table(
            ["arm", "bucket", "n", "mean", "95% CI"],
            [[row["arm"], row["bucket"], row["n"], fmt(row["mean"]),
              f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"] for row in summary["behaviour"]])
    return lines


def analyze_runs(dirs, report_path=None, plots_dir=None, allow_partial: bool = False,
                 phase1_dir=None) -> dict:
    """Analyze run directories (one arm each); write report.md and PNGs; return the summary dict.

    report_path defaults to <first dir>/report.md; plots_dir to <report dir>/plots.
    Summary keys: verdict, verdict_reasons, warnings, verification (rows 1-4), runs, steps (per arm),
    buckets, comparisons, advantages, plots (name -> path), report_path, notes, phase1.
    A run whose run.json status is not "done" is refused (UnfinishedRunError) unless allow_partial,
    which the report then states. phase1_dir: a Phase 1 run whose results go into the report.
    """
    dirs = [Path(directory) for directory in dirs]
    if not dirs:
        raise ValueError("analyze_runs needs at least one run directory")
    check_finished(dirs, allow_partial)
    phase1 = read_phase1(phase1_dir)
    runs = load_runs(dirs)
    report_path = Path(report_path) if report_path is not None else dirs[0] / "report.md"
    plots_dir = Path(plots_dir) if plots_dir is not None else report_path.parent / "plots"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)

    steps_by_arm = {run_label(run): step_rows(run) for run in runs}
    vanilla = find_run(runs, VANILLA_ARM)
    projected = find_run(runs, PROJECTED_ARM)
    judged = [run for run in runs if run_label(run) == run.arm]  # control runs are compared, not judged
    controls = compare_controls(vanilla, control_runs(runs, VANILLA_ARM))
    row_4_run = contrib_run(judged)
    verification = [evaluate_reward_range(judged), evaluate_vanilla_cos_in(vanilla), evaluate_projection(projected),
                    evaluate_contrib(row_4_run)]
    verdict, verdict_reasons = decide_verdict(
        vanilla_cos_in=step_column(steps_by_arm[VANILLA_ARM], "cos_in") if vanilla else None,
        projected_cos_in=step_column(steps_by_arm[PROJECTED_ARM], "cos_in") if projected else None,
        projected_cos_out=step_column(steps_by_arm[PROJECTED_ARM], "cos_out") if projected else None,
        projected_gate=run_gate(projected) if projected else DEFAULT_GATE,
        projected_overshoot=run_overshoot(projected) if projected else DEFAULT_OVERSHOOT,
        reward_range_status=verification[0]["status"],
        teacher_base_discriminates=discriminates(teacher_vs_base(row_4_run)) if row_4_run else None,
        projected_n_overprojected=(step_column(steps_by_arm[PROJECTED_ARM], "n_overprojected")
                                   if projected and any("n_overprojected" in r for r in projected.records) else None),
        projected_lr=run_lr(projected) if projected else 0.0,
        null_sd=run_null_sd(vanilla) if vanilla else None,
        controls_beaten=[row["beats"] for row in controls if row["control"] != "none"] or None,
    )
    warnings = [f"verification row {row['row']} ({row['metric']}): {row['status']}: {'; '.join(row['reasons'])}"
                for row in verification if row["status"] not in (SUCCESS, NOT_AVAILABLE)]

    plots = {"cos_trajectory": plot_cos_trajectory(steps_by_arm, plots_dir / "cos_trajectory.png"),
             "cos_contrib_buckets": plot_contrib_buckets(runs, plots_dir / "cos_contrib_buckets.png")}
    advantage_plot = plot_advantages(runs, plots_dir / "advantages.png")
    if advantage_plot is not None:
        plots["advantages"] = advantage_plot

    summary = {
        "verdict": verdict,
        "verdict_reasons": verdict_reasons,
        "warnings": warnings,
        "verification": verification,
        "runs": [{"arm": run_label(run), "directory": run.directory, "info": run.info, "n_records": len(run.records),
                  "n_steps": len(steps_by_arm[run_label(run)]), "lr": run_lr(run)} for run in runs],
        "steps": steps_by_arm,
        "buckets": [row for run in runs for row in bucket_rows(run)],
        "comparisons": [test for run in runs for test in (teacher_vs_base(run), teacher_vs_base(run, signed=True),
                                                          hacked_vs_not_hacked(run))],
        "advantages": [advantage_summary(run) for run in runs],
        "controls": controls,
        "behaviour": [row for run in runs for row in behaviour_rows(run)],
        "plots": {name: str(path) for name, path in plots.items()},
        "report_path": str(report_path),
        "notes": report_notes(runs, allow_partial),
        "phase1": phase1,
    }
    report_text = "\n".join(report_lines(summary, report_path.parent))
    report_path.write_text(report_text, encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    """Plain-text verdict and verification table, for printing."""
    lines = [f"note: {note}" for note in summary.get("notes", [])]
    lines.append(f"Phase 3 verdict: {summary['verdict']}")
    lines += [f"  - {reason}" for reason in summary["verdict_reasons"]]
    lines += [f"  ! {warning}" for warning in summary["warnings"]]
    lines.append("Phase 2 verification:")
    for row in summary["verification"]:
        lines.append(f"  {row['row']}. {row['metric']} [{row['arm']}]: {row['status'].upper()} -- {row['observed']}")
    lines.append(f"report: {summary['report_path']}")
    return "\n".join(lines)


def json_safe(value):
    """Copy of a summary with NaN/inf as None and paths as str, for strict JSON."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def summary_to_json(summary: dict) -> str:
    return json.dumps(json_safe(summary), indent=2, allow_nan=False)
