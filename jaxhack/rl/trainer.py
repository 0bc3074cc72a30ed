"""Phase 3 training loop: sample -> grade -> Dr.GRPO loss -> optax chain -> orbax checkpoint
(math: ../shared/DESIGN.md "Phase 3"; loop, chain, files and resume semantics: docs/phase3.md).

Per step s (0-based), with k_s = fold_in(base_key, s):
  1. prompts: `prompts_per_step` (pp) problems from a seeded per-epoch permutation of the training
     problems, at data cursor s * pp; each prompt gets G rows (consecutive rows = one group).
  2. rollouts: G - K' rows per group sampled from the current policy (`sampler.generate`, one call);
     K' = min(mix_per_group, cached teacher completions of that problem) rows copied from the teacher
     pool (`--mix-teacher`), truncated to max_new tokens.
  3. grading: every row (teacher rows too: regraded under this run's mode) in the sandbox, in parallel.
  4. update (one jitted program): A = r - mean_group(r) (Dr.GRPO, no std); per token
     -min(rho A, clip(rho) A) + beta (exp(d) - d - 1), d = logp_ref - logp, summed and divided by
     G * max_new * pp; ref = the base model (adapters=None == the zero adapter); grads ->
     optax.chain(clip_by_global_norm, hack_projection, adamw(warmup-cosine)) (placement "gradient")
     or chain(clip, adamw, hack_projection(placement="update")) -> apply.
  5. metrics line -> RUN/metrics.jsonl; every eval_every steps held-out eval -> RUN/eval.jsonl;
     every ckpt_every steps an orbax checkpoint -> RUN/ckpt/step_NNNNNN (atomic, last 2 kept).

old_logp: "current" (default) uses stop_gradient(logp) of the very forward being differentiated, so
rho == 1 exactly and the PPO clip is inactive: with ONE update per sampled batch the policy that
sampled the batch IS the current policy, and the gradient is the REINFORCE / Dr.GRPO one
(-A grad logp). "sampler" uses the sampler's log-probs for sampled rows (rho = 1 up to numerical
differences between the cached decode and the training forward); teacher rows always use "current".
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxhack.atomic import atomic_directory
from jaxhack.models.adapters import init_lora_adapter, init_svd_adapter, merge
from jaxhack.models.config import Qwen3Config
from jaxhack.models.load import load_model as _load_model
from jaxhack.rl.presets import RESUME_FREE_FIELDS, TrainConfig

# arm -> (adapter kind, projection mode, v_hack control)
ARMS: dict[str, tuple[str, str, str]] = {
    "vanilla": ("svd", "measure", "none"),
    "projected": ("svd", "erase", "none"),
    "lora_projected": ("lora", "erase", "none"),
    "route": ("svd", "route", "none"),
    "random_v": ("svd", "erase", "random"),
    "shuffled": ("svd", "erase", "shuffled"),
}
TINY_SEED = 0  # the embedded "tiny" model: config.TINY, qwen3.init_params(PRNGKey(TINY_SEED)), fp32
RANDOM_4B_SEED = 0
METRICS_FILE, EVAL_FILE, RUN_FILE, DONE_FILE = "metrics.jsonl", "eval.jsonl", "run.json", "done.json"
CKPT_DIR, VHACK_DIR, ROLLOUT_DIR = "ckpt", "v_hack", "rollouts"
_EVAL_TAG, _LORA_TAG, _BASES_TAG = 1_000_003, 1_000_033, 1_000_037


# ================================================================ model loading

def load_model(ckpt: str, dtype: str | None = None, tokenizer: str | None = None):
    """(params, config, tokenizer) for `ckpt` (see jaxhack.models.load.load_model)."""
    params, config, tok, _ = _load_model(ckpt, dtype, tokenizer, seed=TINY_SEED if ckpt == "tiny" else RANDOM_4B_SEED)
    return params, config, tok


# ================================================================ adapters

@functools.partial(jax.jit, static_argnames=("rows", "cols", "dtype"))
def _random_orthonormal(key, rows: int, cols: int, dtype) -> jax.Array:
    """[rows, cols] with orthonormal columns (rows >= cols), QR of a Gaussian, cast to dtype."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (rows, cols), jnp.float32))
    return q.astype(dtype)


def random_svd_bases(params: dict, config: Qwen3Config, key: jax.Array, targets=None):
    """BENCHMARK ONLY: an SVD-shaped adapter whose frozen u [L,out,r] / vh [L,r,in] are random
    orthonormal bases instead of the SVD of W (skips the slow SVD of a random 4B model). Same
    shapes and dtypes as `init_svd_adapter`; built one layer at a time (fp32 QR of one layer)."""
    from jaxhack.models.adapters import TARGET_MODULES, module_dims

    dims = module_dims(params, targets or TARGET_MODULES)
    trainable, frozen = {}, {}
    for m_index, (name, (L, d_in, d_out)) in enumerate(dims.items()):
        r = min(d_in, d_out)
        dtype = params["layers"][name].dtype
        us, vhs = [], []
        for layer in range(L):
            k = jax.random.fold_in(jax.random.fold_in(key, m_index), layer)
            ku, kv = jax.random.split(k)
            us.append(_random_orthonormal(ku, d_out, r, dtype))  # [out, r]
            vhs.append(_random_orthonormal(kv, d_in, r, dtype).T)  # [r, in]
        frozen[name] = {"u": jnp.stack(us), "vh": jnp.stack(vhs)}
        trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32),
                           "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    return trainable, frozen


