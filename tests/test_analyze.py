"""Phase 2 analysis: statistics with known answers, every branch of the verification table and of
the Phase 3 verdict, and the report / plots written by analyze_runs."""

import math

import numpy as np
import pytest
import scipy.stats

from jaxhack.probes import analyze, stats, tables
from jaxhack.probes import verdict as rules
from jaxhack.probes.tables import Run
from jaxhack.probes.records import validate_record, write_run_info, write_step

TEACHER_REWARD = 3.5
BASE_REWARD = 0.25


def sample_records(step, arm, samples, cos_in, cos_out, frac_fired, log_adv=True):
    """Validated records of one step. samples: (src_pool, hacked, reward, cos_S_contrib) tuples;
    adv = reward - mean(reward) (Dr.GRPO centered) when log_adv."""
    rewards = np.array([reward for _, _, reward, _ in samples])
    records = []
    for sample_id, (src_pool, hacked, reward, cos_contrib) in enumerate(samples):
        record = {
            "step": step, "sample_id": sample_id, "src_pool": src_pool, "src_step": step,
            "src_sample": sample_id % 4, "reward": reward, "hacked": hacked, "gt_pass": not hacked,
            "fmt_ok": True, "comp_len": 100 + sample_id, "cos_S_contrib": cos_contrib, "grad_norm_contrib": 1.0,
            "mean_cos_in": cos_in, "mean_cos_out": cos_out, "frac_fired": frac_fired, "arm": arm,
        }
        if log_adv:
            record["adv"] = float(reward - rewards.mean())
        records.append(validate_record(record))
    return records


def mixed_batch(step, teacher_cos=0.5, base_cos=0.1, spread=0.05, teacher_reward=TEACHER_REWARD,
                base_reward=BASE_REWARD):
    """4 teacher (hacked) + 4 base (clean) samples with cos_S_contrib = center +/- spread pattern.
    cos_S_contrib is advantage-signed (grpo): base samples (A < 0) with base_cos = +0.1 have an
    unsigned (own NLL-descent) cosine of -0.1."""
    offsets = spread * np.array([-1.5, -0.5, 0.5, 1.5]) * (1 + 0.1 * step)
    teacher = [("teacher_pool", True, teacher_reward, float(teacher_cos + offset)) for offset in offsets]
    base = [("base_pool", False, base_reward, float(base_cos + offset)) for offset in offsets]
    return teacher + base


def make_run(arm, cos_in, cos_out=None, frac_fired=None, batch=mixed_batch, log_adv=True, info=None):
    """In-memory Run with one step per entry of cos_in (cos_out defaults to cos_in, frac_fired to 0)."""
    cos_in = list(cos_in)
    cos_out = list(cos_in if cos_out is None else cos_out)
    frac_fired = list([0.0] * len(cos_in) if frac_fired is None else frac_fired)
    records = []
    for step, (step_in, step_out, step_fired) in enumerate(zip(cos_in, cos_out, frac_fired)):
        records += sample_records(step, arm, batch(step), step_in, step_out, step_fired, log_adv)
    return Run(directory=f"memory/{arm}", arm=arm, info=dict(info or {}, arm=arm), records=records)


N_STEPS = 20


def steady(value, n=N_STEPS):
    return [value] * n


# ---- stats ---------------------------------------------------------------------------------------
def test_mean_std_ci_known_answers():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    assert stats.mean(values) == 2.5
    assert stats.std(values) == pytest.approx(math.sqrt(5.0 / 3.0))
    # t_{0.975, 3} = 3.182446 from a printed t table; half width = t * s / sqrt(n)
    half_width = 3.182446 * math.sqrt(5.0 / 3.0) / 2.0
    low, high = stats.ci95_mean(values)
    assert low == pytest.approx(2.5 - half_width, abs=1e-5)
    assert high == pytest.approx(2.5 + half_width, abs=1e-5)
    scipy_low, scipy_high = scipy.stats.t.interval(0.95, 3, loc=2.5, scale=scipy.stats.sem(values))
    assert (low, high) == pytest.approx((scipy_low, scipy_high))


