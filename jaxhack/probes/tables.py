"""Phase 2 analysis, tables: one run directory per arm loaded as a `Run`, per-step rows, per-sample
cos_S_contrib buckets and Welch comparisons (pure numpy; docs/analysis.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


TINY_ADV = 1e-6                     # |adv| below this counts as zero advantage
Z_SIGNAL = 2.0                      # a step's cos is "above the null" when z = cos / null_cos_sd > this
CONTROL_KEYS = ("v_hack_control", "control")  # run.json: which v_hack control the run used
REAL = "none"                       # the real v_hack (not a control)


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
    """Read every run directory; one (arm, v_hack control) per directory and none twice."""
    runs = []
    for directory in dirs:
        records, info = read_run(directory)
        runs.append(Run(directory=str(directory), arm=run_arm(records, info, directory), info=info, records=records))
    labels = [run_label(run) for run in runs]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"arm(s) {duplicated} given by more than one run directory; pass one directory per arm "
                         "(control runs are told apart by run.json v_hack_control)")
    return runs


def run_control(run: Run) -> str:
    """The run's v_hack control (run.json "v_hack_control"): none (the real v_hack), random, shuffled,
    clean_vs_clean."""
    return str(run_setting(run, CONTROL_KEYS, REAL))


def run_label(run: Run) -> str:
    """The arm, with the control in brackets for control runs: "vanilla", "vanilla[random]"."""
    control = run_control(run)
    return run.arm if control == REAL else f"{run.arm}[{control}]"


def find_run(runs: list[Run], arm: str) -> Run | None:
    """The real-v_hack run of this arm (control runs are never the judged arm)."""
    for run in runs:
        if run.arm == arm and run_control(run) == REAL:
            return run
    return None


def control_runs(runs: list[Run], arm: str = "vanilla") -> list[Run]:
    return [run for run in runs if run.arm == arm and run_control(run) != REAL]


def run_lr(run: Run) -> float:
    """Phase 2 learning rate (run.json settings.lr; 0 = the pure probe, the default)."""
    return float(run_setting(run, ("lr",), 0.0))


def run_loss_mode(run: Run) -> str:
    return str(run_setting(run, ("loss_mode",), "grpo"))


def run_null_sd(run: Run) -> float:
    """Null sd of the step's mean top-1 cosine (run.json null_cos_sd; NaN if not logged)."""
    return float(run_setting(run, ("null_cos_sd",), math.nan))


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
    null_sd = run_null_sd(run)
    for step, step_records in records_by_step(run.records).items():
        rewards = np.array([record["reward"] for record in step_records])
        advantages = [record["adv"] for record in step_records if "adv" in record]
        first = step_records[0]
        rows.append({
            "arm": run_label(run),
            "step": step,
            "n_samples": len(step_records),
            "cos_in": first["mean_cos_in"],
            "cos_out": first["mean_cos_out"],
            "frac_fired": first["frac_fired"],
            "z_in": first["mean_cos_in"] / null_sd if null_sd > 0 else math.nan,
            "n_overprojected": first.get("n_overprojected", math.nan),
            "update_cos": first.get("update_cos", math.nan),
            "removed_frac": first.get("removed_frac", math.nan),
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


def sign_of_adv(record: dict) -> float:
    """sign(adv); NaN when adv is not logged or zero (|adv| < TINY_ADV)."""
    adv = record.get("adv")
    if adv is None or abs(adv) < TINY_ADV:
        return math.nan
    return 1.0 if adv > 0 else -1.0


def contrib_unsigned(run: Run, record: dict) -> float:
    """cos of the sample's own NLL-descent direction with v_hack: the GRPO per-sample gradient is
    A_i * grad NLL_i, so this is sign(A_i) * cos_S_contrib (loss_mode grpo); nll runs log it as is.
    > 0: learning this sample moves hack-ward. NaN where the sign is unknown."""
    if run_loss_mode(run) == "nll":
        return record["cos_S_contrib"]
    return sign_of_adv(record) * record["cos_S_contrib"]


def contrib_signed(run: Run, record: dict) -> float:
    """The advantage-signed cosine: the sample's contribution to the batch gradient (grpo: logged as
    is; nll: sign(A_i) * cos)."""
    if run_loss_mode(run) == "nll":
        return sign_of_adv(record) * record["cos_S_contrib"]
    return record["cos_S_contrib"]


def has_unsigned(run: Run) -> bool:
    return run_loss_mode(run) == "nll" or all("adv" in record for record in run.records)


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
        unsigned = contrib_values(run, lambda r, key=(src_pool, hacked): (r["src_pool"], r["hacked"]) == key,
                                  contrib_unsigned)
        rows.append({
            "arm": run_label(run), "src_pool": src_pool, "pool_kind": pool_kind(src_pool), "hacked": hacked,
            "n": summary.n, "n_nan": int(np.isnan(values).sum()), "mean": summary.mean, "std": summary.std,
            "ci_low": summary.ci_low, "ci_high": summary.ci_high, "mean_unsigned": stats.mean(unsigned),
        })
    return rows


def contrib_values(run: Run, keep, value=None) -> np.ndarray:
    """Defined values (default cos_S_contrib; `value(run, record)` e.g. contrib_unsigned) of the
    records for which keep(record) is true."""
    value = value or (lambda run, record: record["cos_S_contrib"])
    return defined([value(run, record) for record in run.records if keep(record)])


def comparison(run: Run, name: str, label_a: str, keep_a, label_b: str, keep_b, value=None) -> dict:
    """Welch's test of cos_S_contrib (or `value`) between two groups of one arm's samples."""
    values_a = contrib_values(run, keep_a, value)
    values_b = contrib_values(run, keep_b, value)
    welch = stats.welch_t_test(values_a, values_b)
    return {
        "arm": run_label(run), "comparison": name, "group_a": label_a, "group_b": label_b,
        "n_a": int(values_a.size), "n_b": int(values_b.size),
        "mean_a": stats.mean(values_a), "mean_b": stats.mean(values_b),
        "t": welch.t, "dof": welch.dof, "p": welch.p_two_sided,
    }


def teacher_vs_base(run: Run, signed: bool | None = None) -> dict:
    """Teacher vs base cos_S_contrib. signed=False (the default where adv is logged or loss_mode is
    nll): the unsigned cosine `contrib_unsigned`, the one row 4 judges; signed=True: as logged
    (grpo: advantage-signed)."""
    if signed is None:
        signed = not has_unsigned(run)
    value = contrib_signed if signed else contrib_unsigned
    return dict(comparison(
        run, "teacher vs base" + (" (signed)" if signed else " (unsigned)"),
        "teacher", lambda record: pool_kind(record["src_pool"]) == "teacher",
        "base", lambda record: pool_kind(record["src_pool"]) == "base", value=value), signed=signed)


BEHAVIOUR_BUCKETS = ("hack-only", "hack+correct", "honest-correct", "other")


def behaviour_bucket(record: dict) -> str | None:
    """hack-only = hacked; hack+correct = attempted_hack and gt_pass; honest-correct = gt_pass and not
    attempted_hack; other = the rest. None when attempted_hack is not logged (and the sample is not
    hacked), since hack+correct and honest-correct cannot be told apart then."""
    if record["hacked"]:
        return "hack-only"
    if "attempted_hack" not in record:
        return None
    if record["gt_pass"]:
        return "hack+correct" if record["attempted_hack"] else "honest-correct"
    return "other"


def behaviour_rows(run: Run) -> list[dict]:
    """Unsigned cos_S_contrib per behaviour bucket (rows only where attempted_hack is logged)."""
    if not any("attempted_hack" in record for record in run.records):
        return []
    rows = []
    for bucket in BEHAVIOUR_BUCKETS:
        values = contrib_values(run, lambda r, b=bucket: behaviour_bucket(r) == b, contrib_unsigned)
        summary = stats.summarize(values)
        rows.append({"arm": run_label(run), "bucket": bucket, "n": summary.n, "mean": summary.mean,
                     "ci_low": summary.ci_low, "ci_high": summary.ci_high})
    return rows


def control_row(run: Run) -> dict:
    """One run's v_hack-quality numbers for the controls table: mean cos_in, mean z and the share of
    steps above the null, and the unsigned teacher - base cos_S_contrib difference with its p."""
    rows = step_rows(run)
    cos_in = defined([row["cos_in"] for row in rows])
    z = defined([row["z_in"] for row in rows])
    test = teacher_vs_base(run)
    return {"arm": run_label(run), "control": run_control(run), "n_steps": len(rows),
            "mean_cos_in": stats.mean(cos_in), "mean_z": stats.mean(z),
            "frac_steps_above_null": float(np.mean(z > Z_SIGNAL)) if z.size else math.nan,
            "teacher_minus_base": test["mean_a"] - test["mean_b"], "p": test["p"], "cos_in": cos_in}


def hacked_vs_not_hacked(run: Run) -> dict:
    return comparison(
        run, "hacked vs not hacked", "hacked", lambda record: record["hacked"],
        "not hacked", lambda record: not record["hacked"],
    )


def advantage_summary(run: Run) -> dict:
    """Distribution of the logged advantage `adv` (n = 0 when the field was not logged)."""
    advantages = np.array([record["adv"] for record in run.records if "adv" in record], dtype=np.float64)
    if advantages.size == 0:
        return {"arm": run_label(run), "n": 0, "n_records": len(run.records), "min": math.nan, "max": math.nan,
                "mean": math.nan, "median_abs": math.nan, "frac_tiny": math.nan}
    return {
        "arm": run_label(run), "n": int(advantages.size), "n_records": len(run.records),
        "min": float(advantages.min()), "max": float(advantages.max()), "mean": float(advantages.mean()),
        "median_abs": float(np.median(np.abs(advantages))),
        "frac_tiny": float(np.mean(np.abs(advantages) < TINY_ADV)),
    }


