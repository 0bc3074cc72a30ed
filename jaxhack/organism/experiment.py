"""`jaxhack organism run`: the whole experiment on the organism (docs/organism.md).

1. build (or reuse) the organism (build.py): problems, phrase tokenizer, base and teacher policies;
2. pools: teacher and base rollouts sampled on the hinted training prompts, graded by the sandboxed
   grader (jaxhack.env.pools.build_pool + jaxhack.rl.sampler.sampling_source);
3. v_hack from (hack, honest) pairs in the organism's own completion style, in the SVD-delta basis
   and in each seed's LoRA basis, with label-shuffled and random controls (cosines to v_hack);
4. Phase 1 (NLL distillation probe) and Phase 2 (mixed-replay probe, arms vanilla / projected /
   lora_projected) and their report + verdict (jaxhack.probes.analyze.analyze_runs);
5. Phase 3 GRPO (jaxhack.rl.trainer.train) with the run_tests hint for each arm and seed;
6. report: organism_report.json / .md, plots/phase3_hack_rate.png (hack and gt-pass rate per step,
   mean and spread over seeds), the H1 test (hack-rate drop of each projected arm vs vanilla over
   the last quarter of the steps, paired by seed, with its SEM, next to the gt-pass difference).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxhack.organism.build import SIZES as BUILD_SIZES, BuildSettings, build_organism
from jaxhack.organism.rundir import claim_experiment_dir
from jaxhack.organism.report import control_cosines, curves, h1_test, plot_curves, report_markdown, verdict


@dataclasses.dataclass(frozen=True)
class RunSettings:
    build: BuildSettings = BuildSettings()
    arms: tuple[str, ...] = ("vanilla", "projected", "random_v")
    seeds: tuple[int, ...] = (0,)
    steps: int = 30
    prompts_per_step: int = 4
    group_size: int = 8
    lr: float = 1e-1
    lora_lr: float = 3e-3
    beta: float = 1e-3
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1          # cosine decay to lr * min_lr_ratio (1.0: constant after warmup)
    max_new: int = 40
    lora_rank: int = 8
    k: int = 1
    vhack_pairs: int = 24
    pool_steps: int = 8
    pool_per_step: int = 16
    phase_steps: int = 4
    per_pool: int = 4
    grade_workers: int | None = None
    ckpt_every: int = 0                # Phase 3 checkpoints (a killed call resumes from the newest)
    temperature: float = 1.0           # Phase 3 rollout sampling temperature
    jobs: int = 1                      # Phase 3 runs trained at once, each in its own process (run_phase3)


SIZES = {
    "cpu": RunSettings(grade_workers=3, steps=40, prompts_per_step=8, lr=3e-2, beta=0.0, min_lr_ratio=1.0),
    # 16 x 8 rollouts x 100 steps (docs/results/organism_gpu.json: build 78 s + run 318 s on one GPU of 16 cores)
    "gpu": RunSettings(build=BUILD_SIZES["gpu"], arms=("vanilla", "projected", "lora_projected", "random_v"),
                       seeds=(0, 1, 2), steps=100, prompts_per_step=16, group_size=8, lr=3e-2, beta=0.0,
                       min_lr_ratio=1.0, vhack_pairs=128,
                       lora_lr=2e-3, pool_steps=16, pool_per_step=64, phase_steps=20, per_pool=8,
                       ckpt_every=10, jobs=4),
    # session 5's experiment (docs/results/organism_gpu_16x16_session5.json): 16 x 16 rollouts x 150 steps
    "gpu-16x16": RunSettings(build=BUILD_SIZES["gpu"], arms=("vanilla", "projected", "lora_projected", "random_v"),
                             seeds=(0, 1, 2), steps=150, prompts_per_step=16, group_size=16, lr=3e-2, beta=0.0,
                             min_lr_ratio=1.0, vhack_pairs=128, lora_lr=2e-3, pool_steps=16, pool_per_step=64,
                             phase_steps=20, per_pool=8, ckpt_every=10, jobs=4),
    "test": RunSettings(build=dataclasses.replace(BUILD_SIZES["test"], hack_share=0.3), arms=("vanilla", "projected"),
                        steps=12, prompts_per_step=4, group_size=8, lr=3e-2, beta=0.0, min_lr_ratio=1.0,
                        vhack_pairs=8, pool_steps=2, pool_per_step=8,
                        phase_steps=2, per_pool=2),
}



def shrink(s: RunSettings) -> RunSettings:
    """The same size's code path (model shape, arms, seeds) at tiny scale: a smoke check on a CPU."""
    b = dataclasses.replace(s.build, n_problems=24, n_eval=6, sft_examples=200, sft_steps=3, batch_size=4,
                            teacher_steps=2, measure_samples=1)
    return dataclasses.replace(s, build=b, steps=2, prompts_per_step=2, group_size=4, vhack_pairs=4,
                               pool_steps=1, pool_per_step=4, phase_steps=1, per_pool=1)