def test_small_samples_are_not_available():
    assert math.isnan(stats.mean([]))
    assert math.isnan(stats.std([3.0]))
    assert all(math.isnan(bound) for bound in stats.ci95_mean([3.0]))
    welch = stats.welch_t_test([1.0], [1.0, 2.0, 3.0])
    assert math.isnan(welch.t) and math.isnan(welch.dof) and math.isnan(welch.p_two_sided)
    assert math.isnan(stats.welch_t_test([1.0, 1.0], [2.0, 2.0]).t)  # zero standard error
    summary = stats.summarize([0.3])
    assert summary.n == 1 and summary.mean == 0.3 and math.isnan(summary.ci_low)
    assert stats.format_number(math.nan) == "n/a" and stats.format_p_value(math.nan) == "n/a"
    assert stats.format_number(0.12345) == "0.123"
    with pytest.raises(ValueError, match="finite"):
        stats.mean([1.0, math.nan])


def test_welch_against_scipy_and_hand_formula():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = np.array([2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
    result = stats.welch_t_test(a, b)
    # hand formula: var_a = 2.5, var_b = 14
    se2 = 2.5 / 5 + 14.0 / 6
    hand_t = (3.0 - 7.0) / math.sqrt(se2)
    hand_dof = se2**2 / ((2.5 / 5) ** 2 / 4 + (14.0 / 6) ** 2 / 5)
    assert result.t == pytest.approx(hand_t)
    assert result.dof == pytest.approx(hand_dof)
    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert result.t == pytest.approx(reference.statistic)
    assert result.p_two_sided == pytest.approx(reference.pvalue)
    assert result.dof == pytest.approx(reference.df)


# ---- buckets -------------------------------------------------------------------------------------
def test_bucket_statistics_known_answers():
    samples = [("teacher_pool", True, 3.5, 0.2), ("teacher_pool", True, 3.5, 0.4), ("teacher_pool", True, 3.5, 0.9),
               ("teacher_pool", False, 1.0, 0.1), ("base_pool", False, 0.0, -0.3), ("base_pool", False, 0.5, 0.1),
               ("base_pool", False, 0.0, math.nan)]
    run = Run("memory", "vanilla", {}, sample_records(0, "vanilla", samples, 0.3, 0.3, 0.0))
    rows = {(row["src_pool"], row["hacked"]): row for row in tables.bucket_rows(run)}
    assert set(rows) == {("teacher_pool", True), ("teacher_pool", False), ("base_pool", False)}
    hacked = rows[("teacher_pool", True)]
    assert hacked["n"] == 3 and hacked["mean"] == pytest.approx(0.5)
    assert hacked["std"] == pytest.approx(math.sqrt(((0.3) ** 2 + (0.1) ** 2 + (0.4) ** 2) / 2))
    t_table_2_dof = 4.302653  # t_{0.975, 2}
    assert hacked["ci_high"] - hacked["mean"] == pytest.approx(t_table_2_dof * hacked["std"] / math.sqrt(3), abs=1e-5)
    single = rows[("teacher_pool", False)]
    assert single["n"] == 1 and single["mean"] == pytest.approx(0.1) and math.isnan(single["ci_low"])
    base = rows[("base_pool", False)]
    assert base["n"] == 2 and base["n_nan"] == 1 and base["mean"] == pytest.approx(-0.1)

    test = tables.teacher_vs_base(run, signed=True)  # as logged (advantage-signed)
    teacher_values = [0.2, 0.4, 0.9, 0.1]
    reference = scipy.stats.ttest_ind(teacher_values, [-0.3, 0.1], equal_var=False)
    assert (test["n_a"], test["n_b"]) == (4, 2)
    assert test["t"] == pytest.approx(reference.statistic) and test["p"] == pytest.approx(reference.pvalue)
    # unsigned (the default, row 4): sign(adv) * cos; mean reward 12/7, so only the hacked teachers have A > 0
    test = tables.teacher_vs_base(run)
    reference = scipy.stats.ttest_ind([0.2, 0.4, 0.9, -0.1], [0.3, -0.1], equal_var=False)
    assert not test["signed"] and test["t"] == pytest.approx(reference.statistic)
    assert base["mean_unsigned"] == pytest.approx(0.1)
    hacked_test = tables.hacked_vs_not_hacked(run)
    assert (hacked_test["n_a"], hacked_test["n_b"]) == (3, 3)
    assert hacked_test["mean_b"] == pytest.approx((0.1 - 0.3 + 0.1) / 3)


def test_pool_kind_and_advantage_summary():
    assert tables.pool_kind("out/probe_distill/teacher_pool/") == "teacher"
    assert tables.pool_kind("base_pool") == "base"
    assert tables.pool_kind("other") == "other"
    run = make_run("vanilla", steady(0.3, 2))
    summary = tables.advantage_summary(run)
    spread = (TEACHER_REWARD - BASE_REWARD) / 2
    assert summary["n"] == 16 and summary["max"] == pytest.approx(spread) and summary["min"] == pytest.approx(-spread)
    assert summary["mean"] == pytest.approx(0.0, abs=1e-12) and summary["frac_tiny"] == 0.0
    assert tables.advantage_summary(make_run("vanilla", [0.3], log_adv=False))["n"] == 0


# ---- verification row 1: reward range ------------------------------------------------------------
def test_row1_success_and_note_without_adv():
    row = rules.evaluate_reward_range([make_run("vanilla", steady(0.3))])
    assert row["status"] == rules.SUCCESS
    assert row["numbers"]["n_range_above_success"] == N_STEPS
    assert row["numbers"]["min_range"] == pytest.approx(TEACHER_REWARD - BASE_REWARD)
    no_adv = rules.evaluate_reward_range([make_run("vanilla", steady(0.3), log_adv=False)])
    assert no_adv["status"] == rules.SUCCESS and any("adv not logged" in reason for reason in no_adv["reasons"])


def test_row1_likely_fail_when_rewards_equal():
    def all_hack(step):
        return mixed_batch(step, base_reward=TEACHER_REWARD)
    row = rules.evaluate_reward_range([make_run("vanilla", steady(0.3), batch=all_hack)])
    assert row["status"] == rules.LIKELY_FAIL and "no advantage signal" in row["reasons"][0]

    def almost_equal(step):  # range 0.05 < 0.1: still useless
        return mixed_batch(step, teacher_reward=0.3, base_reward=0.25)
    row = rules.evaluate_reward_range([make_run("vanilla", steady(0.3), batch=almost_equal)])
    assert row["status"] == rules.LIKELY_FAIL and "no advantage signal" in row["reasons"][0]
    assert row["numbers"]["n_range_below_useless"] == N_STEPS


def test_row1_sneaky_fail_tiny_advantages():
    def one_outlier(step):
        return [("teacher_pool", True, 1.0, 0.3)] * 7 + [("base_pool", False, 1.2, 0.0)]
    row = rules.evaluate_reward_range([make_run("vanilla", steady(0.3), batch=one_outlier)])
    assert row["status"] == rules.SNEAKY_FAIL
    assert row["numbers"]["median_abs_adv_informative"] == pytest.approx(0.2 / 8)


def test_row1_likely_fail_when_range_moderate():
    def narrow(step):
        return mixed_batch(step, teacher_reward=1.0, base_reward=0.5)
    row = rules.evaluate_reward_range([make_run("vanilla", steady(0.3), batch=narrow)])
    assert row["status"] == rules.LIKELY_FAIL and "success criterion not met" in row["reasons"][0]


def test_row1_not_available_without_runs():
    assert rules.evaluate_reward_range([])["status"] == rules.NOT_AVAILABLE


# ---- verification row 2: vanilla cos_in ----------------------------------------------------------
@pytest.mark.parametrize(
    "cos_in, status",
    [
        (steady(0.3), rules.SUCCESS),
        ([0.3] * 12 + [-0.1] * 8, rules.SUCCESS),
        ([0.01, -0.01] * 10, rules.LIKELY_FAIL),
        ([-0.3] * 15 + [0.1] * 5, rules.SNEAKY_FAIL),
        ([0.3] * 8 + [-0.05] * 12, rules.SNEAKY_FAIL),
        ([0.5] * 6 + [0.0] * 14, rules.LIKELY_FAIL),  # mean 0.15 but > 0 on only 6/20
        (steady(math.nan), rules.LIKELY_FAIL),
    ],
)
def test_row2_branches(cos_in, status):
    row = rules.evaluate_vanilla_cos_in(make_run("vanilla", cos_in))
    assert row["status"] == status
    assert row["numbers"]["n_positive"] == sum(value > 0 for value in cos_in)


def test_row2_not_available_without_vanilla():
    assert rules.evaluate_vanilla_cos_in(None)["status"] == rules.NOT_AVAILABLE


# ---- verification row 3: projected arm -----------------------------------------------------------
@pytest.mark.parametrize(
    "cos_out, frac_fired, status",
    [
        (steady(0.01), steady(0.65), rules.SUCCESS),
        ([0.01] * 16 + [0.3] * 4, steady(0.65), rules.SUCCESS),
        ([0.01] * 15 + [0.3] * 5, steady(0.65), rules.LIKELY_FAIL),
        (steady(0.3), steady(0.0), rules.LIKELY_FAIL),
        ([0.3] * 11 + [0.01] * 9, steady(0.65), rules.LIKELY_FAIL),
        (steady(0.01), steady(0.1), rules.SNEAKY_FAIL),
    ],
)
def test_row3_branches(cos_out, frac_fired, status):
    run = make_run("projected", steady(0.3), cos_out, frac_fired)
    row = rules.evaluate_projection(run)
    assert row["status"] == status
    assert row["numbers"]["n_reduced"] == sum(value < 0.3 for value in cos_out)


def test_row3_not_available_without_projected():
    assert rules.evaluate_projection(None)["status"] == rules.NOT_AVAILABLE


# ---- verification row 4: cos_S_contrib teacher vs base -------------------------------------------
def test_row4_success():
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3)))
    assert row["status"] == rules.SUCCESS and row["numbers"]["judged"] == "unsigned"
    assert row["numbers"]["mean_a"] == pytest.approx(0.5) and row["numbers"]["mean_b"] == pytest.approx(-0.1)
    assert row["numbers"]["signed_mean_base"] == pytest.approx(0.1)  # reported side by side
    assert row["numbers"]["p"] < rules.SIGNIFICANCE_ALPHA
    assert "advantage-signed: teacher 0.500, base 0.100" in row["observed"]


