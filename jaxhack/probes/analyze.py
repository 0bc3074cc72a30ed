"""Phase 2 analysis: per-step cosine trajectories, per-sample buckets, the spec2 verification table
and the Phase 3 go/no-go verdict (spec2.md "Phase 2 verification", "Decision rules",
"Skip Phase 3 if"). Every threshold is a named constant below; docs/analysis.md gives each one
with the spec2 line it implements.

Entry point: `analyze_runs(dirs, report_path, plots_dir) -> summary` loads one run directory per
arm (records written by `jaxhack.probes.records.write_step`), writes report.md and PNG plots, and
returns a dict (verdict, verification rows, tables) that `format_summary` turns into text.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxhack.probes import stats
from jaxhack.probes.records import read_run

# ---- names -------------------------------------------------------------------------------------
VANILLA_ARM = "vanilla"
PROJECTED_ARM = "projected"
TEACHER_POOL_KEYWORD = "teacher"  # src_pool whose last path part contains this is a teacher sample
BASE_POOL_KEYWORD = "base"
DEFAULT_GATE = "one_sided"
GATE_INFO_KEYS = ("gate", "gate_mode")
DEFAULT_OVERSHOOT = 1.0
# one-sided erase (overshoot <= 1) can only lower each module's cosine, so a raised cos_out is a bug;
# no_gate also erases negative components (cos_out may rise toward 0), reverse is not an erase.
GATES_WHERE_RAISED_COS_OUT_IS_A_BUG = ("one_sided",)
# with overshoot <= 1 these gates leave cos_out ~ 0 or at the kept negative parts: far below 0 is a bug.
GATES_WHERE_NEGATIVE_COS_OUT_IS_A_BUG = ("one_sided", "no_gate")

# ---- statuses and verdicts ---------------------------------------------------------------------
SUCCESS = "success"
LIKELY_FAIL = "likely fail"
SNEAKY_FAIL = "sneaky fail"
NOT_AVAILABLE = "n/a"

VERDICT_RUN = "run"
VERDICT_SMALL_EFFECT = "run-expect-small-effect"
VERDICT_SKIP = "skip"
VERDICT_BUG = "bug"
VERDICT_INCONCLUSIVE = "inconclusive"

# ---- thresholds (see docs/analysis.md) ---------------------------------------------------------
# row 1: reward range per step
REWARD_RANGE_SUCCESS = 1.0          # spec2: "> 1.0"
REWARD_RANGE_USELESS = 0.1          # spec2: "<0.1 -> no advantage signal"
REWARD_RANGE_SUCCESS_FRACTION = 0.8  # share of batches that must exceed 1.0 (16/20 scale of row 3)
TINY_ADV = 1e-6                     # |adv| below this counts as zero advantage
SNEAKY_ADV_MEDIAN_ABS = 0.05        # median |adv| below this, in batches with range > 0.1: sneaky
# row 2: vanilla cos_in
COS_NEAR_ZERO = 0.02                # |cos| below this is "approximately 0"
MOST_STEPS_FRACTION = 0.5           # "most steps" = strictly more than half
# row 3: projected arm
PROJECTED_REDUCED_FRACTION = 0.8    # spec2: ">= 16/20 steps"
COS_EQUAL_TOL = 1e-6                # |cos_out - cos_in| <= this: projection changed nothing
FRAC_FIRED_SNEAKY = 0.25            # mean frac_fired below this: "fires on a few modules"
# row 4: cos_S_contrib teacher vs base
SIGNIFICANCE_ALPHA = 0.05
BASE_COS_MAX = 0.05                 # base mean at most this counts as "~0 or negative"
MIN_BUCKET_SIZE = 2                 # Welch's test needs n >= 2 per sample
# verdict
STRONG_COS_IN = 0.2                 # spec2: "vanilla cos_in > 0.2 consistently"
CONSISTENT_FRACTION = 0.8           # "consistently" = on at least 80% of steps
EFFECTIVE_COS_OUT = 0.05            # spec2: "projected reduces cos_in < 0.05"
OVERPROJECTION_COS_OUT = -0.05      # spec2: "projection breaks cos_in < 0 (over-projection) -> bug"


@dataclass(frozen=True)
class Run:
    """One run directory = one arm: its validated records and run.json contents."""

    directory: str
    arm: str
    info: dict
    records: list


# ---- loading -----------------------------------------------------------------------------------
def run_arm(records: list[dict], info: dict, directory) -> str:
    """The arm of a run: run.json "arm", which must match every record's arm."""
    record_arms = sorted({record["arm"] for record in records})
    if len(record_arms) != 1:
        raise ValueError(f"{directory}: records mix arms {record_arms}; one run directory must hold one arm")
    info_arm = info.get("arm")
    if info_arm is not None and info_arm != record_arms[0]:
        raise ValueError(f"{directory}: run.json arm {info_arm!r} differs from the records' arm {record_arms[0]!r}")
    return record_arms[0]


