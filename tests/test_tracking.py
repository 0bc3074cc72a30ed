"""Experiment tracking (jaxhack/tracking.py: TensorBoard via tensorboardX, W&B offline) and run configs
as files (`jaxhack train --config run.json`), on the trainer tests' tiny settings (teacher rows give
reward variance, so the runs really learn)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

import test_trainer as TT  # same settings as the trainer tests: jit caches are shared
from jaxhack import tracking
from jaxhack.cli import main
from jaxhack.env.pools import write_pool_meta
from jaxhack.io import read_jsonl
from jaxhack.rl.config import add_config_args, config_from_args
from jaxhack.tracking import TrackingSettings, open_tracker

STEPS = 2


def event_accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def train_flags(root, problems, teacher, run_dir) -> list[str]:
    """`jaxhack train` flags equal to test_trainer.base_config(steps=STEPS)."""
    return ["train", "--problems", str(problems), "--hint", "false", "--arm", "projected", "--steps", str(STEPS),
            "--group-size", "4", "--prompts-per-step", "2", "--max-new", "48", "--mix-teacher", str(teacher),
            "--mix-per-group", "2", "--eval-every", "2", "--n-eval", "3", "--ckpt-every", "1", "--v-hack", "random",
            "--k", "2", "--lr", "1e-2", "--warmup-steps", "0", "--temperature", "1.0", "--run-dir", str(run_dir),
            "--no-progress"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-step `jaxhack train` run with TensorBoard and an offline W&B run."""
    pytest.importorskip("tensorboardX")
    root = tmp_path_factory.mktemp("tracked")
    problems = TT.write_short_problems(root / "short.jsonl")
    teacher = TT.write_teacher_pool(TT.load_problems(problems), root / "teacher")
    write_pool_meta(teacher, {"pool": "teacher", "mode": "run_tests", "complete": True})  # the CLI checks it
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root / "wandb"), WANDB_SILENT="true")
    (root / "wandb").mkdir()
    try:
        argv = train_flags(root, problems, teacher, root / "run") + ["--tensorboard"]
        if tracking.wandb_installed():
            argv += ["--wandb", "jaxhack-test", "--wandb-tags", "ci"]
        assert main(argv) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return root, problems, teacher, root / "run"


def expected_scalar_tags(run_dir: Path) -> set[str]:
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    return set(tracking.scalar_items(metrics[0]))


def test_tensorboard_events_have_every_scalar_per_step(tracked_run):
    *_, run_dir = tracked_run
    acc = event_accumulator(run_dir)
    tags = set(acc.Tags()["scalars"])
    expected = expected_scalar_tags(run_dir)
    assert {"reward_mean", "hack_rate_policy", "loss", "grad_norm", "cos_in", "cos_out", "kl_mean"} <= expected
    assert expected <= tags
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for tag in expected:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(STEPS)), tag
        assert [e.value for e in events] == pytest.approx([float(m[tag]) for m in metrics], rel=1e-6, nan_ok=True)
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e.step for e in acc.Scalars("eval/hack_rate")] == [e["step"] for e in evals] == [0, 2]
    assert {"rollout/reward", "rollout/advantage"} <= set(acc.Tags()["histograms"])
    assert len(acc.Histograms("rollout/reward")) == STEPS