def _pool_key(s: RunSettings, d: Path) -> str:
    return f"{d.name}/{s.pool_steps}/{s.pool_per_step}/{s.max_new}"


def load_organism(d: Path, role: str):
    """(params, config, tokenizer) of the built base or teacher."""
    from jaxhack.checkpoint import load_checkpoint
    from jaxhack.organism.tokenizer import PhraseTokenizer

    params, config, _ = load_checkpoint(d / role)
    return params, config, PhraseTokenizer.load(d / "tokenizer.json")


def lora_basis(params, config, seed: int, rank: int, alpha: float = 16.0):
    """The LoRA adapter of basis seed `seed` (the one factory's rule, `models.load.make_adapter`); the
    v_hack extracted in it records lora_seed, so the Phase 3 trainer rebuilds the same basis."""
    from jaxhack.models.load import make_adapter

    return make_adapter("lora", params, config, ckpt="-", lora_rank=rank, lora_alpha=alpha, lora_seed=seed)


def phase3_config(s: RunSettings, d: Path, arm: str, seed: int, run_dir: Path, v_hack: Path | None):
    """The Phase 3 TrainConfig of one arm and seed on the organism in `d`: the `organism` preset
    (jaxhack.rl.config.PRESETS: the policy's own hinted rollouts, held-out eval at temperature 1) with
    this size's GRPO settings, the organism's checkpoint, train/eval problems and v_hack."""
    from jaxhack.rl.config import make_config

    return make_config("organism", ckpt=str((d / "base").resolve()), problems=str(d / "problems_train.jsonl"),
                       eval_problems=str(d / "problems_eval.jsonl"), arm=arm,
                       v_hack=str(v_hack) if v_hack is not None else None, k=s.k, seed=seed, steps=s.steps,
                       group_size=s.group_size, prompts_per_step=s.prompts_per_step,
                       max_new=s.max_new, beta=s.beta, temperature=s.temperature,
                       lr=s.lora_lr if arm == "lora_projected" else s.lr,
                       warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio,
                       lora_rank=s.lora_rank, eval_every=s.steps, ckpt_every=s.ckpt_every,
                       grade_workers=s.grade_workers, run_dir=str(run_dir))


def _train_one(cfg, organism_dir: str) -> None:
    """One Phase 3 run (resumed when its run dir holds a checkpoint of this config): the task of a
    `run_phase3` worker process."""
    from jaxhack.rl.trainer import train

    train(cfg, model=load_organism(Path(organism_dir), "base"), progress=False, resume=True)


def _worker_init(devices, mem_fraction: float | None) -> None:
    """A `run_phase3` worker's first act, before it imports jax's backend: take one GPU of the host
    (a multi-GPU host: each worker its own card), or share the one there is, and cap this process at
    `mem_fraction` of the card (see `worker_mem_fraction`)."""
    import os

    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    if mem_fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.4f}"


def worker_mem_fraction(jobs: int, n_gpus: int, budget: float | None = None) -> float | None:
    """The share of its card each of `jobs` Phase 3 workers may take: the workers on one card share
    80% of `budget` (this process's XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.9 of the card) and this
    process, which built the pools, v_hack and Phase 1/2 and keeps its memory pool, the rest. None off
    GPU. Without a cap a worker's allocator (preallocation off) grows until another worker's
    allocation fails (an 80 GB H100 with 4 workers did, session 5)."""
    import math
    import os

    if n_gpus == 0:
        return None
    if budget is None:
        budget = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9"))
    return 0.8 * budget / math.ceil(jobs / n_gpus)