def init_adapter(kind: str, params: dict, config: Qwen3Config, cfg: TrainConfig, key: jax.Array,
                 cache_dir: str | Path | None = None):
    """(trainable, frozen) of the arm's adapter kind at its initial point (zero delta_s / B = 0)."""
    if kind == "lora":
        return init_lora_adapter(params, config, key, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.svd_random_bases:
        return random_svd_bases(params, config, key)
    return init_svd_adapter(params, config, cache_dir=cache_dir)


# ================================================================ data

def split_problems(problems: Sequence, cfg: TrainConfig, eval_problems: Sequence | None = None):
    """(train, eval). Without a separate eval set, a permutation seeded by cfg.split_seed (the same
    for every seed and arm) holds out cfg.n_eval problems; n_problems caps the training set."""
    problems = list(problems)
    if eval_problems is not None:
        train, held = problems, list(eval_problems)
    else:
        if cfg.n_eval >= len(problems):
            raise ValueError(f"n_eval={cfg.n_eval} leaves no training problems ({len(problems)} in all)")
        order = np.random.default_rng(cfg.split_seed).permutation(len(problems))
        held = [problems[i] for i in order[:cfg.n_eval]]
        train = [problems[i] for i in sorted(order[cfg.n_eval:])]
    if cfg.n_problems is not None:
        train = train[:cfg.n_problems]
    if not train:
        raise ValueError("no training problems")
    return train, held


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training problems in one epoch (seeded by (seed, epoch))."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def problem_indices(cursor: int, count: int, n: int, seed: int) -> list[int]:
    """Training-problem indices of prompts cursor .. cursor+count-1 (prompt i: epoch i // n,
    position i % n of that epoch's permutation)."""
    out, perms = [], {}
    for i in range(cursor, cursor + count):
        epoch = i // n
        if epoch not in perms:
            perms[epoch] = epoch_permutation(n, seed, epoch)
        out.append(int(perms[epoch][i % n]))
    return out


def load_teacher_pool(pool_dir: str | Path) -> dict[str, list[dict]]:
    """{problem_id: [teacher records in pool order]} from a pool dir (jaxhack.env.pools)."""
    from jaxhack.env.pools import read_pool

    _, records = read_pool(pool_dir)
    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(str(r["problem_id"]), []).append(r)
    if not by_problem:
        raise ValueError(f"{pool_dir}: teacher pool has no records")
    return by_problem


def pick_teacher(records: Sequence[dict], k: int, seed: int, step: int, group: int) -> list[dict]:
    """min(k, len(records)) distinct records, chosen by a PRNG seeded by (seed, step, group)."""
    n = min(k, len(records))
    if n == 0:
        return []
    rng = np.random.default_rng([seed, step, group, 7])
    return [records[i] for i in sorted(rng.choice(len(records), size=n, replace=False).tolist())]


# ================================================================ v_hack

def make_v_hack(cfg: TrainConfig, control: str, train_problems: Sequence, tokenizer, trainable, frozen,
                params, config) -> tuple[dict, dict]:
    """(bundle, meta) for the arm: `--v-hack PATH` | "random" | a random_v control | extracted from
    template pairs over the training problems (label-shuffled for the "shuffled" control)."""
    from jaxhack.projection.modules import module_dims
    from jaxhack.projection.pairs import pairs_from_env_templates, shuffle_labels
    from jaxhack.projection.v_hack import extract_v_hack, load_v_hack, random_v_hack

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
                                  batch_size=cfg.vhack_batch, max_len=cfg.vhack_max_len)
    info.update(source="extracted from template pairs over the training problems", control=control,
                n_problems=len(problems), control_seed=cfg.control_seed)
    return bundle, info


# ================================================================ optimizer

def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup > 0 else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, v_hack: dict, projection_mode: str) -> optax.GradientTransformation:
    """placement "gradient": chain(clip_by_global_norm, hack_projection, adamw): the projection sees
    the clipped loss gradient (clip first, so the projected gradient's norm stays <= the clip, and
    cos_in is measured on what the optimizer would otherwise get). placement "update":
    chain(clip, adamw, hack_projection(placement="update")): the applied update itself has no
    hack-ward component (closes the leak through Adam's per-coordinate rescaling)."""
    from jaxhack.projection.optax_projection import hack_projection

    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay)
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
    proj = hack_projection(v_hack, mode=projection_mode, gate=cfg.gate, overshoot=cfg.overshoot,
                           placement=cfg.placement)
    if cfg.placement == "gradient":
        return optax.chain(clip, proj, adamw)
    return optax.chain(clip, adamw, proj)