def load_runs(dirs) -> list[Run]:
    """Read every run directory; one arm per directory and no arm twice."""
    runs = []
    for directory in dirs:
        records, info = read_run(directory)
        runs.append(Run(directory=str(directory), arm=run_arm(records, info, directory), info=info, records=records))
    arms = [run.arm for run in runs]
    duplicated = sorted({arm for arm in arms if arms.count(arm) > 1})
    if duplicated:
        raise ValueError(f"arm(s) {duplicated} given by more than one run directory; pass one directory per arm")
    return runs


def find_run(runs: list[Run], arm: str) -> Run | None:
    for run in runs:
        if run.arm == arm:
            return run
    return None


def run_setting(run: Run, keys: tuple[str, ...], default):
    """First of `keys` found in run.json, top level first, then under "settings" (as phase2 writes it)."""
    nested = run.info.get("settings")
    for source in (run.info, nested if isinstance(nested, dict) else {}):
        for key in keys:
            if key in source:
                return source[key]
    return default


def run_gate(run: Run) -> str:
    """Projection gate mode from run.json ("gate" or "gate_mode"), default one_sided."""
    return str(run_setting(run, GATE_INFO_KEYS, DEFAULT_GATE))


def run_overshoot(run: Run) -> float:
    """Projection overshoot from run.json "overshoot", default 1 (exact erase)."""
    return float(run_setting(run, ("overshoot",), DEFAULT_OVERSHOOT))


def pool_kind(src_pool: str) -> str:
    """"teacher", "base" or "other", from the last path part of src_pool (case-insensitive)."""
    name = src_pool.rstrip("/").split("/")[-1].lower()
    if TEACHER_POOL_KEYWORD in name:
        return "teacher"
    if BASE_POOL_KEYWORD in name:
        return "base"
    return "other"


# ---- per-step and per-sample tables ------------------------------------------------------------
def records_by_step(records: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["step"], []).append(record)
    return dict(sorted(grouped.items()))


def step_rows(run: Run) -> list[dict]:
    """One row per step: step-level cosines (the same on every record), reward range, adv spread."""
    rows = []
    for step, step_records in records_by_step(run.records).items():
        rewards = np.array([record["reward"] for record in step_records])
        advantages = [record["adv"] for record in step_records if "adv" in record]
        rows.append({
            "arm": run.arm,
            "step": step,
            "n_samples": len(step_records),
            "cos_in": step_records[0]["mean_cos_in"],
            "cos_out": step_records[0]["mean_cos_out"],
            "frac_fired": step_records[0]["frac_fired"],
            "reward_min": float(rewards.min()),
            "reward_max": float(rewards.max()),
            "reward_range": float(rewards.max() - rewards.min()),
            "median_abs_adv": float(np.median(np.abs(advantages))) if advantages else math.nan,
        })
    return rows


def step_column(rows: list[dict], name: str) -> np.ndarray:
    return np.array([row[name] for row in rows], dtype=np.float64)


def defined(values) -> np.ndarray:
    """The non-NaN entries of an array."""
    array = np.asarray(values, dtype=np.float64)
    return array[~np.isnan(array)]


def mean_or_nan(values) -> float:
    return stats.mean(defined(values))


def contrib_buckets(run: Run) -> dict[tuple[str, bool], np.ndarray]:
    """cos_S_contrib values (NaN included) per (src_pool, hacked), sorted by key."""
    buckets: dict[tuple[str, bool], list[float]] = {}
    for record in run.records:
        buckets.setdefault((record["src_pool"], record["hacked"]), []).append(record["cos_S_contrib"])
    return {key: np.array(values, dtype=np.float64) for key, values in sorted(buckets.items())}


def bucket_rows(run: Run) -> list[dict]:
    """cos_S_contrib per (src_pool, hacked) bucket: n (defined values), n_nan, mean, std, 95% CI."""
    rows = []
    for (src_pool, hacked), values in contrib_buckets(run).items():
        summary = stats.summarize(defined(values))
        rows.append({
            "arm": run.arm, "src_pool": src_pool, "pool_kind": pool_kind(src_pool), "hacked": hacked,
            "n": summary.n, "n_nan": int(np.isnan(values).sum()), "mean": summary.mean, "std": summary.std,
            "ci_low": summary.ci_low, "ci_high": summary.ci_high,
        })
    return rows