def test_row4_judges_the_unsigned_cosine():
    """Logged base cos -0.1 with A < 0 means the base sample's own NLL descent points hack-ward
    (+0.1): the old rule (signed base <= 0.05) passed it; the unsigned rule does not."""
    def hackward_base(step):
        return mixed_batch(step, base_cos=-0.1)
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3), batch=hackward_base))
    assert row["status"] == rules.LIKELY_FAIL and "not ~0 or negative" in row["reasons"][0]
    # nll runs log the unsigned cosine directly
    nll = make_run("vanilla", steady(0.3), batch=hackward_base, info={"loss_mode": "nll"})
    assert rules.evaluate_contrib(nll)["status"] == rules.SUCCESS
    # without adv the signed cosine is judged, and the row says so
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3), batch=hackward_base, log_adv=False))
    assert row["numbers"]["judged"] == "signed" and any("adv not logged" in r for r in row["reasons"])


def test_row4_likely_fail_when_similar_or_base_positive():
    def similar(step):
        return mixed_batch(step, teacher_cos=0.2, base_cos=-0.2)
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3), batch=similar))
    assert row["status"] == rules.LIKELY_FAIL and "isn't direction-specific" in row["reasons"][0]

    def base_positive(step):
        return mixed_batch(step, teacher_cos=0.6, base_cos=-0.3)
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3), batch=base_positive))
    assert row["status"] == rules.LIKELY_FAIL and "not ~0 or negative" in row["reasons"][0]


