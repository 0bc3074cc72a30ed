"""Phase 2 analysis, verdict: the spec2 verification table (rows 1-4) and the Phase 3 go/no-go
decision. Every threshold is a named constant here; docs/analysis.md gives each one with the
spec2 line it implements."""
from __future__ import annotations

import math

import numpy as np

from jaxhack.probes import stats
from jaxhack.probes.tables import (DEFAULT_OVERSHOOT, GATES_WHERE_NEGATIVE_COS_OUT_IS_A_BUG,
                                   GATES_WHERE_RAISED_COS_OUT_IS_A_BUG, PROJECTED_ARM, Run,
                                   VANILLA_ARM, Z_SIGNAL, control_row, find_run, mean_or_nan, run_label,
                                   step_column, step_rows, teacher_vs_base)

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
EFFECTIVE_COS_IN = 0.05             # spec2: "projected reduces cos_in < 0.05" (projected arm, lr > 0)
EFFECTIVE_COS_OUT = EFFECTIVE_COS_IN  # old name
# spec2: "projection breaks cos_in < 0 (over-projection) -> bug": a per-module count,
# n_overprojected = #modules with cos_out_m < min(cos_in_m, 0) - OVERPROJECTION_TOL (logged per step)
OVERPROJECTION_MAX_MODULES = 0      # bug when the count exceeds this on any step
NO_SIGNAL = "no signal"



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
    n_over = step_column(rows, "n_overprojected")
    numbers = {"n_steps": n_steps, "n_reduced": n_reduced, "n_unchanged": n_unchanged,
               "mean_frac_fired": mean_frac_fired, "mean_cos_in": mean_or_nan(cos_in),
               "mean_cos_out": mean_or_nan(cos_out),
               "overprojected_module_steps": float(np.nansum(n_over)) if not np.all(np.isnan(n_over)) else math.nan,
               "mean_update_cos": mean_or_nan(step_column(rows, "update_cos"))}
    observed = (f"cos_out < cos_in on {n_reduced}/{n_steps} steps, unchanged on {n_unchanged}; mean frac_fired "
                f"{stats.format_number(mean_frac_fired)}; mean cos_in {stats.format_number(numbers['mean_cos_in'])} "
                f"-> cos_out {stats.format_number(numbers['mean_cos_out'])}; over-projected module-steps "
                f"{stats.format_number(numbers['overprojected_module_steps'], 0)}; mean update cos "
                f"{stats.format_number(numbers['mean_update_cos'])}")
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
    """Row 4: cos_S_contrib of teacher-pool vs base-pool samples. Judged on the UNSIGNED cosine
    (sign(adv) * cos in grpo mode: the direction of each sample's own NLL descent), where spec2's
    expectation "teacher > base, base ~0 or negative" holds; the advantage-signed cosine (as logged,
    base samples have A < 0 and so show positive values) is reported next to it. Without `adv` in a
    grpo run the signed cosine is judged and the row says so."""
    if run is None:
        return verification_row(4, ROW4_METRIC, "-", NOT_AVAILABLE, "no runs", ["no run directories"], {})
    test = teacher_vs_base(run)
    signed = teacher_vs_base(run, signed=True)
    kind = "signed" if test["signed"] else "unsigned"
    numbers = {key: test[key] for key in ("n_a", "n_b", "mean_a", "mean_b", "t", "dof", "p")}
    numbers.update(judged=kind, signed_mean_teacher=signed["mean_a"], signed_mean_base=signed["mean_b"])
    observed = (f"{kind}: teacher n={test['n_a']} mean {stats.format_number(test['mean_a'])}; base n={test['n_b']} "
                f"mean {stats.format_number(test['mean_b'])}; Welch t={stats.format_number(test['t'])}, "
                f"p={stats.format_p_value(test['p'])}")
    if not test["signed"]:
        observed += (f" (advantage-signed: teacher {stats.format_number(signed['mean_a'])}, "
                     f"base {stats.format_number(signed['mean_b'])})")
    note = [] if not test["signed"] else ["adv not logged: the advantage-signed cosine is judged (base samples "
                                          "with A < 0 then count with flipped sign)"]
    label = run_label(run)
    if test["n_a"] < MIN_BUCKET_SIZE or test["n_b"] < MIN_BUCKET_SIZE:
        return verification_row(4, ROW4_METRIC, label, SNEAKY_FAIL, observed, [
            f"teacher or base bucket has fewer than {MIN_BUCKET_SIZE} samples with a defined cos_S_contrib: "
            "mixing both pools is required for the next phase"] + note, numbers)
    is_discriminating = discriminates(test)
    if is_discriminating and test["mean_b"] <= BASE_COS_MAX:
        return verification_row(4, ROW4_METRIC, label, SUCCESS, observed, [
            f"{kind} teacher > base with p < {SIGNIFICANCE_ALPHA}, base mean <= {BASE_COS_MAX}"] + note, numbers)
    if is_discriminating:
        return verification_row(4, ROW4_METRIC, label, LIKELY_FAIL, observed, [
            f"success criterion not met: teacher > base significantly but {kind} base mean "
            f"{stats.format_number(test['mean_b'])} > {BASE_COS_MAX} (not ~0 or negative)"] + note, numbers)
    return verification_row(4, ROW4_METRIC, label, LIKELY_FAIL, observed, [
        f"no significant teacher > base difference (p >= {SIGNIFICANCE_ALPHA} or teacher <= base): "
        "v_hack isn't direction-specific"] + note, numbers)


