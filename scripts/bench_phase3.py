"""Benchmark: one Phase 3 step of the `full` preset at Qwen3-4B shape on one GPU, split and against its floor.

The step is the same work `phase3_train.py --preset full --arm projected` does per step, built from the
same pieces (jaxhack.rl.sampler, the grader, grads.losses.sequence_logprobs for the reference pass,
grads.losses.grpo_batch_loss and rl.learner.make_optimizer with the v_hack projection), on random inputs:
- weights: random bf16 with Qwen3-4B shapes; SVD adapter with random orthonormal-scale bases (full
  rank, as the real adapter); random v_hack (k=1); projection "erase", placement "gradient".
- rollouts: pp=43 prompts x G=6 = 258 rows; prompts of random tokens, lengths uniform in
  [prompt_len - 100, prompt_len + 100] (default mean 400, "several hundred tokens");
  completions sampled at temperature 1 with the current adapter, max_new 1536.
  regime `worst`: every row runs to max_new. regime `realistic`: row i stops (as at an EOS) after
  L_i tokens, L_i ~ Gamma(shape 4, scale 125) rounded, clipped to [16, max_new]: mean ~500, sd ~250
  (LeetCode solutions without thinking); the same lengths every step (seed 0).
- grade: the 258 completions graded by the sandbox grader; random weights write no code, so each row's
  completion is replaced by a bundled problem's canonical solution in a python block (a real sandbox
  run per row, as a policy that writes code would cost). --grade none skips it.
- reference log-probs and update: length-bucketed micro-batches (jaxhack.grads.microbatch): rows sorted
  by real length, `microbatch` rows at a time (at most microbatch_tokens // T rows at T positions:
  the preset's token budget), each micro-batch cut to its longest row rounded up to the preset's
  length_multiple (128);
  reference = base model forward (vocab-chunked log-probs); update = value_and_grad of the
  Dr.GRPO loss summed over micro-batches, then clip -> v_hack projection -> AdamW (jitted).
  These are the trainer's own functions (rl/learner.reference_logp, rl/learner.make_update_fn).
  --update fixed instead pads every micro-batch to prompt + max_new (the trainer before bucketing).
- sampler schedule (--sampler): `refill` (what the trainer uses for the full preset: sample_rows decode
  slots, a finished row's slot refilled with the next pending row, jaxhack/rl/refill.py), `groups`
  (row groups of <= sample_rows, each decoding until its longest row is done: the sampler before
  refill) or `both`: one record per schedule from the same call (the same rows, lengths and tokens).
  Before timing, each schedule is compiled by one call with every row capped at 1 token.
  --sample-only times the sampler alone (no grade, reference pass or update): the cheap old-vs-new
  comparison.

Floor (derivation in docs/benchmarks.md; `jaxhack/phase3_floor.py`): FLOPs of prefill (the refill sampler's:
each prompt once; `floor_exact_form_s`, the issue's floor: every row's), reference and update at the
card's dense bf16 peak, plus decode at the HBM bandwidth floor (each decode step reads all weights and
adapter bases once plus the live rows' KV cache, for the refill sampler each live prompt's keys once
for all its rows; the issue's floor: every row its own prompt's; all 258 rows in one batch, i.e.
without the memory limit), compute-bound decode steps counted at the FLOP peak instead.

    PYTHONPATH=. python scripts/bench_phase3.py --regime realistic    # GPU, ~6 min on an H100
    PYTHONPATH=. python scripts/bench_phase3.py --regime realistic --sampler both --sample-only  # old vs new
    PYTHONPATH=. python scripts/bench_phase3.py --regime worst        # GPU, ~6 min on an H100
    PYTHONPATH=. python scripts/bench_phase3.py --tiny --regime both  # CPU, ~1 min

Data parallel (docs/phase3.md, "One GPU, one node of N GPUs, a cluster"): `--meshes data=1 data=2 data=4`
runs the step on each mesh in turn, in one process (the first N devices), and writes one JSON line per
mesh with `mesh`, `n_devices` and `scaling_efficiency` = step_s(1 device) / (N step_s(N devices)) against
the data=1 line of the same call (`device_scaling_efficiency`: the same without the host-side grading,
which does not shard). On a mesh the sampler's rows, the reference pass and the update's micro-batches
are sharded over the devices exactly as `jaxhack train --mesh` does: sample_rows and microbatch are per
device, params / adapter / optimizer state replicated; the refill sampler cuts the rows into one part
per device and each device refills its own sample_rows slots (`refill.generate_slots_on_devices`).

    PYTHONPATH=. python scripts/bench_phase3.py --regime realistic --meshes data=1 data=2 data=4  # 4 GPUs
    PYTHONPATH=. python scripts/bench_phase3.py --tiny --regime worst --grade none --cpu-devices 4 \
        --meshes data=1 data=2 data=4                                                         # CPU check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.commands import checks, fail  # noqa: E402
from jaxhack.io import UserError  # noqa: E402
from jaxhack.phase3_floor import (completion_lengths, sampler_schedule_floor, slot_plan,  # noqa: E402
                                  step_floor)
from jaxhack.rl.memory import memory_estimate  # noqa: E402
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # default 0.75 = 60 GB of an 80 GB card

TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def log(msg: str) -> None:
    print(f"[bench_phase3 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the step
def train_config(args):
    """The `full` preset's TrainConfig with the command line's overrides (validated: a bad value raises
    rl.config.ConfigError before any work)."""
    from jaxhack.rl.config import make_config

    # a mesh: make_config's and TrainConfig's rules about meshes apply (the preset's shared-prompt
    # learner becomes "rows"; asking for it by name on a mesh is an error)
    mesh = args.mesh or (args.meshes[0] if args.meshes else None)
    cfg = make_config("full", arm="projected", ckpt="random-4b", svd_random_bases=True, v_hack="random",
                      remat=args.remat, mesh=mesh, update_layout=args.update_layout,
                      lend_weights=False if args.keep_weights else None)  # two copies: the preset's 96 slots
    if args.tiny:
        cfg = dataclasses.replace(cfg, group_size=2, prompts_per_step=3, max_new=24, microbatch=2)
    overrides = {k: v for k, v in (("max_new", args.max_new), ("prompts_per_step", args.prompts_per_step),
                                   ("microbatch", args.microbatch), ("microbatch_tokens", args.microbatch_tokens),
                                   ("sampler_form", args.sampler_form), ("length_multiple", args.length_multiple))
                 if v is not None}
    return dataclasses.replace(cfg, **overrides)


def build(args, cfg):
    """Random Qwen3-4B-shaped (or tiny) weights, SVD adapter, v_hack and optimizer for `cfg`
    (`train_config(args)`)."""
    import jax
    import jax.numpy as jnp

    from jaxhack.models.config import QWEN3_4B
    from jaxhack.models.random_init import random_params, random_svd_adapter
    from jaxhack.projection.v_hack import random_v_hack
    from jaxhack.rl import learner

    if args.tiny:
        config = dataclasses.replace(QWEN3_4B, **TINY_SHAPE)
        dtype = jnp.float32
    else:
        config = QWEN3_4B
        dtype = jnp.bfloat16
    kp, ka = jax.random.split(jax.random.PRNGKey(0))
    params = random_params(config, kp, dtype)
    trainable, frozen = random_svd_adapter(params, ka, dtype)
    v_hack = random_v_hack({n: tuple(m["delta_s"].shape) for n, m in trainable.items()}, seed=0, k=1)
    optimizer = learner.make_optimizer(cfg, v_hack, "erase")
    opt_state = optimizer.init(trainable)
    hyper = learner.LossHyper(cfg.group_size, cfg.max_new, cfg.prompts_per_step, cfg.clip_eps,
                              cfg.clip_eps_high, cfg.beta, cfg.remat, cfg.logp_chunk)
    return cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack


def place(built, mesh):
    """The built state replicated on the mesh (None: as built)."""
    if mesh is None:
        return built
    from jaxhack.parallel import mesh as meshlib
    cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack = built
    params, trainable, frozen, opt_state = meshlib.tree_to_global((params, trainable, frozen, opt_state),
                                                                  meshlib.replicated(mesh))
    return cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack


def run_regime(args, regime: str, built, mesh=None) -> list[dict]:
    import jax

    from jaxhack.grads.batch import make_batch
    from jaxhack.grads.losses import centered_advantages
    from jaxhack.models.fused_decode import requested
    from jaxhack.rl import learner, sampler
    from jaxhack.rl.lend import lent_merge
    from jaxhack.rl.refill import PromptRuns, device_parts

    cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack = place(built, mesh)
    n_dev = 1 if mesh is None else int(mesh.shape["data"])
    # the trainer's own reference pass and update (rl/learner.py); "fixed": every micro-batch padded to
    # prompt + max_new (a length multiple no row reaches), "bucketed": cut to length_multiple
    multiple = cfg.length_multiple if args.update == "bucketed" else 1 << 30  # train_config applied --length-multiple
    cfg = dataclasses.replace(cfg, length_multiple=multiple)
    update_fn = learner.make_update_fn(optimizer, config, hyper, cfg.microbatch, v_hack, cfg.length_multiple, mesh,
                                       cfg.microbatch_tokens, cfg.update_layout)
    N = cfg.group_size * cfg.prompts_per_step
    rng = np.random.default_rng(1)
    half = min(100, args.prompt_len // 4)
    prompt_lens = rng.integers(args.prompt_len - half, args.prompt_len + half + 1, cfg.prompts_per_step)
    # the G rows of a group share their prompt, as in GRPO (the shared-prompt learner layout needs it)
    prompts = [p for n in prompt_lens for p in [rng.integers(3, config.vocab_size, n).tolist()] * cfg.group_size]
    comp_lens = completion_lengths(regime, N, cfg.max_new)
    grade_items = None
    if args.grade == "canonical" and not args.learner_only:
        from jaxhack.env.problems import load_problems
        problems = load_problems("bundled")
        grade_items = [problems[i % len(problems)] for i in range(N)]
    P = sampler.prompt_bucket(int(prompt_lens.max()))
    S = -(-(P + cfg.max_new) // 128) * 128
    max_len = -(-(int(prompt_lens.max()) + cfg.max_new) // 64) * 64
    groups, B_groups = sampler.row_groups(N, args.sample_rows * n_dev)  # sample_rows: per device, as generate(mesh=)
    B_groups = -(-B_groups // n_dev) * n_dev
    schedules = ("groups", "refill") if args.sampler == "both" else (args.sampler,)
    if args.learner_only:  # no sampler: completions of the regime's lengths, random tokens
        schedules = ("none",)
    # refill: sample_rows slots (at most the padded batch); groups: B_groups rows per group
    B_slots = sampler.refill_slots(N, args.sample_rows, n_dev)  # refill: slots per device, as generate picks
    batch = {"groups": B_groups, "refill": B_slots * n_dev, "none": 0}
    # the refill sampler's prompt pool (rl.refill.PromptRuns), per device part: each prompt prefilled once
    # and held once; its slots hold the generated tokens only (Sg positions)
    ids = np.repeat(np.arange(cfg.prompts_per_step), cfg.group_size)  # the rows' prompts: G rows share one
    parts = device_parts(N, n_dev)
    books = {a: PromptRuns(ids[a:b], B_slots, args.refill_rows) for a, b in zip(parts, parts[1:]) if b > a}
    refill_prompts = max(book.U for book in books.values())  # U: prompts per refill program
    Sg, Pp = -(-cfg.max_new // 128) * 128, -(-P // 128) * 128
    pool = max(book.pool_size for book in books.values()) * Pp
    mb_tokens = cfg.microbatch * max_len if cfg.microbatch_tokens is None else min(cfg.microbatch_tokens,
                                                                                   cfg.microbatch * max_len)
    mem = {sched: memory_estimate(config, batch[sched] // n_dev, Sg if sched == "refill" else S, cfg.microbatch,
                                  max_len, min(args.prefill_chunk, P), P, 2 if not args.tiny else 4, tokens=mb_tokens,
                                  sampler_form=cfg.sampler_form,
                                  prefill_rows=refill_prompts if sched == "refill" else None, lend=cfg.lend_weights,
                                  pool_positions=pool if sched == "refill" else 0)
           for sched in schedules}
    # the floor of the computation performed (this sampler form and learner layout), and the issue's
    # floor (exact sampler, per-row learner) for comparison
    shared = cfg.group_size if cfg.update_layout == "shared_prompt" else None
    refill_only = schedules == ("refill",)
    prefilled = np.concatenate([a + book.first for a, book in books.items()]) if refill_only else None
    runs = np.concatenate([a + book.run_of_row for a, book in books.items()]) if refill_only else None
    floor = step_floor(config, np.repeat(prompt_lens, cfg.group_size), comp_lens, args.peak_tflops * 1e12,
                       args.hbm_tbps * 1e12, slots=B_slots, sampler_form=cfg.sampler_form, shared_prompt_groups=shared,
                       prefilled=prefilled, prompt_runs=runs)
    floor_exact = step_floor(config, np.repeat(prompt_lens, cfg.group_size), comp_lens, args.peak_tflops * 1e12,
                             args.hbm_tbps * 1e12, slots=B_slots)
    refill_plan = slot_plan(config, comp_lens, Sg, args.refill_rows, 2 if not args.tiny else 4, ids=ids,
                            prompt_positions=Pp)
    schedule_floor = sampler_schedule_floor(config, np.repeat(prompt_lens, cfg.group_size), comp_lens, B_slots,
                                            args.refill_rows, n_dev, args.peak_tflops * 1e12, args.hbm_tbps * 1e12,
                                            cfg.sampler_form, ids=ids)
    log(f"{regime}: {N} rows, prompt bucket {P}, mean completion {comp_lens.mean():.0f}, "
        f"max {comp_lens.max()}; groups: {len(groups)} of {B_groups} rows of {S} positions; refill: {B_slots} slots "
        f"of {Sg} positions and a pool of {pool // Pp} prompts of {Pp}, {args.refill_rows} rows per refill; "
        f"memory estimate "
        + ", ".join(f"{k} {m['peak_gb']:.1f} GB (sample {m['sample_gb']:.1f}, update {m['update_gb']:.1f})"
                    for k, m in mem.items())
        + f"; floor {floor['floor_s']:.1f} s (decode at {B_slots} slots: {floor['floor_slots_s']:.1f} s)")

    def sample(step: int, schedule: str, caps, trainable):
        t0 = time.perf_counter()
        with lent_merge(trainable, frozen) as adapters:  # the trainer's: the sampler may borrow the bases
            res = sampler.generate(params, config, prompts, max_new_tokens=cfg.max_new,
                                   key=jax.random.PRNGKey(step), adapters=adapters,
                                   temperature=cfg.temperature, eos_token_ids=[], pad_id=0,
                                   max_rows=args.sample_rows, prefill_chunk=args.prefill_chunk,
                                   max_lengths=caps.tolist(), schedule=schedule, refill_rows=args.refill_rows,
                                   mesh=mesh, form=cfg.sampler_form, lend_weights=cfg.lend_weights)
        return res, time.perf_counter() - t0

    def one_step(step: int, trainable, opt_state, schedule: str):
        times = {}
        if schedule == "none":
            toks = rng.integers(3, config.vocab_size, (N, cfg.max_new)).astype(np.int32)
            res = sampler.SampleResult(tokens=toks, lengths=comp_lens.copy(), logprobs=np.zeros(toks.shape, np.float32),
                                       prompt_lengths=np.repeat(prompt_lens, cfg.group_size).astype(np.int32),
                                       finished=np.zeros(N, bool), decode_steps=0)
            times["sample_s"] = 0.0
        else:
            res, times["sample_s"] = sample(step, schedule, comp_lens, trainable)
        assert (res.lengths == comp_lens).all(), "forced completion lengths not honoured"
        t0 = time.perf_counter()
        if grade_items is not None:
            from jaxhack.env.grader import GradeRequest, RewardConfig, grade_batch
            from jaxhack.env.sandbox import SandboxLimits
            texts = [f"```python\n{p.canonical_solution}\n```" for p in grade_items]
            grades = grade_batch([GradeRequest(p, cfg.mode, c) for p, c in zip(grade_items, texts)],
                                 RewardConfig(cfg.format_reward, cfg.pass_reward),
                                 SandboxLimits(wall_s=cfg.sandbox_wall_s, cpu_s=int(cfg.sandbox_wall_s)))
            rewards = np.asarray([g.reward for g in grades], np.float32)
            rewards = rewards + rng.standard_normal(N).astype(np.float32)  # non-zero advantages
        else:
            rewards = rng.standard_normal(N).astype(np.float32)
        times["grade_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        comps = [res.tokens[i, :n].tolist() for i, n in enumerate(res.lengths)]
        batch = make_batch(prompts, comps, pad_id=0, padding="right", length=max_len)
        if mesh is not None and cfg.microbatch is None and N % n_dev:
            raise ValueError(f"{N} rows do not split over {n_dev} devices without --microbatch")
        batch["prompt_len"] = np.asarray([len(p) for p in prompts], np.int32)
        batch["advantage"] = np.asarray(centered_advantages(rewards, group_size=cfg.group_size))
        batch["old_logp"] = np.zeros_like(batch["tokens"], np.float32)
        batch["use_current"] = np.ones((N,), bool)
        real = batch["attention_mask"].sum(1)
        batch["ref_logp"] = learner.reference_logp(params, config, batch, cfg, mesh=mesh)
        times["ref_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        trainable, opt_state, _ = update_fn(trainable, opt_state, frozen, params, batch)
        jax.block_until_ready(trainable)
        times["update_s"] = time.perf_counter() - t0
        times["step_s"] = sum(times.values())
        times["n_tokens"] = int(real.sum())
        times["n_completion_tokens"] = int(res.lengths.sum())
        times["decode_steps"] = res.decode_steps
        return times, trainable, opt_state

    compile_s = {}
    for schedule in [s for s in schedules if s != "none"]:  # compile: every row capped at 1 token (prefill, 1 step)
        _, compile_s[schedule] = sample(0, schedule, np.ones_like(comp_lens), trainable)
        log(f"{regime} {schedule}: compiled (+ prefill, 1 token per row) in {compile_s[schedule]:.1f} s")
    records = {schedule: [] for schedule in schedules}
    if args.sample_only:
        for step in range(args.steps):
            for schedule in schedules:
                res, sample_s = sample(step + 1, schedule, comp_lens, trainable)
                assert (res.lengths == comp_lens).all(), "forced completion lengths not honoured"
                records[schedule].append({"sample_s": sample_s, "decode_steps": res.decode_steps,
                                          "n_completion_tokens": int(res.lengths.sum())})
                log(f"{regime} {schedule} sample {step}: {sample_s:.2f} s, {res.decode_steps} decode steps")
        if args.profile_sample:  # one more call of the last schedule, under the profiler
            write_sample_profile(args, regime, schedules[-1], config.num_hidden_layers,
                                 lambda: sample(args.steps + 1, schedules[-1], comp_lens, trainable)[0])
    else:
        for step in range(args.warmup):  # compiles the reference pass and the update (same shapes for both)
            t, trainable, opt_state = one_step(step, trainable, opt_state, schedules[-1])
            log(f"{regime} {schedules[-1]} step {step} (warm-up): "
                + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k.endswith("_s")))
        for step in range(args.warmup, args.warmup + args.steps):
            for schedule in schedules:
                t, trainable, opt_state = one_step(step, trainable, opt_state, schedule)
                log(f"{regime} {schedule} step {step}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k.endswith("_s"))
                    + f", {t['decode_steps']} decode steps")
                records[schedule].append(t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    parts = ("sample_s",) if args.sample_only else ("sample_s", "grade_s", "ref_s", "update_s", "step_s")
    out = []
    for schedule in schedules:
        recs = records[schedule]
        split = {k: float(np.median([r[k] for r in recs])) for k in parts}
        rec = {"preset": "full" if not args.tiny else "full-tiny", "regime": regime, "device": dev.device_kind,
               "sampler": schedule, "sample_only": args.sample_only, **split}
        if schedule == "none":  # the learner's own floor: reference pass + update
            learner_floor = floor["ref_s"] + floor["update_s"]
            rec.update(learner_floor_s=learner_floor,
                       fraction_of_learner_floor=learner_floor / (split["ref_s"] + split["update_s"]),
                       tokens_per_s=recs[-1]["n_tokens"] / (split["ref_s"] + split["update_s"]))
        elif not args.sample_only:
            rec.update(floor_s=floor["floor_s"], fraction_of_floor=floor["floor_s"] / split["step_s"],
                       fraction_of_exact_form_floor=floor_exact["floor_s"] / split["step_s"],
                       floor_slots_s=floor["floor_slots_s"],
                       tokens_per_s=recs[-1]["n_tokens"] / split["step_s"],
                       completion_tokens_per_s=recs[-1]["n_completion_tokens"] / split["step_s"])
        else:  # the sampler's own floor: prefill + decode (all rows in one batch; at the slots)
            rec.update(sample_floor_s=floor["prefill_s"] + floor["decode_s"],
                       sample_floor_slots_s=floor["prefill_s"] + floor["decode_slots_s"],
                       completion_tokens_per_s=recs[-1]["n_completion_tokens"] / split["sample_s"])
        rec.update({
            "peak_bytes": stats.get("peak_bytes_in_use"), "memory_estimate_gb": mem[schedule],
            "decode_steps": recs[-1]["decode_steps"], "compile_s": compile_s.get(schedule), "refill_plan": refill_plan,
            # the refill schedule's own count for these lengths on this many devices: a measured
            # decode_steps above it would mean the sampler ran rounds the schedule does not need
            "planned_decode_steps": schedule_floor["schedule_steps"] if schedule == "refill" else None,
            # the sampler's floor at the steps its refill schedule runs (kernels at the bandwidth floor; the
            # schedule's tail counted): sample_s against it says how far the kernels are from the floor
            **({"sample_floor_schedule_s": schedule_floor["sample_floor_schedule_s"],
                "fraction_of_sample_floor_schedule": schedule_floor["sample_floor_schedule_s"] / split["sample_s"]}
               if schedule == "refill" else {}),
            "rows": N, "max_new": cfg.max_new, "mean_completion": float(comp_lens.mean()),
            "max_completion": int(comp_lens.max()), "prompt_len_mean": float(prompt_lens.mean()),
            "sample_rows": args.sample_rows, "sampler_groups": len(groups) if schedule == "groups" else None,
            "sampler_batch": batch[schedule], "refill_rows": args.refill_rows if schedule == "refill" else None,
            # prompts the sampler prefills (refill: each once, into its prompt pool), against N rows
            "prefilled_prompts": len(prefilled) if prefilled is not None else N,
            **({"prompt_pool": pool // Pp, "slot_positions": Sg, "prompt_positions": Pp} if schedule == "refill" else {}),
            "prefill_chunk": args.prefill_chunk, "update": args.update, "microbatch": cfg.microbatch,
            "microbatch_tokens": cfg.microbatch_tokens, "learner_only": schedule == "none",
            "remat": cfg.remat, "floor": floor, "sampler_form": cfg.sampler_form, "lend_weights": cfg.lend_weights,
            "length_multiple": cfg.length_multiple, "update_layout": cfg.update_layout,
            # real tokens the learner's Linears see: per row, or each group's prompt once (shared_prompt)
            "learner_tokens": int((np.repeat(prompt_lens, cfg.group_size) + comp_lens).sum()
                                  if shared is None else prompt_lens.sum() + comp_lens.sum()),
            # the floor too (exact sampler, per-row learner): the factored sampler and the
            # shared-prompt layout do less work than it assumes
            "floor_exact_form_s": floor_exact["floor_s"], "steps": recs, "peak_tflops": args.peak_tflops,
            "hbm_tbps": args.hbm_tbps, "mesh": None if mesh is None else f"data={n_dev}", "n_devices": n_dev,
            # the allocator's cap (e.g. 0.54 on a 141 GB H200 gives an 80 GB H100's ~76 GiB)
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "decode_kernel": requested()})  # JAXHACK_DECODE_KERNEL: the sampler's kernels (models/fused_decode.py)
        out.append(rec)
    return out


def write_sample_profile(args, regime: str, schedule: str, layers: int, run) -> dict:
    """One sampler call under the profiler (`jaxhack.profiling`): each kernel's device time per call and per
    decode step, written as JSON to args.profile_sample; the largest printed."""
    from jaxhack.profiling import decode_roles, profile

    res = {}

    def call():
        res["sample"] = run()
        return res["sample"]

    summary = profile(call, 1)
    steps = res["sample"].decode_steps
    for row in summary["kernels"]:
        row["us_per_decode_step"] = 1e3 * row["ms_per_step"] / steps
    summary.update(regime=regime, sampler=schedule, decode_steps=steps, sample_rows=args.sample_rows,
                   max_new=args.max_new, sampler_form=args.sampler_form, roles=decode_roles(summary, steps, layers))
    Path(args.profile_sample).write_text(json.dumps(summary, indent=1))
    log(f"profile of one {regime} {schedule} sampler call: kernels sum to {summary['total_ms_per_step']:.0f} ms over "
        f"{steps} decode steps ({1e3 * summary['total_ms_per_step'] / steps:.0f} us per step) -> {args.profile_sample}")
    for cat, ms in summary["by_category_ms"].items():
        log(f"  {cat:<28} {1e3 * ms / steps:8.1f} us per decode step")
    for role, r in summary["roles"].items():
        log(f"  {role:<28} {r['us_per_decode_step']:8.1f} us per decode step, {r['launches_per_decode_step']:6.1f} launches")
    for row in summary["kernels"][:15]:
        log(f"  {row['us_per_decode_step']:8.1f} us {row['calls_per_step'] / steps:6.1f}x per step  "
            f"[{row['category']}] {row['kernel'][:70]}")
    return summary


def add_scaling(rec: dict, one: dict | None) -> None:
    """scaling_efficiency = step_s(1) / (N step_s(N)) against the 1-device record `one` of the same call
    (None without one); device_scaling_efficiency: the same for sample + ref + update (no grading)."""
    rec["scaling_efficiency"] = rec["device_scaling_efficiency"] = None
    if one is None or "step_s" not in rec:
        return
    n = rec["n_devices"]
    device = lambda r: r["sample_s"] + r["ref_s"] + r["update_s"]  # noqa: E731
    rec["scaling_efficiency"] = one["step_s"] / (n * rec["step_s"])
    rec["device_scaling_efficiency"] = device(one) / (n * device(rec))
    rec["speedup"] = one["step_s"] / rec["step_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=("realistic", "worst", "both"), default="realistic")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 6 rows x 24 tokens: CPU, for tests")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 2, worst 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (they compile)")
    ap.add_argument("--prompt-len", type=int, default=None, help="mean prompt tokens (default 400; tiny 12)")
    ap.add_argument("--sample-rows", type=int, default=None,
                    help="sampler decode slots (refill) or rows per group (groups); default: the full preset's "
                         "sample_rows (152 refill slots, KV cache ~46 GB; groups: 2 of 129 rows, 136 padded); tiny 4")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--sampler", choices=("refill", "groups", "both"), default=None,
                    help="sampler schedule: refill (slots refilled as rows finish, each device its own slots "
                         "on a mesh: the trainer's for the full preset), groups (row groups, each until its "
                         "longest row: the old path), both (default: refill)")
    ap.add_argument("--refill-rows", type=int, default=8, help="refill: rows prefilled per refill")
    ap.add_argument("--max-new", type=int, default=None, help="override max_new (preset 1536; tiny 24); the "
                    "realistic lengths scale with it (Gamma scale 125 max_new / 1536)")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="override pp (preset 43; tiny 3)")
    ap.add_argument("--sample-only", action="store_true",
                    help="time the sampler alone (no grade / reference / update, no warm-up step)")
    ap.add_argument("--update", choices=("bucketed", "fixed"), default="bucketed",
                    help="bucketed: length-sorted micro-batches cut to their length; fixed: every row padded "
                         "to prompt + max_new (the trainer before length bucketing)")
    ap.add_argument("--length-multiple", type=int, default=None,
                    help="micro-batch lengths round up to this (default: the preset's length_multiple)")
    ap.add_argument("--sampler-form", default=None,
                    help="default: the full preset's (dense). exact: x W + the adapter, as trained; factored: SVD-adapted Linears from "
                         "their factors (fewer bytes per decode step; rl/sampler.generate); dense: x W + x dW with "
                         "the adapter's change dW built once per sampler call")
    ap.add_argument("--update-layout", default=None,
                    help="shared_prompt (the full preset's default on one device): the reference pass and the update "
                         "run each group's prompt once (grads/shared_prompt.py; fewer tokens, the same loss; floor_s "
                         "counts what it computes, floor_exact_form_s the issue's per-row floor); rows: per row "
                         "(the default on a mesh)")
    ap.add_argument("--keep-weights", action="store_true",
                    help="the sampler keeps the stacked weights beside its decode layout (two copies, and the "
                         "preset's 96 slots unless --sample-rows is given; the default lends them: one copy, rl/lend.py)")
    ap.add_argument("--grade", choices=("canonical", "none"), default="canonical")
    ap.add_argument("--remat", default=None, help="override the preset's remat policy (linear) for the update")
    ap.add_argument("--microbatch", type=int, default=None, help="override the preset's rows per micro-batch (32)")
    ap.add_argument("--microbatch-tokens", type=int, default=None,
                    help="token budget of a micro-batch: at T positions at most this // T rows (TrainConfig)")
    ap.add_argument("--learner-only", action="store_true",
                    help="time the reference pass and the update alone: no sampler, no grading; completions of "
                         "the regime's lengths with random tokens (sampler 'none' in the record)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM 989)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth (H100 SXM 3.35, H200 4.8)")
    ap.add_argument("--mesh", default=None, help="one mesh, e.g. data=4 (rows sharded over 4 devices)")
    ap.add_argument("--meshes", nargs="+", default=None, metavar="MESH",
                    help="several meshes in one call, e.g. data=1 data=2 data=4: one JSON line each, with "
                         "scaling_efficiency against the data=1 line")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="CPU only: fake this many host devices (XLA_FLAGS, set before jax loads)")
    ap.add_argument("--profile-sample", default=None, metavar="JSON",
                    help="with --sample-only: one more sampler call under the profiler; each kernel's time per "
                         "decode step written here (one regime, one device)")
    ap.add_argument("--out", default=None, help="append JSON lines here (default docs/results/bench_phase3.jsonl; "
                                                "tiny: not written unless given)")
    args = ap.parse_args(argv)
    # flags that bypass TrainConfig (max_new, prompts_per_step, sampler_form ... are checked by it: train_config)
    try:
        checks.at_least(args, ("sample_rows", "refill_rows", "prefill_chunk", "steps", "prompt_len", "cpu_devices"))
        checks.at_least(args, ("warmup",), minimum=0)
    except UserError as e:
        return fail(e)
    if args.profile_sample and (not args.sample_only or args.regime == "both" or args.meshes or args.sampler == "both"):
        print("error: --profile-sample needs --sample-only, one --regime, one --sampler and no --meshes", file=sys.stderr)
        return 2
    if args.profile_sample and not Path(args.profile_sample).resolve().parent.is_dir():
        print(f"error: --profile-sample {args.profile_sample}: no such directory", file=sys.stderr)
        return 2
    args.sampler = args.sampler or "refill"
    if args.tiny:
        args.prompt_len = args.prompt_len or 12
        args.sample_rows = args.sample_rows or 4
        args.length_multiple = min(args.length_multiple or 16, 16)
        args.prefill_chunk = min(args.prefill_chunk, 16)
    args.prompt_len = args.prompt_len or 400
    out = args.out or (None if args.tiny else str(Path(__file__).resolve().parents[1] / "docs/results/bench_phase3.jsonl"))
    regimes = ("realistic", "worst") if args.regime == "both" else (args.regime,)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    from jaxhack.models.fused_decode import requested
    try:
        requested()  # a bad JAXHACK_DECODE_KERNEL: one line here, not a traceback per regime after the weights
    except UserError as e:
        return fail(e)
    specs = args.meshes or ([args.mesh] if args.mesh else [None])
    from jaxhack.parallel.mesh import make_mesh
    try:
        meshes = [make_mesh(spec) for spec in specs]
    except ValueError as err:
        print(f"error: --meshes: {err}", file=sys.stderr)
        return 2
    from jaxhack.commands.train import config_error_line
    from jaxhack.rl.config import ConfigError
    try:
        cfg = train_config(args)
    except ConfigError as err:
        print(f"error: {config_error_line(err)}", file=sys.stderr)
        return 2
    args.sample_rows = args.sample_rows or cfg.sample_rows  # the preset's (152)
    log("building random Qwen3-4B-shaped weights, SVD adapter, v_hack ..." if not args.tiny else "building tiny model ...")
    built = build(args, cfg)
    if args.meshes or args.mesh:  # host copies: each mesh places its own replicas (no extra copy on device 0)
        import jax
        cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack = built
        params, trainable, frozen, opt_state = jax.tree.map(np.asarray, (params, trainable, frozen, opt_state))
        built = cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack
        del cfg, config, params, trainable, frozen, optimizer, opt_state, hyper, v_hack
    one_device: dict = {}  # regime -> the data=1 record of this call
    for regime, (spec, mesh) in [(r, m) for r in regimes for m in zip(specs, meshes)]:
        steps = args.steps if args.steps is not None else (1 if regime == "worst" else 2)
        run_args = argparse.Namespace(**{**vars(args), "steps": steps})
        try:
            recs = run_regime(run_args, regime, built, mesh)
        except Exception as e:  # noqa: BLE001 - an OOM in one regime is a result, not a crash
            import traceback
            traceback.print_exc()
            recs = [{"preset": "full" if not args.tiny else "full-tiny", "regime": regime, "sampler": args.sampler,
                     "mesh": spec, "error": f"{type(e).__name__}: {str(e)[:800]}"}]
        for rec in recs:
            if args.meshes:
                add_scaling(rec, one_device.get((regime, rec.get("sampler"))))
                if rec.get("n_devices") == 1 and "step_s" in rec:
                    one_device[(regime, rec.get("sampler"))] = rec
            line = json.dumps(rec)
            print(line, flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(line + "\n")
        for rec in recs:
            peak = (rec.get("peak_bytes") or 0) / 1e9
            where = rec.get("mesh") or "one device"
            if "learner_floor_s" in rec:
                print(f"{regime} [learner only, {rec['update_layout']} layout, remat {rec['remat']}, microbatch "
                      f"{rec['microbatch']}, tokens {rec['microbatch_tokens']}]: ref {rec['ref_s']:.1f} s, update {rec['update_s']:.1f} s; "
                      f"learner floor {rec['learner_floor_s']:.1f} s = {100 * rec['fraction_of_learner_floor']:.0f}% "
                      f"reached; process peak {peak:.1f} GB", flush=True)
            elif "step_s" in rec:
                print(f"{regime} [{rec['sampler']}, {where}]: step {rec['step_s']:.1f} s (sample {rec['sample_s']:.1f}, "
                      f"grade {rec['grade_s']:.1f}, ref {rec['ref_s']:.1f}, update {rec['update_s']:.1f}); floor "
                      f"{rec['floor_s']:.1f} s = {100 * rec['fraction_of_floor']:.0f}% reached; "
                      f"{rec['decode_steps']} decode steps"
                      + (f" (sampler at {100 * rec['fraction_of_sample_floor_schedule']:.0f}% of its floor at those "
                         f"steps, {rec['sample_floor_schedule_s']:.1f} s)" if "sample_floor_schedule_s" in rec else "")
                      + f"; process peak {peak:.1f} GB measured, "
                      f"{rec['memory_estimate_gb']['peak_gb']:.1f} GB estimated"
                      + (f"; scaling efficiency {rec['scaling_efficiency']:.2f} (device part "
                         f"{rec['device_scaling_efficiency']:.2f})" if rec.get("scaling_efficiency") else ""),
                      flush=True)
            elif "sample_s" in rec:
                print(f"{regime} [{rec['sampler']}, {where}]: sample {rec['sample_s']:.2f} s, {rec['decode_steps']} "
                      f"decode steps, sampler floor {rec['sample_floor_slots_s']:.1f} s at {args.sample_rows} slots "
                      f"({rec['sample_floor_s']:.1f} s all rows at once); process peak {peak:.1f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
