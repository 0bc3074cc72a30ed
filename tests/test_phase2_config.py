"""`jaxhack phase2 --config` (issue 17): a Phase 2 run.json records every input, rerunning from it
reproduces the run's records exactly, flags given explicitly override the file, and every bad config
is one `error:` line (exit 2) before any work. One probe run (the rerun); the rest parses only."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import jaxhack.commands.phase2 as phase2_command
from jaxhack.cli import main
from jaxhack.commands import make_parser
from jaxhack.io import UserError
from jaxhack.probes.phase2 import ReplaySettings
from jaxhack.probes.records import read_run
from jaxhack.rl.config import TrainConfig


def values_of(argv: list[str]) -> dict:
    return phase2_command.phase2_values(make_parser(phase2_command).parse_args(argv))


def error_line(capsys, argv: list[str]) -> str:
    """Run argv: exit 2, exactly one `error:` line, no traceback; returns the line."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_run_json_records_every_input_and_a_rerun_reproduces_it(probe_inputs, tmp_path):
    old_dir = probe_inputs["p2"]
    old_records, old = read_run(old_dir)
    config = old["config"]
    assert set(f.name for f in dataclasses.fields(ReplaySettings)) <= set(config)  # every settings field
    assert config["replay_dirs"] == [str(probe_inputs["teacher"]), str(probe_inputs["base"])]
    assert config["max_completion_tokens"] == 32 and config["pad_multiple"] == 64  # the tiny size, filled in
    paths = old["config_paths"]
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in paths["replay_dirs"])
    assert Path(paths["v_hack"]).is_absolute() and paths["ckpt"] == "tiny"
    assert old["adapter"]["kind"] == "svd" and old["adapter"]["svd_cache"].endswith("_svd_cache/tiny")
    assert len(old["input_digests"]["replay_dirs"]) == 2 and len(old["input_digests"]["v_hack"]) == 64

    new_dir = tmp_path / "again"
    # --allow-partial: a flag given explicitly overrides the file's false (the pools are complete, so the
    # numbers must not change)
    assert main(["phase2", "--config", str(old_dir / "run.json"), "--run-dir", str(new_dir), "--allow-partial",
                 "--tensorboard", "false"]) == 0
    new_records, new = read_run(new_dir)
    assert len(new_records) == 2 * 4
    # every row, every number (NaN cosines included: compared as JSON text)
    assert json.dumps(new_records, sort_keys=True) == json.dumps(old_records, sort_keys=True)
    assert new["config"] == {**config, "allow_partial": True} and not config["allow_partial"]
    assert new["config_paths"] == paths and new["settings"] == old["settings"]
    assert new["input_digests"] == old["input_digests"]
    assert new["config_file"] == str((old_dir / "run.json").resolve())
    assert not list(new_dir.glob("events.out.tfevents.*"))


def test_flags_given_override_the_file_and_defaults_do_not(probe_inputs, tmp_path):
    run_json = str(probe_inputs["p2"] / "run.json")
    old = json.loads(Path(run_json).read_text())["config"]
    # no flag given: the file's values, not the flags' defaults (steps 20, per_pool 4, tiny sizes 192 / 320)
    values = values_of(["--config", run_json, "--out", str(tmp_path / "a")])
    assert {k: values[k] for k in old} == old
    values = values_of(["--config", run_json, "--out", str(tmp_path / "a"), "--steps", "20", "--lr", "0.5",
                        "--gate", "no_gate", "--replay-dirs", str(probe_inputs["teacher"])])
    assert (values["steps"], values["lr"], values["gate"]) == (20, 0.5, "no_gate")
    assert values["replay_dirs"] == [str(probe_inputs["teacher"])]
    assert {k: v for k, v in values.items() if k not in ("steps", "lr", "gate", "replay_dirs")} == \
        {k: v for k, v in old.items() if k not in ("steps", "lr", "gate", "replay_dirs")}
    settings = phase2_command.probe_settings(values)
    assert (settings.steps, settings.lr, settings.per_pool, settings.max_prompt_tokens) == (20, 0.5, 2, 32)

    # a flat YAML file of config fields: "A,B" dirs, null = no cut, the rest from the defaults / sizes
    pytest.importorskip("yaml")
    y = tmp_path / "p2.yaml"
    y.write_text(f"replay_dirs: {probe_inputs['teacher']},{probe_inputs['base']}\n"
                 f"v_hack: {probe_inputs['v_hack']}\nsteps: 3\nmax_completion_tokens: null\nlr: 1\n")
    values = values_of(["--config", str(y), "--out", str(tmp_path / "b"), "--arm", "projected"])
    assert values["replay_dirs"] == [str(probe_inputs["teacher"]), str(probe_inputs["base"])]
    assert (values["steps"], values["max_completion_tokens"], values["lr"], values["arm"]) == \
        (3, None, 1.0, "projected")
    assert (values["max_prompt_tokens"], values["per_pool"], values["ckpt"]) == (320, 4, "tiny")