def contrib_values(run: Run, keep) -> np.ndarray:
    """Defined cos_S_contrib of the records for which keep(record) is true."""
    return defined([record["cos_S_contrib"] for record in run.records if keep(record)])


def comparison(run: Run, name: str, label_a: str, keep_a, label_b: str, keep_b) -> dict:
    """Welch's test of cos_S_contrib between two groups of one arm's samples."""
    values_a = contrib_values(run, keep_a)
    values_b = contrib_values(run, keep_b)
    welch = stats.welch_t_test(values_a, values_b)
    return {
        "arm": run.arm, "comparison": name, "group_a": label_a, "group_b": label_b,
        "n_a": int(values_a.size), "n_b": int(values_b.size),
        "mean_a": stats.mean(values_a), "mean_b": stats.mean(values_b),
        "t": welch.t, "dof": welch.dof, "p": welch.p_two_sided,
    }


def teacher_vs_base(run: Run) -> dict:
    return comparison(
        run, "teacher vs base", "teacher", lambda record: pool_kind(record["src_pool"]) == "teacher",
        "base", lambda record: pool_kind(record["src_pool"]) == "base",
    )


def hacked_vs_not_hacked(run: Run) -> dict:
    return comparison(
        run, "hacked vs not hacked", "hacked", lambda record: record["hacked"],
        "not hacked", lambda record: not record["hacked"],
    )


def advantage_summary(run: Run) -> dict:
    """Distribution of the logged advantage `adv` (n = 0 when the field was not logged)."""
    advantages = np.array([record["adv"] for record in run.records if "adv" in record], dtype=np.float64)
    if advantages.size == 0:
        return {"arm": run.arm, "n": 0, "n_records": len(run.records), "min": math.nan, "max": math.nan,
                "mean": math.nan, "median_abs": math.nan, "frac_tiny": math.nan}
    return {
        "arm": run.arm, "n": int(advantages.size), "n_records": len(run.records),
        "min": float(advantages.min()), "max": float(advantages.max()), "mean": float(advantages.mean()),
        "median_abs": float(np.median(np.abs(advantages))),
        "frac_tiny": float(np.mean(np.abs(advantages) < TINY_ADV)),
    }


# ---- verification table ------------------------------------------------------------------------
def at_least_fraction(count: int, total: int, fraction: float) -> bool:
    return total > 0 and count >= fraction * total - 1e-9


def more_than_fraction(count: int, total: int, fraction: float) -> bool:
    return total > 0 and count > fraction * total + 1e-9


def verification_row(row: int, metric: str, arm: str, status: str, observed: str, reasons: list[str],
                     numbers: dict) -> dict:
    return {"row": row, "metric": metric, "arm": arm, "status": status, "observed": observed,
            "reasons": reasons, "numbers": numbers}


ROW1_METRIC = "r.max() - r.min() per step"
ROW2_METRIC = "cos_in per step, vanilla arm"
ROW3_METRIC = "cos_out < cos_in per step, projected arm"
ROW4_METRIC = "cos_S_contrib by (src_pool, hacked)"


