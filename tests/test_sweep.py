"""Phase 3 sweep logic (jaxhack/rl/sweep.py): order, skipping finished runs, resuming, the cost
ceiling, the summary table. A fake train function makes the logic tests instant; one real tiny run
goes through the trainer."""
from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest

from jaxhack.rl import sweep as S
from jaxhack.rl.config import make_config


class FakeTrain:
    """Writes RUN/run.json + RUN/done.json with a chosen peak hack rate per (arm, seed); records calls.
    crash_on: (arm, seed) whose first call writes run.json and then raises (an interrupted run)."""

    def __init__(self, peaks: dict, crash_on=None):
        self.peaks, self.crash_on, self.calls = peaks, crash_on, []

    def __call__(self, cfg, resume=True, model=None):
        self.calls.append((cfg.arm, cfg.seed, resume))
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        assert run.name == f"seed_{cfg.seed}" and run.parent.name.split("+")[0] == cfg.arm
        if (cfg.arm, cfg.seed) == self.crash_on and not (run / "run.json").exists():
            (run / "run.json").write_text("{}")
            raise KeyboardInterrupt("simulated kill")
        peak = self.peaks.get((cfg.arm, cfg.seed), 0.0)
        summary = {"steps_done": cfg.steps, "train_hack_rate_max_windowed": peak,
                   "train_hack_rate_final": peak / 2, "train_gt_pass_rate_final": 0.1 * (cfg.seed + 1)}
        (run / "done.json").write_text(json.dumps({"summary": summary}))
        return summary


def test_ceiling_stops_after_first_arm_without_separation(tmp_path):
    fake = FakeTrain({("vanilla", 0): 0.02, ("vanilla", 1): 0.05, ("vanilla", 2): 0.09})
    base = make_config("smoke")
    result = S.run_sweep(base, tmp_path, ["vanilla", "projected", "lora_projected"], [0, 1, 2],
                         train_fn=fake, hack_threshold=0.1, log=lambda s: None)
    assert result["stopped"] and "no separation" in result["reason"]
    assert fake.calls == [("vanilla", s, True) for s in (0, 1, 2)]  # the other 6 runs never started
    assert not (tmp_path / "projected").exists()
    assert (tmp_path / S.STOPPED_FILE).is_file()
    assert "STOPPED" in (tmp_path / S.SUMMARY_MD).read_text()
    # a re-run skips the finished runs and stops again (still no separation)
    fake2 = FakeTrain({})
    again = S.run_sweep(base, tmp_path, ["vanilla", "projected"], [0, 1, 2], train_fn=fake2,
                        hack_threshold=0.1, log=lambda s: None)
    assert fake2.calls == [] and again["stopped"]
    assert [r["status"] for r in again["runs"]] == ["skipped (done)"] * 3
    # --no-ceiling runs the other arms
    fake3 = FakeTrain({})
    S.run_sweep(base, tmp_path, ["vanilla", "projected"], [0, 1, 2], train_fn=fake3, ceiling=False,
                log=lambda s: None)
    assert fake3.calls == [("projected", s, True) for s in (0, 1, 2)]


def test_separation_runs_all_arms_skips_done_and_resumes(tmp_path):
    peaks = {("vanilla", 0): 0.0, ("vanilla", 1): 0.3, ("vanilla", 2): 0.0}
    base = make_config("smoke")
    fake = FakeTrain(peaks, crash_on=("projected", 1))
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(base, tmp_path, ["vanilla", "projected"], [0, 1, 2], train_fn=fake, log=lambda s: None)
    assert fake.calls == [("vanilla", 0, True), ("vanilla", 1, True), ("vanilla", 2, True),
                          ("projected", 0, True), ("projected", 1, True)]
    fake2 = FakeTrain(peaks)
    result = S.run_sweep(base, tmp_path, ["vanilla", "projected"], [0, 1, 2], train_fn=fake2,
                         log=lambda s: None)
    assert not result["stopped"]
    assert fake2.calls == [("projected", 1, True), ("projected", 2, True)]  # done runs skipped
    status = {(r["arm"], r["seed"]): r["status"] for r in result["runs"]}
    assert status[("vanilla", 0)] == "skipped (done)" and status[("projected", 1)].startswith("resumed")
    assert status[("projected", 2)].startswith("ran")
    rows = {r["arm"]: r for r in result["rows"]}
    assert rows["vanilla"]["n_seeds"] == 3
    assert rows["vanilla"]["hack_rate_mean"] == pytest.approx(0.05)  # finals 0, 0.15, 0
    assert rows["vanilla"]["hack_rate_std"] == pytest.approx(0.0866025, rel=1e-4)  # sample std
    assert rows["projected"]["gt_pass_rate_mean"] == pytest.approx(0.2)
    assert "| vanilla | 3 | 0.050 ± 0.087 |" in (tmp_path / S.SUMMARY_MD).read_text()


