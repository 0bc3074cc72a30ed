"""Phase 2 analysis, verdict: the spec2 verification table (rows 1-4) and the Phase 3 go/no-go
decision. Every threshold is a named constant here; docs/analysis.md gives each one with the
spec2 line it implements."""
from __future__ import annotations

import math

import numpy as np

from jaxhack.probes import stats
from jaxhack.probes.tables import (DEFAULT_OVERSHOOT, GATES_WHERE_NEGATIVE_COS_OUT_IS_A_BUG,
                                   GATES_WHERE_RAISED_COS_OUT_IS_A_BUG, PROJECTED_ARM, Run, TINY_ADV,
                                   VANILLA_ARM, find_run, mean_or_nan, step_column, step_rows,
                                   teacher_vs_base)

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