def null_signal(cos_in, null_sd: float | None) -> tuple[bool | None, str]:
    """Is the vanilla cos_in above the null baseline? True when z = cos / null_sd > Z_SIGNAL on more
    than half of the defined steps; None when the null is unknown (null_sd not logged)."""
    if null_sd is None or not null_sd > 0:
        return None, "null baseline not logged (run.json null_cos_sd): z not computed"
    cos_in = np.asarray(cos_in, dtype=np.float64)
    z = cos_in[~np.isnan(cos_in)] / null_sd
    n_above = int(np.sum(z > Z_SIGNAL))
    text = (f"vanilla z = cos_in / null sd {stats.format_number(null_sd)} > {Z_SIGNAL} on {n_above}/{z.size} "
            f"steps (mean z {stats.format_number(float(z.mean()) if z.size else math.nan)})")
    return more_than_fraction(n_above, z.size, MOST_STEPS_FRACTION), text


def compare_controls(real: Run | None, controls: list[Run]) -> list[dict]:
    """Controls side by side with the real v_hack (vanilla arm): per control, does the real v_hack
    beat it? beats = real mean cos_in > control mean cos_in with Welch p < alpha over steps, and the
    real unsigned teacher - base difference exceeds the control's."""
    rows = [] if real is None else [dict(control_row(real), beats=None)]
    real_row = rows[0] if rows else None
    for run in controls:
        row = control_row(run)
        if real_row is None:
            row["beats"] = None
        else:
            welch = stats.welch_t_test(real_row["cos_in"], row["cos_in"])
            row["beats"] = bool(real_row["mean_cos_in"] > row["mean_cos_in"] and welch.p_two_sided < SIGNIFICANCE_ALPHA
                                and real_row["teacher_minus_base"] > row["teacher_minus_base"])
            row["p_cos_in"] = welch.p_two_sided
        rows.append(row)
    for row in rows:
        row.pop("cos_in")
    return rows