# ================================================================ the jitted update

@dataclasses.dataclass(frozen=True)
class LossHyper:
    group_size: int
    max_new: int
    prompts_per_step: int
    clip_eps: float
    clip_eps_high: float | None
    beta: float
    remat: str
    chunk: int


def batch_terms(trainable, frozen, params, config: Qwen3Config, batch: dict, hyper: LossHyper):
    """Sum over rows of the Phase 3 loss of a (micro)batch, plus token sums for the metrics.
    batch: tokens/attention_mask/completion_mask/old_logp/ref_logp [M,T], advantage [M] f32,
    use_current [M] bool (old_logp := stop_gradient(logp) on that row)."""
    from jaxhack.rl.losses import grpo_token_terms, sequence_logprobs

    # rows are right-padded (make_batch(padding="right")), so fused causal attention is exact
    logp = sequence_logprobs(params, config, merge(trainable, frozen), batch["tokens"],
                             batch["attention_mask"], remat=hyper.remat, chunk=hyper.chunk,
                             attention="causal")  # [M,T]
    old = jnp.where(batch["use_current"][:, None], jax.lax.stop_gradient(logp), batch["old_logp"])
    terms = jax.vmap(grpo_token_terms, in_axes=(0, 0, 0, 0, 0, None, None))
    pg, kl = terms(logp, batch["completion_mask"], batch["advantage"], old, batch["ref_logp"],
                   hyper.clip_eps, hyper.clip_eps_high)  # [M,T] each, 0 off the completion
    denom = hyper.group_size * hyper.max_new * hyper.prompts_per_step
    loss = jnp.sum(pg + hyper.beta * kl) / denom
    m = batch["completion_mask"]
    log_ratio = jnp.where(m, jax.lax.stop_gradient(logp) - old, 0.0)
    rho = jnp.exp(log_ratio)
    eps_high = hyper.clip_eps if hyper.clip_eps_high is None else hyper.clip_eps_high
    clipped = m & ((rho < 1 - hyper.clip_eps) | (rho > 1 + eps_high))
    aux = {"kl_sum": jnp.sum(kl), "pg_sum": jnp.sum(pg), "n_tokens": jnp.sum(m).astype(jnp.float32),
           "ratio_sum": jnp.sum(jnp.where(m, rho, 0.0)), "clipped": jnp.sum(clipped).astype(jnp.float32)}
    return loss, jax.tree.map(jax.lax.stop_gradient, aux)


