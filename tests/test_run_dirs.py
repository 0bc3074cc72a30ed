"""The one run-directory rule (jaxhack.io.claim_run_dir + atomic_directory) and partial inputs:
no command mixes a new run into an old one or silently loses one, and killed / incomplete inputs are
refused unless --allow-partial, which the report then states (issue 15, parts 1 and 2)."""
from __future__ import annotations

import json
import shutil

import pytest

from jaxhack.cli import main
from jaxhack.env.pools import read_pool
from jaxhack.io import UserError, atomic_directory, claim_run_dir, remove_stale_temp_dirs
from jaxhack.probes.records import read_run, read_run_info, write_run_info


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- the rule itself

def test_claim_run_dir_refuses_a_finished_run_and_names_the_flags(tmp_path):
    run = tmp_path / "run"
    assert claim_run_dir(run, what="pool", finished=lambda p: True) is False  # missing: claimed
    run.mkdir()
    assert claim_run_dir(run, what="pool", finished=lambda p: True) is False  # empty: claimed
    (run / "pool.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds a finished pool; pass --force to replace it"):
        claim_run_dir(run, what="pool", finished=lambda p: True)
    with pytest.raises(UserError, match=r"an unfinished Phase 3 run .*--force.*--resume"):
        claim_run_dir(run, what="Phase 3 run", finished=lambda p: False, resumable=True)
    assert claim_run_dir(run, what="pool", finished=lambda p: True, force=True) is True
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        claim_run_dir(tmp_path / "file", what="pool", finished=lambda p: True)