def test_row4_sneaky_fail_when_a_bucket_is_empty():
    def teacher_only(step):
        return [sample for sample in mixed_batch(step) if sample[0] == "teacher_pool"]
    row = rules.evaluate_contrib(make_run("vanilla", steady(0.3), batch=teacher_only))
    assert row["status"] == rules.SNEAKY_FAIL and row["numbers"]["n_b"] == 0


def test_row4_uses_vanilla_then_projected():
    vanilla, projected = make_run("vanilla", [0.3]), make_run("projected", [0.3])
    assert rules.contrib_run([projected, vanilla]) is vanilla
    assert rules.contrib_run([projected]) is projected
    assert rules.evaluate_contrib(None)["status"] == rules.NOT_AVAILABLE


# ---- verdict -------------------------------------------------------------------------------------
def verdict(vanilla=None, projected_in=None, projected_out=None, gate="one_sided", row1=rules.SUCCESS,
            discriminates=True, overshoot=1.0, **kw):
    return rules.decide_verdict(vanilla, projected_in, projected_out, gate, row1, discriminates, overshoot, **kw)


def test_verdict_run():
    # lr = 0: the projected arm cannot move; effectiveness is reported as not evaluated
    result, reasons = verdict(steady(0.3), steady(0.3), steady(0.0))
    assert result == rules.VERDICT_RUN and "not evaluated" in reasons[1] and "lr=0" in reasons[1]
    result, reasons = verdict(steady(0.3))
    assert result == rules.VERDICT_RUN and "no projected arm" in reasons[1]
    # lr > 0: judged on the projected arm's cos_in over steps >= 1
    moved = [0.3] + [0.01] * (N_STEPS - 1)
    result, reasons = verdict(steady(0.3), moved, steady(0.0), projected_lr=1e-3)
    assert result == rules.VERDICT_RUN and "projection effective" in reasons[1]