def test_separated_definition():
    assert S.separated([{"train_hack_rate_max_windowed": 0.1}], 0.1)
    assert not S.separated([{"train_hack_rate_max_windowed": 0.099}, {}], 0.1)
    assert S.separated([{"eval_hack_rate_max": 0.5}], 0.1, metric="eval_hack_rate_max")


def test_real_tiny_sweep_run(tmp_path):
    """One real (tiny) run through the trainer; a second sweep call skips it."""
    import test_trainer as TT  # same settings as the trainer tests: jit caches are shared

    from jaxhack.env.problems import load_problems
    problems = TT.write_short_problems(tmp_path / "short.jsonl")
    teacher = TT.write_teacher_pool(load_problems(problems), tmp_path / "teacher")
    base = TT.base_config((tmp_path, problems, teacher), tmp_path / "unused", eval_every=0, steps=4)
    out = tmp_path / "sweep"
    result = S.run_sweep(base, out, ["projected"], [0], log=lambda s: None)
    run = S.run_dir_for(out, "projected", 0)
    assert (run / "done.json").is_file() and (run / "metrics.jsonl").is_file()
    assert result["runs"][0]["summary"]["steps_done"] == 4
    assert result["rows"][0]["n_seeds"] == 1
    again = S.run_sweep(base, out, ["projected"], [0], log=lambda s: None)
    assert again["runs"][0]["status"] == "skipped (done)"


# ---- issue 13: H1 test and arm options --------------------------------------------------------
from jaxhack.rl import h1 as H1  # noqa: E402


def _seeds(pairs):
    return {s: hp for s, hp in enumerate(pairs)}


def test_h1_rule_supported_falsified_inconclusive_not_comparable():
    vanilla = _seeds([(0.8, 0.5), (0.7, 0.5), (0.9, 0.5)])
    big = H1.h1_row(vanilla, _seeds([(0.1, 0.5), (0.05, 0.45), (0.1, 0.55)]), "projected")
    assert big["status"] == "supported" and big["paired"] and big["ci_low"] >= 0.30
    small = H1.h1_row(vanilla, _seeds([(0.75, 0.5), (0.7, 0.5), (0.8, 0.5)]), "projected")
    assert small["status"] == "falsified" and small["ci_high"] < 0.30
    noisy = H1.h1_row(vanilla, _seeds([(0.1, 0.5), (0.7, 0.5), (0.5, 0.5)]), "projected")
    assert noisy["status"] == "inconclusive" and noisy["ci_low"] < 0.30 <= noisy["ci_high"]
    broken = H1.h1_row(vanilla, _seeds([(0.0, 0.2), (0.0, 0.2), (0.0, 0.2)]), "projected")  # pass fell 30 pp
    assert broken["status"] == "not comparable" and broken["pass_gap"] == pytest.approx(-0.3)
    one = H1.h1_row({0: (0.8, 0.5)}, {0: (0.1, 0.5)}, "projected")
    assert one["status"] == "inconclusive"  # no CI from one seed (mean +/- std said nothing either)
    # SEM over seeds of the paired differences
    d = [0.7, 0.65, 0.8]
    assert big["sem"] == pytest.approx(float(np.std(d, ddof=1) / np.sqrt(3)))


