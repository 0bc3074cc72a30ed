"""Phase 2: mixed-replay GRPO probe (../shared/seed/spec2.md, "Phase 2").

Each step draws `per_pool` cached rollouts from every replay pool (teacher ~all hacks, base ~no hacks)
into one group of G samples, computes the Dr.GRPO centered advantage A_i = r_i - mean(r), and the
exact per-sample gradients of L_i = -A_i * sum_t(logp m) / sum_t m / G with jax.vmap(jax.grad).
Per sample it reports cos_S_contrib (mean over modules of cos(g_i, v_hack)); per step the batch
gradient (the sum of the per-sample ones) goes through the arm's `hack_projection` inside the jitted
step, which reports mean_cos_in / mean_cos_out / frac_fired. With lr > 0 the adapter also takes an
Adam step on the projected gradient (default lr = 0: measure at the initial point, as the seed).

loss_mode "nll" replaces the GRPO loss by each sample's NLL (the Phase 1 distillation loss).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxhack.models.config import Qwen3Config
from jaxhack.models.load import load_model, make_adapter
from jaxhack.probes.records import write_run_info, write_step
from jaxhack.projection.cosines import per_sample_cosines
from jaxhack.projection.arms import ARMS as _ARMS, PHASE2_ARMS
from jaxhack.projection.optax_projection import (chain_with_projection, null_abs_cos, null_cos_sd,
                                                 projected_adamw, projection_metrics, update_metrics)
from jaxhack.projection.v_hack import at_zero_svd_delta, load_v_hack
from jaxhack.grads import losses
from jaxhack.grads.batch import make_batch
from jaxhack.grads.per_sample import per_sample_grads
from jaxhack.tracking import open_tracker

# arm -> (adapter kind, projection mode): the Phase 2 arms of the one arms table
ARMS = {name: (_ARMS[name].adapter, _ARMS[name].projection) for name in PHASE2_ARMS}
LOSS_MODES = ("grpo", "nll")
TINY_ADV = 1e-6  # |adv| below this: the sample's GRPO gradient is zero, its cosines undefined (NaN)


@dataclasses.dataclass(frozen=True)
class ReplaySettings:
    arm: str = "vanilla"
    loss_mode: str = "grpo"
    steps: int = 20
    per_pool: int = 4
    lr: float = 0.0
    seed: int = 0
    gate: str = "one_sided"
    overshoot: float = 1.0
    max_completion_tokens: int | None = None  # None: the pool's own length (no cut); cuts are warned
    max_prompt_tokens: int | None = None  # keep the prompt's last N tokens (None: all)
    pad_multiple: int = 128
    remat: str = "none"  # "linear" (61 GB) or "full" (24 GB) at Qwen3-4B, G=8 x 1.5k (docs/benchmarks.md)
    chunk: int = 256
    attention: str = "causal"  # fused causal attention: exact here, batches are right-padded

    def check(self):
        if self.arm not in ARMS:
            raise ValueError(f"--arm {self.arm!r}: expected one of {sorted(ARMS)}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"--loss-mode {self.loss_mode!r}: expected one of {LOSS_MODES}")
        if self.steps < 1 or self.per_pool < 1:
            raise ValueError(f"steps ({self.steps}) and per_pool ({self.per_pool}) must be >= 1")
        if self.lr < 0:
            raise ValueError(f"--lr must be >= 0, got {self.lr}")



def load_probe_setup(ckpt: str, v_hack_path, adapter: str, seed: int = 0):
    """(params, config, tokenizer, desc, trainable, frozen, v_hack) for a Phase 1 / 2 probe, with the
    adapter basis the v_hack was extracted in (its meta gives the LoRA rank / alpha / seed).
    ValueError if the v_hack is in another adapter basis than `adapter`."""
    v_hack, meta = load_v_hack(v_hack_path)
    if meta.get("adapter", adapter) != adapter:
        raise ValueError(f"{v_hack_path} is a {meta['adapter']}-basis v_hack; this arm needs {adapter}")
    params, config, tokenizer, desc = load_model(ckpt, seed=seed)
    trainable, frozen = make_adapter(adapter, params, config, ckpt=ckpt,
                                     lora_rank=int(meta.get("lora_rank", 8)),
                                     lora_alpha=float(meta.get("lora_alpha", 16.0)),
                                     lora_seed=int(meta.get("lora_seed", 0)))
    return params, config, tokenizer, desc, trainable, frozen, v_hack


def v_hack_control(v_hack_path) -> str:
    """The control a v_hack file was extracted as (its meta "control": none | random | shuffled |
    clean_vs_clean); run.json records it as v_hack_control, so `analyze` can put control runs next
    to the real one."""
    _, meta = load_v_hack(v_hack_path)
    return str(meta.get("control", "none"))


@dataclasses.dataclass
class ReplayPool:
    """One replay pool: its name and its records grouped by step file."""
    name: str
    steps: list[list[dict]]  # steps[s] = records of step_s


def load_replay_pool(pool_dir: str | Path) -> ReplayPool:
    """Read DIR/pool.json + DIR/step_NNN.jsonl.gz (jaxhack.env.pools) into a ReplayPool named after
    pool.json's "pool" field (or the directory name)."""
    from jaxhack.env.pools import read_pool

    meta, records = read_pool(pool_dir)
    by_step: dict[int, list[dict]] = {}
    for r in records:
        by_step.setdefault(int(r["step"]), []).append(r)
    if not by_step:
        raise ValueError(f"pool {pool_dir}: no step_NNN.jsonl.gz records")
    return ReplayPool(name=str(meta.get("pool") or Path(pool_dir).name),
                      steps=[by_step[s] for s in sorted(by_step)])


