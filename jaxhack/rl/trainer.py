"""Phase 3 training loop: sample -> grade -> Dr.GRPO loss -> optax chain -> orbax checkpoint
(math: ../shared/DESIGN.md "Phase 3"; loop, chain, files and resume semantics: docs/phase3.md).

Per step s (0-based), with k_s = fold_in(base_key, s):
  1. prompts: `prompts_per_step` (pp) problems from a seeded per-epoch permutation of the training
     problems, at data cursor s * pp (`rl.data`); each prompt gets G rows (one group).
  2. rollouts (`rl.rollout.sample_rollout` -> a typed `Rollout`): G - K' rows per group sampled from
     the current policy (`sampler.generate`, one call); K' = min(mix_per_group, cached teacher
     completions of that problem) rows copied from the teacher pool (`--mix-teacher`), truncated to
     max_new tokens; every row graded in the sandbox (teacher rows regraded under this run's mode).
  3. update (`rl.learner`, one jitted program): reference log-probs of the base model, then the
     library loss `grads.losses.grpo_batch_loss` (A = r - mean_group(r), Dr.GRPO; per token
     -min(rho A, clip(rho) A) + beta (exp(d) - d - 1), summed and divided by G * max_new * pp) ->
     grads -> optax.chain(clip_by_global_norm, hack_projection, adamw(warmup-cosine)) (placement
     "gradient") or chain(clip, adamw, hack_projection(placement="update")) -> apply.
  4. metrics line -> RUN/metrics.jsonl; every eval_every steps held-out eval -> RUN/eval.jsonl;
     every ckpt_every steps an orbax checkpoint -> RUN/ckpt/step_NNNNNN (`rl.checkpoints`).

old_logp: "current" (default) uses stop_gradient(logp) of the very forward being differentiated, so
rho == 1 exactly and the PPO clip is inactive: with ONE update per sampled batch the policy that
sampled the batch IS the current policy, and the gradient is the REINFORCE / Dr.GRPO one
(-A grad logp). "sampler" uses the sampler's log-probs for sampled rows (rho = 1 up to numerical
differences between the cached decode and the training forward); teacher rows always use "current".
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxhack.env.pools import write_pool_meta, write_pool_step
from jaxhack.io import UserError, append_jsonl, atomic_write_text, read_jsonl, rewrite_jsonl  # noqa: F401
from jaxhack.parallel import mesh as meshlib
from jaxhack.rl.checkpoints import CKPT_DIR, list_checkpoints, restore_train_state, save_train_state  # noqa: F401
from jaxhack.rl.config import ARMS, TrainConfig
from jaxhack.rl.data import problem_indices
from jaxhack.rl.learner import lr_schedule, make_optimizer, reference_logp, train_batch  # noqa: F401
from jaxhack.rl.learner import cached_update_fn
from jaxhack.rl.lend import lent_merge
from jaxhack.rl.refresh import REFRESH_LOG, latest_refresh, refresh_v_hack
from jaxhack.rl.refresh import due as refresh_due
from jaxhack.rl.rollout import evaluate, rollout_metrics, rollout_records, sample_rollout
from jaxhack.rl.run import (DONE_FILE, EVAL_FILE, EVAL_TAG, METRICS_FILE, ROLLOUT_DIR, RUN_FILE,  # noqa: F401
                            VHACK_DIR, RunContext, check_resume_config, final_summary, setup_run)
from jaxhack.tracking import TrackingSettings, open_tracker


def step_seconds(m: dict) -> dict:
    """A metrics line's split of the step: generation / grading / reference pass / update / step
    (time_update_s counts the reference pass too; the update here is without it)."""
    return {"generation": m["time_generation_s"], "grading": m["time_grading_s"], "reference": m["time_ref_s"],
            "update": m["time_update_s"] - m["time_ref_s"], "step": m["time_step_s"]}


@contextlib.contextmanager
def out_of_memory_hint(cfg: TrainConfig, phase: str, step: int):
    """XLA's RESOURCE_EXHAUSTED (the device's memory ran out) in `phase` ("sampling", "the reference
    pass", "the update", "the eval") as a UserError naming the flag that bounds that phase's memory
    (one line from the CLI; XLA's allocator dump above it stays). Other errors pass through."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        if phase in ("sampling", "the eval"):
            now = "all rows" if cfg.sample_rows is None else cfg.sample_rows
            knob = (f"lower --sample-rows (now {now}: the rows the sampler decodes at once; the samples do not "
                    f"depend on it) and rerun with --resume")
        elif cfg.microbatch is None:
            knob = "set --microbatch (rows per micro-batch of the reference pass and the update; now all at once)"
        else:
            knob = (f"lower --microbatch-tokens (now {cfg.microbatch_tokens}: the tokens one micro-batch of the "
                    f"reference pass and the update holds) or --microbatch (now {cfg.microbatch})")
        raise UserError(f"the device ran out of memory in {phase} of step {step}: {knob}") from None


def train_step(ctx: RunContext, trainable, opt_state, step: int, cursor: int):
    """One full step. Returns (trainable, opt_state, metrics dict, rollout records)."""
    cfg = ctx.cfg
    t_step = time.time()
    idx = problem_indices(cursor, cfg.prompts_per_step, len(ctx.train_problems), cfg.seed)
    # cfg.lend_weights: the sampler borrows the bases
    with lent_merge(trainable, ctx.frozen) as adapters, out_of_memory_hint(cfg, "sampling", step):
        rollout, t_gen, t_grade = sample_rollout(
            ctx.params, ctx.config, ctx.tokenizer, adapters, [ctx.train_problems[i] for i in idx], ctx.prompt_ids,
            ctx.teacher, cfg, jax.random.fold_in(ctx.base_key, step), step, ctx.prompt_multiple, mesh=ctx.mesh,
            grade_cache=ctx.grade_cache)
    t0 = time.time()
    batch, adv = train_batch(rollout, cfg, ctx.tokenizer.pad_token_id, ctx.n_rows, ctx.seq_len)
    with out_of_memory_hint(cfg, "the reference pass", step):
        batch["ref_logp"] = reference_logp(ctx.params, ctx.config, batch, cfg, mesh=ctx.mesh)
    t_ref = time.time() - t0
    with out_of_memory_hint(cfg, "the update", step):
        if ctx.mesh is None:
            trainable, opt_state, m = ctx.update_fn(trainable, opt_state, ctx.frozen, ctx.params,
                                                    jax.tree.map(jnp.asarray, batch))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
        else:  # host batch: the update shards its rows over the mesh
            trainable, opt_state, m = ctx.update_fn(trainable, opt_state, ctx.frozen, ctx.params, batch)
            m = {k: float(v) for k, v in meshlib.tree_to_host(m).items()}
    t_update = time.time() - t0
    metrics = {
        "step": step, "cursor": cursor, "epoch": cursor // len(ctx.train_problems),
        **rollout_metrics(rollout), "adv_abs_mean": float(np.mean(np.abs(adv))),
        "loss": m["loss"], "kl_mean": m["kl_mean"], "pg_token_mean": m["pg_token_mean"],
        "ratio_mean": m["ratio_mean"], "clip_frac": m["clip_frac"], "grad_norm": m["grad_norm"],
        "update_norm": m["update_norm"], "cos_in": m["mean_cos_in"], "cos_out": m["mean_cos_out"],
        "frac_fired": m["frac_fired"], "frac_positive": m["frac_positive"], "removed_norm": m["removed_norm"],
        "removed_frac": m["removed_frac"], "n_overprojected": m["n_overprojected"], "update_cos": m["update_cos"],
        "update_frac_positive": m["update_frac_positive"],
        **{k: m[k] for k in ("cos_in_student", "cos_in_teacher") if k in m},
        "lr": float(lr_schedule(cfg)(step)), "arm": cfg.arm, "seed": cfg.seed,
        "time_generation_s": t_gen, "time_grading_s": t_grade, "time_update_s": t_update,
        "time_ref_s": t_ref, "time_step_s": time.time() - t_step,
    }
    return trainable, opt_state, metrics, rollout_records(rollout, adv, step, cfg, ctx.prompt_texts)


def _train_state(trainable, opt_state, ctx: RunContext, cursor: int, step: int) -> dict:
    return {"trainable": trainable, "opt_state": opt_state, "key": ctx.base_key,
            "cursor": jnp.int32(cursor), "step": jnp.int32(step)}


def _resume(ctx: RunContext, trainable, opt_state):
    """(trainable, opt_state, start step, cursor) from the newest checkpoint, else from scratch."""
    ckpts = list_checkpoints(ctx.run_dir)
    if not ckpts:
        return trainable, opt_state, 0, 0
    done_steps, path = ckpts[-1]
    state = restore_train_state(path, _train_state(trainable, opt_state, ctx, 0, 0))
    if ctx.mesh is not None:  # the checkpoint holds host arrays: replicate them on this run's mesh
        state = dict(state, **meshlib.tree_to_global({k: state[k] for k in ("trainable", "opt_state")},
                                                     meshlib.replicated(ctx.mesh)))
    start, cursor = int(state["step"]), int(state["cursor"])
    chex.assert_trees_all_equal(state["key"], ctx.base_key)
    if start != done_steps:
        raise ValueError(f"{path}: holds step {start}, its name says {done_steps}")
    print(f"resuming {ctx.run_dir} from {path.name} (step {start}, cursor {cursor})")
    return state["trainable"], state["opt_state"], start, cursor


def ablate_hack(trainable: dict) -> dict:
    """The route arm's deploy adapter: delta_s_hack zeroed (the routed hack-ward part removed)."""
    return {name: (dict(m, delta_s_hack=jnp.zeros_like(m["delta_s_hack"])) if "delta_s_hack" in m else m)
            for name, m in trainable.items()}


def track_step(tracker, step: int, metrics: dict, records: list[dict]) -> None:
    """Every scalar of the step's metrics line, and histograms of the rows' rewards and advantages."""
    tracker.scalars(step, metrics)
    tracker.histogram(step, "rollout/reward", [r["reward"] for r in records])
    tracker.histogram(step, "rollout/advantage", [r["advantage"] for r in records])


def device_peak_bytes() -> int | None:
    """This process's peak bytes in use on its first device (what the allocator reports; None where
    it reports nothing, e.g. on a CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, model=None,
          progress: bool = True, tracking: TrackingSettings | None = None) -> dict:
    """Run (or resume) a Phase 3 training run in cfg.run_dir; returns final_summary(run_dir).

    resume: continue from the newest RUN/ckpt/step_* (config must match up to RESUME_FREE_FIELDS);
    without a checkpoint it starts from scratch. A run dir holding a run.json is refused unless
    resume. stop_after: stop after this many steps of this call (simulates a kill; no done.json).
    model: a preloaded (params, config, tokenizer) (the sweep loads it once).
    tracking: TensorBoard / W&B settings (jaxhack.tracking); None: no tracker. The run is tagged
    arm:/seed:/preset: for the trackers' grouping.
    """
    run_dir = Path(cfg.run_dir)
    run_json = run_dir / RUN_FILE
    primary = meshlib.is_primary()  # several processes (multi-host): files are written by process 0 only
    if run_json.is_file():
        if not resume:
            raise FileExistsError(f"{run_dir}: a run already exists here (pass --resume to continue it)")
        check_resume_config(json.loads(run_json.read_text())["config"], cfg.to_dict(), run_json)
        if (run_dir / DONE_FILE).is_file():
            return json.loads((run_dir / DONE_FILE).read_text())["summary"]
    meshlib.barrier("jaxhack-train-checked")  # every process has seen the run dir before process 0 writes
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = setup_run(cfg, model, progress=progress)
    if not run_json.is_file() and primary:
        atomic_write_text(run_json, json.dumps(ctx.info, indent=2, sort_keys=True, default=str) + "\n")
    trainable, opt_state = ctx.trainable0, ctx.optimizer.init(ctx.trainable0)
    if ctx.mesh is not None:
        opt_state = meshlib.tree_to_global(meshlib.tree_to_host(opt_state), meshlib.replicated(ctx.mesh))
    start, cursor = 0, 0
    if resume:
        trainable, opt_state, start, cursor = _resume(ctx, trainable, opt_state)
    # drop whatever the killed run wrote after its last checkpoint: it will be redone identically
    if primary:
        rewrite_jsonl(run_dir / METRICS_FILE, lambda r: r["step"] < start)
        rewrite_jsonl(run_dir / EVAL_FILE, lambda r: r["step"] <= start if start > 0 else False)
    tags = (f"arm:{cfg.arm}", f"seed:{cfg.seed}", f"preset:{cfg.preset}")
    tracker = open_tracker(tracking.with_tags(*tags) if tracking is not None and primary else None,
                           run_dir, {**cfg.to_dict(), "model": ctx.info["model"]}, purge_step=start)
    if cfg.save_rollouts and primary:
        write_pool_meta(run_dir / ROLLOUT_DIR, {"pool": f"phase3/{cfg.arm}/seed_{cfg.seed}", "mode": cfg.mode,
                                                "comp_len_unit": "tokens", "source": "phase3 training"})

    def maybe_eval(done: int, force: bool = False) -> float:
        if not ctx.eval_problems or cfg.eval_every <= 0 or (not force and done % cfg.eval_every):
            return 0.0
        t0 = time.time()
        key = jax.random.fold_in(jax.random.fold_in(ctx.base_key, EVAL_TAG), done)

        def held_out(policy):  # the held-out eval of one adapter state (ctx.cfg: the sampler's fitted slots)
            with lent_merge(policy, ctx.frozen) as adapters, out_of_memory_hint(ctx.cfg, "the eval", done):
                return evaluate(ctx.params, ctx.config, ctx.tokenizer, adapters, ctx.eval_problems, ctx.cfg, key,
                                done, ctx.prompt_ids, ctx.prompt_multiple, mesh=ctx.mesh, grade_cache=ctx.grade_cache)

        rec = held_out(trainable)
        if ARMS[cfg.arm].projection == "route":  # deploy = delta_s_hack ablated; both are reported
            ablated = held_out(ablate_hack(trainable))
            rec.update({f"ablated_{k}": v for k, v in ablated.items() if k not in ("step", "n", "temperature")})
        rec["time_eval_s"] = time.time() - t0
        if primary:
            append_jsonl(run_dir / EVAL_FILE, rec)
        tracker.scalars(done, rec, prefix="eval/")
        return rec["time_eval_s"]

    def use_v_hack(ctx, bundle):
        optimizer, update_fn = cached_update_fn(cfg, bundle, ARMS[cfg.arm].projection, ctx.config, ctx.mesh)
        return dataclasses.replace(ctx, v_hack=bundle, optimizer=optimizer, update_fn=update_fn)

    refreshing = bool(cfg.vhack_refresh_every) and ARMS[cfg.arm].control == "none"
    recent: list[dict] = []
    if refreshing and start > 0:
        restored = latest_refresh(run_dir, start)
        if restored is not None:
            ctx = use_v_hack(ctx, restored)
        if primary:
            rewrite_jsonl(run_dir / REFRESH_LOG, lambda r: r["step"] <= start)
        boundary = start - start % cfg.vhack_refresh_every
        if cfg.save_rollouts and boundary < start:  # the records since the last refresh, as a straight run has
            from jaxhack.env.pools import read_pool
            recent = [r for r in read_pool(run_dir / ROLLOUT_DIR)[1] if boundary <= int(r["step"]) < start]
    if start == 0:
        maybe_eval(0)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"phase3 {cfg.arm} seed {cfg.seed}", unit="step",
               initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        trainable, opt_state, metrics, records = train_step(ctx, trainable, opt_state, step, cursor)
        cursor += cfg.prompts_per_step
        done = step + 1
        if cfg.save_rollouts and primary:
            write_pool_step(run_dir / ROLLOUT_DIR, step, records)
        if primary:
            append_jsonl(run_dir / METRICS_FILE, metrics)
        track_step(tracker, step, metrics, records)
        if refreshing:
            recent += records
            if refresh_due(cfg, done):
                bundle, entry = refresh_v_hack(ctx, trainable, recent, done)
                if primary:
                    append_jsonl(run_dir / REFRESH_LOG, entry)
                if bundle is not None:
                    ctx = use_v_hack(ctx, bundle)
                recent = []
        t_eval = maybe_eval(done, force=(done == cfg.steps))
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or done == end:
            state = _train_state(trainable, opt_state, ctx, cursor, done)
            if ctx.mesh is None:
                save_train_state(run_dir, done, state, keep=cfg.keep_ckpts)
            else:  # replicated state: one host copy, written by process 0 (restores on any mesh)
                state = meshlib.tree_to_host(state)
                if primary:
                    save_train_state(run_dir, done, state, keep=cfg.keep_ckpts)
                meshlib.barrier(f"jaxhack-ckpt-{done}")
        t = step_seconds(metrics)
        bar.set_postfix(gen=f"{t['generation']:.1f}s", grade=f"{t['grading']:.1f}s", ref=f"{t['reference']:.1f}s",
                        upd=f"{t['update']:.1f}s", eval=f"{t_eval:.1f}s",
                        R=f"{metrics['reward_mean']:.2f}", hack=f"{metrics['hack_rate_policy']:.2f}")
        if not progress:
            print(f"[{cfg.arm} seed {cfg.seed}] step {step + 1}/{cfg.steps} done: gen {t['generation']:.2f}s "
                  f"grade {t['grading']:.2f}s ref {t['reference']:.2f}s update {t['update']:.2f}s "
                  f"reward {metrics['reward_mean']:.3f} hack {metrics['hack_rate_policy']:.3f}", flush=True)
    bar.close()
    tracker.close()
    summary = final_summary(run_dir)
    meshlib.barrier("jaxhack-train-done")
    if end == cfg.steps and primary:
        atomic_write_text(run_dir / DONE_FILE, json.dumps({"summary": summary, "time_unix": time.time(),
                                                           "device_peak_bytes": device_peak_bytes(),
                                                           "grade_cache": {"entries": len(ctx.grade_cache.oracle),
                                                                           "sandbox_runs_saved": ctx.grade_cache.hits}},
                                                          indent=2, sort_keys=True) + "\n")
    return summary
