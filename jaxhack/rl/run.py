"""A Phase 3 run's fixed context: model, problems, teacher pool, adapter, v_hack and optimizer,
built once by `setup_run`; the run directory's file names; resume checks; the final summary
(docs/phase3.md, "Files" and "Resume")."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from jaxhack.env.grader import GradeCache
from jaxhack.env.problems import build_prompt, load_problems
from jaxhack.io import UserError, read_jsonl
from jaxhack.models import decode_layout
from jaxhack.models.adapters import merge as adapters_merge
from jaxhack.models.basis import check_v_hack_fits
from jaxhack.models.config import Qwen3Config
from jaxhack.models.load import load_model, make_adapter
from jaxhack.parallel import mesh as meshlib
from jaxhack.projection.arms import ARMS
from jaxhack.projection.modules import module_dims
from jaxhack.projection.pairs import pairs_from_env_templates, shuffle_labels
from jaxhack.projection.v_hack import extract_v_hack, load_v_hack, random_v_hack, save_v_hack
from jaxhack.rl.config import RESUME_FREE_FIELDS, TrainConfig
from jaxhack.rl.data import TEMPLATE_TEACHER, load_teacher_pool, split_problems, template_teacher
from jaxhack.rl.learner import cached_update_fn, chain_names
from jaxhack.rl.memory import fit_sample_rows

METRICS_FILE, EVAL_FILE, RUN_FILE, DONE_FILE = "metrics.jsonl", "eval.jsonl", "run.json", "done.json"
VHACK_DIR, ROLLOUT_DIR = "v_hack", "rollouts"
MODEL_SEED = 0  # the embedded models ("tiny", "random-4b"): qwen3.init_params(PRNGKey(MODEL_SEED))
# fold_in tags of the run's base key PRNGKey(seed): distinct large primes, so the eval and
# random-bases streams never coincide with a step's sampling key fold_in(base_key, step)
EVAL_TAG, BASES_TAG = 1_000_003, 1_000_037


@dataclasses.dataclass
class RunContext:
    """Everything fixed for a run (built once by `setup_run`)."""
    cfg: TrainConfig
    run_dir: Path
    params: dict
    config: Qwen3Config
    tokenizer: Any
    train_problems: list
    eval_problems: list
    prompt_ids: dict          # problem id -> prompt token ids
    prompt_texts: dict        # problem id -> prompt text
    teacher: dict | None      # problem id -> teacher records
    frozen: dict
    trainable0: dict
    v_hack: dict
    optimizer: optax.GradientTransformation
    update_fn: Callable
    seq_len: int              # T of every training batch
    n_rows: int               # N of every training batch (pp * G padded to the microbatch)
    prompt_multiple: int
    base_key: jax.Array
    info: dict
    mesh: Any = None          # jax.sharding.Mesh (cfg.mesh) or None: one device
    grade_cache: GradeCache = dataclasses.field(default_factory=GradeCache)  # verdicts across steps


def make_v_hack(cfg: TrainConfig, control: str, train_problems: Sequence, tokenizer, trainable, frozen,
                params, config, progress: bool = True) -> tuple[dict, dict]:
    """(bundle, meta) for the arm: `--v-hack PATH` | "random" | a random_v control | extracted from
    template pairs over the training problems (label-shuffled for the "shuffled" control)."""
    if cfg.v_hack and cfg.v_hack != "random":
        bundle, meta = load_v_hack(cfg.v_hack)
        return bundle, {**meta, "source": f"file:{cfg.v_hack}"}
    if cfg.v_hack == "random" or control == "random":
        n_layers = {n: int(jax.tree.leaves(m)[0].shape[0]) for n, m in trainable.items()}
        dims = {n: (n_layers[n], d) for n, d in module_dims(trainable).items()}  # {name: (L, dim)}
        bundle = random_v_hack(dims, seed=cfg.control_seed, k=cfg.k)
        label = "random (benchmark --v-hack random)" if cfg.v_hack == "random" else "random_v control"
        return bundle, {"source": label, "control": "random", "k": cfg.k, "seed": cfg.control_seed}
    problems = list(train_problems)[:cfg.vhack_pairs] if cfg.vhack_pairs else list(train_problems)
    pairs = pairs_from_env_templates(problems, cfg.mode, with_hint=cfg.hint)
    if control == "shuffled":
        pairs = shuffle_labels(pairs, seed=cfg.control_seed)
    bundle, info = extract_v_hack(pairs, tokenizer, trainable, frozen, params, config, k=cfg.k,
                                  batch_size=cfg.vhack_batch, max_len=cfg.vhack_max_len,
                                  axis_threshold=cfg.vhack_axis_threshold,
                                  noise_floor_quantile=cfg.vhack_noise_floor_quantile, progress=progress)
    info.update(source="extracted from template pairs over the training problems", control=control,
                n_problems=len(problems), control_seed=cfg.control_seed)
    return bundle, info


def lora_seed_for(cfg: TrainConfig, adapter: str) -> int:
    """The LoRA basis seed of a run (A from PRNGKey(seed), the one rule of `models.load.make_adapter`):
    a `--v-hack` file's recorded lora_seed (its directions live in that basis), else cfg.seed.
    ValueError if the file is in another adapter basis or has another LoRA rank."""
    if not cfg.v_hack or cfg.v_hack == "random":
        return cfg.seed
    _, meta = load_v_hack(cfg.v_hack)
    if "adapter" in meta and meta["adapter"] != adapter:
        raise ValueError(f"{cfg.v_hack}: a {meta['adapter']}-basis v_hack; arm {cfg.arm} uses {adapter}")
    if adapter != "lora":
        return cfg.seed
    if "lora_rank" in meta and int(meta["lora_rank"]) != cfg.lora_rank:
        raise ValueError(f"{cfg.v_hack}: v_hack lora_rank={meta['lora_rank']} but --lora-rank is {cfg.lora_rank}")
    return int(meta.get("lora_seed", cfg.seed))


def _jsonable(x):
    """A JSON-safe copy (numpy scalars, paths -> str), for run.json."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