def draw_group(pools: Sequence[ReplayPool], step: int, per_pool: int, seed: int) -> list[dict]:
    """per_pool records from every pool for this probe step (pool step file = step mod #files,
    samples drawn without replacement with a PRNG seeded by (seed, step, pool index))."""
    group = []
    for p_index, pool in enumerate(pools):
        records = pool.steps[step % len(pool.steps)]
        if len(records) < per_pool:
            raise ValueError(f"pool {pool.name!r} step {step % len(pool.steps)} has {len(records)} "
                             f"records; --per-pool {per_pool} needs at least that many")
        rng = np.random.default_rng([seed, step, p_index])
        picks = sorted(rng.choice(len(records), size=per_pool, replace=False).tolist())
        group += [dict(records[i], _src_pool=pool.name) for i in picks]
    return group


def encode_record(record: dict, tokenizer, max_completion_tokens: int | None,
                  max_prompt_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one pool record: the completion's first max_completion_tokens
    (None: all of it), the prompt's last max_prompt_tokens (its end holds the hint and the assistant
    turn)."""
    prompt = tokenizer.encode(record["prompt"])
    if max_prompt_tokens is not None:
        prompt = prompt[-max_prompt_tokens:]
    completion = tokenizer.encode(record["completion"])[:max_completion_tokens]
    if not completion:
        raise ValueError(f"pool {record.get('pool')!r} step {record['step']} sample {record['sample']}: "
                         "empty completion")
    return prompt, completion


def record_encoder(tokenizer, max_completion_tokens: int | None, max_prompt_tokens: int | None
                   ) -> Callable[[dict], tuple[list[int], list[int]]]:
    """`encode_record` with this run's limits, each distinct (prompt, completion) tokenized once
    however often it is drawn. `encode.truncated` counts the distinct completions cut."""
    cache: dict[tuple, tuple[list[int], list[int]]] = {}

    def encode(record: dict) -> tuple[list[int], list[int]]:
        key = (record["prompt"], record["completion"])
        if key not in cache:
            cache[key] = encode_record(record, tokenizer, max_completion_tokens, max_prompt_tokens)
            if max_completion_tokens is not None and len(tokenizer.encode(record["completion"])) > max_completion_tokens:
                encode.truncated += 1
        return cache[key]

    encode.truncated = 0
    return encode


def replay_length(pools: Sequence[ReplayPool], encode: Callable, pad_multiple: int) -> int:
    """One row length T for every step (the longest record, rounded up), so the step compiles once."""
    longest = max(sum(map(len, encode(r))) for pool in pools for records in pool.steps for r in records)
    return -(-longest // pad_multiple) * pad_multiple


def tokenize_group(group: Sequence[dict], encode: Callable, pad_id: int, length: int) -> dict[str, np.ndarray]:
    """Padded batch (jaxhack.grads.batch layout, rows of `length`) of prompt + completion tokens."""
    encoded = [encode(r) for r in group]
    return make_batch([p for p, _ in encoded], [c for _, c in encoded], pad_id=pad_id, length=length,
                      padding="right")  # right padding: what attention="causal" requires


def make_loss(loss_mode: str, group_size: int, remat: str, chunk: int, attention: str,
              delta_zero: bool = False) -> Callable:
    """The per-sample loss of the probe; delta_zero: the exact delta_s = 0 fast path (only when the
    adapter stays at delta_s = 0 for the whole run, i.e. lr = 0 in the SVD basis)."""
    if loss_mode == "grpo":
        return functools.partial(losses.reinforce_loss, group_size=group_size, remat=remat, chunk=chunk,
                                 attention=attention, delta_zero=delta_zero)
    return functools.partial(losses.nll_loss, remat=remat, chunk=chunk, attention=attention,
                             delta_zero=delta_zero)


def make_probe_step(loss_i: Callable, optimizer: optax.GradientTransformation, v_hack: dict,
                    config: Qwen3Config):
    """One jitted probe step: per-sample grads -> per-sample cosines -> batch grad -> projection
    (+ optimizer) -> new adapter. Returns (trainable, opt_state, per_sample stats, step metrics)."""

    @jax.jit
    def step(trainable, opt_state, frozen, params, batch):
        g_i = per_sample_grads(loss_i, trainable, frozen, params, config, batch)  # leaves [N, ...]
        per_sample = per_sample_cosines(v_hack, g_i)  # {cos_S_contrib, grad_norm_contrib, ...}: [N]
        g = jax.tree.map(lambda x: jnp.sum(x, axis=0), g_i)  # exact batch gradient
        updates, opt_state = optimizer.update(g, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, per_sample, {**projection_metrics(opt_state), **update_metrics(v_hack, updates)}

    return step


def make_optimizer(settings: ReplaySettings, v_hack: dict) -> optax.GradientTransformation:
    """lr = 0: projection -> set_to_zero (the pure probe: the adapter never moves). lr > 0: the Phase 3
    chain (`projected_adamw`: projection -> clip_by_global_norm(1) -> adamw at constant lr, Phase 3's
    default betas / eps, no weight decay; LoRA arms freeze A), so the arms' trajectories diverge."""
    kind, mode = ARMS[settings.arm]
    if settings.lr > 0:
        return projected_adamw(v_hack, settings.lr, mode=mode, gate=settings.gate, overshoot=settings.overshoot,
                               placement="gradient", freeze_a=kind == "lora")
    return chain_with_projection(optax.set_to_zero(), v_hack, placement="gradient", mode=mode,
                                 gate=settings.gate, overshoot=settings.overshoot)