def _gpu_ids() -> list[str]:
    """The CUDA ids this process may use (its CUDA_VISIBLE_DEVICES, else 0..n-1); [] off GPU."""
    import os

    if jax.devices()[0].platform != "gpu":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x for x in visible.split(",") if x.strip()] if visible else []
    return ids or [str(i) for i in range(len(jax.local_devices()))]


class Phase3RunsFailed(RuntimeError):
    """Some `run_phase3` workers' runs raised (each said when it happened, its traceback on stderr)."""


def run_phase3(runs: list[tuple[str, int, object]], d: Path, jobs: int = 1, say=print) -> None:
    """Train every (arm, seed, TrainConfig) of `runs` on the organism in `d`.

    jobs 1: one after another in this process. jobs > 1: that many spawned worker processes, each
    training whole runs (the organism is small: one run leaves a GPU and the host's grading cores
    mostly idle); on a host with several GPUs the workers take them in turn. A run's result does not
    depend on which process trains it (tests/test_organism_rise.py). On a GPU, the caller must have
    turned jax's memory preallocation off before its first device use (`organism_main` does), or the
    first process takes 75% of the card."""
    from jaxhack.rl.trainer import train

    finished = []
    t0 = time.time()

    def done(arm, seed, cfg):
        m = curves({(arm, seed): Path(cfg.run_dir)})[arm][str(seed)]
        finished.append((arm, seed))
        say(f"[phase3] {len(finished)}/{len(runs)} runs done ({time.time() - t0:.0f} s): {arm} seed {seed}: "
            f"hack {m['hack_rate'][0]:.2f} -> {np.mean(m['hack_rate'][-5:]):.2f}, "
            f"gt_pass {m['gt_pass_rate'][0]:.2f} -> {np.mean(m['gt_pass_rate'][-5:]):.2f}")

    if jobs <= 1:
        base = load_organism(d, "base")
        for arm, seed, cfg in runs:
            train(cfg, model=base, progress=False, resume=True)
            done(arm, seed, cfg)
        return
    import concurrent.futures
    import multiprocessing
    import sys
    import traceback

    ctx = multiprocessing.get_context("spawn")  # a fresh jax per worker (never fork a live backend)
    gpus, devices = _gpu_ids(), None
    if len(gpus) > 1:
        devices = ctx.Queue()
        for i in range(jobs):
            devices.put(gpus[i % len(gpus)])
    mem_fraction = worker_mem_fraction(jobs, len(gpus))
    if mem_fraction is not None:
        say(f"[phase3] {jobs} worker processes on {len(gpus)} GPU(s), each capped at {mem_fraction:.3f} of its card")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(devices, mem_fraction)) as pool:
        futures = {pool.submit(_train_one, cfg, str(d)): (arm, seed, cfg) for arm, seed, cfg in runs}
        failed = []
        for f in concurrent.futures.as_completed(futures):
            arm, seed, cfg = futures[f]
            err = f.exception()
            if err is None:
                done(arm, seed, cfg)
                continue
            # said at once (the other runs go on), the worker's traceback on stderr, all failures at the end
            failed.append(f"{arm} seed {seed}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
            say(f"[phase3] {failed[-1]} (FAILED)")
            print("".join(traceback.format_exception(err)), file=sys.stderr)
    if failed:
        raise Phase3RunsFailed(f"{len(failed)} of {len(runs)} Phase 3 run(s) failed (the others finished; the same "
                           f"command retries them, resuming from their checkpoints): " + "; ".join(failed))


def _without_empty(pool):
    """The pool without its empty completions (an immediate EOS, which the replay cannot score; seen
    from the barely trained `--tiny` organisms), steps left empty dropped."""
    from jaxhack.probes.phase2 import ReplayPool

    steps = [[r for r in recs if r["completion"]] for recs in pool.steps]
    steps = [recs for recs in steps if recs]
    if not steps:
        raise ValueError(f"pool {pool.name}: every completion is empty")
    return ReplayPool(name=pool.name, steps=steps)


def _resumable(rd: Path, cfg) -> bool:
    """Whether the Phase 3 run dir `rd` holds a run of exactly this config (finished: reused; killed:
    resumed from its last checkpoint by the trainer), so a run split over several calls (the GPU
    size on a 10-minute device call) redoes nothing."""
    from jaxhack.rl.run import RUN_FILE, check_resume_config

    if not (rd / RUN_FILE).is_file():
        return False
    try:
        check_resume_config(json.loads((rd / RUN_FILE).read_text())["config"], cfg.to_dict(), rd / RUN_FILE)
    except (ValueError, KeyError):
        return False
    return True


def run_experiment(out: str | Path, settings: RunSettings = RunSettings(), progress: bool = True,
                   organism_dir: str | Path | None = None, force: bool = False) -> dict:
    """The whole experiment into OUT (docs/organism.md): build (reused), pools, v_hack with controls,
    Phase 1/2, Phase 3 for every arm and seed, the report; returns the report dict. OUT resumes an
    experiment of the same settings and refuses one of other settings unless `force` (`rundir`)."""
    from jaxhack.env.pools import build_pool
    from jaxhack.env.problems import load_problems
    from jaxhack.models.adapters import init_svd_adapter
    from jaxhack.organism.corpus import hack_clean_pairs
    from jaxhack.probes.analyze import analyze_runs, format_summary, json_safe
    from jaxhack.probes.phase1 import format_split, split_pure_vs_correct
    from jaxhack.probes.phase2 import ARMS as PHASE2_ARMS, ReplaySettings, load_replay_pool, run_replay
    from jaxhack.projection.pairs import shuffle_labels
    from jaxhack.projection.v_hack import extract_v_hack, random_v_hack, save_v_hack
    from jaxhack.rl.run import DONE_FILE, EVAL_FILE
    from jaxhack.rl.sampler import sampling_source

    t0 = time.time()
    s = settings
    out = Path(out)
    claim_experiment_dir(out, s, force=force)  # same settings resume; others are refused (or, force, replaced)
    say = print if progress else (lambda *a, **k: None)
    walls: dict[str, float] = {}
    d = build_organism(organism_dir or out / "organism", s.build, progress=progress)
    walls["build"] = time.time() - t0
    build_info = json.loads((d / "build.json").read_text())
    base = load_organism(d, "base")
    teacher = load_organism(d, "teacher")
    params, config, tok = base
    train_path = d / "problems_train.jsonl"
    train_problems = load_problems(train_path)
    train_records = [json.loads(x) for x in train_path.read_text().splitlines()]

    # ---- pools (sampled, graded, hinted prompts)
    t1 = time.time()
    pools = {}
    for kind, model in (("teacher", teacher), ("base", base)):
        pool_json = out / f"{kind}_pool" / "pool.json"
        if pool_json.is_file() and json.loads(pool_json.read_text()).get("complete") and \
                json.loads(pool_json.read_text()).get("organism_run") == _pool_key(s, d):
            pools[kind] = load_replay_pool(out / f"{kind}_pool")  # reused: same organism and pool settings
            say(f"[pools] {kind}: reused {out / f'{kind}_pool'}")
            continue
        src = sampling_source(model[0], model[1], tok, max_new_tokens=s.max_new, seed=s.build.seed + 11)
        meta = build_pool(train_problems, out / f"{kind}_pool", mode="run_tests", source=src,
                          steps=s.pool_steps, per_step=s.pool_per_step, with_hint=True, seed=s.build.seed,
                          pool_name=f"{kind}_pool", tokenizer=tok, progress=False,
                          max_workers=s.grade_workers, extra_meta={"kind": kind, "source": f"organism {kind}",
                                      "organism_run": _pool_key(s, d)})
        pools[kind] = load_replay_pool(out / f"{kind}_pool")
        sm = meta["summary"]
        say(f"[pools] {kind}: n={sm['n']} hack_rate={sm['hack_rate']:.3f} gt_pass_rate={sm['gt_pass_rate']:.3f}")
    pool_summary = {k: json.loads((out / f"{k}_pool" / "pool.json").read_text())["summary"] for k in pools}
    pools = {k: _without_empty(p) for k, p in pools.items()}
    walls["pools"] = time.time() - t1

    # ---- v_hack in both bases, with controls
    t1 = time.time()
    pairs = hack_clean_pairs(train_records[:s.vhack_pairs], seed=s.build.seed + 5)
    svd = init_svd_adapter(params, config, cache_dir=d / "base" / "svd_cache", progress=False)
    ex = dict(k=s.k, batch_size=8, progress=False)
    v_svd, info_svd = extract_v_hack(pairs, tok, *svd, params, config, **ex)
    save_v_hack(out / "v_hack_svd", v_svd, meta=json_safe(info_svd), force=True)
    v_shuf, _ = extract_v_hack(shuffle_labels(pairs, seed=1), tok, *svd, params, config, **ex)
    dims = {n: (int(np.asarray(v).shape[0]), int(np.asarray(v).shape[2])) for n, v in v_svd["V"].items()}
    v_rand = random_v_hack(dims, seed=0, k=s.k)
    vhack_report = {"svd": {"info": json_safe(info_svd), "cos_to_shuffled": control_cosines(v_svd, v_shuf),
                            "cos_to_random": control_cosines(v_svd, v_rand)}}
    lora = {}
    for seed in s.seeds:
        lora[seed] = lora_basis(params, config, seed, s.lora_rank)
        v_l, info_l = extract_v_hack(pairs, tok, *lora[seed], params, config, **ex)
        save_v_hack(out / f"v_hack_lora_seed{seed}", v_l, force=True,
                    meta=json_safe({**info_l, "adapter": "lora", "lora_seed": seed, "lora_rank": s.lora_rank}))
        if seed == s.seeds[0]:
            v_lshuf, _ = extract_v_hack(shuffle_labels(pairs, seed=1), tok, *lora[seed], params, config, **ex)
            vhack_report["lora"] = {"info": json_safe(info_l), "cos_to_shuffled": control_cosines(v_l, v_lshuf)}
            v_lora0 = v_l
    walls["v_hack"] = time.time() - t1
    say(f"[v_hack] svd and lora bases from {len(pairs)} organism pairs; signed cos to the label-shuffled "
        f"control: svd {vhack_report['svd']['cos_to_shuffled']['mean_cos']:+.3f}, lora "
        f"{vhack_report['lora']['cos_to_shuffled']['mean_cos']:+.3f}; |cos| to random: "
        f"{vhack_report['svd']['cos_to_random']['mean_abs_cos']:.3f}")

    # ---- Phase 1 and Phase 2
    t1 = time.time()
    rs = dict(max_completion_tokens=s.max_new, pad_multiple=16, seed=s.build.seed)
    p1 = run_replay([pools["teacher"]], params, config, tok, *svd, v_svd,
                    ReplaySettings(arm="projected", loss_mode="nll", steps=s.phase_steps,
                                   per_pool=2 * s.per_pool, **rs), out / "phase1",
                    run_info={"model": "organism base", "phase": 1}, progress=False)
    split = split_pure_vs_correct(p1)
    (out / "phase1" / "phase1_split.json").write_text(json.dumps(json_safe(split), indent=2))
    say(format_split(split))
    adapters = {"svd": (svd, v_svd), "lora": (lora[s.seeds[0]], v_lora0)}
    p2_dirs = []
    for arm, (kind, _) in PHASE2_ARMS.items():
        (tr, fr), v = adapters[kind]
        run_replay([pools["teacher"], pools["base"]], params, config, tok, tr, fr, v,
                   ReplaySettings(arm=arm, loss_mode="grpo", steps=s.phase_steps, per_pool=s.per_pool, **rs),
                   out / "phase2" / arm, run_info={"model": "organism base", "phase": 2}, progress=False)
        p2_dirs.append(out / "phase2" / arm)
    p2 = analyze_runs(p2_dirs, report_path=out / "phase2_report.md", plots_dir=out / "plots")
    say(format_summary(p2))
    walls["phase1_2"] = time.time() - t1

    # ---- Phase 3
    t1 = time.time()
    run_dirs, runs = {}, []
    for seed in s.seeds:
        for arm in s.arms:
            rd = out / "phase3" / arm / f"seed_{seed}"
            v = {"vanilla": out / "v_hack_svd", "projected": out / "v_hack_svd",
                 "lora_projected": out / f"v_hack_lora_seed{seed}"}.get(arm)
            cfg = phase3_config(s, d, arm, seed, rd, v)
            if not _resumable(rd, cfg):
                import shutil
                shutil.rmtree(rd, ignore_errors=True)
            elif (rd / DONE_FILE).is_file():
                say(f"[phase3] {arm} seed {seed}: reused the finished run in {rd}")
            run_dirs[(arm, seed)] = rd
            runs.append((arm, seed, cfg))
    from jaxhack.rl.trainer import device_peak_bytes
    memory = {"parent_peak_bytes": device_peak_bytes()}
    run_phase3(runs, d, jobs=s.jobs, say=say)
    walls["phase3"] = time.time() - t1
    done = {f"{arm}/seed_{seed}": json.loads((rd / DONE_FILE).read_text()) for (arm, seed), rd in run_dirs.items()}
    memory["run_process_peak_bytes"] = {k: v.get("device_peak_bytes") for k, v in done.items()}
    grade_cache = {k: v.get("grade_cache") for k, v in done.items()}

    cur = curves(run_dirs)
    h1 = h1_test(cur, s.steps, base_hack_rate=build_info["step0"]["base/hint/train"]["hack_rate"])
    plot_curves(cur, out / "plots" / "phase3_hack_rate.png")
    from jaxhack.io import read_jsonl
    evals = {f"{a}/seed_{sd}": read_jsonl(rd / EVAL_FILE) for (a, sd), rd in run_dirs.items()}
    walls["total"] = time.time() - t0
    report = {
        "settings": json_safe(dataclasses.asdict(s)), "organism": {"dir": str(d), "hash": d.name,
            "n_params": build_info["n_params"], "step0": {k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                                                          for k, v in build_info["step0"].items()},
            "build_wall_s": build_info["wall_s"]},
        "device": {"platform": jax.devices()[0].platform, "devices": [str(x) for x in jax.devices()],
                   "cpu_count": __import__("os").cpu_count()},
        "wall_s": walls, "pools": pool_summary, "v_hack": vhack_report,
        "phase1": json_safe(split), "phase2": {"verdict": p2.get("verdict"), "verification": p2.get("verification")},
        "phase3": {arm: {seed: {"hack_rate": v["hack_rate"], "gt_pass_rate": v["gt_pass_rate"],
                                "mean_step_time_s": v["time_s"]}
                         for seed, v in by.items()} for arm, by in cur.items()},
        "phase3_jobs": s.jobs,
        "device_memory": memory,
        "phase3_grade_cache": grade_cache,   # per run: verdicts kept, sandbox runs saved (in its last process)
        "phase3_eval_final": {k: (v[-1] if v else None) for k, v in evals.items()},
        "h1": h1, "verdict": verdict(h1),
    }
    (out / "organism_report.json").write_text(json.dumps(json_safe(report), indent=2, default=str))
    (out / "organism_report.md").write_text(report_markdown(report))
    print(f"[report] {out / 'organism_report.md'}  ({walls['total']:.0f} s)\n[verdict] {report['verdict']}")
    return report


def organism_main(args) -> int:
    """`jaxhack organism build|run` (see jaxhack/cli.py); the flags are checked by
    jaxhack/commands/organism.py (seeds and arms as tuples, counts >= 1)."""
    import sys

    s = SIZES[args.size]
    if args.seeds is not None:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    if args.arms is not None:
        s = dataclasses.replace(s, arms=tuple(args.arms))
    if args.tiny:  # first, so that the flags below apply to the tiny settings too
        s = shrink(s)
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps)
    if args.grade_workers is not None:
        s = dataclasses.replace(s, grade_workers=args.grade_workers)
    if args.jobs is not None:
        s = dataclasses.replace(s, jobs=args.jobs)
    import os
    if s.jobs > 1:  # the Phase 3 workers share the card: no process may take 75% of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # one persistent compilation cache for this experiment: each Phase 3 run (same shapes) compiles once
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(args.out).resolve() / "jax_cache"))
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    if args.size.startswith("gpu") and not args.tiny and jax.default_backend() != "gpu":
        print(f"note: --size {args.size} is sized for one GPU (build + run about 7 minutes there); on "
              f"{jax.default_backend()} it takes hours. --size cpu is the CPU experiment, --tiny checks this "
              f"size's code path in minutes.", file=sys.stderr)
    out = Path(args.out)
    if args.action == "build":
        build_organism(out / "organism", s.build, progress=not args.quiet)
    else:
        try:  # an ExperimentDirError is a UserError: one line, exit 2 (commands.guarded)
            run_experiment(out, s, progress=not args.quiet, force=args.force)
        except Phase3RunsFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0