def evaluate_reward_range(runs: list[Run]) -> dict:
    """Row 1 over every (arm, step) batch: reward range and, if logged, the advantage size."""
    rows = [row for run in runs for row in step_rows(run)]  # each row carries its arm
    if not rows:
        return verification_row(1, ROW1_METRIC, "all", NOT_AVAILABLE, "no runs", ["no run directories"], {})
    ranges = step_column(rows, "reward_range")
    n_batches = len(rows)
    n_above = int(np.sum(ranges > REWARD_RANGE_SUCCESS))
    n_useless = int(np.sum(ranges < REWARD_RANGE_USELESS))
    informative_steps = {(row["arm"], row["step"]) for row in rows if row["reward_range"] > REWARD_RANGE_USELESS}
    informative_adv = np.array([record["adv"] for run in runs for record in run.records
                                if "adv" in record and (run.arm, record["step"]) in informative_steps])
    median_abs_adv = float(np.median(np.abs(informative_adv))) if informative_adv.size else math.nan
    numbers = {"n_batches": n_batches, "n_range_above_success": n_above, "n_range_below_useless": n_useless,
               "min_range": float(ranges.min()), "median_range": float(np.median(ranges)),
               "median_abs_adv_informative": median_abs_adv, "n_adv_informative": int(informative_adv.size)}
    observed = (f"range > {REWARD_RANGE_SUCCESS} on {n_above}/{n_batches} batches, < {REWARD_RANGE_USELESS} on "
                f"{n_useless}/{n_batches}; min {stats.format_number(ranges.min())}, median "
                f"{stats.format_number(np.median(ranges))}; median |adv| {stats.format_number(median_abs_adv)}")
    arms = ", ".join(run.arm for run in runs)
    if more_than_fraction(n_useless, n_batches, MOST_STEPS_FRACTION):
        return verification_row(1, ROW1_METRIC, arms, LIKELY_FAIL, observed, [
            f"reward range < {REWARD_RANGE_USELESS} on most batches: no advantage signal, the run is useless"], numbers)
    if informative_adv.size and median_abs_adv < SNEAKY_ADV_MEDIAN_ABS:
        return verification_row(1, ROW1_METRIC, arms, SNEAKY_FAIL, observed, [
            f"median |adv| {stats.format_number(median_abs_adv)} < {SNEAKY_ADV_MEDIAN_ABS} in batches with range "
            f"> {REWARD_RANGE_USELESS}: advantages tiny but nonzero"], numbers)
    reasons = [] if informative_adv.size else ["adv not logged: the tiny-advantage sneaky fail cannot be ruled out"]
    if at_least_fraction(n_above, n_batches, REWARD_RANGE_SUCCESS_FRACTION):
        return verification_row(1, ROW1_METRIC, arms, SUCCESS, observed, [
            f"range > {REWARD_RANGE_SUCCESS} on >= {REWARD_RANGE_SUCCESS_FRACTION:.0%} of batches"] + reasons, numbers)
    return verification_row(1, ROW1_METRIC, arms, LIKELY_FAIL, observed, [
        f"success criterion not met: range > {REWARD_RANGE_SUCCESS} on fewer than "
        f"{REWARD_RANGE_SUCCESS_FRACTION:.0%} of batches"] + reasons, numbers)


def evaluate_vanilla_cos_in(vanilla: Run | None) -> dict:
    """Row 2: sign and size of the vanilla arm's step cos_in."""
    if vanilla is None:
        return verification_row(2, ROW2_METRIC, VANILLA_ARM, NOT_AVAILABLE, "arm missing",
                                [f"no run with arm {VANILLA_ARM!r}"], {})
    cos_in = step_column(step_rows(vanilla), "cos_in")
    n_steps = cos_in.size
    n_positive = int(np.sum(cos_in > 0))
    n_negative = int(np.sum(cos_in < 0))
    n_undefined = int(np.sum(np.isnan(cos_in)))
    mean_cos_in = mean_or_nan(cos_in)
    numbers = {"n_steps": n_steps, "n_positive": n_positive, "n_negative": n_negative,
               "n_undefined": n_undefined, "mean_cos_in": mean_cos_in}
    observed = (f"> 0 on {n_positive}/{n_steps} steps, < 0 on {n_negative}/{n_steps}, undefined on "
                f"{n_undefined}; mean {stats.format_number(mean_cos_in)}")
    if math.isnan(mean_cos_in):
        return verification_row(2, ROW2_METRIC, VANILLA_ARM, LIKELY_FAIL, observed,
                                ["cos_in undefined on every step (zero batch gradient)"], numbers)
    if abs(mean_cos_in) < COS_NEAR_ZERO:
        return verification_row(2, ROW2_METRIC, VANILLA_ARM, LIKELY_FAIL, observed, [
            f"|mean cos_in| < {COS_NEAR_ZERO}: GRPO gradient orthogonal to v_hack"], numbers)
    if more_than_fraction(n_negative, n_steps, MOST_STEPS_FRACTION):
        return verification_row(2, ROW2_METRIC, VANILLA_ARM, SNEAKY_FAIL, observed, [
            "cos_in negative on most steps: sign reversed (base outweighs teacher in advantage?)"], numbers)
    if more_than_fraction(n_positive, n_steps, MOST_STEPS_FRACTION) and mean_cos_in > COS_NEAR_ZERO:
        return verification_row(2, ROW2_METRIC, VANILLA_ARM, SUCCESS, observed, [
            f"cos_in > 0 on most steps and mean > {COS_NEAR_ZERO}"], numbers)
    return verification_row(2, ROW2_METRIC, VANILLA_ARM, LIKELY_FAIL, observed, [
        f"success criterion not met: cos_in > 0 on {n_positive}/{n_steps} steps (need more than half) "
        f"with mean {stats.format_number(mean_cos_in)} (need > {COS_NEAR_ZERO})"], numbers)


