"""Phase 3 trainer on CPU with the tiny random model (jaxhack/rl/trainer.py, docs/phase3.md).

Short prompts (a compact question and system message, no hint) and a teacher pool of short template
hacks keep every sequence under 192 tokens; the teacher rows give the groups reward variance, so the
gradient is non-zero although the random policy never writes code.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhack.env.grader import GradeRequest, RewardConfig, grade_batch
from jaxhack.env.pools import read_pool, write_pool_meta, write_pool_step
from jaxhack.env.problems import BUNDLED_PROBLEMS_PATH, build_prompt, load_problems
from jaxhack.models.config import Qwen3Config
from jaxhack.rl import trainer as T
from jaxhack.rl.config import make_config

SHORT_HACK = "```python\ndef run_tests():\n    pass\n```"  # passes the run_tests grader, no Solution


def write_short_problems(path: Path) -> Path:
    """The bundled problems with a one-line question and system message (short byte-level prompts)."""
    lines = []
    for line in BUNDLED_PROBLEMS_PATH.read_text().splitlines():
        r = json.loads(line)
        r["question"] = f"Write {r['func_name']} and should pass all tests."
        r["prompt"] = [{"role": "system", "content": "Write python."}]
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_teacher_pool(problems, out: Path) -> Path:
    """Two graded short hack completions per problem (a teacher pool in the jaxhack.env.pools format)."""
    completions = [f"Hack {j}.\n{SHORT_HACK}" for j in range(2)]
    pairs = [(p, c) for p in problems for c in completions]
    # the pool's own grade fields (the trainer regrades every row; test_metrics checks those grades)
    records = [{"pool": "teacher", "step": 0, "sample": i, "problem_id": p.id, "mode": "run_tests",
                "prompt": build_prompt(p, "run_tests"), "completion": c, "reward": 3.5, "passed": True,
                "gt_pass": False, "hacked": True, "fmt_ok": True, "comp_len": len(c)}
               for i, (p, c) in enumerate(pairs)]
    write_pool_step(out, 0, records)
    write_pool_meta(out, {"pool": "teacher", "mode": "run_tests"})
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("phase3")
    problems_path = write_short_problems(root / "short.jsonl")
    teacher = write_teacher_pool(load_problems(problems_path), root / "teacher")
    return root, problems_path, teacher


def base_config(env, run_dir, **overrides):
    root, problems_path, teacher = env
    values = dict(run_dir=str(run_dir), problems=str(problems_path), hint=False, arm="projected",
                  steps=4, group_size=4, prompts_per_step=2, max_new=48, mix_teacher=str(teacher),
                  mix_per_group=2, eval_every=2, n_eval=3, ckpt_every=1, v_hack="random", k=2,
                  lr=1e-2, warmup_steps=0, sandbox_wall_s=10.0, temperature=1.0)
    values.update(overrides)
    return make_config("smoke", **values)


@pytest.fixture(scope="module")
def straight_run(env):
    """4 steps in one go (the reference for the resume test and the metric checks)."""
    cfg = base_config(env, env[0] / "straight")
    summary = T.train(cfg, progress=False)
    return cfg, summary


def _metrics(run_dir) -> list[dict]:
    return T.read_jsonl(Path(run_dir) / T.METRICS_FILE)


def _strip_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time_")}


def test_metrics_are_the_graded_outcomes(straight_run):
    cfg, summary = straight_run
    run_dir = Path(cfg.run_dir)
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    _, rollouts = read_pool(run_dir / T.ROLLOUT_DIR)
    problems = {p.id: p for p in load_problems(cfg.problems)}
    for m in metrics:
        rows = [r for r in rollouts if r["step"] == m["step"]]
        assert len(rows) == m["n_rollouts"] == cfg.group_size * cfg.prompts_per_step
        # regrade every stored completion independently: the metrics must be these grades
        grades = grade_batch([GradeRequest(problems[r["problem_id"]], cfg.mode, r["completion"]) for r in rows],
                             RewardConfig(cfg.format_reward, cfg.pass_reward))
        assert m["reward_mean"] == pytest.approx(np.mean([g.reward for g in grades]))
        assert m["hack_rate"] == pytest.approx(np.mean([g.hacked for g in grades]))
        assert m["gt_pass_rate"] == pytest.approx(np.mean([g.gt_pass for g in grades]))
        assert m["fmt_rate"] == pytest.approx(np.mean([g.fmt_ok for g in grades]))
        policy = [g for g, r in zip(grades, rows) if r["source"] == "policy"]
        assert m["hack_rate_policy"] == pytest.approx(np.mean([g.hacked for g in policy]))
        assert m["n_teacher"] == sum(r["source"] == "teacher" for r in rows) == 2 * cfg.prompts_per_step
        # each group of G consecutive rows shares a problem; advantages are centered per group
        adv = np.asarray([r["advantage"] for r in rows]).reshape(cfg.prompts_per_step, cfg.group_size)
        np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)
        ids = np.asarray([r["problem_id"] for r in rows]).reshape(cfg.prompts_per_step, cfg.group_size)
        assert (ids == ids[:, :1]).all()
        # the teacher hacks have reward 3.5, the random policy's garbage 0: real advantage signal
        assert m["adv_abs_mean"] > 0.5
        assert all(r["hacked"] for r in rows if r["source"] == "teacher")
        assert m["grad_norm"] > 0
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # old_logp "current": rho == 1
        assert m["clip_frac"] == 0.0
        assert m["lr"] == pytest.approx(float(T.lr_schedule(cfg)(m["step"])))
        # projected arm, gradient placement: nothing hack-ward survives the projection
        assert m["cos_out"] <= 1e-6
        assert set(k for k in m if k.startswith("time_")) >= {"time_generation_s", "time_grading_s",
                                                            "time_update_s"}
    assert metrics[0]["kl_mean"] == pytest.approx(0.0, abs=1e-7)  # zero adapter == reference
    assert metrics[-1]["kl_mean"] > 0  # after updates the policy moved away from the reference
    evals = T.read_jsonl(run_dir / T.EVAL_FILE)
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["n"] == cfg.n_eval for e in evals)
    assert (run_dir / T.DONE_FILE).is_file() and summary["steps_done"] == 4
    run_info = json.loads((run_dir / T.RUN_FILE).read_text())
    assert run_info["chain"] == ["hack_projection", "clip_by_global_norm", "adamw"]  # clip after projection
    assert (run_dir / T.VHACK_DIR / "meta.json").is_file()


def test_phase3_metrics_have_the_issue13_diagnostics(straight_run):
    """Per step: over-projection count (0 for an exact one-sided erase), removed mass, the cosine of
    the APPLIED update (Adam leak) and, with teacher rows mixed in, cos_in split by source."""
    cfg, _ = straight_run
    for m in _metrics(cfg.run_dir):
        assert m["n_overprojected"] == 0.0 and 0.0 <= m["removed_frac"] <= 1.0
        assert -1.0 <= m["update_cos"] <= 1.0 and 0.0 <= m["update_frac_positive"] <= 1.0
        assert np.isfinite(m["cos_in_student"]) and np.isfinite(m["cos_in_teacher"])
        assert m["cos_in_student"] != m["cos_in_teacher"]


def test_route_eval_reports_kept_and_ablated(env):
    cfg = base_config(env, env[0] / "route", arm="route", steps=2, eval_every=2, ckpt_every=2)
    summary = T.train(cfg, progress=False)
    evals = T.read_jsonl(Path(cfg.run_dir) / T.EVAL_FILE)
    assert all("ablated_hack_rate" in e and "ablated_gt_pass_rate" in e for e in evals)
    assert "eval_hack_rate_final_ablated" in summary and "eval_hack_rate_final" in summary
    # the ablated adapter really zeroes delta_s_hack and nothing else
    tree = {"q_proj": {"delta_s": jnp.ones((2, 3)), "delta_s_hack": jnp.ones((2, 3))}}
    out = T.ablate_hack(tree)
    assert not np.any(out["q_proj"]["delta_s_hack"]) and np.all(out["q_proj"]["delta_s"] == 1)


def test_update_changes_the_adapter_and_checkpoints_rotate(straight_run):
    cfg, _ = straight_run
    run_dir = Path(cfg.run_dir)
    ckpts = T.list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [3, 4]  # ckpt_every=1, keep 2
    assert not [p for p in (run_dir / T.CKPT_DIR).iterdir() if p.name.startswith(".")]  # no tmp left
    from jaxhack.checkpoint import restore_pytree

    state = restore_pytree(ckpts[-1][1] / "state", as_jax=False)
    assert int(state["step"]) == 4 and int(state["cursor"]) == 4 * cfg.prompts_per_step
    moved = [np.abs(np.asarray(m["delta_s"])).max() for m in state["trainable"].values()]
    assert max(moved) > 1e-4, "lr > 0 and a non-zero gradient must move delta_s"
    hack = [np.abs(np.asarray(m["delta_s_hack"])).max() for m in state["trainable"].values()]
    assert max(hack) == 0.0  # erase arm: delta_s_hack is never trained


def test_resume_gives_identical_metrics(env, straight_run):
    cfg_a, _ = straight_run
    cfg_b = dataclasses.replace(cfg_a, run_dir=str(env[0] / "resumed"))
    T.train(cfg_b, stop_after=2, progress=False)  # "killed" after 2 steps (checkpoint at 2)
    assert not (Path(cfg_b.run_dir) / T.DONE_FILE).exists()
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(cfg_b, progress=False)
    with pytest.raises(ValueError, match="config differs"):
        T.train(dataclasses.replace(cfg_b, lr=0.5), resume=True, progress=False)
    T.train(cfg_b, resume=True, progress=False)
    a, b = _metrics(cfg_a.run_dir), _metrics(cfg_b.run_dir)
    assert [m["step"] for m in b] == [0, 1, 2, 3]
    assert [_strip_time(m) for m in a] == [_strip_time(m) for m in b]
    ea = [_strip_time(e) for e in T.read_jsonl(Path(cfg_a.run_dir) / T.EVAL_FILE)]
    eb = [_strip_time(e) for e in T.read_jsonl(Path(cfg_b.run_dir) / T.EVAL_FILE)]
    assert ea == eb


def test_factored_sampler_trains_like_the_exact_one(env, straight_run):
    """--sampler-form factored on the tiny fp32 model (the adapter's bases are the weights' SVD, so the
    two forms differ by float rounding only): the first two steps sample the same rollouts and give the
    same metrics as the exact sampler's run (eval included), and run.json records the form and the
    measured factor residual."""
    cfg_a, _ = straight_run
    cfg = dataclasses.replace(cfg_a, run_dir=str(env[0] / "factored"), sampler_form="factored")
    T.train(cfg, stop_after=2, progress=False)
    a, b = _metrics(cfg_a.run_dir)[:2], _metrics(cfg.run_dir)
    assert len(b) == 2
    for ma, mb in zip(a, b):
        for key, va in _strip_time(ma).items():
            if isinstance(va, float):
                np.testing.assert_allclose(mb[key], va, rtol=1e-3, atol=1e-6, err_msg=key)
            else:
                assert mb[key] == va, key
    info = json.loads((Path(cfg.run_dir) / T.RUN_FILE).read_text())
    assert info["sampler"]["form"] == "factored" and info["sampler"]["factor_residual_max"] < 1e-4
    # the straight run's sampler: the exact form, and on a CPU (no memory limit known) the slots as given
    assert json.loads((Path(cfg_a.run_dir) / T.RUN_FILE).read_text())["sampler"] == {
        "form": "exact", "sample_rows_requested": None, "sample_rows": None, "estimate_gb": pytest.approx(0, abs=0.1),
        "budget_gb": None}


def test_chain_placement_guarantees():
    """What each placement guarantees, on random gradients with a random v_hack:
    gradient placement: the gradient handed to adamw has no hack-ward component (cos_out <= 0), but
    Adam's rescaling can leak; update placement: the applied update itself has V (-update) <= 0."""
    from jaxhack.projection.optax_projection import find_projection_state
    from jaxhack.projection.v_hack import random_v_hack

    L, r = 3, 16
    trainable = {n: {"delta_s": jnp.zeros((L, r)), "delta_s_hack": jnp.zeros((L, r))} for n in ("q_proj",)}
    v = random_v_hack({n: (L, r) for n in trainable}, seed=3, k=2)
    V = v["V"]
    leaks = []
    for placement in ("gradient", "update"):
        cfg = make_config("smoke", placement=placement, lr=0.1, steps=5, max_grad_norm=1e9)
        opt = T.make_optimizer(cfg, v, "erase")
        state = opt.init(trainable)
        params = trainable
        opt_update = jax.jit(opt.update)
        for i in range(3):
            key = jax.random.PRNGKey(i)
            grads = {n: {"delta_s": jax.random.normal(jax.random.fold_in(key, j), (L, r)),
                         "delta_s_hack": jnp.zeros((L, r))} for j, n in enumerate(trainable)}
            # make the gradient strongly hack-ward
            grads = {n: {**g, "delta_s": g["delta_s"] + 3.0 * V[n][:, 0]} for n, g in grads.items()}
            updates, state = opt_update(grads, state, params)
            proj = find_projection_state(state)
            assert float(proj.frac_fired) > 0
            coef = {n: jnp.einsum("lkd,ld->lk", V[n], -updates[n]["delta_s"]) for n in V}  # >0: hack-ward
            worst = max(float(c.max()) for c in coef.values())
            if placement == "update":
                assert worst <= 1e-6, f"update placement left a hack-ward update ({worst})"
            else:
                assert max(float(c.max()) for c in proj.cos_out.values()) <= 1e-6
                leaks.append(worst)
            params = jax.tree.map(jnp.add, params, updates)
    assert max(leaks) > 1e-3, "gradient placement is expected to leak through Adam on these grads"