def test_bad_configs_are_one_error_line(probe_inputs, tmp_path, capsys):
    run_json = json.loads((probe_inputs["p2"] / "run.json").read_text())
    out = ["--out", str(tmp_path / "new")]

    def write(name: str, data) -> str:
        (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
        return str(tmp_path / name)

    line = error_line(capsys, ["phase2", "--config", str(tmp_path / "nope.json"), *out])
    assert "nope.json: no such file" in line
    line = error_line(capsys, ["phase2", "--config", write("bad.json", '{\n "steps": 2,\n "lr": \n}\n'), *out])
    assert "bad.json: line 4: invalid JSON" in line
    line = error_line(capsys, ["phase2", "--config", write("bad.yaml", "steps: 2\nlr: [1,\n"), *out])
    assert "bad.yaml: line 3: invalid YAML" in line
    p3 = write("p3.json", {"config": TrainConfig().to_dict(), "chain": []})  # a Phase 3 run.json's shape
    line = error_line(capsys, ["phase2", "--config", p3, *out])
    assert "a Phase 3 run.json" in line and "jaxhack train --config" in line
    line = error_line(capsys, ["train", "--config", str(probe_inputs["p2"] / "run.json"), "--run-dir",
                               str(tmp_path / "r")])
    assert "a Phase 2 run.json" in line and "jaxhack phase2 --config" in line
    line = error_line(capsys, ["phase2", "--config", write("p1.json", {**run_json, "phase": 1}), *out])
    assert "a Phase 1 run.json" in line
    line = error_line(capsys, ["phase2", "--config", write("demo.json", {"phase": 2, "arm": "vanilla"}), *out])
    assert "without a \"config\" object" in line
    unknown = {**run_json, "config": {**run_json["config"], "per_pol": 2}}
    assert "unknown field(s) ['per_pol']" in error_line(capsys, ["phase2", "--config", write("u.json", unknown), *out])
    wrong = {**run_json, "config": {**run_json["config"], "steps": "two"}}
    assert "field 'steps': expected int" in error_line(capsys, ["phase2", "--config", write("w.json", wrong), *out])

    # a recorded pool that is gone (given and resolved paths both)
    pools = tmp_path / "pools"
    shutil.copytree(probe_inputs["base"], pools / "base_pool")
    dirs = [str(probe_inputs["teacher"]), str(pools / "base_pool")]
    moved = {**run_json, "config": {**run_json["config"], "replay_dirs": dirs},
             "config_paths": {**run_json["config_paths"], "replay_dirs": dirs}}
    moved_json = write("moved.json", moved)
    shutil.rmtree(pools)
    line = error_line(capsys, ["phase2", "--config", moved_json, *out])
    assert "replay_dirs: replay pool directory" in line and "base_pool no longer exists" in line
    # ... unless a flag replaces it
    values = values_of(["--config", moved_json, "--replay-dirs", str(probe_inputs["base"]), *out])
    assert values["replay_dirs"] == [str(probe_inputs["base"])]

    # a recorded pool whose content changed since the run: a warning (the numbers would differ)
    shutil.copytree(probe_inputs["base"], pools / "base_pool")
    capsys.readouterr()
    values_of(["--config", moved_json, *out])
    assert "changed since the run" not in capsys.readouterr().err  # same content, same digest
    with open(pools / "base_pool" / "step_000.jsonl.gz", "ab") as f:
        f.write(b"\0")
    values_of(["--config", moved_json, *out])
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: ") and "base_pool changed since the run" in warning and "\n" not in warning

    # an existing finished run is never replaced without --force (the config's own run included)
    before = sorted(p.name for p in probe_inputs["p2"].iterdir())
    line = error_line(capsys, ["phase2", "--config", str(probe_inputs["p2"] / "run.json"),
                               "--out", str(probe_inputs["p2"])])
    assert "finished probe run" in line and "--force" in line
    assert sorted(p.name for p in probe_inputs["p2"].iterdir()) == before
    with pytest.raises(UserError, match="--replay-dirs is required"):
        values_of(["--out", str(tmp_path / "c")])


def test_phase1_run_json_reruns_the_run(probe_inputs, tmp_path, capsys):
    """`jaxhack phase1 --config RUN/run.json` (the same config fields: replay_dirs holds the one pool,
    per_pool is --per-step) reproduces the run; a Phase 1 config with two pools or a GRPO loss is one
    error line, and so is a Phase 2 run.json."""
    old_dir, new_dir = tmp_path / "p1", tmp_path / "p1_again"
    assert main(["phase1", "--pool", str(probe_inputs["teacher"]), "--v-hack", str(probe_inputs["v_hack"]),
                 "--steps", "1", "--per-step", "4", "--out", str(old_dir), *probe_inputs["small"]]) == 0
    old_records, old = read_run(old_dir)
    assert old["phase"] == 1 and old["config"]["replay_dirs"] == [str(probe_inputs["teacher"])]
    assert (old["config"]["per_pool"], old["config"]["loss_mode"], old["config"]["arm"]) == (4, "nll", "projected")
    assert main(["phase1", "--config", str(old_dir / "run.json"), "--out", str(new_dir)]) == 0
    new_records, new = read_run(new_dir)
    assert json.dumps(new_records, sort_keys=True) == json.dumps(old_records, sort_keys=True)
    assert new["config"] == old["config"] and new["settings"] == old["settings"]
    assert (new_dir / "phase1_split.json").read_text() == (old_dir / "phase1_split.json").read_text()

    def write(name: str, data: dict) -> str:
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    out = ["--out", str(tmp_path / "x")]
    two = write("two.json", {**old, "config": {**old["config"], "replay_dirs": [str(probe_inputs["teacher"])] * 2},
                             "config_paths": {}})
    assert "Phase 1 takes one (teacher) pool, got 2" in error_line(capsys, ["phase1", "--config", two, *out])
    grpo = write("grpo.json", {**old, "config": {**old["config"], "loss_mode": "grpo"}})
    assert "Phase 1 is the NLL probe" in error_line(capsys, ["phase1", "--config", grpo, *out])
    line = error_line(capsys, ["phase1", "--config", str(probe_inputs["p2"] / "run.json"), *out])
    assert "a Phase 2 run.json" in line and "jaxhack phase2 --config" in line
    line = error_line(capsys, ["phase2", "--config", str(old_dir / "run.json"), *out])
    assert "a Phase 1 run.json" in line and "jaxhack phase1 --config" in line
    assert "--pool is required" in error_line(capsys, ["phase1", "--v-hack", str(probe_inputs["v_hack"]), *out])
