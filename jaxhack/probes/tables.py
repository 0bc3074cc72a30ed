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