def make_update_fn(optimizer: optax.GradientTransformation, config: Qwen3Config, hyper: LossHyper,
                   microbatch: int | None):
    """jit(update)(trainable, opt_state, frozen, params, batch) -> (trainable, opt_state, metrics).

    With `microbatch` M the N rows (N % M == 0) run as a lax.scan over N/M micro-batches, each with
    its own forward + backward, gradients summed (memory of one micro-batch)."""
    from jaxhack.projection.cosines import safe_norm
    from jaxhack.projection.modules import to_module_vectors
    from jaxhack.projection.optax_projection import projection_metrics

    def global_norm(tree):
        vecs = to_module_vectors(tree)  # SVD: delta_s only (delta_s_hack's gradient is a copy)
        return jnp.sqrt(sum(jnp.sum(jnp.square(safe_norm(v))) for v in vecs.values()))

    def grads_of(trainable, frozen, params, batch):
        fn = jax.value_and_grad(batch_terms, has_aux=True)
        if microbatch is None:
            (loss, aux), grads = fn(trainable, frozen, params, config, batch, hyper)
            return loss, aux, grads
        n = jax.tree.leaves(batch)[0].shape[0]
        chex.assert_equal(n % microbatch, 0)
        micro = jax.tree.map(lambda x: x.reshape(n // microbatch, microbatch, *x.shape[1:]), batch)

        def body(carry, mb):
            loss_acc, aux_acc, g_acc = carry
            (loss, aux), g = fn(trainable, frozen, params, config, mb, hyper)
            return (loss_acc + loss, jax.tree.map(jnp.add, aux_acc, aux), jax.tree.map(jnp.add, g_acc, g)), None

        zero_aux = {k: jnp.zeros((), jnp.float32) for k in ("kl_sum", "pg_sum", "n_tokens", "ratio_sum", "clipped")}
        init = (jnp.zeros((), jnp.float32), zero_aux, jax.tree.map(jnp.zeros_like, trainable))
        (loss, aux, grads), _ = jax.lax.scan(body, init, micro)
        return loss, aux, grads

    @jax.jit
    def update(trainable, opt_state, frozen, params, batch):
        loss, aux, grads = grads_of(trainable, frozen, params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        n_tok = jnp.maximum(aux["n_tokens"], 1.0)
        metrics = {"loss": loss, "kl_mean": aux["kl_sum"] / n_tok, "pg_token_mean": aux["pg_sum"] / n_tok,
                   "ratio_mean": aux["ratio_sum"] / n_tok, "clip_frac": aux["clipped"] / n_tok,
                   "n_tokens": aux["n_tokens"], "grad_norm": global_norm(grads),
                   "update_norm": global_norm(updates), **projection_metrics(opt_state)}
        return new_trainable, opt_state, metrics

    return update


_UPDATE_CACHE: dict = {}
_OPTIMIZER_FIELDS = ("lr", "warmup_steps", "steps", "min_lr_ratio", "weight_decay", "b1", "b2", "adam_eps",
                     "max_grad_norm", "gate", "overshoot", "placement", "microbatch")


def _v_hack_digest(v_hack: dict) -> str:
    import hashlib

    from jaxhack.projection.cosines import directions

    h = hashlib.sha256()
    for name, v in sorted(directions(v_hack).items()):
        a = np.ascontiguousarray(np.asarray(v, np.float32))
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_update_fn(cfg: TrainConfig, v_hack: dict, projection_mode: str, config: Qwen3Config):
    """(optimizer, jitted update) for this run; runs of one process with the same optimizer settings,
    loss hyper-parameters, model config and v_hack share them, so jit compiles once (a sweep or a
    resumed run in the same process). Keeps the 4 most recent entries."""
    hyper = LossHyper(cfg.group_size, cfg.max_new, cfg.prompts_per_step, cfg.clip_eps, cfg.clip_eps_high,
                      cfg.beta, cfg.remat, cfg.logp_chunk)
    key = (tuple(getattr(cfg, f) for f in _OPTIMIZER_FIELDS), projection_mode, hyper, config,
           _v_hack_digest(v_hack))
    if key not in _UPDATE_CACHE:
        optimizer = make_optimizer(cfg, v_hack, projection_mode)
        _UPDATE_CACHE[key] = (optimizer, make_update_fn(optimizer, config, hyper, cfg.microbatch))
        while len(_UPDATE_CACHE) > 4:
            _UPDATE_CACHE.pop(next(iter(_UPDATE_CACHE)))
    return _UPDATE_CACHE[key]


@functools.partial(jax.jit, static_argnames=("config", "remat", "chunk"))
def _ref_logp_chunk(params, config, tokens, attention_mask, remat="none", chunk=256):
    from jaxhack.rl.losses import sequence_logprobs
    return sequence_logprobs(params, config, None, tokens, attention_mask, remat=remat, chunk=chunk,
                             attention="causal")  # right-padded rows (see batch_terms)


def reference_logp(params, config: Qwen3Config, tokens: np.ndarray, attention_mask: np.ndarray,
                   microbatch: int | None, chunk: int = 256) -> np.ndarray:
    """[N,T] log-probs of the zero-adapter reference (the base model), microbatch rows at a time."""
    n = tokens.shape[0]
    step = n if microbatch is None else microbatch
    out = [np.asarray(_ref_logp_chunk(params, config, jnp.asarray(tokens[i:i + step]),
                                      jnp.asarray(attention_mask[i:i + step]), chunk=chunk))
           for i in range(0, n, step)]
    return np.concatenate(out, axis=0)


# ================================================================ files

def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict) -> None:
    """Append one json line and flush + fsync (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file; a torn last line (crash mid-write) is ignored."""
    if not Path(path).is_file():
        return []
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1}: invalid json") from None
    return out


def _truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    records = [r for r in read_jsonl(path) if keep(r)]
    _atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def ckpt_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "state").is_dir():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def save_train_state(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """RUN/ckpt/step_NNNNNN/{state/ (orbax: trainable, opt_state, key, cursor, step), meta.json}.

    Orbax itself writes into `<dir>.orbax-checkpoint-tmp-*` and renames; on top of that the whole
    step dir is built in a hidden temporary sibling and os.rename'd into place, so a step dir exists
    only when complete. Then all but the newest `keep` step dirs are deleted."""
    from jaxhack.checkpoint import save_pytree

    final = ckpt_path(run_dir, step)
    with atomic_directory(final) as tmp:
        save_pytree(tmp / "state", state)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "cursor": int(state["cursor"]),
                                                   "time_unix": time.time()}) + "\n")
    for old_step, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def restore_train_state(path: Path, target: dict) -> dict:
    """Inverse of save_train_state; `target` gives the tree structure (optax namedtuples)."""
    from jaxhack.checkpoint import restore_pytree

    host = jax.tree.map(np.asarray, target)
    state = restore_pytree(Path(path) / "state", target=host, as_jax=False)
    return jax.tree.map(lambda t, x: jnp.asarray(x, dtype=jnp.asarray(t).dtype), target, state)


# ================================================================ rollouts and grading

