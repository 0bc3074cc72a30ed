"""The main job on the embedded default: everything from pools to the go/no-go verdict, offline.

    jaxhack demo --out runs/demo        (or: python -m jaxhack.cli demo)

1. model: a tiny random Qwen3 (config.TINY) and the byte tokenizer, built locally;
2. problems: the bundled synthetic set; pools: a teacher pool (hack templates for the loophole mode,
   prompts with the hint) and a base pool (clean / wrong / unformatted templates, no hint), both
   graded by the real sandboxed grader;
3. v_hack: contrastive (hack, clean) template pairs (wordings drawn with another seed than the pools'),
   per-sample NLL gradients, per-module SVD, in the SVD-delta basis and in the LoRA basis;
4. Phase 1: NLL distillation probe over the teacher pool (pure-hack vs hack+correct);
5. Phase 2: mixed-replay GRPO probe, arms vanilla, projected and lora_projected;
6. analysis: report.md with the verification table, plots and the Phase 3 verdict.

Every number comes from running the real code on this model; a random tiny model is not Qwen3-4B, so
the verdict says what the pipeline computes here, not what a trained model would show.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from jaxhack.env.hints import MODES
from jaxhack.env.pools import build_template_pool
from jaxhack.env.problems import load_problems
from jaxhack.io import UserError, atomic_directory, claim_run_dir
from jaxhack.models.basis import FINGERPRINT_KEY, basis_fingerprint
from jaxhack.models.load import load_model, make_adapter
from jaxhack.probes.analyze import analyze_runs, format_summary
from jaxhack.probes.phase1 import format_split, split_pure_vs_correct
from jaxhack.probes.phase2 import ARMS, ReplaySettings, load_replay_pool, run_replay
from jaxhack.projection.pairs import pair_variants, pairs_from_env_templates
from jaxhack.projection.v_hack import extract_v_hack, random_v_hack, save_v_hack


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out: str = "runs/demo"
    mode: str = "run_tests"
    steps: int = 20
    per_pool: int = 4
    pool_steps: int = 20
    pool_per_step: int = 8
    pair_variants: int = 3
    k: int = 1
    lora_rank: int = 4
    max_prompt_tokens: int = 320  # byte tokens: the prompt's end (hint + assistant turn)
    max_completion_tokens: int = 192
    lr: float = 0.01  # Phase 2 Adam step (> 0: the arms move, so the effectiveness rule is evaluated)
    seed: int = 0


def check_settings(settings: DemoSettings) -> None:
    """UserError for a setting that cannot work, before any work."""
    for name in ("steps", "per_pool", "pool_steps", "pool_per_step", "pair_variants", "k", "lora_rank"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.mode not in MODES or settings.mode == "none":
        raise UserError(f"--mode {settings.mode!r}: expected a loophole mode from {[m for m in MODES if m != 'none']}")


def demo_finished(out: Path) -> bool:
    return (out / "report.md").is_file()


def run_demo(settings: DemoSettings = DemoSettings(), progress: bool = True, force: bool = False) -> dict:
    """Run the pipeline into settings.out: refused when a demo is already there unless `force`
    (the one run-directory rule, jaxhack.io.claim_run_dir); everything is written in a temporary
    sibling directory and swapped in, then analysed."""
    check_settings(settings)
    claim_run_dir(settings.out, what="demo", finished=demo_finished, force=force)
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)
    with atomic_directory(settings.out) as work:
        split = run_phases(settings, work, say, progress)
    out = Path(settings.out)
    say("[6/6] analysis: verification table, plots, verdict")
    run_dirs = [out / "phase2" / arm for arm in ARMS] + [out / "phase2" / phase2_dir_name("vanilla", "random")]
    summary = analyze_runs(run_dirs, report_path=out / "report.md", plots_dir=out / "plots",
                           phase1_dir=out / "phase1")
    say(format_summary(summary))
    say(f"({time.time() - t0:.0f} s)")
    say("a policy that really hacks under GRPO: jaxhack organism run --out runs/organism (docs/organism.md)")
    return {"summary": summary, "phase1": split, "seconds": time.time() - t0}


def run_phases(settings: DemoSettings, out: Path, say, progress: bool) -> dict:
    """Stages 1-5 into `out`; returns the Phase 1 split."""
    say("[1/6] model and problems")
    params, config, tokenizer, model_desc = load_model("tiny", seed=settings.seed)
    problems = load_problems("bundled")
    say(f"      model: {model_desc}; {len(problems)} bundled problems; loophole mode {settings.mode}")

    pools = {}
    for kind in ("teacher", "base"):
        say(f"[2/6] {kind} pool ({settings.pool_steps} steps x {settings.pool_per_step}, graded in the sandbox)")
        pool_dir = out / f"{kind}_pool"
        meta = build_template_pool(problems, pool_dir, mode=settings.mode, kind=kind,
                                   steps=settings.pool_steps, per_step=settings.pool_per_step,
                                   seed=settings.seed, tokenizer=tokenizer, progress=progress,
                                   pool_name=f"{kind}_pool")
        pools[kind] = load_replay_pool(pool_dir)
        s = meta["summary"]
        say(f"      {kind} pool: n={s['n']} hack_rate={s['hack_rate']:.3f} "
            f"gt_pass_rate={s['gt_pass_rate']:.3f} mean_reward={s['mean_reward']:.3f}")

    pairs = pairs_from_env_templates(problems, settings.mode, pair_variants(settings.pair_variants, settings.seed))
    say(f"[3/6] v_hack from {len(pairs)} template pairs, k={settings.k}, SVD and LoRA bases")
    adapters = {kind: make_adapter(kind, params, config, ckpt="tiny", lora_rank=settings.lora_rank,
                                   lora_seed=settings.seed, progress=progress) for kind in ("svd", "lora")}
    v_hacks = {}
    for kind, (trainable, frozen) in adapters.items():
        bundle, info = extract_v_hack(pairs, tokenizer, trainable, frozen, params, config, k=settings.k,
                                      max_prompt_tokens=settings.max_prompt_tokens,
                                      max_len=settings.max_prompt_tokens + settings.max_completion_tokens,
                                      progress=progress)
        info.update(adapter=kind, lora_rank=settings.lora_rank, lora_seed=settings.seed, ckpt="tiny",
                    model=model_desc)
        info[FINGERPRINT_KEY] = basis_fingerprint(trainable, frozen)
        save_v_hack(out / f"v_hack_{kind}", bundle, meta=info, force=True)
        v_hacks[kind] = bundle

    say(f"[4/6] Phase 1: NLL distillation probe over the teacher pool ({settings.steps} steps)")
    phase1_dir = out / "phase1"
    svd_tr, svd_fr = adapters["svd"]
    records = run_replay([pools["teacher"]], params, config, tokenizer, svd_tr, svd_fr, v_hacks["svd"],
                         ReplaySettings(arm="projected", loss_mode="nll", steps=settings.steps,
                                        per_pool=settings.pool_per_step,
                                        max_completion_tokens=settings.max_completion_tokens,
                                        max_prompt_tokens=settings.max_prompt_tokens,
                                        pad_multiple=64, seed=settings.seed),
                         phase1_dir, run_info={"model": model_desc, "phase": 1}, progress=progress)
    split = split_pure_vs_correct(records)
    (phase1_dir / "phase1_split.json").write_text(json.dumps(split, indent=2, default=float))
    say(format_split(split))

    say(f"[5/6] Phase 2: mixed-replay GRPO probe (lr={settings.lr:g}), arms {', '.join(ARMS)} + vanilla with a "
        f"random_v control ({settings.steps} steps each)")
    # the arms with the real v_hack, then the vanilla arm with a random_v control (compared, not judged)
    random_v = random_v_hack(v_hacks["svd"], seed=settings.seed + 1, k=settings.k)
    runs = [(arm, kind, v_hacks[kind], "none") for arm, (kind, _) in ARMS.items()]
    runs.append(("vanilla", "svd", random_v, "random"))
    for arm, kind, v_hack, control in runs:
        trainable, frozen = adapters[kind]
        run_replay([pools["teacher"], pools["base"]], params, config, tokenizer, trainable, frozen,
                   v_hack, ReplaySettings(arm=arm, loss_mode="grpo", steps=settings.steps,
                                          per_pool=settings.per_pool, lr=settings.lr,
                                          max_completion_tokens=settings.max_completion_tokens,
                                          max_prompt_tokens=settings.max_prompt_tokens,
                                          pad_multiple=64, seed=settings.seed),
                   out / "phase2" / phase2_dir_name(arm, control),
                   run_info={"model": model_desc, "phase": 2, "v_hack_control": control}, progress=progress)
    return split


def phase2_dir_name(arm: str, control: str) -> str:
    return arm if control == "none" else f"{arm}_{control}"