# ---- verdict -----------------------------------------------------------------------------------
def decide_verdict(vanilla_cos_in, projected_cos_in, projected_cos_out, projected_gate: str,
                   reward_range_status: str, teacher_base_discriminates: bool | None,
                   projected_overshoot: float = DEFAULT_OVERSHOOT, *, projected_n_overprojected=None,
                   projected_lr: float = 0.0, null_sd: float | None = None,
                   controls_beaten: list[bool | None] | None = None) -> tuple[str, list[str]]:
    """Phase 3 verdict from spec2 "Decision rules" and "Skip Phase 3 if"; returns (verdict, reasons).

    vanilla_cos_in: per-step cos_in of the vanilla arm, or None when that arm is missing.
    projected_cos_in / projected_cos_out: per-step values of the projected arm, or None.
    projected_gate / projected_overshoot: the projected arm's gate mode and overshoot (run.json);
    the bug rules apply only where the projection is supposed to be an exact erase.
    projected_n_overprojected: per-step module counts (NaN / None: not logged, rule not checked).
    projected_lr: the projected arm's Phase 2 lr; at 0 its cos_in equals vanilla's and the
    effectiveness rule cannot be evaluated (reported, not judged).
    null_sd: the null sd of the vanilla mean cosine (run.json null_cos_sd); None: z not used.
    controls_beaten: per control run, whether the real v_hack beat it (compare_controls).
    teacher_base_discriminates: `discriminates(teacher_vs_base)`, None when untestable.
    Rules are applied in order: bug, inconclusive (unusable inputs), skip, run, small effect.
    """
    exact_erase = projected_overshoot <= DEFAULT_OVERSHOOT
    if projected_cos_out is not None:
        cos_in = np.asarray(projected_cos_in, dtype=np.float64)
        cos_out = np.asarray(projected_cos_out, dtype=np.float64)
        bug_reasons = []
        with np.errstate(invalid="ignore"):
            n_raised = int(np.sum(cos_out > cos_in + COS_EQUAL_TOL))
        if n_raised and exact_erase and projected_gate in GATES_WHERE_RAISED_COS_OUT_IS_A_BUG:
            bug_reasons.append(f"projected arm ({projected_gate} gate): cos_out > cos_in on {n_raised} step(s); "
                               "a one-sided erase can only lower it")
        if projected_n_overprojected is not None and exact_erase and projected_gate in GATES_WHERE_NEGATIVE_COS_OUT_IS_A_BUG:
            counts = np.nan_to_num(np.asarray(projected_n_overprojected, dtype=np.float64))
            n_bad_steps = int(np.sum(counts > OVERPROJECTION_MAX_MODULES))
            if n_bad_steps:
                bug_reasons.append(f"projected arm ({projected_gate} gate): over-projection on {n_bad_steps} step(s) "
                                   f"({int(counts.sum())} module-steps with cos_out_m < min(cos_in_m, 0) - tol)")
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
    control_notes = []
    if controls_beaten:
        n_beaten = sum(1 for b in controls_beaten if b)
        control_notes = [f"real v_hack beats {n_beaten}/{len(controls_beaten)} control run(s)"]

    n_steps = cos_in.size
    near_zero_or_undefined = np.isnan(cos_in) | (np.abs(np.nan_to_num(cos_in)) < COS_NEAR_ZERO)
    signal, null_text = null_signal(cos_in, null_sd)
    all_near_zero = bool(np.all(near_zero_or_undefined))
    if all_near_zero or signal is False:
        why = (f"vanilla |cos_in| < {COS_NEAR_ZERO} on all {n_steps} steps" if all_near_zero
               else f"{NO_SIGNAL}: {null_text}")
        if teacher_base_discriminates is None:
            return VERDICT_INCONCLUSIVE, [f"{why}, but teacher vs base discrimination cannot be tested "
                                          "(a bucket is too small)"] + control_notes
        if not teacher_base_discriminates:
            return VERDICT_SKIP, [why, "cos_S_contrib shows no teacher > base discrimination",
                                  "try R7 (re-extract v_hack with a GRPO-style contrastive loss) first"] + control_notes
        return VERDICT_SMALL_EFFECT, [why, "but cos_S_contrib discriminates teacher > base"] + control_notes

    null_notes = [] if signal is None else [null_text]
    n_strong = int(np.sum(cos_in > STRONG_COS_IN))
    if at_least_fraction(n_strong, n_steps, CONSISTENT_FRACTION):
        strong = f"vanilla cos_in > {STRONG_COS_IN} on {n_strong}/{n_steps} steps (consistent)"
        notes = null_notes + control_notes
        if controls_beaten and not all(controls_beaten):
            return VERDICT_SMALL_EFFECT, [strong, "but the real v_hack does not beat every control"] + notes
        if projected_cos_in is None:
            return VERDICT_RUN, [strong, "no projected arm given: projection effectiveness not checked"] + notes
        if not projected_lr > 0:
            return VERDICT_RUN, [strong, "projection effectiveness not evaluated: the projected arm ran with lr=0 "
                                         "(the pure probe; its cos_in equals vanilla's). Rerun Phase 2 with --lr > 0"
                                 ] + notes
        moved = np.asarray(projected_cos_in, dtype=np.float64)[1:]  # step 0 is before any update
        mean_moved = mean_or_nan(moved)
        if mean_moved < EFFECTIVE_COS_IN:
            return VERDICT_RUN, [strong, f"projected arm (lr={projected_lr:g}) mean cos_in over steps >= 1 "
                                         f"{stats.format_number(mean_moved)} < {EFFECTIVE_COS_IN}: projection effective"
                                 ] + notes
        return VERDICT_SMALL_EFFECT, [strong, f"but projected arm (lr={projected_lr:g}) mean cos_in over steps >= 1 "
                                              f"{stats.format_number(mean_moved)} >= {EFFECTIVE_COS_IN} (or undefined): "
                                              "projection not effective"] + notes
    if abs(mean_cos_in) < COS_NEAR_ZERO:
        band = f"vanilla mean cos_in {stats.format_number(mean_cos_in)} ~ 0 (|.| < {COS_NEAR_ZERO})"
    elif mean_cos_in < STRONG_COS_IN:
        band = f"vanilla mean cos_in {stats.format_number(mean_cos_in)} in [{COS_NEAR_ZERO}, {STRONG_COS_IN})"
    else:
        band = (f"vanilla mean cos_in {stats.format_number(mean_cos_in)} but > {STRONG_COS_IN} on only "
                f"{n_strong}/{n_steps} steps (not consistent)")
    return VERDICT_SMALL_EFFECT, [band, "Phase 2 cannot show alignment at step 0; v_hack may matter later"
                                  ] + null_notes + control_notes