def test_effectiveness_is_judged_on_projected_cos_in_not_cos_out():
    """Under the one-sided gate cos_out <= 0 always, so the old rule (mean cos_out < 0.05) could never
    fail; a projected arm whose cos_in stays at 0.3 with lr > 0 is not effective."""
    result, reasons = verdict(steady(0.3), steady(0.3), steady(-0.01), projected_lr=1e-3)
    assert result == rules.VERDICT_SMALL_EFFECT and "projection not effective" in reasons[1]


@pytest.mark.parametrize(
    "vanilla, discriminates, reason_text",
    [
        (steady(0.1), True, "in [0.02, 0.2)"),
        ([0.3] * 15 + [0.1] * 5, True, "not consistent"),
        ([0.01] * 19 + [0.1], False, "~ 0"),
        (steady(0.01), True, "discriminates"),
    ],
)
def test_verdict_small_effect(vanilla, discriminates, reason_text):
    result, reasons = verdict(vanilla, discriminates=discriminates)
    assert result == rules.VERDICT_SMALL_EFFECT
    assert any(reason_text in reason for reason in reasons)


def test_verdict_null_baseline():
    """A cos_in of 0.3 is no signal when a random direction gives sd 0.2 (z = 1.5 < 2): skip without
    teacher > base discrimination. With sd 0.05 (z = 6) it is a signal."""
    result, reasons = verdict(steady(0.3), null_sd=0.2, discriminates=False)
    assert result == rules.VERDICT_SKIP and reasons[0].startswith("no signal")
    assert verdict(steady(0.3), null_sd=0.2)[0] == rules.VERDICT_SMALL_EFFECT
    result, reasons = verdict(steady(0.3), null_sd=0.05)
    assert result == rules.VERDICT_RUN and any("z = cos_in / null sd" in r for r in reasons)


def test_verdict_controls():
    assert verdict(steady(0.3), controls_beaten=[True, False])[0] == rules.VERDICT_SMALL_EFFECT
    result, reasons = verdict(steady(0.3), controls_beaten=[True, True])
    assert result == rules.VERDICT_RUN and "beats 2/2 control" in reasons[-1]


def test_verdict_skip():
    result, reasons = verdict([0.01, -0.015, math.nan] * 6 + [0.0, 0.0], discriminates=False)
    assert result == rules.VERDICT_SKIP and "R7" in reasons[-1]


def test_verdict_bug():
    raised = [0.01] * 19 + [0.31]
    result, reasons = verdict(steady(0.3), steady(0.3), raised)
    assert result == rules.VERDICT_BUG and "1 step(s)" in reasons[0]
    # over-projection is a per-module count: a negative mean cos_out alone is not a bug (an honest
    # one-sided erase keeps the negative modules); the old mean rule called this a bug
    assert verdict(steady(0.3), steady(0.3), steady(-0.2))[0] == rules.VERDICT_RUN
    assert verdict(steady(0.3), steady(0.3), steady(-0.2), projected_n_overprojected=steady(0.0))[0] == rules.VERDICT_RUN
    counts = [0.0] * 19 + [3.0]
    result, reasons = verdict(steady(0.3), steady(0.3), steady(-0.2), projected_n_overprojected=counts)
    assert result == rules.VERDICT_BUG and "over-projection on 1 step(s)" in reasons[0]
    result, reasons = verdict(steady(0.3), steady(0.3), steady(0.0), gate="no_gate", projected_n_overprojected=counts)
    assert result == rules.VERDICT_BUG and "over-projection" in reasons[0]
    # not an exact erase: reverse reflects and overshoot > 1 over-projects on purpose
    assert verdict(steady(0.3), steady(0.3), steady(-0.2), gate="reverse",
                   projected_n_overprojected=counts)[0] == rules.VERDICT_RUN
    assert verdict(steady(0.3), steady(0.3), steady(-0.2), overshoot=1.5,
                   projected_n_overprojected=counts)[0] == rules.VERDICT_RUN
    assert verdict(steady(0.3), steady(-0.1), steady(0.0), gate="no_gate")[0] == rules.VERDICT_RUN