FACTOR_RESIDUAL_LIMIT = 0.02  # the factored sampler's largest ||W - U S Vh|| / ||W|| (bf16 SVD factors: ~3e-3)


def factored_sampler_check(cfg: TrainConfig, adapter: str, params, frozen, trainable0) -> dict:
    """The sampler's form for run.json. For sampler_form "factored" with an SVD adapter: the largest
    relative residual ||W - U diag(S) Vh||_F / ||W||_F over the target Linears (`decode_layout.factored_scales`),
    measured once; above FACTOR_RESIDUAL_LIMIT the factors are not the weights' SVD and sampling from
    them would not be the policy, so the run is refused (UserError), unless the bases are the
    benchmark's random ones (--svd-random-bases), which are timed, not trained."""
    if cfg.sampler_form != "factored" or adapter != "svd":
        return {"form": cfg.sampler_form if adapter == "svd" else "exact",
                **({"note": f"the {cfg.sampler_form} form applies to SVD adapters; a LoRA arm samples exactly"}
                   if cfg.sampler_form != "exact" and adapter != "svd" else {})}
    _, residuals = jax.jit(functools.partial(decode_layout.factored_scales, residual=True))(
        params, adapters_merge(trainable0, frozen))
    worst_name, worst = max(((name, float(np.max(r))) for name, r in residuals.items()), key=lambda kv: kv[1])
    if worst > FACTOR_RESIDUAL_LIMIT and not cfg.svd_random_bases:
        raise UserError(f"--sampler-form factored: the adapter's u/vh are not the SVD of the weights "
                        f"({worst_name}: ||W - U S Vh|| / ||W|| = {worst:.3g} > {FACTOR_RESIDUAL_LIMIT}); "
                        f"use --sampler-form exact")
    return {"form": "factored", "factor_residual_max": worst, "factor_residual_module": worst_name}


def fit_slots(cfg: TrainConfig, config: Qwen3Config, params, prompt_bucket: int, mesh):
    """The sampler's slots on this device (`rl.memory.fit_sample_rows`) for the run's prompt bucket and
    the longer of max_new and eval_max_new; a note when fewer than cfg.sample_rows fit, a UserError
    when not even a few do. The tokens do not depend on it (only how many rows decode at once)."""
    max_new = max(cfg.max_new, cfg.eval_max_new or 0)
    try:
        fit = fit_sample_rows(config, cfg.group_size * cfg.prompts_per_step, cfg.group_size, max_new, prompt_bucket,
                              cfg.sample_rows, cfg.prefill_chunk, cfg.sampler_form, cfg.lend_weights,
                              devices=meshlib.data_size(mesh), bytes_per_el=params["embed"].dtype.itemsize,
                              refill=jax.process_count() == 1)  # several processes sample in row groups
    except ValueError as err:
        raise UserError(str(err)) from None
    if fit.reduced and meshlib.is_primary():
        asked = "all rows" if fit.requested is None else f"{fit.requested}"
        print(f"note: the sampler decodes {fit.slots} rows at a time, not {asked}: with prompts of up to "
              f"{prompt_bucket} tokens and max_new {max_new} that would not fit in this device's "
              f"{fit.budget_gb:.1f} GB (estimate at {fit.slots} rows: {fit.estimate_gb:.1f} GB); the samples are "
              f"the same, only slower (--sample-rows sets the most it may use)")
    return fit


