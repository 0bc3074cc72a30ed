"""A bad-input sweep over every command (issue 15, part 3): each user error gives exactly one
`error: ...` line on stderr, exit status 2, no traceback, and no work done first. All calls go through
`jaxhack.cli.main` in-process (the same `guarded` path the scripts use)."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
import pytest

from jaxhack.cli import build_parser, main
from jaxhack.commands import COMMANDS, HelpFormatter, guarded
from jaxhack.models.config import TARGET_MODULES
from jaxhack.projection.v_hack import random_v_hack, save_v_hack


def sys_unwritable() -> bool:
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return False
    except OSError:
        return True


def run_bad(capsys, argv: list[str]) -> str:
    """Run argv; it must return 2 with one `error:` line and no traceback; returns the line."""
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert rc == 2, (argv, captured.err)
    lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err  # progress bars aside
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "pairs_missing.jsonl").write_text('{"prompt": "p", "hack": "h"}\n')
    (d / "pairs_truncated.jsonl").write_text('{"prompt": "p", "hack": "h", "cle\n')
    (d / "pairs_surrogate.jsonl").write_text('{"prompt": "p", "hack": "\\ud800", "clean": "c"}\n')
    (d / "completions_bytes.jsonl").write_bytes(b'{"problem_id": "x", "mode": "none", "completion": "\xff\xfe"}\n')
    (d / "completions_surrogate.jsonl").write_text(
        '{"problem_id": 0, "mode": "none", "completion": "print(1)\\ud800"}\n')
    return d


@pytest.fixture(scope="module")
def other_shape_v_hack(tmp_path_factory):
    """An SVD v_hack shaped for a 3-layer, d=96 model (the tiny model has 2 layers, d=64)."""
    out = tmp_path_factory.mktemp("vh") / "v_hack_other"
    bundle = random_v_hack({name: (3, 96) for name in TARGET_MODULES}, seed=0, k=1)
    save_v_hack(out, bundle, meta={"adapter": "svd"})
    return out


def test_missing_paths_and_unknown_ckpt(probe_inputs, tmp_path, capsys):
    out = str(tmp_path / "x")  # never created: the input errors must come first
    teacher, v_hack, small = str(probe_inputs["teacher"]), str(probe_inputs["v_hack"]), probe_inputs["small"]
    cases = [
        (["extract", "--pairs-from", "pools", "--teacher", "/nope", "--base", teacher, "--out", out], "/nope"),
        (["extract", "--pairs-from", "file", "--pairs", "/nope.jsonl", "--out", out], "/nope.jsonl"),
        (["phase1", "--pool", "/nope", "--v-hack", v_hack, "--out", out], "/nope"),
        (["phase1", "--pool", teacher, "--v-hack", "/nope", "--out", out], "/nope"),
        (["phase2", "--replay-dirs", "/nope", "--v-hack", v_hack, "--out", out], "/nope"),
        (["phase2", "--replay-dirs", teacher, "--v-hack", "/nope", "--out", out], "/nope"),
        (["sweep", "--out", out, "--problems", "/nope.jsonl"], "/nope.jsonl"),
        (["train", "--run-dir", out, "--mix-teacher", "/nope"], "/nope"),
        (["analyze", "/nope"], "/nope"),
        (["grade", "--problems", "/nope.jsonl", "--completions", "/nope2", "--out", out + ".jsonl"], "/nope"),
        (["convert", "--hf-dir", "/nope", "--name", "x", "--out-root", "/tmp/jaxhack_nope_ckpts"], "/nope"),
    ]
    for argv, needle in cases:
        assert needle in run_bad(capsys, argv)
    for argv in (["extract", "--ckpt", "qwen3-4bb", "--out", out],
                 ["phase1", "--ckpt", "qwen3-4bb", "--pool", teacher, "--v-hack", v_hack, "--out", out],
                 ["phase2", "--ckpt", "Tiny", "--replay-dirs", teacher, "--v-hack", v_hack, "--out", out, *small],
                 ["sweep", "--ckpt", "qwen3-4bb", "--out", out],
                 ["train", "--ckpt", "qwen3-4bb", "--run-dir", out],
                 ["pool", "--model", "qwen3-4bb", "--mode", "run_tests", "--kind", "base", "--out", out]):
        line = run_bad(capsys, argv)
        assert "no such checkpoint" in line and "valid names: tiny, random-4b" in line


def test_bad_numbers_are_refused_before_work(probe_inputs, tmp_path, capsys):
    teacher, v_hack = str(probe_inputs["teacher"]), str(probe_inputs["v_hack"])
    p2 = ["phase2", "--replay-dirs", teacher, "--v-hack", v_hack, "--out", str(tmp_path / "p2")]
    cases = [
        ([*p2, "--steps", "0"], "--steps must be >= 1"),
        ([*p2, "--per-pool", "-1"], "--per-pool must be >= 1"),
        (["phase1", "--pool", teacher, "--v-hack", v_hack, "--out", str(tmp_path / "p1"), "--per-step", "0"],
         "--per-step must be >= 1"),
        (["extract", "--k", "0", "--out", str(tmp_path / "v")], "--k must be >= 1"),
        (["extract", "--batch-size", "0", "--out", str(tmp_path / "v")], "--batch-size must be >= 1"),
        (["sweep", "--seeds", "", "--out", str(tmp_path / "s")], "--seeds: give at least one value"),
        (["sweep", "--seeds", "a", "--out", str(tmp_path / "s")], "expected comma-separated integers"),
        (["sweep", "--steps", "0", "--out", str(tmp_path / "s")], "steps must be >= 1"),
        (["demo", "--steps", "0", "--out", str(tmp_path / "d")], "--steps must be >= 1"),
        (["pool", "--mode", "run_tests", "--kind", "teacher", "--hack-correct-fraction", "1.5",
          "--out", str(tmp_path / "pool")], "--hack-correct-fraction must be within [0, 1]"),
        (["pool", "--mode", "run_tests", "--kind", "teacher", "--steps", "0", "--out", str(tmp_path / "pool")],
         "--steps must be >= 1"),
        (["pool", "--mode", "run_tests", "--kind", "teacher", "--wall-s", "0", "--out", str(tmp_path / "pool")],
         "--wall-s must be > 0, got 0.0"),
        (["export", "--run-dir", str(tmp_path), "--max-shard-mb", "nan", "--out", str(tmp_path / "e")],
         "--max-shard-mb must be > 0, got nan"),
        (["train", "--group-size", "1", "--run-dir", str(tmp_path / "t")], "--group-size must be >= 2"),
        (["train", "--lr", "-1", "--run-dir", str(tmp_path / "t")], "lr, beta and warmup_steps must be >= 0"),
        (["train", "--remat", "bogus", "--run-dir", str(tmp_path / "t")], "--remat 'bogus': expected one of"),
        (["train", "--update-layout", "packed", "--run-dir", str(tmp_path / "t")],
         "--update-layout 'packed': expected one of ('rows', 'shared_prompt')"),
        (["train", "--preset", "fast", "--microbatch-tokens", "0", "--run-dir", str(tmp_path / "t")],
         "--microbatch-tokens must be >= 1 and needs microbatch"),
    ]
    for argv, needle in cases:
        t0 = time.time()
        assert needle in run_bad(capsys, argv)
        assert time.time() - t0 < 10, argv  # refused up front, not after minutes of work
    assert not any((tmp_path / name).exists() for name in ("p2", "p1", "v", "s", "d", "pool", "e", "t"))


def test_train_config_errors_name_the_flags_group_size_first(tmp_path, capsys):
    """TrainConfig's rules on the CLI: each field-named error names its flag, in the config's order
    (--group-size 1 also breaks the smoke preset's mix rule; the group size is the cause, so first)."""
    line = run_bad(capsys, ["train", "--group-size", "1", "--run-dir", str(tmp_path / "t")])
    assert 0 < line.index("--group-size must be >= 2, got 1") < line.index("--mix-per-group must be in [0, group_size)")
    line = run_bad(capsys, ["train", "--steps", "0", "--ckpt-every", "-1", "--run-dir", str(tmp_path / "t")])
    assert "--steps must be >= 1, got 0; ckpt_every and eval_every must be >= 0" in line
    assert not (tmp_path / "t").exists()


def test_malformed_pairs_and_text(bad_files, tmp_path, capsys):
    out = str(tmp_path / "v")
    assert "missing field 'clean'" in run_bad(capsys, ["extract", "--pairs-from", "file", "--pairs",
                                                        str(bad_files / "pairs_missing.jsonl"), "--out", out])
    assert "invalid JSON" in run_bad(capsys, ["extract", "--pairs-from", "file", "--pairs",
                                              str(bad_files / "pairs_truncated.jsonl"), "--out", out])
    assert "field 'hack': not valid text" in run_bad(capsys, ["extract", "--pairs-from", "file", "--pairs",
                                                              str(bad_files / "pairs_surrogate.jsonl"), "--out", out])
    assert "--pairs-from file needs --pairs" in run_bad(capsys, ["extract", "--pairs-from", "file", "--out", out])
    graded = tmp_path / "graded.jsonl"
    line = run_bad(capsys, ["grade", "--problems", "bundled", "--completions",
                            str(bad_files / "completions_bytes.jsonl"), "--out", str(graded)])
    assert "line 1: not valid UTF-8" in line
    line = run_bad(capsys, ["grade", "--problems", "bundled", "--completions",
                            str(bad_files / "completions_surrogate.jsonl"), "--out", str(graded)])
    assert "line 1: field 'completion': not valid text" in line
    assert list(tmp_path.iterdir()) == []  # nothing graded, no OUT.tmp left


@pytest.mark.skipif(not sys_unwritable(), reason="needs an unwritable directory (/sys)")
def test_unwritable_output_dirs(probe_inputs, bad_files, capsys):
    teacher, v_hack = str(probe_inputs["teacher"]), str(probe_inputs["v_hack"])
    out = "/sys/jaxhack_out"
    for argv in (["pool", "--mode", "run_tests", "--kind", "teacher", "--out", out],
                 ["extract", "--out", out],
                 ["phase1", "--pool", teacher, "--v-hack", v_hack, "--out", out],
                 ["phase2", "--replay-dirs", teacher, "--v-hack", v_hack, "--out", out],
                 ["demo", "--out", out],
                 ["train", "--run-dir", out],
                 ["sweep", "--out", out],
                 ["analyze", str(probe_inputs["p2"]), "--report", out + "/report.md"],
                 ["grade", "--problems", "bundled", "--completions", str(bad_files / "pairs_missing.jsonl"),
                  "--out", out + ".jsonl"]):
        assert "not writable" in run_bad(capsys, argv)


def test_v_hack_from_another_model_shape_or_basis(probe_inputs, other_shape_v_hack, tmp_path, capsys):
    teacher, small = str(probe_inputs["teacher"]), probe_inputs["small"]
    line = run_bad(capsys, ["phase2", "--replay-dirs", teacher, "--v-hack", str(other_shape_v_hack),
                            "--out", str(tmp_path / "p2"), *small])
    assert "another model shape" in line and "3 layers x dim 96" in line and "2 layers" in line
    assert "another model shape" in run_bad(capsys, ["phase1", "--pool", teacher, "--v-hack", str(other_shape_v_hack),
                                                     "--out", str(tmp_path / "p1"), *small])
    assert "svd-basis v_hack; this arm needs lora" in run_bad(
        capsys, ["phase2", "--replay-dirs", teacher, "--arm", "lora_projected", "--v-hack",
                 str(probe_inputs["v_hack"]), "--out", str(tmp_path / "p2"), *small])
    # Phase 3: refused after the adapter is built, before any sampling; the run dir does not block a rerun
    run_dir = tmp_path / "train"
    t0 = time.time()
    assert "another model shape" in run_bad(capsys, ["train", "--preset", "smoke", "--arm", "projected",
                                                     "--v-hack", str(other_shape_v_hack), "--run-dir", str(run_dir),
                                                     "--no-progress"])
    assert time.time() - t0 < 30
    assert not run_dir.exists() or not any(run_dir.iterdir())
    # other basis factors (the recorded fingerprint differs): refused
    moved = tmp_path / "v_hack_moved"
    shutil.copytree(probe_inputs["v_hack"], moved)
    meta = json.loads((moved / "meta.json").read_text())
    assert set(meta["basis_fingerprint"]) == set(TARGET_MODULES)
    meta["basis_fingerprint"]["q_proj"] = "svd:0000"
    (moved / "meta.json").write_text(json.dumps(meta))
    line = run_bad(capsys, ["phase2", "--replay-dirs", teacher, "--v-hack", str(moved),
                            "--out", str(tmp_path / "p2"), *small])
    assert "other basis factors" in line and "q_proj" in line
    assert not (tmp_path / "p2").exists()


def test_basis_fingerprint_changes_with_the_factors():
    from jaxhack.models.basis import BasisMismatch, basis_fingerprint, check_v_hack_fits

    rng = np.random.default_rng(0)
    u, vh = rng.normal(size=(2, 8, 4)).astype(np.float32), rng.normal(size=(2, 4, 6)).astype(np.float32)
    trainable = {"q_proj": {"delta_s": np.zeros((2, 4), np.float32), "delta_s_hack": np.zeros((2, 4), np.float32)}}
    fp = basis_fingerprint(trainable, {"q_proj": {"u": u, "vh": vh}})
    rotated = vh.copy()
    rotated[0, 0] *= -1  # a sign flip of one singular vector: same subspace, other coordinates
    assert basis_fingerprint(trainable, {"q_proj": {"u": u, "vh": rotated}}) != fp
    v_hack = {"V": {"q_proj": np.zeros((2, 1, 4), np.float32)}}
    check_v_hack_fits(v_hack, {"adapter": "svd", "basis_fingerprint": fp}, trainable,
                      {"q_proj": {"u": u, "vh": vh}}, "v")
    with pytest.raises(BasisMismatch, match="other basis factors"):
        check_v_hack_fits(v_hack, {"basis_fingerprint": fp}, trainable, {"q_proj": {"u": u, "vh": rotated}}, "v")


def test_ctrl_c_is_a_clean_stop_that_says_how_to_resume(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert guarded(interrupted, argparse.Namespace(run_dir="out/p3", resume=False)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--resume" in err and "out/p3" in err
    assert guarded(interrupted, argparse.Namespace(out="x")) == 130
    assert "rerun the same command" in capsys.readouterr().err


def test_a_bad_decode_kernel_choice_stops_any_command_up_front(monkeypatch, capsys):
    """JAXHACK_DECODE_KERNEL is read where decoding is traced; guarded checks it before any command runs,
    so a typo is never silently ignored by a command that does not decode."""
    ran = []
    monkeypatch.setenv("JAXHACK_DECODE_KERNEL", "fussed")
    assert guarded(lambda args: ran.append(1) or 0, argparse.Namespace()) == 2
    assert not ran
    err = capsys.readouterr().err
    assert "JAXHACK_DECODE_KERNEL='fussed'; expected one of fused, split, fused-interpret" in err and "Traceback" not in err
    monkeypatch.setenv("JAXHACK_DECODE_KERNEL", "split")
    assert guarded(lambda args: ran.append(1) or 0, argparse.Namespace()) == 0 and ran == [1]


def test_a_real_bug_keeps_its_traceback():
    def buggy(args):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        guarded(buggy, argparse.Namespace())


def test_every_flag_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        formatter = HelpFormatter(prog=name)
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help text"
            if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                assert "default" in formatter._get_help_string(action).lower(), \
                    f"{name} {action.option_strings[0]}: default {action.default!r} not shown"