def test_sweep_summary_has_the_h1_table_and_arm_options(tmp_path):
    peaks = {("vanilla", s): 0.8 for s in range(3)}
    peaks.update({("projected", s): 0.1 for s in range(3)})
    fake = FakeTrain(peaks)
    placements = []

    def train_fn(cfg, resume=True, model=None):
        placements.append((cfg.arm, cfg.placement))
        return fake(cfg, resume, model)
    result = S.run_sweep(make_config("smoke"), tmp_path, ["vanilla", "projected+placement=update"], [0, 1, 2],
                         train_fn=train_fn, log=lambda _: None)
    assert placements[-1] == ("projected", "update") and placements[0] == ("vanilla", "gradient")
    text = (tmp_path / S.SUMMARY_MD).read_text()
    assert "## H1 test" in text and "| projected+placement=update | 3 |" in text
    assert result["h1"][0]["drop"] == pytest.approx(0.35)
    assert (tmp_path / "projected+placement=update" / "seed_0" / "done.json").is_file()
    with pytest.raises(ValueError, match="arm option"):
        S.parse_arm("projected+lr=1")
    assert S.parse_arm("projected+placement=update+overshoot=2") == ("projected", {"placement": "update",
                                                                                  "overshoot": 2.0})


# ---- issue 16: the Ray backend's CLI errors (no Ray needed) and the strict summary.json ----------
def test_backend_ray_without_ray_is_one_line_error(tmp_path, monkeypatch, capsys):
    import sys

    from jaxhack.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["sweep", "--backend", "ray", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[ray]'" in err and err.startswith("error:")
    assert main(["sweep", "--fake-devices", "8", "--out", str(tmp_path / "s")]) == 2
    assert "need --backend ray" in capsys.readouterr().err


def test_summary_json_is_strict(tmp_path):
    fake = FakeTrain({("vanilla", 0): float("nan")})  # NaN peak and a NaN std from one seed
    S.run_sweep(make_config("smoke"), tmp_path, ["vanilla"], [0], train_fn=fake, log=lambda _: None)

    def refuse(name):
        raise AssertionError(f"non-JSON constant {name}")
    summary = json.loads((tmp_path / S.SUMMARY_JSON).read_text(), parse_constant=refuse)
    assert summary["backend"] == "local" and summary["rows"][0]["hack_rate_std"] is None
    assert summary["runs"][0]["summary"]["train_hack_rate_max_windowed"] is None


def test_layout_extrapolation(tmp_path):
    """sweep_estimate: full run = setup + step0 + (steps - 1) * median later step; the sweep =
    sum over waves of ceil(runs / slots) * slowest run."""
    from jaxhack.rl.sweep_estimate import extrapolate, run_timing

    runs = []
    for i, (arm, seed) in enumerate([(a, s) for a in ("vanilla", "projected") for s in (0, 1, 2)]):
        run = tmp_path / arm / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"setup_s": 10.0}))
        steps = [100.0, 36.0 + i, 30.0 + i, 40.0 + i]  # median of the later steps: 36 + i
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "time_step_s": t}) + "\n"
                                                   for k, t in enumerate(steps)))
        runs.append({"arm": arm, "seed": seed, "run_dir": str(run), "placement": [{"devices": [f"cuda:{i}"]}]})
    t = run_timing(runs[0]["run_dir"])
    assert t["steady_step_s"] == 36.0 and t["step0_s"] == 100.0 and t["steps"] == 4
    waves = [[["vanilla", s] for s in (0, 1, 2)], [["projected", s] for s in (0, 1, 2)]]
    est = extrapolate({"runs": runs, "ray": {"concurrent_runs": 2, "waves": waves}}, full_steps=201, seed_hours=65)
    hours = [(10 + 100 + 200 * (36 + i)) / 3600 for i in range(6)]
    # wave 1: 3 runs on 2 slots -> 2 rounds of its slowest (i=2); wave 2 likewise (i=5)
    assert est["sweep_wall_h_ceiling_waves"] == pytest.approx(2 * hours[2] + 2 * hours[5])
    assert est["sweep_wall_h_one_wave"] == pytest.approx(3 * hours[5])  # ceil(6 / 2) rounds
    assert est["sequential_h_measured"] == pytest.approx(sum(hours))
    assert est["speedup_vs_seed"] == pytest.approx(65 / est["sweep_wall_h_ceiling_waves"])
    assert est["per_run"][4]["devices"] == ["cuda:4"] and est["waves"] == [3, 3]