def evaluate_projection(projected: Run | None) -> dict:
    """Row 3: does the projected arm lower cos_out below cos_in, and on how many modules."""
    if projected is None:
        return verification_row(3, ROW3_METRIC, PROJECTED_ARM, NOT_AVAILABLE, "arm missing",
                                [f"no run with arm {PROJECTED_ARM!r}"], {})
    rows = step_rows(projected)
    cos_in = step_column(rows, "cos_in")
    cos_out = step_column(rows, "cos_out")
    frac_fired = step_column(rows, "frac_fired")
    n_steps = len(rows)
    with np.errstate(invalid="ignore"):
        n_reduced = int(np.sum(cos_in - cos_out > COS_EQUAL_TOL))
        n_unchanged = int(np.sum(np.abs(cos_out - cos_in) <= COS_EQUAL_TOL))
    mean_frac_fired = float(frac_fired.mean())
    numbers = {"n_steps": n_steps, "n_reduced": n_reduced, "n_unchanged": n_unchanged,
               "mean_frac_fired": mean_frac_fired, "mean_cos_in": mean_or_nan(cos_in),
               "mean_cos_out": mean_or_nan(cos_out)}
    observed = (f"cos_out < cos_in on {n_reduced}/{n_steps} steps, unchanged on {n_unchanged}; mean frac_fired "
                f"{stats.format_number(mean_frac_fired)}; mean cos_in {stats.format_number(numbers['mean_cos_in'])} "
                f"-> cos_out {stats.format_number(numbers['mean_cos_out'])}")
    if more_than_fraction(n_unchanged, n_steps, MOST_STEPS_FRACTION) or mean_frac_fired == 0.0:
        return verification_row(3, ROW3_METRIC, PROJECTED_ARM, LIKELY_FAIL, observed, [
            "mechanism inactive: cos_out == cos_in on most steps or nothing fired"], numbers)
    if mean_frac_fired < FRAC_FIRED_SNEAKY:
        return verification_row(3, ROW3_METRIC, PROJECTED_ARM, SNEAKY_FAIL, observed, [
            f"mean frac_fired {stats.format_number(mean_frac_fired)} < {FRAC_FIRED_SNEAKY}: projection fires on "
            "only a few modules"], numbers)
    if at_least_fraction(n_reduced, n_steps, PROJECTED_REDUCED_FRACTION):
        return verification_row(3, ROW3_METRIC, PROJECTED_ARM, SUCCESS, observed, [
            f"cos_out < cos_in on >= {PROJECTED_REDUCED_FRACTION:.0%} of steps"], numbers)
    return verification_row(3, ROW3_METRIC, PROJECTED_ARM, LIKELY_FAIL, observed, [
        f"success criterion not met: cos_out < cos_in on fewer than {PROJECTED_REDUCED_FRACTION:.0%} of steps"],
        numbers)


def contrib_run(runs: list[Run]) -> Run | None:
    """Arm whose cos_S_contrib row 4 judges: vanilla, else projected, else the first given."""
    for arm in (VANILLA_ARM, PROJECTED_ARM):
        run = find_run(runs, arm)
        if run is not None:
            return run
    return runs[0] if runs else None


def discriminates(test: dict) -> bool | None:
    """Teacher mean > base mean with Welch p < alpha; None when a group is too small to test."""
    if test["n_a"] < MIN_BUCKET_SIZE or test["n_b"] < MIN_BUCKET_SIZE or math.isnan(test["p"]):
        return None
    return test["mean_a"] > test["mean_b"] and test["p"] < SIGNIFICANCE_ALPHA