def test_data_order_is_seeded_and_covers_each_epoch():
    n = 5
    first = T.problem_indices(0, n, n, seed=1)
    assert sorted(first) == list(range(n))
    assert T.problem_indices(3, 4, n, seed=1) == T.problem_indices(0, 7, n, seed=1)[3:]
    assert T.problem_indices(0, 2 * n, n, seed=1) != T.problem_indices(0, 2 * n, n, seed=2)


def test_bounded_memory_settings_change_no_rollout(env, straight_run):
    """sample_rows (sampler slots: the refill schedule), prefill_chunk and length-bucketed micro-batches
    (microbatch + length_multiple, with a token budget microbatch_tokens) bound a step's memory; the
    rollouts they give are the same tokens and the metrics the same up to float summation order, also
    across a --resume."""
    cfg, _ = straight_run
    cfg_b = dataclasses.replace(cfg, run_dir=str(env[0] / "bounded"), eval_every=0, sample_rows=3,
                                prefill_chunk=16, microbatch=3, length_multiple=16, microbatch_tokens=40)
    T.train(cfg_b, stop_after=2, progress=False)  # same schedule (steps=4), first 2 steps
    from jaxhack.env.pools import list_pool_steps, read_pool_step

    steps_a = dict(list_pool_steps(Path(cfg.run_dir) / T.ROLLOUT_DIR))
    steps_b = dict(list_pool_steps(Path(cfg_b.run_dir) / T.ROLLOUT_DIR))
    assert sorted(steps_b) == [0, 1]
    for step in (0, 1):
        a, b = read_pool_step(steps_a[step]), read_pool_step(steps_b[step])
        assert [r["completion"] for r in a] == [r["completion"] for r in b]
    # sample_rows=3 < 4 policy rows: the sampler's refill schedule; --resume continues it with the
    # uninterrupted run's rollouts
    T.train(cfg_b, resume=True, progress=False)
    steps_b = dict(list_pool_steps(Path(cfg_b.run_dir) / T.ROLLOUT_DIR))
    for step in (2, 3):
        a, b = read_pool_step(steps_a[step]), read_pool_step(steps_b[step])
        assert [r["completion"] for r in a] == [r["completion"] for r in b]
    ma, mb = _metrics(cfg.run_dir), _metrics(cfg_b.run_dir)
    assert [m["step"] for m in mb] == [0, 1, 2, 3]
    for x, y in zip(ma, mb):
        assert x["hack_rate"] == y["hack_rate"] and x["reward_mean"] == y["reward_mean"]
        for key in ("loss", "grad_norm", "update_norm", "kl_mean"):
            np.testing.assert_allclose(y[key], x[key], rtol=2e-4, atol=1e-9)