def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def grade_rows(problems, completions, cfg: TrainConfig):
    from jaxhack.env.grader import GradeRequest, RewardConfig, grade_batch
    from jaxhack.env.sandbox import SandboxLimits

    limits = SandboxLimits(wall_s=cfg.sandbox_wall_s, cpu_s=max(1, math.ceil(cfg.sandbox_wall_s)))
    return grade_batch([GradeRequest(p, cfg.mode, c) for p, c in zip(problems, completions)],
                       RewardConfig(cfg.format_reward, cfg.pass_reward), limits, cfg.grade_workers)


def rate(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def evaluate(params, config, tokenizer, trainable, frozen, problems, cfg: TrainConfig, key, step: int,
             prompt_ids: dict, prompt_multiple: int) -> dict:
    """Completions on the held-out problems (greedy when eval_temperature == 0), graded."""
    from jaxhack.rl.sampler import generate

    rows = [p for p in problems for _ in range(cfg.eval_samples)]
    max_new = cfg.eval_max_new or cfg.max_new
    chunk = cfg.group_size * cfg.prompts_per_step
    adapters = merge(trainable, frozen)
    completions, finished = [], []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        res = generate(params, config, [prompt_ids[p.id] for p in part], max_new_tokens=max_new,
                       key=jax.random.fold_in(key, start), adapters=adapters,
                       temperature=cfg.eval_temperature, top_p=cfg.top_p,
                       eos_token_ids=tokenizer.eos_token_ids, pad_id=tokenizer.pad_token_id,
                       prompt_multiple=prompt_multiple)
        completions += [_decode(tokenizer, res.tokens[i, :res.lengths[i]]) for i in range(len(part))]
        finished += res.finished.tolist()
    grades = grade_rows(rows, completions, cfg)
    return {"step": step, "n": len(rows), "hack_rate": rate(g.hacked for g in grades),
            "gt_pass_rate": rate(g.gt_pass for g in grades), "pass_rate": rate(g.passed for g in grades),
            "fmt_rate": rate(g.fmt_ok for g in grades), "reward_mean": rate(g.reward for g in grades),
            "frac_finished": rate(finished), "temperature": cfg.eval_temperature}


# ================================================================ the run

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


def setup_run(cfg: TrainConfig, model=None) -> RunContext:
    """Load the model / problems / pool, build the adapter, v_hack (extracted or loaded from RUN/v_hack)
    and the optimizer; write RUN/run.json (checked against an existing one when resuming)."""
    from jaxhack.env.problems import build_prompt, load_problems
    from jaxhack.projection.v_hack import load_v_hack, save_v_hack

    cfg.check()
    run_dir = Path(cfg.run_dir)
    kind, proj_mode, control = ARMS[cfg.arm]
    t0 = time.time()
    params, config, tokenizer = model if model is not None else load_model(cfg.ckpt, cfg.dtype, cfg.tokenizer)
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
    n_rows = cfg.group_size * cfg.prompts_per_step
    if cfg.microbatch is not None:
        n_rows = -(-n_rows // cfg.microbatch) * cfg.microbatch
    teacher = load_teacher_pool(cfg.mix_teacher) if cfg.mix_teacher and cfg.mix_per_group > 0 else None

    base_key = jax.random.PRNGKey(cfg.seed)
    adapter_key = jax.random.fold_in(base_key, _LORA_TAG if kind == "lora" else _BASES_TAG)
    cache_dir = None
    if cfg.ckpt not in ("tiny", "random-4b"):
        from jaxhack.checkpoint import checkpoint_dir
        cache_dir = checkpoint_dir(cfg.ckpt) / "svd_cache"
    trainable0, frozen = init_adapter(kind, params, config, cfg, adapter_key, cache_dir)

    vdir = run_dir / VHACK_DIR
    if vdir.is_dir():
        v_hack, v_meta = load_v_hack(vdir)
    else:
        v_hack, v_meta = make_v_hack(cfg, control, train_problems, tokenizer, trainable0, frozen,
                                     params, config)
        v_meta = json.loads(json.dumps(v_meta, default=str))
        save_v_hack(vdir, v_hack, v_meta, force=True)
    optimizer, update_fn = cached_update_fn(cfg, v_hack, proj_mode, config)
    info = {
        "config": cfg.to_dict(), "arm": {"name": cfg.arm, "adapter": kind, "projection": proj_mode,
                                         "control": control},
        "chain": (["clip_by_global_norm", "hack_projection", "adamw"] if cfg.placement == "gradient"
                  else ["clip_by_global_norm", "adamw", "hack_projection(update)"]),
        "model": {"ckpt": cfg.ckpt, "config": config.to_dict(), "tokenizer": getattr(tokenizer, "name", "?"),
                  "param_dtype": str(jax.tree.leaves(params)[0].dtype),
                  "random_weights": cfg.ckpt in ("tiny", "random-4b")},
        "svd_bases": ("RANDOM ORTHONORMAL (benchmark only, --svd-random-bases)" if cfg.svd_random_bases
                      and kind == "svd" else ("svd of W" if kind == "svd" else "n/a (lora)")),
        "v_hack": v_meta, "n_train_problems": len(train_problems), "n_eval_problems": len(eval_problems),
        "train_problem_ids": [p.id for p in train_problems], "eval_problem_ids": [p.id for p in eval_problems],
        "seq_len": seq_len, "batch_rows": n_rows, "max_prompt_tokens": max_prompt,
        "devices": [str(d) for d in jax.devices()], "setup_s": round(time.time() - t0, 3),
    }
    return RunContext(cfg, run_dir, params, config, tokenizer, train_problems, eval_problems, prompt_ids,
                      prompt_texts, teacher, frozen, trainable0, v_hack, optimizer, update_fn, seq_len,
                      n_rows, prompt_multiple, base_key, info)


def _check_resume_config(old: dict, new: dict, path: Path) -> None:
    diff = {k: (old.get(k), v) for k, v in new.items()
            if k not in RESUME_FREE_FIELDS and old.get(k) != v}
    if diff:
        raise ValueError(f"{path}: cannot resume, config differs from the run's: "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items())))