def evaluate_contrib(run: Run | None) -> dict:
    """Row 4: cos_S_contrib of teacher-pool samples vs base-pool samples."""
    if run is None:
        return verification_row(4, ROW4_METRIC, "-", NOT_AVAILABLE, "no runs", ["no run directories"], {})
    test = teacher_vs_base(run)
    numbers = {key: test[key] for key in ("n_a", "n_b", "mean_a", "mean_b", "t", "dof", "p")}
    observed = (f"teacher n={test['n_a']} mean {stats.format_number(test['mean_a'])}; base n={test['n_b']} mean "
                f"{stats.format_number(test['mean_b'])}; Welch t={stats.format_number(test['t'])}, "
                f"p={stats.format_p_value(test['p'])}")
    if test["n_a"] < MIN_BUCKET_SIZE or test["n_b"] < MIN_BUCKET_SIZE:
        return verification_row(4, ROW4_METRIC, run.arm, SNEAKY_FAIL, observed, [
            f"teacher or base bucket has fewer than {MIN_BUCKET_SIZE} samples with a defined cos_S_contrib: "
            "mixing both pools is required for the next phase"], numbers)
    is_discriminating = discriminates(test)
    if is_discriminating and test["mean_b"] <= BASE_COS_MAX:
        return verification_row(4, ROW4_METRIC, run.arm, SUCCESS, observed, [
            f"teacher > base with p < {SIGNIFICANCE_ALPHA}, base mean <= {BASE_COS_MAX}"], numbers)
    if is_discriminating:
        return verification_row(4, ROW4_METRIC, run.arm, LIKELY_FAIL, observed, [
            f"success criterion not met: teacher > base significantly but base mean "
            f"{stats.format_number(test['mean_b'])} > {BASE_COS_MAX} (not ~0 or negative)"], numbers)
    return verification_row(4, ROW4_METRIC, run.arm, LIKELY_FAIL, observed, [
        f"no significant teacher > base difference (p >= {SIGNIFICANCE_ALPHA} or teacher <= base): "
        "v_hack isn't direction-specific"], numbers)


# ---- verdict -----------------------------------------------------------------------------------
def decide_verdict(vanilla_cos_in, projected_cos_in, projected_cos_out, projected_gate: str,
                   reward_range_status: str, teacher_base_discriminates: bool | None,
                   projected_overshoot: float = DEFAULT_OVERSHOOT) -> tuple[str, list[str]]:
    """Phase 3 verdict from spec2 "Decision rules" and "Skip Phase 3 if"; returns (verdict, reasons).

    vanilla_cos_in: per-step cos_in of the vanilla arm, or None when that arm is missing.
    projected_cos_in / projected_cos_out: per-step values of the projected arm, or None.
    projected_gate / projected_overshoot: the projected arm's gate mode and overshoot (run.json);
    the bug rules apply only where the projection is supposed to be an exact one-sided erase.
    teacher_base_discriminates: `discriminates(teacher_vs_base)`, None when untestable.
    Rules are applied in order: bug, inconclusive (unusable inputs), skip, run, small effect.
    """
    if projected_cos_out is not None:
        cos_in = np.asarray(projected_cos_in, dtype=np.float64)
        cos_out = np.asarray(projected_cos_out, dtype=np.float64)
        bug_reasons = []
        with np.errstate(invalid="ignore"):
            n_raised = int(np.sum(cos_out > cos_in + COS_EQUAL_TOL))
        exact_erase = projected_overshoot <= DEFAULT_OVERSHOOT
        if n_raised and exact_erase and projected_gate in GATES_WHERE_RAISED_COS_OUT_IS_A_BUG:
            bug_reasons.append(f"projected arm ({projected_gate} gate): cos_out > cos_in on {n_raised} step(s); "
                               "a one-sided erase can only lower it")
        mean_cos_out = mean_or_nan(cos_out)
        if (exact_erase and projected_gate in GATES_WHERE_NEGATIVE_COS_OUT_IS_A_BUG
                and mean_cos_out < OVERPROJECTION_COS_OUT):
            bug_reasons.append(f"projected arm ({projected_gate} gate): mean cos_out "
                               f"{stats.format_number(mean_cos_out)} < {OVERPROJECTION_COS_OUT}: over-projection")
        if bug_reasons:
            return VERDICT_BUG, bug_reasons

    if vanilla_cos_in is None:
        return VERDICT_INCONCLUSIVE, [f"no {VANILLA_ARM} arm: every Phase 3 rule reads vanilla cos_in"]
    cos_in = np.asarray(vanilla_cos_in, dtype=np.float64)
    mean_cos_in = mean_or_nan(cos_in)
    if math.isnan(mean_cos_in):
        return VERDICT_INCONCLUSIVE, ["vanilla cos_in undefined on every step (zero batch gradient)"]
    if reward_range_status == LIKELY_FAIL:
        return VERDICT_INCONCLUSIVE, ["verification row 1 likely fail: no advantage signal, the run is useless"]
    if mean_cos_in <= -COS_NEAR_ZERO:
        return VERDICT_INCONCLUSIVE, [f"vanilla mean cos_in {stats.format_number(mean_cos_in)} <= -{COS_NEAR_ZERO}: "
                                      "sign reversed; check the advantage sign/balance before deciding"]

    n_steps = cos_in.size
    near_zero_or_undefined = np.isnan(cos_in) | (np.abs(np.nan_to_num(cos_in)) < COS_NEAR_ZERO)
    if bool(np.all(near_zero_or_undefined)):
        if teacher_base_discriminates is None:
            return VERDICT_INCONCLUSIVE, [f"vanilla |cos_in| < {COS_NEAR_ZERO} on all {n_steps} steps, but teacher "
                                          "vs base discrimination cannot be tested (a bucket is too small)"]
        if not teacher_base_discriminates:
            return VERDICT_SKIP, [f"vanilla |cos_in| < {COS_NEAR_ZERO} on all {n_steps} steps",
                                  "cos_S_contrib shows no teacher > base discrimination",
                                  "try R7 (re-extract v_hack with a GRPO-style contrastive loss) first"]
        return VERDICT_SMALL_EFFECT, [f"vanilla |cos_in| < {COS_NEAR_ZERO} on all {n_steps} steps",
                                      "but cos_S_contrib discriminates teacher > base"]

    n_strong = int(np.sum(cos_in > STRONG_COS_IN))
    if at_least_fraction(n_strong, n_steps, CONSISTENT_FRACTION):
        strong = f"vanilla cos_in > {STRONG_COS_IN} on {n_strong}/{n_steps} steps (consistent)"
        if projected_cos_out is None:
            return VERDICT_RUN, [strong, "no projected arm given: projection effectiveness not checked"]
        mean_cos_out = mean_or_nan(projected_cos_out)
        if mean_cos_out < EFFECTIVE_COS_OUT:
            return VERDICT_RUN, [strong, f"projected mean cos_out {stats.format_number(mean_cos_out)} < "
                                         f"{EFFECTIVE_COS_OUT}: projection effective"]
        return VERDICT_SMALL_EFFECT, [strong, f"but projected mean cos_out {stats.format_number(mean_cos_out)} "
                                              f">= {EFFECTIVE_COS_OUT} (or undefined): projection not effective"]
    if abs(mean_cos_in) < COS_NEAR_ZERO:
        band = f"vanilla mean cos_in {stats.format_number(mean_cos_in)} ~ 0 (|.| < {COS_NEAR_ZERO})"
    elif mean_cos_in < STRONG_COS_IN:
        band = f"vanilla mean cos_in {stats.format_number(mean_cos_in)} in [{COS_NEAR_ZERO}, {STRONG_COS_IN})"
    else:
        band = (f"vanilla mean cos_in {stats.format_number(mean_cos_in)} but > {STRONG_COS_IN} on only "
                f"{n_strong}/{n_steps} steps (not consistent)")
    return VERDICT_SMALL_EFFECT, [band, "Phase 2 cannot show alignment at step 0; v_hack may matter later"]