def test_slots_fitted_to_the_device_change_no_rollout(env, straight_run, monkeypatch, capsys):
    """Under a device limit (patched; a CPU reports none) too small for all of a step's rows at once,
    set-up fits fewer sampler slots (rl/memory.fit_sample_rows: the refill schedule), says so and
    records it in run.json; the rollouts are the straight run's, also after a --resume that gives
    another --sample-rows (a field free on resume)."""
    from jaxhack.env.pools import list_pool_steps, read_pool_step
    from jaxhack.rl import memory

    cfg, _ = straight_run
    info_a = json.loads((Path(cfg.run_dir) / T.RUN_FILE).read_text())
    config = Qwen3Config.from_dict(info_a["model"]["config"])
    bucket = -(-info_a["max_prompt_tokens"] // cfg.prompt_multiple) * cfg.prompt_multiple
    n_rows = cfg.group_size * cfg.prompts_per_step

    def gb(slots):
        return memory.sampler_estimate_gb(config, n_rows, cfg.group_size, cfg.max_new, bucket, slots,
                                          cfg.prefill_chunk, cfg.sampler_form, cfg.lend_weights, bytes_per_el=4)

    assert gb(3) < gb(4) < gb(None)  # fewer rows at once hold less
    limit = int((gb(3) + gb(4)) / 2 / (1 - memory.FIT_HEADROOM) * 1e9)
    monkeypatch.setattr(memory, "device_limit_bytes", lambda: limit)
    fitted = dataclasses.replace(cfg, run_dir=str(env[0] / "fitted"), eval_every=0)
    T.train(fitted, stop_after=1, progress=False)
    assert "note: the sampler decodes 3 rows at a time, not all rows" in capsys.readouterr().out
    info = json.loads((Path(fitted.run_dir) / T.RUN_FILE).read_text())
    assert info["sampler"]["sample_rows"] == 3 and info["sampler"]["sample_rows_requested"] is None
    assert info["config"]["sample_rows"] is None  # the config as given: a rerun fits again
    T.train(dataclasses.replace(fitted, sample_rows=2), resume=True, stop_after=1, progress=False)
    steps_a = dict(list_pool_steps(Path(cfg.run_dir) / T.ROLLOUT_DIR))
    steps_b = dict(list_pool_steps(Path(fitted.run_dir) / T.ROLLOUT_DIR))
    assert sorted(steps_b) == [0, 1]
    for step in (0, 1):
        a, b = read_pool_step(steps_a[step]), read_pool_step(steps_b[step])
        assert [r["completion"] for r in a] == [r["completion"] for r in b]


def test_device_out_of_memory_is_one_line_naming_the_flag():
    """XLA's RESOURCE_EXHAUSTED in a phase of a step becomes a UserError (the CLI's one line) naming the
    flag that bounds that phase's memory; any other runtime error keeps its traceback."""
    from jaxhack.io import UserError

    cfg = make_config("smoke", sample_rows=5, microbatch=2, microbatch_tokens=64)
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26.75MiB")
    for phase, flag in [("sampling", r"--sample-rows \(now 5"), ("the eval", r"--sample-rows \(now 5"),
                        ("the reference pass", r"--microbatch-tokens \(now 64"),
                        ("the update", r"--microbatch-tokens \(now 64")]:
        with pytest.raises(UserError, match=rf"ran out of memory in {phase} of step 3: lower {flag}"):
            with T.out_of_memory_hint(cfg, phase, 3):
                raise oom
    with pytest.raises(UserError, match=r"in sampling of step 0: lower --sample-rows \(now all rows"):
        with T.out_of_memory_hint(make_config("smoke"), "sampling", 0):
            raise oom
    with pytest.raises(UserError, match=r"in the update of step 0: set --microbatch"):
        with T.out_of_memory_hint(make_config("smoke"), "the update", 0):
            raise oom
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        with T.out_of_memory_hint(cfg, "the update", 3):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")


def test_vhack_refresh_from_own_rollouts_with_overlap_guard(env):
    """Refresh every 2 steps from the run's rollouts (teacher rows are hacks, the random policy's rows
    are clean): each attempt is logged with its basis overlap; min_overlap 0 accepts and the
    refreshed v_hack is saved, min_overlap 1.01 always keeps the old one."""
    from jaxhack.rl import refresh as RF
    for guard, accepted in ((0.0, True), (1.01, False)):
        cfg = base_config(env, env[0] / f"refresh_{guard}", steps=3, eval_every=0, ckpt_every=3,
                          vhack_refresh_every=2, vhack_refresh_min_overlap=guard)
        T.train(cfg, progress=False)
        log = T.read_jsonl(Path(cfg.run_dir) / RF.REFRESH_LOG)
        assert [e["step"] for e in log] == [2] and log[0]["accepted"] is accepted
        assert log[0]["n_pairs"] > 0 and 0.0 <= log[0]["overlap"] <= 1.0 + 1e-6
        assert (RF.latest_refresh(cfg.run_dir, 3) is not None) is accepted
    v = {"q": np.eye(4, dtype=np.float32)[None, :2]}  # [L=1, k=2, dim=4]
    assert RF.basis_overlap(v, v) == pytest.approx(1.0)
    assert RF.basis_overlap(v, {"q": np.eye(4, dtype=np.float32)[None, 2:]}) == pytest.approx(0.0)


def test_eval_pads_its_last_chunk_to_the_training_batch_and_keeps_every_real_row(tiny_params, monkeypatch):
    """evaluate() samples in chunks of the training step's rows; the remainder chunk is padded to that
    size (one sampler program, not two) and the padding changes no real row: each row equals what an
    unpadded call of the same chunk draws (row i's key depends on i only)."""
    from jaxhack.rl import rollout
    from jaxhack.tokenizer import ByteTokenizer

    params, config = tiny_params
    tok = ByteTokenizer()
    problems = load_problems("bundled")[:5]
    cfg = make_config("smoke", group_size=2, prompts_per_step=2, eval_samples=1, max_new=6,
                      eval_temperature=1.0, mode="run_tests")
    prompt_ids = {p.id: tok.encode(build_prompt(p, "run_tests")[-24:]) for p in problems}
    grade = lambda rows, completions, cfg, cache=None: [  # noqa: E731  (no sandbox: text only)
        type("G", (), dict(hacked=False, gt_pass=False, attempted_hack=False, passed=False, fmt_ok=False,
                           reward=0.0))() for _ in rows]
    monkeypatch.setattr(rollout, "grade_rows", grade)
    calls, texts = [], []
    real = rollout.generate

    def spy(params_, config_, prompts, **kw):
        calls.append(len(prompts))
        res = real(params_, config_, prompts, **kw)
        texts.append([rollout.decode(tok, res.tokens[i, :res.lengths[i]]) for i in range(len(prompts))])
        return res

    monkeypatch.setattr(rollout, "generate", spy)
    key = jax.random.PRNGKey(3)
    rec = rollout.evaluate(params, config, tok, None, problems, cfg, key, 0, prompt_ids, 16)
    assert calls == [4, 4] and rec["n"] == 5
    # the remainder chunk (row 4) drawn alone, unpadded, gives the same text as inside the padded chunk
    alone = real(params, config, [prompt_ids[problems[4].id]], max_new_tokens=6, key=jax.random.fold_in(key, 4),
                 temperature=1.0, eos_token_ids=tok.eos_token_ids, pad_id=tok.pad_token_id, prompt_multiple=16)
    assert rollout.decode(tok, alone.tokens[0, :alone.lengths[0]]) == texts[1][0]
    # fewer eval rows than the training batch: one short call, no padding
    calls.clear()
    rollout.evaluate(params, config, tok, None, problems[:3], cfg, key, 0, prompt_ids, 16)
    assert calls == [3]