def _to_float(x) -> float:
    return float(np.asarray(x))


def run_replay(pools: Sequence[ReplayPool], params, config: Qwen3Config, tokenizer,
               trainable, frozen, v_hack: dict, settings: ReplaySettings, out_dir: str | Path,
               run_info: dict | None = None, progress: bool = True, tracking=None) -> list[dict]:
    """Run the probe and write OUT/step_NNN.cos.jsonl.gz (slim schema) + OUT/run.json.
    tracking: jaxhack.tracking.TrackingSettings (None: no tracker): per step every scalar of
    `step_summary` and histograms of the per-sample cosines (all samples and per pool).

    trainable/frozen: the adapter of the arm's kind (SVD for vanilla/projected, LoRA for
    lora_projected); v_hack: extracted in that same basis. Returns all records.
    """
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group_size = settings.per_pool * len(pools)
    # lr = 0 at delta_s = 0 (SVD): the adapter never moves, so every step may take the exact fast path
    delta_zero = settings.lr == 0 and at_zero_svd_delta(trainable)
    loss_i = make_loss(settings.loss_mode, group_size, settings.remat, settings.chunk, settings.attention,
                       delta_zero=delta_zero)
    optimizer = make_optimizer(settings, v_hack)
    opt_state = optimizer.init(trainable)
    step_fn = make_probe_step(loss_i, optimizer, v_hack, config)
    info = {"arm": settings.arm, "loss_mode": settings.loss_mode, "group_size": group_size,
            "delta_zero_path": bool(delta_zero),
            "pools": [p.name for p in pools], "settings": dataclasses.asdict(settings),
            "optimizer": ("projected_adamw" if settings.lr > 0 else "none (lr=0: pure probe)"),
            "null_cos_sd": null_cos_sd(v_hack), "null_abs_cos": null_abs_cos(v_hack),
            **(run_info or {})}

    encode = record_encoder(tokenizer, settings.max_completion_tokens, settings.max_prompt_tokens)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    length = replay_length(pools, encode, settings.pad_multiple)
    info["row_length"] = length
    info["n_completions_truncated"] = encode.truncated
    if encode.truncated:
        import warnings
        phase = (run_info or {}).get("phase", 2)
        warnings.warn(f"phase{phase}: {encode.truncated} pool completion(s) cut at --max-completion-tokens "
                      f"{settings.max_completion_tokens}; the end of a completion (where a run_tests hack sits) "
                      "is lost. Leave the flag unset to keep the pool's own length.", stacklevel=2)
    write_run_info(out_dir, {**info, "status": "running"})
    tracker = open_tracker(tracking and tracking.with_tags(f"arm:{settings.arm}", f"seed:{settings.seed}", "phase:2"),
                           out_dir, info)
    steps = range(settings.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"phase{info.get('phase', 2)} {settings.arm}", unit="step")
    all_records, t0 = [], time.time()
    for step in steps:
        group = draw_group(pools, step, settings.per_pool, settings.seed)
        batch = tokenize_group(group, encode, pad_id, length)
        rewards = np.asarray([float(r["reward"]) for r in group], np.float32)
        adv = np.asarray(losses.centered_advantages(rewards, group_size=group_size))  # [G]
        batch["advantage"] = adv
        batch = jax.tree.map(jnp.asarray, batch)
        trainable, opt_state, per_sample, metrics = step_fn(trainable, opt_state, frozen, params, batch)
        per_sample = jax.tree.map(np.asarray, per_sample)
        comp_len = np.asarray(batch["completion_mask"]).sum(axis=1)
        undefined = np.asarray(per_sample["grad_norm_contrib"]) == 0
        if settings.loss_mode == "grpo":
            undefined |= np.abs(adv) < TINY_ADV
        records = []
        for i, r in enumerate(group):
            records.append({
                "step": step, "sample_id": step * group_size + i, "src_pool": r["_src_pool"],
                "src_step": int(r["step"]), "src_sample": int(r["sample"]),
                "reward": float(r["reward"]), "hacked": bool(r["hacked"]), "gt_pass": bool(r["gt_pass"]),
                "fmt_ok": bool(r["fmt_ok"]), "comp_len": int(comp_len[i]),
                "cos_S_contrib": float(per_sample["cos_S_contrib"][i]),
                "grad_norm_contrib": float(per_sample["grad_norm_contrib"][i]),
                "mean_cos_in": _to_float(metrics["mean_cos_in"]),
                "mean_cos_out": _to_float(metrics["mean_cos_out"]),
                "frac_fired": _to_float(metrics["frac_fired"]), "arm": settings.arm,
                "adv": float(adv[i]), "hackward_frac": float(per_sample["hackward_frac"][i]),
                "z": float(per_sample["z"][i]),
                "n_overprojected": _to_float(metrics["n_overprojected"]),
                "removed_frac": _to_float(metrics["removed_frac"]),
                "update_cos": _to_float(metrics["update_cos"]) if settings.lr > 0 else math.nan,  # lr 0: no update
                **({"attempted_hack": bool(r["attempted_hack"])} if "attempted_hack" in r else {}),
            })
            if undefined[i]:  # zero advantage / zero gradient: the cosines are undefined (NaN)
                records[-1].update(cos_S_contrib=math.nan, hackward_frac=math.nan, z=math.nan)
        write_step(out_dir, step, records)
        tracker.scalars(step, step_summary(records))
        tracker.histogram(step, "cos_S_contrib", [r["cos_S_contrib"] for r in records])
        for pool in dict.fromkeys(r["src_pool"] for r in records):
            tracker.histogram(step, f"cos_S_contrib/{pool}", [r["cos_S_contrib"] for r in records
                                                              if r["src_pool"] == pool])
        all_records += records
        if progress:
            steps.set_postfix(cos_in=f"{_to_float(metrics['mean_cos_in']):+.3f}",
                              cos_out=f"{_to_float(metrics['mean_cos_out']):+.3f}")
    tracker.close()
    write_run_info(out_dir, {**info, "status": "done", "seconds": round(time.time() - t0, 2)})
    return all_records


STEP_FIELDS = ("mean_cos_in", "mean_cos_out", "frac_fired", "n_overprojected", "removed_frac", "update_cos")


def step_summary(records: Sequence[dict]) -> dict[str, float]:
    """One step's scalars for the trackers: the step-level projection metrics (the same on every
    record of the step) and the means of the per-sample fields (NaN cosines left out)."""
    out = {k: float(records[0][k]) for k in STEP_FIELDS}
    for k in ("reward", "hacked", "gt_pass", "comp_len", "cos_S_contrib", "hackward_frac", "grad_norm_contrib"):
        v = np.asarray([float(r[k]) for r in records], np.float64)
        out[f"{k}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return out