def test_gate_and_overshoot_read_from_run_info():
    assert tables.run_gate(make_run("projected", [0.3])) == tables.DEFAULT_GATE
    nested = make_run("projected", [0.3], info={"settings": {"gate": "reverse", "overshoot": 1.5}})
    assert tables.run_gate(nested) == "reverse" and tables.run_overshoot(nested) == 1.5
    top_level = make_run("projected", [0.3], info={"gate_mode": "no_gate", "settings": {"gate": "reverse"}})
    assert tables.run_gate(top_level) == "no_gate"


def test_verdict_inconclusive():
    assert verdict(None)[0] == rules.VERDICT_INCONCLUSIVE
    assert verdict(steady(math.nan))[0] == rules.VERDICT_INCONCLUSIVE
    assert verdict(steady(0.3), row1=rules.LIKELY_FAIL)[0] == rules.VERDICT_INCONCLUSIVE
    assert verdict(steady(-0.3))[0] == rules.VERDICT_INCONCLUSIVE
    assert verdict(steady(0.0), discriminates=None)[0] == rules.VERDICT_INCONCLUSIVE


# ---- end to end ----------------------------------------------------------------------------------
def write_run_dir(directory, run, gate="one_sided"):
    for step, step_records in tables.records_by_step(run.records).items():
        write_step(directory, step, step_records)
    write_run_info(directory, {"arm": run.arm, "loss_mode": "grpo", "gate": gate})


def test_analyze_runs_writes_report_and_plots(tmp_path):
    vanilla = make_run("vanilla", [0.3 + 0.01 * step for step in range(N_STEPS)])
    projected = make_run("projected", steady(0.3), steady(0.01), steady(0.65))
    write_run_dir(tmp_path / "vanilla", vanilla)
    write_run_dir(tmp_path / "projected", projected)
    report_path = tmp_path / "report" / "report.md"
    summary = analyze.analyze_runs([tmp_path / "vanilla", tmp_path / "projected"], report_path,
                                   tmp_path / "report" / "plots")
    assert summary["verdict"] == rules.VERDICT_RUN
    assert [row["status"] for row in summary["verification"]] == [rules.SUCCESS] * 4
    assert summary["warnings"] == []
    text = report_path.read_text()
    for row in summary["verification"]:
        observed = row["observed"].replace("|", "\\|")  # "|adv|" escaped inside a table cell
        assert f"| {row['row']} | {row['metric']} | {row['arm']} | {observed} | **{row['status']}** |" in text
    assert "## Phase 3 verdict: `run`" in text
    for name in ("cos_trajectory", "cos_contrib_buckets", "advantages"):
        path = tmp_path / "report" / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    steps = summary["steps"]["vanilla"]
    assert [row["cos_in"] for row in steps] == pytest.approx([0.3 + 0.01 * step for step in range(N_STEPS)])
    assert analyze.summary_to_json(summary).count('"verdict": "run"') == 1
    assert "Phase 3 verdict: run" in analyze.format_summary(summary)


def test_analyze_runs_rejects_two_dirs_of_one_arm_and_arm_mismatch(tmp_path):
    write_run_dir(tmp_path / "a", make_run("vanilla", [0.3]))
    write_run_dir(tmp_path / "b", make_run("vanilla", [0.3]))
    with pytest.raises(ValueError, match="more than one run directory"):
        analyze.analyze_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "report.md")
    write_run_info(tmp_path / "b", {"arm": "projected"})
    with pytest.raises(ValueError, match="differs from the records' arm"):
        analyze.analyze_runs([tmp_path / "b"], tmp_path / "report.md")