def test_atomic_directory_replaces_the_whole_directory(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "step_019.jsonl.gz").write_text("stale")
    with atomic_directory(final) as work:
        (work / "step_000.jsonl.gz").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["step_000.jsonl.gz"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp or old dir left
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as work:
            (work / "half").write_text("x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["step_000.jsonl.gz"]  # old run kept


def test_remove_stale_temp_dirs(tmp_path):
    (tmp_path / ".step_000002.tmp-abc").mkdir()
    (tmp_path / "step_000001").mkdir()
    assert [p.name for p in remove_stale_temp_dirs(tmp_path)] == [".step_000002.tmp-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


# ---------------------------------------------------------------- every command applies it

def test_pool_rerun_is_refused_and_force_leaves_no_stale_step(tmp_path, capsys):
    out = tmp_path / "pool"
    args = ["pool", "--mode", "run_tests", "--per-step", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--kind", "teacher", "--steps", "2"]) == 0
    assert main([*args, "--kind", "base", "--steps", "1"]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "finished pool" in line and "--force" in line
    assert main([*args, "--kind", "base", "--steps", "1", "--force"]) == 0
    meta, records = read_pool(out)
    assert meta["kind"] == "base" and meta["pool"] == "pool" and meta["complete"]
    assert {r["step"] for r in records} == {0} and len(records) == 2  # the teacher's step 1 is gone
    assert [p.name for p in tmp_path.iterdir()] == ["pool"]


def test_phase2_rerun_refused_force_replaces(probe_inputs, tmp_path, capsys):
    out = tmp_path / "p2"
    shutil.copytree(probe_inputs["p2"], out)
    (out / "step_007.cos.jsonl.gz").write_bytes(b"stale")  # a step past the new run's count
    args = ["phase2", "--replay-dirs", f"{probe_inputs['teacher']},{probe_inputs['base']}", "--steps", "1",
            "--per-pool", "2", "--v-hack", str(probe_inputs["v_hack"]), "--out", str(out), *probe_inputs["small"]]
    assert main(args) == 2
    assert "finished probe run" in one_error_line(capsys)
    assert main([*args, "--force"]) == 0
    names = sorted(p.name for p in out.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]  # TensorBoard (docs/phase3.md)
    assert len(events) <= 1 and [n for n in names if n not in events] == ["run.json", "step_000.cos.jsonl.gz"]


def test_phase1_and_extract_and_demo_refuse_before_any_work(probe_inputs, tmp_path, capsys):
    p1 = tmp_path / "p1"
    p1.mkdir()
    write_run_info(p1, {"status": "done"})
    assert main(["phase1", "--pool", str(probe_inputs["teacher"]), "--v-hack", str(probe_inputs["v_hack"]),
                 "--out", str(p1)]) == 2
    assert "--force" in one_error_line(capsys)
    assert main(["extract", "--out", str(probe_inputs["v_hack"])]) == 2  # refused before any gradient
    assert "finished v_hack" in one_error_line(capsys)
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.md").write_text("# old demo")
    assert main(["demo", "--out", str(demo), "--steps", "5", "--seed", "1"]) == 2
    assert "finished demo" in one_error_line(capsys)
    assert (demo / "report.md").read_text() == "# old demo"


def test_train_run_dir_rule(tmp_path, capsys):
    from jaxhack.commands.train import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "done.json").write_text("{}")
    with pytest.raises(UserError, match="finished Phase 3 run.*--force.*--resume"):
        prepare_run_dir(run, resume=False, force=False)
    aside = prepare_run_dir(run, resume=False, force=True)  # moved aside until the new run finishes
    assert not run.exists() and (aside / "run" / "done.json").is_file()
    # --resume on a new directory says so; leftover checkpoint writes are removed
    new = tmp_path / "new"
    assert prepare_run_dir(new, resume=True, force=False) is None
    assert "no run in" in capsys.readouterr().out
    (new / "ckpt" / ".step_000002.tmp-x").mkdir(parents=True)
    (new / "run.json").write_text("{}")
    prepare_run_dir(new, resume=True, force=False)
    assert "removed 1 unfinished checkpoint write" in capsys.readouterr().out
    assert not (new / "ckpt" / ".step_000002.tmp-x").exists()


# ---------------------------------------------------------------- killed / incomplete inputs

def test_analyze_refuses_an_unfinished_run_unless_allow_partial(probe_inputs, tmp_path, capsys):
    run = tmp_path / "p2"
    shutil.copytree(probe_inputs["p2"], run)
    info = read_run_info(run)
    write_run_info(run, {**info, "status": "running"})
    assert main(["analyze", str(run)]) == 2
    line = one_error_line(capsys)
    assert "status is 'running'" in line and "--allow-partial" in line
    assert main(["analyze", str(run), "--allow-partial"]) == 0
    report = (run / "report.md").read_text()
    assert "partial input" in report and "'running'" in report


def test_phase2_refuses_an_incomplete_pool_unless_allow_partial(probe_inputs, tmp_path, capsys):
    pool = tmp_path / "teacher_pool"
    shutil.copytree(probe_inputs["teacher"], pool)
    meta = json.loads((pool / "pool.json").read_text())
    (pool / "pool.json").write_text(json.dumps({**meta, "complete": False}))
    args = ["phase2", "--replay-dirs", f"{pool},{probe_inputs['base']}", "--steps", "1", "--per-pool", "2",
            "--v-hack", str(probe_inputs["v_hack"]), "--out", str(tmp_path / "p2"), *probe_inputs["small"]]
    assert main(args) == 2
    assert "complete: false" in one_error_line(capsys)
    assert not (tmp_path / "p2").exists()
    assert main([*args, "--allow-partial"]) == 0
    _, info = read_run(tmp_path / "p2")
    assert any("incomplete" in note for note in info["partial_inputs"])
    assert main(["analyze", str(tmp_path / "p2")]) == 0
    assert "pool" in (tmp_path / "p2" / "report.md").read_text().split("## Runs")[0]
    assert "incomplete" in (tmp_path / "p2" / "report.md").read_text()


def test_demo_force_leaves_no_stale_step_and_headers_come_first(tmp_path, capsys):
    """The issue's headline case: a 1-step demo forced over an old 20-step one keeps no step of the old
    run; the stage headers print before their stage's output; the report path is printed once."""
    from jaxhack.demo import DemoSettings, run_demo

    out = tmp_path / "demo"
    (out / "phase2" / "vanilla").mkdir(parents=True)
    (out / "phase2" / "vanilla" / "step_019.cos.jsonl.gz").write_bytes(b"old run")
    (out / "report.md").write_text("# old demo")
    settings = DemoSettings(out=str(out), steps=1, seed=1, per_pool=2, pool_steps=1, pool_per_step=8,
                            pair_variants=1, max_prompt_tokens=32, max_completion_tokens=32)
    with pytest.raises(UserError, match="finished demo.*--force"):
        run_demo(settings, progress=False)
    capsys.readouterr()
    result = run_demo(settings, progress=True, force=True)
    printed = capsys.readouterr().out
    order = [printed.index(s) for s in ("[1/6]", "[2/6] teacher", "[3/6]", "[4/6]", "Phase 1 (NLL", "[5/6]",
                                        "[6/6]", "Phase 3 verdict")]
    assert order == sorted(order)
    assert printed.count("report: ") == 1
    for arm in ("vanilla", "projected", "lora_projected"):
        records, info = read_run(out / "phase2" / arm)
        assert {r["step"] for r in records} == {0} and info["settings"]["seed"] == 1
    assert not (out / "phase2" / "vanilla" / "step_019.cos.jsonl.gz").exists()
    report = (out / "report.md").read_text()
    assert "random tiny Qwen3" in report and "## Phase 1" in report
    # the demo end to end (was test_probes.test_demo_end_to_end_small): verdict, records, issue 13 rows
    assert result["summary"]["verdict"] in ("run", "run-expect-small-effect", "skip", "bug", "inconclusive")
    assert result["summary"]["verdict"] in report
    for arm in ("vanilla", "projected", "lora_projected"):
        records, info = read_run(out / "phase2" / arm)
        assert info["arm"] == arm and len(records) == 4
    assert "z (cos_in / null sd)" in report and "over-projected modules" in report and "update cos" in report
    assert "| vanilla[random] | random |" in report and "Phase 2 lr=0.01" in report
    assert json.loads((out / "phase1" / "phase1_split.json").read_text())["n_steps"] == 1


def test_sweep_says_why_the_ceiling_stopped_it(tmp_path, capsys, monkeypatch):
    import jaxhack.commands.sweep as sweep_cmd

    reason = "cost ceiling: after 1 seed(s) of the first arm ('vanilla') no separation"
    monkeypatch.setattr(sweep_cmd, "run_sweep", lambda *a, **k: {"stopped": True, "reason": reason})
    assert main(["sweep", "--out", str(tmp_path / "s"), "--arms", "vanilla,projected", "--seeds", "0"]) == 3
    assert f"sweep STOPPED (exit status 3): {reason}" in capsys.readouterr().out


def test_train_notes_a_constant_reward_run(tmp_path):
    from jaxhack.commands.train import degenerate_note

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_std": 0.0}\n{"step": 1, "reward_std": 0.0}\n')
    assert "--mix-teacher" in degenerate_note(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_std": 0.0}\n{"step": 1, "reward_std": 1.5}\n')
    assert degenerate_note(tmp_path) is None


def test_train_timing_report_splits_the_reference_pass_from_the_update(tmp_path):
    """metrics' time_update_s counts the reference pass too (docs/phase3.md); the report after a run
    gives the two apart, step 0 (compiles) on its own line and the mean of the rest."""
    import json

    from jaxhack.commands.train import timing_report

    def line(step, gen, ref, upd):
        return json.dumps({"step": step, "time_generation_s": gen, "time_grading_s": 0.5, "time_ref_s": ref,
                           "time_update_s": upd, "time_step_s": gen + 0.5 + upd}) + "\n"

    (tmp_path / "metrics.jsonl").write_text(line(0, 100.0, 40.0, 150.0) + line(1, 10.0, 2.0, 8.0)
                                            + line(2, 12.0, 4.0, 12.0))
    first, rest = timing_report(tmp_path).splitlines()
    assert first == ("step 0 (incl. compilation): generation 100.00s, grading 0.50s, reference 40.00s, "
                     "update 110.00s, step 250.50s")
    assert rest == "steps 1..2 mean: generation 11.00s, grading 0.50s, reference 3.00s, update 7.00s, step 21.50s"