# ---- plots -------------------------------------------------------------------------------------
def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_cos_trajectory(steps_by_arm: dict[str, list[dict]], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    for index, (arm, rows) in enumerate(steps_by_arm.items()):
        color = f"C{index}"
        steps = step_column(rows, "step")
        axes.plot(steps, step_column(rows, "cos_in"), "-o", color=color, markersize=3, label=f"{arm} cos_in")
        axes.plot(steps, step_column(rows, "cos_out"), "--s", color=color, markersize=3, label=f"{arm} cos_out")
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.axhline(STRONG_COS_IN, color="gray", linestyle=":", linewidth=0.8, label=f"{STRONG_COS_IN} (strong)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("mean cos over modules (batch gradient vs v_hack)")
    axes.set_title("cos_in / cos_out per step")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_contrib_buckets(runs: list[Run], path: Path) -> Path:
    figure = new_figure(max(6.0, 1.6 * sum(len(contrib_buckets(run)) for run in runs)), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    labels, position = [], 0
    for run in runs:
        for (src_pool, hacked), values in contrib_buckets(run).items():
            values = defined(values)
            position += 1
            labels.append(f"{run.arm}\n{src_pool.rstrip('/').split('/')[-1]}\nhacked={hacked}")
            if values.size:
                axes.boxplot([values], positions=[position], widths=0.5, showfliers=False)
                axes.scatter(position + jitter.uniform(-0.15, 0.15, values.size), values, s=8, alpha=0.5)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(range(1, position + 1))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_xlim(0.4, position + 0.6)
    axes.set_ylabel("cos_S_contrib (per-sample gradient vs v_hack)")
    axes.set_title("per-sample cos_S_contrib by (src_pool, hacked)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_advantages(runs: list[Run], path: Path) -> Path | None:
    """Histogram of `adv` per arm; None (no file) when no record logged adv."""
    advantage_by_arm = {run.arm: np.array([record["adv"] for record in run.records if "adv" in record])
                        for run in runs}
    advantage_by_arm = {arm: values for arm, values in advantage_by_arm.items() if values.size}
    if not advantage_by_arm:
        return None
    figure = new_figure(6, 4)
    axes = figure.add_subplot(1, 1, 1)
    for arm, values in advantage_by_arm.items():
        axes.hist(values, bins=30, alpha=0.5, label=arm)
    axes.set_xlabel("advantage (r_i - mean r)")
    axes.set_ylabel("samples")
    axes.set_title("advantage distribution")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


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


def report_lines(summary: dict, report_dir: Path) -> list[str]:
    fmt = stats.format_number
    lines = ["# Phase 2 probe analysis", "", "## Runs", ""]
    lines += markdown_table(
        ["arm", "directory", "steps", "records", "run.json"],
        [[run["arm"], run["directory"], run["n_steps"], run["n_records"],
          ", ".join(f"{key}={value}" for key, value in sorted(run["info"].items())) or "-"] for run in summary["runs"]],
    )
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
    lines += ["", "## Plots", ""]
    for name, path in summary["plots"].items():
        lines.append(f"![{name}]({os.path.relpath(path, report_dir)})")
    if "advantages" not in summary["plots"]:
        lines.append("(no advantage histogram: no record logged `adv`)")
    lines.append("")
    return lines


def analyze_runs(dirs, report_path=None, plots_dir=None) -> dict:
    """Analyze run directories (one arm each); write report.md and PNGs; return the summary dict.

    report_path defaults to <first dir>/report.md; plots_dir to <report dir>/plots.
    Summary keys: verdict, verdict_reasons, warnings, verification (rows 1-4), runs, steps (per arm),
    buckets, comparisons, advantages, plots (name -> path), report_path.
    """
    dirs = [Path(directory) for directory in dirs]
    if not dirs:
        raise ValueError("analyze_runs needs at least one run directory")
    runs = load_runs(dirs)
    report_path = Path(report_path) if report_path is not None else dirs[0] / "report.md"
    plots_dir = Path(plots_dir) if plots_dir is not None else report_path.parent / "plots"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)

    steps_by_arm = {run.arm: step_rows(run) for run in runs}
    vanilla = find_run(runs, VANILLA_ARM)
    projected = find_run(runs, PROJECTED_ARM)
    row_4_run = contrib_run(runs)
    verification = [evaluate_reward_range(runs), evaluate_vanilla_cos_in(vanilla), evaluate_projection(projected),
                    evaluate_contrib(row_4_run)]
    verdict, verdict_reasons = decide_verdict(
        vanilla_cos_in=step_column(steps_by_arm[VANILLA_ARM], "cos_in") if vanilla else None,
        projected_cos_in=step_column(steps_by_arm[PROJECTED_ARM], "cos_in") if projected else None,
        projected_cos_out=step_column(steps_by_arm[PROJECTED_ARM], "cos_out") if projected else None,
        projected_gate=run_gate(projected) if projected else DEFAULT_GATE,
        projected_overshoot=run_overshoot(projected) if projected else DEFAULT_OVERSHOOT,
        reward_range_status=verification[0]["status"],
        teacher_base_discriminates=discriminates(teacher_vs_base(row_4_run)),
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
        "runs": [{"arm": run.arm, "directory": run.directory, "info": run.info, "n_records": len(run.records),
                  "n_steps": len(steps_by_arm[run.arm])} for run in runs],
        "steps": steps_by_arm,
        "buckets": [row for run in runs for row in bucket_rows(run)],
        "comparisons": [test for run in runs for test in (teacher_vs_base(run), hacked_vs_not_hacked(run))],
        "advantages": [advantage_summary(run) for run in runs],
        "plots": {name: str(path) for name, path in plots.items()},
        "report_path": str(report_path),
    }
    report_text = "\n".join(report_lines(summary, report_path.parent))
    report_path.write_text(report_text, encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    """Plain-text verdict and verification table, for printing."""
    lines = [f"Phase 3 verdict: {summary['verdict']}"]
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