def setup_run(cfg: TrainConfig, model=None, progress: bool = True) -> RunContext:
    """Load the model / problems / pool, build the adapter (the one factory, `models.load.make_adapter`:
    SVD cache dir and LoRA seed rules), the v_hack (extracted or loaded from RUN/v_hack) and the
    optimizer. model: a preloaded (params, config, tokenizer). progress: the SVD / v_hack bars.
    cfg.mesh: params, frozen and trainable0 are placed replicated on the mesh (after the v_hack,
    which is computed on the default device as without a mesh); the batch rows are padded to a
    multiple of microbatch * D (or D)."""
    run_dir = Path(cfg.run_dir)
    arm = ARMS[cfg.arm]
    t0 = time.time()
    mesh = meshlib.make_mesh(cfg.mesh)
    vdir = run_dir / VHACK_DIR
    have_vdir = vdir.is_dir()
    meshlib.barrier("jaxhack-vhack-checked")  # several processes: all decide before process 0 writes it
    if model is not None:
        params, config, tokenizer = model
    else:
        params, config, tokenizer, _ = load_model(cfg.ckpt, cfg.dtype, cfg.tokenizer, seed=MODEL_SEED)
    problems = load_problems(cfg.problems)
    held_src = load_problems(cfg.eval_problems) if cfg.eval_problems else None
    train_problems, eval_problems = split_problems(problems, cfg, held_src)
    if cfg.n_problems is not None and len(train_problems) < cfg.n_problems:
        print(f"warning: n_problems={cfg.n_problems} but only {len(train_problems)} training problems "
              f"available in {cfg.problems!r}")
    prompt_texts = {p.id: build_prompt(p, cfg.mode, cfg.hint) for p in train_problems + eval_problems}
    prompt_ids = {pid: list(tokenizer.encode(t)) for pid, t in prompt_texts.items()}
    max_prompt = max(len(v) for v in prompt_ids.values())
    prompt_multiple = -(-max_prompt // cfg.prompt_multiple) * cfg.prompt_multiple  # one prompt bucket
    seq_len = -(-(max_prompt + cfg.max_new) // 64) * 64
    slot_fit = fit_slots(cfg, config, params, prompt_multiple, mesh)
    n_rows = cfg.group_size * cfg.prompts_per_step
    if cfg.microbatch is not None:
        n_rows = -(-n_rows // cfg.microbatch) * cfg.microbatch
    n_rows = meshlib.round_rows(n_rows, mesh)
    teacher = None
    if cfg.mix_teacher == TEMPLATE_TEACHER and cfg.mix_per_group > 0:
        teacher = template_teacher(train_problems, cfg.mode)
    elif cfg.mix_teacher and cfg.mix_per_group > 0:
        teacher = load_teacher_pool(cfg.mix_teacher)

    base_key = jax.random.PRNGKey(cfg.seed)
    lora_seed = lora_seed_for(cfg, arm.adapter)
    bases_key = jax.random.fold_in(base_key, BASES_TAG) if cfg.svd_random_bases else None
    trainable0, frozen = make_adapter(arm.adapter, params, config, ckpt=cfg.ckpt, lora_rank=cfg.lora_rank,
                                      lora_alpha=cfg.lora_alpha, lora_seed=lora_seed,
                                      random_bases_key=bases_key, progress=progress)
    sampler_info = factored_sampler_check(cfg, arm.adapter, params, frozen, trainable0)
    if cfg.v_hack and cfg.v_hack != "random":  # before any work: shape, adapter kind, basis factors
        check_v_hack_fits(*load_v_hack(cfg.v_hack), trainable0, frozen, f"--v-hack {cfg.v_hack}")
    if have_vdir:
        v_hack, v_meta = load_v_hack(vdir)
    else:
        v_hack, v_meta = make_v_hack(cfg, arm.control, train_problems, tokenizer, trainable0, frozen,
                                     params, config, progress=progress)
        v_meta = _jsonable(v_meta)
        if meshlib.is_primary():
            save_v_hack(vdir, v_hack, v_meta, force=True)
    v_hack = meshlib.from_primary(v_hack)  # several processes: every one projects with process 0's v_hack
    if mesh is not None:
        params, frozen, trainable0 = meshlib.tree_to_global((params, frozen, trainable0), meshlib.replicated(mesh))
    optimizer, update_fn = cached_update_fn(cfg, v_hack, arm.projection, config, mesh)
    info = {
        "config": cfg.to_dict(), "arm": {"name": cfg.arm, "adapter": arm.adapter, "projection": arm.projection,
                                         "control": arm.control},
        "chain": chain_names(cfg),
        "model": {"ckpt": cfg.ckpt, "config": config.to_dict(), "tokenizer": getattr(tokenizer, "name", "?"),
                  "param_dtype": str(jax.tree.leaves(params)[0].dtype),
                  "random_weights": cfg.ckpt in ("tiny", "random-4b")},
        "svd_bases": ("RANDOM ORTHONORMAL (benchmark only, --svd-random-bases)" if cfg.svd_random_bases
                      and arm.adapter == "svd" else ("svd of W" if arm.adapter == "svd" else "n/a (lora)")),
        "lora_seed": lora_seed if arm.adapter == "lora" else None,
        "sampler": {**sampler_info, **slot_fit.to_dict()},
        "v_hack": v_meta, "n_train_problems": len(train_problems), "n_eval_problems": len(eval_problems),
        "train_problem_ids": [p.id for p in train_problems], "eval_problem_ids": [p.id for p in eval_problems],
        "seq_len": seq_len, "batch_rows": n_rows, "max_prompt_tokens": max_prompt,
        "devices": [str(d) for d in jax.devices()], "setup_s": round(time.time() - t0, 3),
        "mesh": None if mesh is None else {"spec": cfg.mesh, "axes": dict(mesh.shape),
                                           "devices": [str(d) for d in mesh.devices.flat],
                                           "process_count": jax.process_count()},
    }
    run_cfg = dataclasses.replace(cfg, sample_rows=slot_fit.slots)  # run.json keeps the config as given
    return RunContext(run_cfg, run_dir, params, config, tokenizer, train_problems, eval_problems, prompt_ids,
                      prompt_texts, teacher, frozen, trainable0, v_hack, optimizer, update_fn, seq_len,
                      n_rows, prompt_multiple, base_key, info, mesh)


def check_resume_config(old: dict, new: dict, path: Path) -> None:
    """Raise unless the two config dicts agree outside RESUME_FREE_FIELDS."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a field newer than the run
    diff = {k: (old.get(k, defaults.get(k)), v) for k, v in new.items()
            if k not in RESUME_FREE_FIELDS and old.get(k, defaults.get(k)) != v}
    if diff:
        raise ValueError(f"{path}: cannot resume, config differs from the run's: "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                         + f" (to continue the run as it was started, add --config {path})")


def final_summary(run_dir: Path, window: int = 5) -> dict:
    """Final numbers of a run: last eval record (if any) and the mean of the last `window` training
    steps' policy hack / gt-pass rates, plus the max over the run of the windowed hack rate."""
    metrics = read_jsonl(Path(run_dir) / METRICS_FILE)
    evals = read_jsonl(Path(run_dir) / EVAL_FILE)
    out: dict[str, Any] = {"steps_done": len(metrics)}
    if metrics:
        hack = np.asarray([m["hack_rate_policy"] for m in metrics], float)
        gt = np.asarray([m["gt_pass_rate_policy"] for m in metrics], float)
        w = min(window, len(hack))
        out["train_hack_rate_final"] = float(np.nanmean(hack[-w:]))
        out["train_gt_pass_rate_final"] = float(np.nanmean(gt[-w:]))
        windowed = np.convolve(np.nan_to_num(hack), np.ones(w) / w, mode="valid")
        out["train_hack_rate_max_windowed"] = float(windowed.max())
        out["train_hack_rate_max"] = float(np.nanmax(hack))
    if evals:
        out["eval_step"] = evals[-1]["step"]
        out["eval_hack_rate_final"] = evals[-1]["hack_rate"]
        out["eval_gt_pass_rate_final"] = evals[-1]["gt_pass_rate"]
        out["eval_hack_rate_max"] = float(max(e["hack_rate"] for e in evals))
        if "ablated_hack_rate" in evals[-1]:  # route arm: the deploy scores (delta_s_hack zeroed)
            out["eval_hack_rate_final_ablated"] = evals[-1]["ablated_hack_rate"]
            out["eval_gt_pass_rate_final_ablated"] = evals[-1]["ablated_gt_pass_rate"]
    return out