def rollout_step(ctx: RunContext, trainable, step: int, cursor: int):
    """Sample + mix + grade one step. Returns (rows, sample_result_info, times) where rows is a list
    of dicts (problem, prompt_ids, completion_ids, completion, source, sampler_logp, grade...)."""
    from jaxhack.rl.sampler import generate

    cfg, G = ctx.cfg, ctx.cfg.group_size
    idx = problem_indices(cursor, cfg.prompts_per_step, len(ctx.train_problems), cfg.seed)
    problems = [ctx.train_problems[i] for i in idx]
    k_sample = jax.random.fold_in(ctx.base_key, step)
    rows: list[dict] = []
    to_sample: list[int] = []
    for g, p in enumerate(problems):
        chosen = []
        if ctx.teacher is not None:
            chosen = pick_teacher(ctx.teacher.get(p.id, []), cfg.mix_per_group, cfg.seed, step, g)
        for j in range(G):
            row = {"group": g, "problem": p, "prompt_ids": ctx.prompt_ids[p.id]}
            t_index = j - (G - len(chosen))  # teacher rows are the last len(chosen) of the group
            if t_index >= 0:
                rec = chosen[t_index]
                ids = list(ctx.tokenizer.encode(rec["completion"]))[:cfg.max_new]
                if not ids:
                    raise ValueError(f"teacher record pool {rec.get('pool')} step {rec.get('step')} "
                                     f"sample {rec.get('sample')}: empty completion")
                row.update(source="teacher", completion_ids=ids, sampler_logp=None, finished=True,
                           teacher_ref=f"{rec.get('pool')}/{rec.get('step')}/{rec.get('sample')}")
            else:
                to_sample.append(len(rows))
                row.update(source="policy")
            rows.append(row)
    t0 = time.time()
    if to_sample:
        res = generate(ctx.params, ctx.config, [rows[i]["prompt_ids"] for i in to_sample],
                       max_new_tokens=cfg.max_new, key=k_sample, adapters=merge(trainable, ctx.frozen),
                       temperature=cfg.temperature, top_p=cfg.top_p,
                       eos_token_ids=ctx.tokenizer.eos_token_ids, pad_id=ctx.tokenizer.pad_token_id,
                       prompt_multiple=ctx.prompt_multiple)
        for j, i in enumerate(to_sample):
            n = int(res.lengths[j])
            rows[i].update(completion_ids=res.tokens[j, :n].tolist(), sampler_logp=res.logprobs[j, :n],
                           finished=bool(res.finished[j]))
    t_gen = time.time() - t0
    for r in rows:
        r["completion"] = _decode(ctx.tokenizer, r["completion_ids"])
    t0 = time.time()
    grades = grade_rows([r["problem"] for r in rows], [r["completion"] for r in rows], cfg)
    t_grade = time.time() - t0
    for r, gr in zip(rows, grades):
        r["grade"] = gr
    return rows, t_gen, t_grade