def wandb_records(path: Path):
    """(run record, [history row {key: value}]) of an offline W&B run file (run-ID.wandb: W&B's
    leveldb-log framing of 32 KiB blocks, 7-byte record headers, protobuf `Record`s)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    run, history = None, []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        which = record.WhichOneof("record_type")
        if which == "run":
            run = record.run
        elif which == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return run, history


def test_wandb_offline_run_has_the_metrics_config_and_tags(tracked_run):
    if not tracking.wandb_installed():
        pytest.skip("wandb not installed")
    root, *_, run_dir = tracked_run
    run_id = json.loads((run_dir / tracking.TRACKING_FILE).read_text())["wandb_id"]
    offline = list((root / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1, list((root / "wandb").rglob("*"))[:20]
    run, history = wandb_records(offline[0] / f"run-{run_id}.wandb")
    assert {"ci", "arm:projected", "seed:0", "preset:smoke"} <= set(run.tags)
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["arm"] == "projected" and config["mix_per_group"] == 2 and config["steps"] == STEPS
    assert [h["_step"] for h in history] == [0, 1, 2]  # steps 0, 1 (+ eval at 0) and the eval at 2
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for m, h in zip(metrics, history):
        assert set(tracking.scalar_items(m)) <= set(h)
        assert h["reward_mean"] == pytest.approx(m["reward_mean"]) and h["loss"] == pytest.approx(m["loss"])
    assert "eval/hack_rate" in history[2]


def test_config_file_reproduces_a_finished_run(tracked_run, tmp_path):
    *_, run_dir = tracked_run
    again = tmp_path / "again"
    assert main(["train", "--config", str(run_dir / "run.json"), "--run-dir", str(again), "--no-progress",
                 "--tensorboard", "false"]) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("time_")} for m in ms]  # noqa: E731
    assert strip(read_jsonl(again / "metrics.jsonl")) == strip(read_jsonl(run_dir / "metrics.jsonl"))
    assert strip(read_jsonl(again / "eval.jsonl")) == strip(read_jsonl(run_dir / "eval.jsonl"))
    assert not list(again.glob("events.out.tfevents.*"))  # --tensorboard false
    old = json.loads((run_dir / "run.json").read_text())["config"]
    new = json.loads((again / "run.json").read_text())["config"]
    assert {**old, "run_dir": None} == {**new, "run_dir": None}


def _parse(argv):
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    return config_from_args(ap.parse_args(argv))


def test_config_file_precedence_yaml_and_errors(tracked_run, tmp_path):
    *_, run_dir = tracked_run
    run_json = run_dir / "run.json"
    old = json.loads(run_json.read_text())["config"]
    cfg = _parse(["--config", str(run_json), "--lr", "0.5", "--microbatch", "none"])
    assert cfg.lr == 0.5 and cfg.microbatch is None  # explicit flags win
    assert {**cfg.to_dict(), "lr": old["lr"]} == old
    # a file's None beats the preset's value (fast sets microbatch=8)
    assert _parse(["--config", str(run_json), "--preset", "fast"]).microbatch is None
    yaml = pytest.importorskip("yaml")
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"preset": "fast", "steps": 3, "microbatch": None, "lr": 1}))
    cfg = _parse(["--config", str(y)])
    assert (cfg.preset, cfg.steps, cfg.microbatch, cfg.lr, cfg.max_new) == ("fast", 3, None, 1.0, 512)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {"steps": 2, "nonsense": 1}}))
    assert main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    bad.write_text(json.dumps({"steps": "two"}))
    with pytest.raises(ValueError, match="field 'steps': expected int"):
        _parse(["--config", str(bad)])


def test_phase2_writes_cosine_histograms(probe_inputs, tmp_path):
    pytest.importorskip("tensorboardX")
    p = probe_inputs
    out = tmp_path / "p2"
    assert main(["phase2", "--replay-dirs", f"{p['teacher']},{p['base']}", "--steps", "2", "--per-pool", "2",
                 "--v-hack", str(p["v_hack"]), "--out", str(out), "--tensorboard", *p["small"]]) == 0
    acc = event_accumulator(out)
    for tag in ("mean_cos_in", "mean_cos_out", "frac_fired", "cos_S_contrib_mean", "reward_mean"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 1], tag
    hists = set(acc.Tags()["histograms"])
    assert "cos_S_contrib" in hists and len(acc.Histograms("cos_S_contrib")) == 2
    assert any(h.startswith("cos_S_contrib/") for h in hists)  # per pool


def test_missing_tensorboard_library(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking, "tensorboard_installed", lambda: False)
    assert main(["train", "--tensorboard", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboardX is not installed" in err[0]
    lines = []
    tracker = open_tracker(TrackingSettings(), tmp_path, {}, log=lines.append)  # auto: a note, no writer
    assert not tracker.active and len(lines) == 1 and "tensorboardX" in lines[0]
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_sweep_forwards_tracking_grouped_and_named(tmp_path):
    """Every sweep run gets the sweep's tracking settings, grouped by the sweep directory and named
    ARM/seed_S (the trainer adds the arm:/seed:/preset: tags itself: test_wandb_offline_run...)."""
    from jaxhack.rl import sweep as S
    from jaxhack.rl.config import make_config

    seen = []

    def fake_train(cfg, resume=True, model=None, tracking=None):
        seen.append((cfg.arm, cfg.seed, tracking))
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        summary = {"steps_done": 1, "train_hack_rate_max_windowed": 0.5}
        (Path(cfg.run_dir) / "done.json").write_text(json.dumps({"summary": summary}))
        return summary

    settings = TrackingSettings(tensorboard=False, tags=("mine",))
    S.run_sweep(make_config("smoke"), tmp_path / "sw", ["vanilla", "projected"], [0, 1], train_fn=fake_train,
                log=lambda s: None, tracking=settings)
    assert [(a, s) for a, s, _ in seen] == [("vanilla", 0), ("vanilla", 1), ("projected", 0), ("projected", 1)]
    for arm, seed, t in seen:
        assert t.group == "sw" and t.name == f"{arm}/seed_{seed}" and t.tags == ("mine",) and t.tensorboard is False
    seen.clear()  # without tracking the train function is called as before (no tracking argument)
    S.run_sweep(make_config("smoke"), tmp_path / "sw2", ["vanilla"], [0], train_fn=fake_train, log=lambda s: None)
    assert seen[0][2] is None
