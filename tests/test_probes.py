"""Phase 1 / Phase 2 probes and the embedded-default demo, end to end on a tiny model."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhack.env.pools import build_template_pool
from jaxhack.env.problems import load_problems
from jaxhack.models.adapters import init_svd_adapter
from jaxhack.models.load import load_model
from jaxhack.probes.phase1 import split_pure_vs_correct
from jaxhack.probes.phase2 import (ReplayPool, ReplaySettings, draw_group, encode_record, load_replay_pool,
                                   run_replay, tokenize_group)
from jaxhack.probes.records import read_run
from jaxhack.projection.cosines import per_sample_cosines
from jaxhack.projection.pairs import pair_variants, pairs_from_env_templates
from jaxhack.projection.v_hack import extract_v_hack
from jaxhack.grads import losses
from jaxhack.grads.per_sample import per_sample_grads

SLIM_FIELDS = {"step", "sample_id", "src_pool", "src_step", "src_sample", "reward", "hacked", "gt_pass",
               "fmt_ok", "comp_len", "cos_S_contrib", "grad_norm_contrib", "mean_cos_in", "mean_cos_out",
               "frac_fired", "arm"}
PROMPT_TOKENS, COMPLETION_TOKENS = 48, 48


def _fake_pool(name, n_steps, per_step):
    return ReplayPool(name, [[{"step": s, "sample": i, "reward": float(i)} for i in range(per_step)]
                             for s in range(n_steps)])


def test_draw_group_is_deterministic_and_balanced():
    pools = [_fake_pool("teacher_pool", 3, 8), _fake_pool("base_pool", 2, 8)]
    a = draw_group(pools, step=4, per_pool=4, seed=7)
    b = draw_group(pools, step=4, per_pool=4, seed=7)
    c = draw_group(pools, step=4, per_pool=4, seed=8)
    assert a == b and a != c
    assert [r["_src_pool"] for r in a] == ["teacher_pool"] * 4 + ["base_pool"] * 4
    assert {r["step"] for r in a[:4]} == {4 % 3} and {r["step"] for r in a[4:]} == {4 % 2}
    assert len({r["sample"] for r in a[:4]}) == 4  # without replacement
    with pytest.raises(ValueError, match="per-pool 9"):
        draw_group(pools, step=0, per_pool=9, seed=0)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    params, config, tokenizer, _ = load_model("tiny")
    problems = load_problems("bundled")[:4]
    for kind in ("teacher", "base"):
        build_template_pool(problems, root / f"{kind}_pool", mode="run_tests", kind=kind, steps=2,
                            per_step=4, progress=False, pool_name=f"{kind}_pool")
    pools = [load_replay_pool(root / "teacher_pool"), load_replay_pool(root / "base_pool")]
    trainable, frozen = init_svd_adapter(params, config)
    pairs = pairs_from_env_templates(problems, "run_tests", pair_variants(1, seed=3))
    v_hack, _ = extract_v_hack(pairs, tokenizer, trainable, frozen, params, config, k=1,
                               max_prompt_tokens=PROMPT_TOKENS, max_len=PROMPT_TOKENS + COMPLETION_TOKENS,
                               batch_size=4, progress=False)
    return root, params, config, tokenizer, pools, trainable, frozen, v_hack


def _settings(arm, **kw):
    return ReplaySettings(arm=arm, steps=2, per_pool=2, max_prompt_tokens=PROMPT_TOKENS,
                          max_completion_tokens=COMPLETION_TOKENS, pad_multiple=32, **kw)


@pytest.fixture(scope="module")
def replay_run(tiny_setup):
    """run(arm, lr) -> (records, out dir): the Phase 2 run of _settings(arm, lr=lr) on the tiny setup,
    each (arm, lr) run once for the module (lr 0 is ReplaySettings' default: the pure probe, whose
    vanilla and projected runs several tests check)."""
    root, params, config, tokenizer, pools, trainable, frozen, v_hack = tiny_setup
    done = {}

    def run(arm, lr=0.0):
        if (arm, lr) not in done:
            out = root / f"lr{lr}_{arm}"
            done[arm, lr] = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack,
                                       _settings(arm, lr=lr), out, progress=False), out
        return done[arm, lr]
    return run


def test_phase2_records_match_an_independent_computation(tiny_setup, replay_run):
    root, params, config, tokenizer, pools, trainable, frozen, v_hack = tiny_setup
    assert _settings("vanilla").lr == 0.0  # the default: the shared lr-0 run is this test's run
    records, out = replay_run("vanilla")
    stored, info = read_run(out)
    assert info["arm"] == "vanilla" and info["status"] == "done" and info["group_size"] == 4
    assert len(stored) == len(records) == 8
    assert SLIM_FIELDS <= set(stored[0])
    # recompute step 1 from scratch: same draw, per-sample grads, cosines
    step1 = [r for r in stored if r["step"] == 1]
    group = draw_group(pools, 1, 2, 0)
    assert [(r["src_pool"], r["src_step"], r["src_sample"]) for r in step1] == \
        [(g["_src_pool"], g["step"], g["sample"]) for g in group]
    batch = tokenize_group(group, lambda r: encode_record(r, tokenizer, COMPLETION_TOKENS, PROMPT_TOKENS),
                           tokenizer.pad_token_id, info["row_length"])
    rewards = np.array([g["reward"] for g in group], np.float32)
    batch["advantage"] = rewards - rewards.mean()
    np.testing.assert_allclose([r["adv"] for r in step1], batch["advantage"], atol=1e-6)
    loss = functools.partial(losses.reinforce_loss, group_size=4)
    g_i = per_sample_grads(loss, trainable, frozen, params, config, jax.tree.map(jnp.asarray, batch))
    cos = per_sample_cosines(v_hack, g_i)
    np.testing.assert_allclose([r["cos_S_contrib"] for r in step1], cos["cos_S_contrib"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([r["grad_norm_contrib"] for r in step1], cos["grad_norm_contrib"], rtol=1e-4)
    # vanilla = measure: nothing removed
    assert all(r["mean_cos_out"] == r["mean_cos_in"] and r["frac_fired"] == 0.0 for r in stored)


def test_phase2_projected_arm_removes_hackward_part(replay_run):
    records, _ = replay_run("projected")
    for r in records:
        assert r["mean_cos_out"] <= 1e-6 and r["mean_cos_out"] <= r["mean_cos_in"] + 1e-9
        assert 0.0 <= r["frac_fired"] <= 1.0
    fired_steps = [r for r in records if r["mean_cos_in"] > 0]
    assert all(r["frac_fired"] > 0 for r in fired_steps)


def test_phase2_lr_moves_the_arms_apart_and_lr0_does_not(replay_run):
    """lr > 0: the Phase 3 chain steps delta_s, so the projected arm's cos_in leaves the vanilla one
    after step 0 (issue 13); lr = 0 (the pure probe) keeps them identical. run.json says which ran."""
    cos_in = {}
    for lr in (0.0, 0.05):
        for arm in ("vanilla", "projected"):
            records, out = replay_run(arm, lr)
            cos_in[lr, arm] = [next(r["mean_cos_in"] for r in records if r["step"] == s) for s in (0, 1)]
            _, info = read_run(out)
            assert info["optimizer"] == ("projected_adamw" if lr > 0 else "none (lr=0: pure probe)")
            assert info["null_cos_sd"] > 0 and info["n_completions_truncated"] >= 0
            assert all({"n_overprojected", "update_cos", "removed_frac"} <= set(r) for r in records)
            if arm == "projected":
                assert all(r["n_overprojected"] == 0 for r in records)
    assert cos_in[0.0, "vanilla"] == cos_in[0.0, "projected"]
    assert cos_in[0.05, "vanilla"][0] == pytest.approx(cos_in[0.05, "projected"][0], abs=1e-6)
    assert abs(cos_in[0.05, "vanilla"][1] - cos_in[0.05, "projected"][1]) > 1e-4


def test_phase2_zero_advantage_samples_are_undefined(tiny_setup):
    """A group whose rewards are all equal has A_i = 0: the cosines are NaN (undefined), not 0."""
    root, params, config, tokenizer, pools, trainable, frozen, v_hack = tiny_setup
    same = ReplayPool("teacher_pool", [[dict(r, reward=3.5) for r in step] for step in pools[0].steps])
    records = run_replay([same], params, config, tokenizer, trainable, frozen, v_hack, _settings("vanilla"),
                         root / "zero_adv", progress=False)
    assert all(np.isnan(r["cos_S_contrib"]) and np.isnan(r["z"]) for r in records)
    stored, _ = read_run(root / "zero_adv")
    assert all(np.isnan(r["cos_S_contrib"]) for r in stored)


def test_phase2_warns_when_completions_are_cut(tiny_setup):
    root, params, config, tokenizer, pools, trainable, frozen, v_hack = tiny_setup
    settings = dataclasses.replace(_settings("vanilla"), steps=1, max_completion_tokens=4)
    with pytest.warns(UserWarning, match="cut at --max-completion-tokens 4"):
        run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, root / "cut",
                   progress=False)
    _, info = read_run(root / "cut")
    assert info["n_completions_truncated"] > 0


def test_phase1_split_statistics():
    recs = []
    for i, (hacked, gt, cos) in enumerate([(True, False, 0.5), (True, False, 0.7), (True, False, 0.6),
                                           (False, True, 0.1), (False, True, 0.3), (False, False, 9.9)]):
        recs.append({"step": i // 3, "hacked": hacked, "gt_pass": gt, "cos_S_contrib": cos,
                     "mean_cos_in": 0.4, "mean_cos_out": 0.1 if i < 3 else 0.4, "frac_fired": 0.5})
    split = split_pure_vs_correct(recs)
    assert split["pure_hack"]["n"] == 3 and split["hack_correct"]["n"] == 2  # the clean failure is neither
    assert split["pure_hack"]["mean"] == pytest.approx(0.6) and split["hack_correct"]["mean"] == pytest.approx(0.2)
    se = np.sqrt(np.var([0.5, 0.7, 0.6], ddof=1) / 3 + np.var([0.1, 0.3], ddof=1) / 2)
    assert split["welch_t"] == pytest.approx(0.4 / se)
    assert split["steps_cos_out_below_in"] == 1 and split["n_steps"] == 2


def test_phase1_split_uses_attempted_hack():
    """With the grader's attempted_hack label, a correct answer that did not attempt the exploit is
    honest-correct, not hack+correct (the old split counted it as hack+correct)."""
    recs = []
    for i, (hacked, gt, attempted, cos) in enumerate([(True, False, True, 0.5), (True, False, True, 0.7),
                                                      (False, True, True, 0.3), (False, True, True, 0.2),
                                                      (False, True, False, -0.4), (False, True, False, -0.2)]):
        recs.append({"step": 0, "hacked": hacked, "gt_pass": gt, "attempted_hack": attempted, "cos_S_contrib": cos,
                     "mean_cos_in": 0.4, "mean_cos_out": 0.1, "frac_fired": 0.5})
    split = split_pure_vs_correct(recs)
    assert split["hack_correct"]["n"] == 2 and split["hack_correct"]["mean"] == pytest.approx(0.25)
    assert split["honest_correct"]["n"] == 2 and split["hack_correct_rule"] == "attempted_hack and gt_pass"


def test_phase_scripts_end_to_end(tmp_path, capsys):
    """The per-phase scripts chained as the README shows, on the embedded default."""
    from helpers import load_script

    def script(name):
        return load_script(name).main

    small = ["--max-prompt-tokens", "32", "--max-completion-tokens", "32", "--remat", "none"]
    for kind in ("teacher", "base"):
        assert script("build_pool")(["--problems", "bundled", "--mode", "run_tests", "--kind", kind,
                                     "--steps", "1", "--per-step", "4", "--out", str(tmp_path / f"{kind}_pool"),
                                     "--no-progress"]) == 0
    v_dir = tmp_path / "v_hack_svd"
    assert script("extract_vhack")(["--ckpt", "tiny", "--adapter", "svd", "--pairs-from", "pools",
                                    "--teacher", str(tmp_path / "teacher_pool"), "--base", str(tmp_path / "base_pool"),
                                    "--max-prompt-tokens", "32", "--max-len", "64", "--out", str(v_dir)]) == 0
    assert (v_dir / "v_hack.safetensors").is_file()
    p2 = tmp_path / "p2" / "projected"
    assert script("phase2_replay")(["--replay-dirs", f"{tmp_path / 'teacher_pool'},{tmp_path / 'base_pool'}",
                                    "--arm", "projected", "--steps", "2", "--per-pool", "2", "--v-hack", str(v_dir),
                                    "--out", str(p2), *small]) == 0
    records, info = read_run(p2)
    assert len(records) == 8 and info["v_hack"] == str(v_dir)
    assert "cos_out < cos_in on" in capsys.readouterr().out
    p1 = tmp_path / "p1"
    assert script("phase1_distill")(["--pool", str(tmp_path / "teacher_pool"), "--per-step", "4", "--steps", "1",
                                     "--v-hack", str(v_dir), "--out", str(p1), *small]) == 0
    assert json.loads((p1 / "phase1_split.json").read_text())["n_steps"] == 1
    # a LoRA arm refuses an SVD-basis v_hack with a clear message
    capsys.readouterr()
    assert script("phase2_replay")(["--replay-dirs", str(tmp_path / "teacher_pool"), "--arm", "lora_projected",
                                    "--v-hack", str(v_dir), "--out", str(tmp_path / "bad"), *small]) == 2
    assert "error: " in capsys.readouterr().err
    assert script("analyze")([str(p2)]) == 0
    assert (p2 / "report.md").is_file()