def build_train_batch(ctx: RunContext, rows: list[dict]) -> tuple[dict, np.ndarray]:
    """Padded batch [n_rows, seq_len] (+ advantage, old_logp, use_current); padding rows have an
    empty completion mask (zero loss, zero gradient). Returns (batch, advantages [pp*G])."""
    from jaxhack.rl.batch import make_batch, place_completion_values
    from jaxhack.rl.losses import centered_advantages

    cfg = ctx.cfg
    n_real = len(rows)
    pad_rows = ctx.n_rows - n_real
    prompts = [r["prompt_ids"] for r in rows] + [rows[0]["prompt_ids"]] * pad_rows
    comps = [r["completion_ids"] for r in rows] + [[]] * pad_rows
    batch = make_batch(prompts, comps, pad_id=ctx.tokenizer.pad_token_id, padding="right",
                       length=ctx.seq_len)
    rewards = np.asarray([r["grade"].reward for r in rows], np.float32)
    adv = np.asarray(centered_advantages(rewards, group_size=cfg.group_size))  # [pp*G]
    use_current = np.ones((ctx.n_rows,), bool)
    sampler_vals = []
    for i, r in enumerate(rows):
        if cfg.old_logp == "sampler" and r["sampler_logp"] is not None:
            use_current[i] = False
            sampler_vals.append(r["sampler_logp"])
        else:
            sampler_vals.append(np.zeros(len(r["completion_ids"]), np.float32))
    sampler_vals += [np.zeros(0, np.float32)] * pad_rows
    batch["old_logp"] = place_completion_values(batch, sampler_vals)
    batch["advantage"] = np.concatenate([adv, np.zeros(pad_rows, np.float32)]).astype(np.float32)
    batch["use_current"] = use_current
    chex.assert_shape(batch["tokens"], (ctx.n_rows, ctx.seq_len))
    return batch, adv