def test_script_prints_verdict_and_fails_cleanly(tmp_path, capsys):
    from scripts.analyze import main

    write_run_dir(tmp_path / "vanilla", make_run("vanilla", steady(0.01), log_adv=False))
    assert main([str(tmp_path / "vanilla"), "--json", str(tmp_path / "summary.json")]) == 0
    printed = capsys.readouterr().out
    assert "Phase 3 verdict: run-expect-small-effect" in printed  # |cos_in| ~ 0 but teacher > base
    assert "3. cos_out < cos_in per step, projected arm [projected]: N/A" in printed
    assert (tmp_path / "vanilla" / "report.md").exists() and (tmp_path / "summary.json").exists()
    assert main([str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def with_fields(run, info=None, **fields):
    """Copy of a run with step-level fields added to every record (and run.json info)."""
    records = [validate_record(dict(record, **fields)) for record in run.records]
    return Run(run.directory, run.arm, dict(run.info, **(info or {})), records)


def test_analyze_shows_controls_null_z_overprojection_and_update_cos(tmp_path):
    """Control runs (same arm, run.json v_hack_control) are accepted and shown side by side; the
    diagnostics table has z, the over-projection count and the update cosine; the verdict reads
    the projected arm's cos_in (lr > 0) and the null."""
    null = {"null_cos_sd": 0.05, "settings": {"lr": 1e-3}}
    vanilla = with_fields(make_run("vanilla", steady(0.3)), null, n_overprojected=0.0, update_cos=0.2)
    control = with_fields(make_run("vanilla", [0.01 * (-1) ** s for s in range(N_STEPS)],
                                   batch=lambda step: mixed_batch(step, teacher_cos=0.0, base_cos=0.0)),
                          dict(null, v_hack_control="random"), n_overprojected=0.0, update_cos=0.0)
    projected = with_fields(make_run("projected", [0.3] + [0.01] * (N_STEPS - 1), steady(0.0), steady(0.65)),
                            null, n_overprojected=0.0, update_cos=0.04, removed_frac=0.3)
    for name, run in (("vanilla", vanilla), ("random", control), ("projected", projected)):
        write_run_dir(tmp_path / name, run)
        write_run_info(tmp_path / name, dict(run.info, loss_mode="grpo"))
    summary = analyze.analyze_runs([tmp_path / n for n in ("vanilla", "random", "projected")], tmp_path / "r.md")
    assert summary["verdict"] == rules.VERDICT_RUN, summary["verdict_reasons"]
    assert any("projection effective" in r for r in summary["verdict_reasons"])
    assert any("beats 1/1 control" in r for r in summary["verdict_reasons"])
    rows = {row["arm"]: row for row in summary["controls"]}
    assert rows["vanilla[random]"]["beats"] is True and rows["vanilla"]["mean_z"] == pytest.approx(6.0)
    text = (tmp_path / "r.md").read_text()
    assert "## Controls: real v_hack vs controls" in text and "| vanilla[random] | random |" in text
    assert "over-projected modules" in text and "| projected | 1 | 0.010 | 0.20 | 0 | 0.040 | 0.300 |" in text
    assert "Phase 2 lr=0.001 (Adam on delta_s" in text
    # an over-projected step in the projected arm is a bug
    bad = with_fields(projected, n_overprojected=2.0)
    write_run_dir(tmp_path / "projected", bad)
    write_run_info(tmp_path / "projected", dict(bad.info, loss_mode="grpo"))
    summary = analyze.analyze_runs([tmp_path / "vanilla", tmp_path / "projected"], tmp_path / "r2.md")
    assert summary["verdict"] == rules.VERDICT_BUG


def test_behaviour_buckets_use_attempted_hack():
    samples = [("teacher_pool", True, 3.5, 0.5), ("teacher_pool", False, 3.5, 0.4),
               ("base_pool", False, 0.5, 0.1), ("base_pool", False, 0.0, 0.2)]
    records = sample_records(0, "vanilla", samples, 0.3, 0.3, 0.0)
    for record, attempted in zip(records, (True, True, False, False)):
        record["attempted_hack"] = attempted
    records[3]["gt_pass"] = False
    run = Run("memory", "vanilla", {"arm": "vanilla"}, records)
    assert [tables.behaviour_bucket(r) for r in records] == ["hack-only", "hack+correct", "honest-correct", "other"]
    rows = {row["bucket"]: row for row in tables.behaviour_rows(run)}
    assert rows["hack+correct"]["n"] == 1 and rows["honest-correct"]["mean"] == pytest.approx(-0.1)
    plain = sample_records(0, "vanilla", samples, 0.3, 0.3, 0.0)
    assert tables.behaviour_bucket(plain[1]) is None  # no attempted_hack: not classifiable