def train_step(ctx: RunContext, trainable, opt_state, step: int, cursor: int):
    """One full step. Returns (trainable, opt_state, metrics dict, rollout records)."""
    cfg = ctx.cfg
    t_step = time.time()
    rows, t_gen, t_grade = rollout_step(ctx, trainable, step, cursor)
    t0 = time.time()
    batch, adv = build_train_batch(ctx, rows)
    batch["ref_logp"] = reference_logp(ctx.params, ctx.config, batch["tokens"], batch["attention_mask"],
                                       cfg.microbatch, cfg.logp_chunk)
    t_ref = time.time() - t0
    device_batch = jax.tree.map(jnp.asarray, batch)
    trainable, opt_state, m = ctx.update_fn(trainable, opt_state, ctx.frozen, ctx.params, device_batch)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    t_update = time.time() - t0
    grades = [r["grade"] for r in rows]
    policy = [r for r in rows if r["source"] == "policy"]
    metrics = {
        "step": step, "cursor": cursor, "epoch": cursor // len(ctx.train_problems),
        "n_rollouts": len(rows), "n_teacher": len(rows) - len(policy),
        "reward_mean": rate(g.reward for g in grades), "reward_std": float(np.std([g.reward for g in grades])),
        "hack_rate": rate(g.hacked for g in grades), "gt_pass_rate": rate(g.gt_pass for g in grades),
        "pass_rate": rate(g.passed for g in grades), "fmt_rate": rate(g.fmt_ok for g in grades),
        "hack_rate_policy": rate(r["grade"].hacked for r in policy),
        "gt_pass_rate_policy": rate(r["grade"].gt_pass for r in policy),
        "reward_mean_policy": rate(r["grade"].reward for r in policy),
        "comp_len_mean": rate(len(r["completion_ids"]) for r in rows),
        "frac_finished": rate(r["finished"] for r in policy),
        "adv_abs_mean": float(np.mean(np.abs(adv))),
        "loss": m["loss"], "kl_mean": m["kl_mean"], "pg_token_mean": m["pg_token_mean"],
        "ratio_mean": m["ratio_mean"], "clip_frac": m["clip_frac"], "grad_norm": m["grad_norm"],
        "update_norm": m["update_norm"], "cos_in": m["mean_cos_in"], "cos_out": m["mean_cos_out"],
        "frac_fired": m["frac_fired"], "frac_positive": m["frac_positive"], "removed_norm": m["removed_norm"],
        "lr": float(lr_schedule(cfg)(step)), "arm": cfg.arm, "seed": cfg.seed,
        "time_generation_s": t_gen, "time_grading_s": t_grade, "time_update_s": t_update,
        "time_ref_s": t_ref, "time_step_s": time.time() - t_step,
    }
    records = [{
        "pool": f"phase3/{cfg.arm}/seed_{cfg.seed}", "step": step, "sample": i, "problem_id": r["problem"].id,
        "mode": cfg.mode, "prompt": ctx.prompt_texts[r["problem"].id], "completion": r["completion"],
        "reward": float(r["grade"].reward), "passed": bool(r["grade"].passed),
        "gt_pass": bool(r["grade"].gt_pass), "hacked": bool(r["grade"].hacked),
        "fmt_ok": bool(r["grade"].fmt_ok), "comp_len": len(r["completion_ids"]), "source": r["source"],
        "advantage": float(adv[i]), "finished": bool(r["finished"]), "detail": r["grade"].detail,
    } for i, r in enumerate(rows)]
    return trainable, opt_state, metrics, records


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
    return out


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, model=None,
          progress: bool = True) -> dict:
    """Run (or resume) a Phase 3 training run in cfg.run_dir; returns final_summary(run_dir).

    resume: continue from the newest RUN/ckpt/step_* (config must match up to RESUME_FREE_FIELDS);
    without a checkpoint it starts from scratch. A run dir holding a run.json is refused unless
    resume. stop_after: stop after this many steps of this call (simulates a kill; no done.json).
    model: a preloaded (params, config, tokenizer) (the sweep loads it once).
    """
    from tqdm.auto import tqdm

    from jaxhack.env.pools import write_pool_meta, write_pool_step

    cfg.check()
    run_dir = Path(cfg.run_dir)
    run_json = run_dir / RUN_FILE
    if run_json.is_file():
        if not resume:
            raise FileExistsError(f"{run_dir}: a run already exists here (pass --resume to continue it)")
        _check_resume_config(json.loads(run_json.read_text())["config"], cfg.to_dict(), run_json)
        if (run_dir / DONE_FILE).is_file():
            return json.loads((run_dir / DONE_FILE).read_text())["summary"]
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = setup_run(cfg, model)
    if not run_json.is_file():
        _atomic_write_text(run_json, json.dumps(ctx.info, indent=2, sort_keys=True, default=str) + "\n")
    trainable = ctx.trainable0
    opt_state = ctx.optimizer.init(trainable)
    start, cursor = 0, 0
    ckpts = list_checkpoints(run_dir) if resume else []
    if ckpts:
        done_steps, path = ckpts[-1]
        target = {"trainable": trainable, "opt_state": opt_state, "key": ctx.base_key,
                  "cursor": jnp.int32(0), "step": jnp.int32(0)}
        state = restore_train_state(path, target)
        trainable, opt_state = state["trainable"], state["opt_state"]
        start, cursor = int(state["step"]), int(state["cursor"])
        chex.assert_trees_all_equal(state["key"], ctx.base_key)
        if start != done_steps:
            raise ValueError(f"{path}: holds step {start}, its name says {done_steps}")
        print(f"resuming {run_dir} from {path.name} (step {start}, cursor {cursor})")
    # drop whatever the killed run wrote after its last checkpoint: it will be redone identically
    _truncate_jsonl(run_dir / METRICS_FILE, lambda r: r["step"] < start)
    _truncate_jsonl(run_dir / EVAL_FILE, lambda r: r["step"] <= start if start > 0 else False)
    if cfg.save_rollouts:
        write_pool_meta(run_dir / ROLLOUT_DIR, {"pool": f"phase3/{cfg.arm}/seed_{cfg.seed}", "mode": cfg.mode,
                                                "comp_len_unit": "tokens", "source": "phase3 training"})

    def maybe_eval(done: int, force: bool = False):
        if not ctx.eval_problems or cfg.eval_every <= 0:
            return 0.0
        if not force and done % cfg.eval_every:
            return 0.0
        t0 = time.time()
        key = jax.random.fold_in(jax.random.fold_in(ctx.base_key, _EVAL_TAG), done)
        rec = evaluate(ctx.params, ctx.config, ctx.tokenizer, trainable, ctx.frozen, ctx.eval_problems,
                       cfg, key, done, ctx.prompt_ids, ctx.prompt_multiple)
        rec["time_eval_s"] = time.time() - t0
        append_jsonl(run_dir / EVAL_FILE, rec)
        return rec["time_eval_s"]

    if start == 0:
        maybe_eval(0)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"phase3 {cfg.arm} seed {cfg.seed}", unit="step",
               initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        trainable, opt_state, metrics, records = train_step(ctx, trainable, opt_state, step, cursor)
        cursor += cfg.prompts_per_step
        done = step + 1
        if cfg.save_rollouts:
            write_pool_step(run_dir / ROLLOUT_DIR, step, records)
        append_jsonl(run_dir / METRICS_FILE, metrics)
        t_eval = maybe_eval(done, force=(done == cfg.steps))
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or done == end:
            save_train_state(run_dir, done, {"trainable": trainable, "opt_state": opt_state,
                                             "key": ctx.base_key, "cursor": jnp.int32(cursor),
                                             "step": jnp.int32(done)}, keep=cfg.keep_ckpts)
        bar.set_postfix(gen=f"{metrics['time_generation_s']:.1f}s", grade=f"{metrics['time_grading_s']:.1f}s",
                        upd=f"{metrics['time_update_s']:.1f}s", eval=f"{t_eval:.1f}s",
                        R=f"{metrics['reward_mean']:.2f}", hack=f"{metrics['hack_rate_policy']:.2f}")
        if not progress:
            print(f"step {step}: gen {metrics['time_generation_s']:.2f}s grade {metrics['time_grading_s']:.2f}s "
                  f"update {metrics['time_update_s']:.2f}s reward {metrics['reward_mean']:.3f} "
                  f"hack {metrics['hack_rate_policy']:.3f}", flush=True)
    bar.close()
    summary = final_summary(run_dir)
    if end == cfg.steps:
        _atomic_write_text(run_dir / DONE_FILE, json.dumps({"summary": summary, "time_unix": time.time()},
                                                           indent=2, sort_keys=True) + "\n")
    return summary
