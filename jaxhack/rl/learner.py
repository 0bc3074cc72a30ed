"""Phase 3 learner: the optimizer chain, the training batch built from a `Rollout`, reference
log-probs, and the jitted update that differentiates the library GRPO loss
(`grads.losses.grpo_batch_loss`, the loss the tests check) (docs/phase3.md, step 4).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxhack.grads.batch import make_batch, place_completion_values
from jaxhack.grads.losses import centered_advantages, grpo_batch_loss, reference_logprobs, sequence_logprobs
from jaxhack.grads.microbatch import length_microbatches, put_rows, take_rows
from jaxhack.grads.shared_prompt import batched_shared_prompt_logprobs, group_microbatches, shared_prompt_logprobs
from jaxhack.models.config import Qwen3Config
from jaxhack.parallel import mesh as meshlib
from jaxhack.projection.cosines import directions, gradient_cosines, safe_norm
from jaxhack.projection.modules import to_module_vectors
from jaxhack.projection.arms import ARMS
from jaxhack.projection.optax_projection import chain_names as _chain_names
from jaxhack.projection.optax_projection import projected_adamw, projection_metrics, update_metrics
from jaxhack.rl.config import TrainConfig
from jaxhack.rl.rollout import Rollout


# ----------------------------------------------------------------------------------------------
# optimizer

def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup > 0 else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, v_hack: dict, projection_mode: str) -> optax.GradientTransformation:
    """`projection.optax_projection.projected_adamw` (the one chain builder) with this run's settings.
    placement "gradient": projection -> clip_by_global_norm -> adamw: the clip sees what is actually
    trained (the projected delta_s; delta_s_hack's duplicate gradient is zeroed outside route) and
    cos_in is measured on the raw loss gradient. placement "update": zero_hack_duplicate -> clip ->
    adamw -> projection(placement="update"): the applied update itself has no hack-ward component
    (closes the leak through Adam's per-coordinate rescaling). LoRA arms freeze A (LoRA-FA)."""
    return projected_adamw(v_hack, lr_schedule(cfg), mode=projection_mode, gate=cfg.gate,
                           overshoot=cfg.overshoot, placement=cfg.placement, b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                           freeze_a=freeze_lora_a_for(cfg))


def freeze_lora_a_for(cfg: TrainConfig) -> bool:
    """LoRA arms train B only (LoRA-FA): v_hack extracted at B = 0 has no A-part (docs/projection.md)."""
    return ARMS[cfg.arm].adapter == "lora"


def chain_names(cfg: TrainConfig) -> list[str]:
    """The chain's transforms in order (for run.json)."""
    return _chain_names(cfg.placement, freeze_lora_a_for(cfg), cfg.max_grad_norm > 0)


# ----------------------------------------------------------------------------------------------
# the training batch

def train_batch(rollout: Rollout, cfg: TrainConfig, pad_id: int, n_rows: int, seq_len: int
                ) -> tuple[dict, np.ndarray]:
    """Right-padded batch [n_rows, seq_len]: tokens / attention_mask / completion_mask, old_logp
    [n_rows, seq_len], advantage [n_rows], use_current [n_rows] (old_logp := stop_gradient(logp)),
    prompt_len [n_rows].
    Rows past the rollout's N are padding with an empty completion mask (zero loss and gradient).
    Returns (batch, advantages [N])."""
    n_real = len(rollout)
    pad_rows = n_rows - n_real
    prompts = list(rollout.prompt_ids) + [rollout.prompt_ids[0]] * pad_rows
    comps = list(rollout.completion_ids) + [[]] * pad_rows
    batch = make_batch(prompts, comps, pad_id=pad_id, padding="right", length=seq_len)
    batch["prompt_len"] = np.asarray([len(p) for p in prompts], np.int32)  # [n_rows] (the shared-prompt layout)
    adv = np.asarray(centered_advantages(rollout.rewards, group_size=cfg.group_size))  # [N]
    use_current = np.ones((n_rows,), bool)
    sampler_vals = []
    for i, (ids, logp) in enumerate(zip(rollout.completion_ids, rollout.sampler_logp)):
        if cfg.old_logp == "sampler" and logp is not None:
            use_current[i] = False
            sampler_vals.append(logp)
        else:
            sampler_vals.append(np.zeros(len(ids), np.float32))
    sampler_vals += [np.zeros(0, np.float32)] * pad_rows
    batch["old_logp"] = place_completion_values(batch, sampler_vals)
    batch["advantage"] = np.concatenate([adv, np.zeros(pad_rows, np.float32)]).astype(np.float32)
    batch["use_current"] = use_current
    if cfg.mix_per_group > 0:  # rows from the teacher pool: the update splits cos_in by source
        batch["is_teacher"] = np.asarray([s == "teacher" for s in rollout.sources] + [False] * pad_rows)
    chex.assert_shape(batch["tokens"], (n_rows, seq_len))
    return batch, adv


def reference_logp(params, config: Qwen3Config, batch: dict, cfg: TrainConfig, mesh=None) -> np.ndarray:
    """[N,T] log-probs of the zero-adapter reference (the base model) in length-bucketed micro-batches
    of cfg.microbatch rows (`grads.losses.reference_logprobs`; right-padded rows, so causal attention
    is exact and cutting trailing padding changes no real token's log-prob).
    mesh: rows sharded over its data axis (`sharded_reference_logp`); None: one device.
    cfg.update_layout "shared_prompt": whole groups per micro-batch, each prompt once
    (`grads.shared_prompt.batched_shared_prompt_logprobs`)."""
    if mesh is not None:
        return sharded_reference_logp(params, config, batch, cfg, mesh)
    if cfg.update_layout == "shared_prompt":
        return batched_shared_prompt_logprobs(params, config, None, batch, cfg.group_size, cfg.microbatch,
                                              cfg.length_multiple, cfg.microbatch_tokens, cfg.logp_chunk)
    return np.asarray(reference_logprobs(params, config, batch["tokens"], batch["attention_mask"],
                                         chunk=cfg.logp_chunk, attention="causal",
                                         microbatch=cfg.microbatch, length_multiple=cfg.length_multiple,
                                         max_tokens=cfg.microbatch_tokens))


# ----------------------------------------------------------------------------------------------
# data parallel (a mesh with a `data` axis of D devices; jaxhack.parallel.mesh)

def row_plan(batch: dict, microbatch: int | None, length_multiple: int, mesh,
             microbatch_tokens: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Micro-batches of a host batch for D devices: D x `microbatch` rows each, or D x (budget // T) at
    T positions under the token budget (each device gets the rows, and so the memory, that one device
    would), length-bucketed as on one device (`length_microbatches(devices=D)`); None: every row at
    once (N must be a multiple of D). Rows -1 are empty padding."""
    n, T = np.asarray(batch["tokens"]).shape
    if microbatch is None:
        if n % meshlib.data_size(mesh):
            raise ValueError(f"{n} rows are not a multiple of the mesh's data axis ({meshlib.data_size(mesh)})")
        return [(np.arange(n), T)]
    # D x (microbatch, or fewer under the token budget) rows: every device gets the same number
    return length_microbatches(np.asarray(batch["attention_mask"]).sum(1), microbatch, multiple=length_multiple,
                               max_len=T, max_tokens=microbatch_tokens, devices=meshlib.data_size(mesh))


def learner_plan(host: dict, update_layout: str, group_size: int, microbatch: int | None, length_multiple: int,
                 mesh, microbatch_tokens: int | None = None) -> list[tuple[np.ndarray, int, dict]]:
    """The learner's micro-batches of a host batch: [(rows, T, layout)], `row_plan`'s with no layout
    arrays, or with update_layout "shared_prompt" whole groups and their `group_layout` (on a mesh: whole
    groups per device)."""
    if update_layout == "shared_prompt":
        return group_microbatches(host, group_size, microbatch, length_multiple, microbatch_tokens,
                                  devices=meshlib.data_size(mesh))
    return [(rows, t, {}) for rows, t in row_plan(host, microbatch, length_multiple, mesh, microbatch_tokens)]


@functools.lru_cache(maxsize=8)
def _sharded_logprobs(mesh, config: Qwen3Config, chunk: int, shared_prompt: bool = False):
    """The base model's log-probs of a micro-batch, its leading axis (rows; with shared_prompt the
    groups' layout arrays too, whole groups per device) sharded over `data`, params replicated."""
    rows, rep = P(meshlib.DATA), P()
    if shared_prompt:
        def body(params, tokens, layout):
            return shared_prompt_logprobs(params, config, None, tokens, layout, chunk=chunk)
    else:
        def body(params, tokens, mask):
            return sequence_logprobs(params, config, None, tokens, mask, chunk=chunk, attention="causal")
    f = jax.shard_map(body, mesh=mesh, in_specs=(rep, rows, rows), out_specs=rows, check_vma=False)
    return jax.jit(f, in_shardings=(meshlib.replicated(mesh), meshlib.row_sharded(mesh), meshlib.row_sharded(mesh)),
                   out_shardings=meshlib.row_sharded(mesh))


def sharded_reference_logp(params, config: Qwen3Config, batch: dict, cfg: TrainConfig, mesh) -> np.ndarray:
    """`reference_logp` with the rows of each micro-batch sharded over the mesh's data axis (one jitted
    program per micro-batch shape, params replicated); with update_layout "shared_prompt" whole groups
    per device (`group_microbatches(devices=D)`). Returns [N,T] host log-probs."""
    host = {k: np.asarray(batch[k]) for k in ("tokens", "attention_mask", "prompt_len") if k in batch}
    shared = cfg.update_layout == "shared_prompt"
    fn, sharding = _sharded_logprobs(mesh, config, cfg.logp_chunk, shared), meshlib.row_sharded(mesh)
    parts = []
    for rows, t, layout in learner_plan(host, cfg.update_layout, cfg.group_size, cfg.microbatch, cfg.length_multiple,
                                        mesh, cfg.microbatch_tokens):
        mb = take_rows(host, rows, t)
        second = meshlib.tree_to_global(layout, sharding) if shared else meshlib.to_global(mb["attention_mask"], sharding)
        parts.append((rows, t, fn(params, meshlib.to_global(mb["tokens"], sharding), second)))  # [rows, t], dispatched
    return put_rows(np.zeros(host["tokens"].shape, np.float32), parts, meshlib.to_host)


# ----------------------------------------------------------------------------------------------
# the jitted update

@dataclasses.dataclass(frozen=True)
class LossHyper:
    """The static keyword arguments of `grpo_batch_loss` (a jit cache key)."""
    group_size: int
    max_new: int
    prompts_per_step: int
    clip_eps: float
    clip_eps_high: float | None
    beta: float
    remat: str
    chunk: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "LossHyper":
        return cls(cfg.group_size, cfg.max_new, cfg.prompts_per_step, cfg.clip_eps, cfg.clip_eps_high,
                   cfg.beta, cfg.remat, cfg.logp_chunk)


def make_update_fn(optimizer: optax.GradientTransformation, config: Qwen3Config, hyper: LossHyper,
                   microbatch: int | None, v_hack: dict, length_multiple: int = 512, mesh=None,
                   microbatch_tokens: int | None = None, update_layout: str = "rows"):
    """update(trainable, opt_state, frozen, params, batch) -> (trainable, opt_state, metrics).

    The loss is `grpo_batch_loss` (causal attention: the rows are right-padded). With `microbatch`
    M the N rows run as length-bucketed micro-batches (`grads.microbatch.length_microbatches`: rows
    sorted by real length, M at a time, each cut to its longest row rounded up to `length_multiple`),
    one jitted forward + backward each, losses and gradients summed (the sum is the full-batch loss;
    memory is that of one micro-batch of at most M rows, whatever N); `microbatch_tokens` B caps a
    micro-batch of T positions at B // T rows (short rows go many at a time, long rows few). Then one
    jitted step applies the optimizer chain (projection, clip, AdamW) and computes the metrics.
    `batch`: numpy or jax arrays [N, T] (host copies are taken for the micro-batch plan); optional
    is_teacher [N] bool adds the student / teacher split of cos_in (the reference's cin_s / cin_t):
    the loss is a sum over rows, so the teacher rows' gradient is that of the loss with the other rows
    masked out (one more forward + backward), and the student part is the rest.

    mesh (data parallel, `jaxhack.parallel.mesh`): micro-batches of microbatch * D rows (`row_plan`),
    their rows sharded over `data`; each device differentiates the loss of its rows (shard_map) and
    the (loss, aux, grads) sums are psum'd over `data`, so every device holds the full-batch gradient;
    `apply` is jitted with replicated in/out shardings and donates trainable and opt_state. trainable,
    opt_state, frozen and params are replicated global arrays; batch a host (numpy) batch.

    update_layout "shared_prompt": micro-batches of whole groups (`grads.shared_prompt.group_microbatches`,
    by the batch's prompt_len; on a mesh whole groups per device), each group's prompt run once; the
    same loss and gradient up to the float summation order."""
    loss_fn = functools.partial(grpo_batch_loss, attention="causal", **dataclasses.asdict(hyper))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(3,))
    if mesh is not None:
        rep, rows = meshlib.replicated(mesh), meshlib.row_sharded(mesh)

        def local_grads(trainable, frozen, params, part):
            out = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, params, config, part)
            return jax.lax.psum(out, meshlib.DATA)

        sharded_grad_fn = jax.jit(
            jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(), P(), P(meshlib.DATA)), out_specs=P(),
                          check_vma=False),
            in_shardings=(rep, rep, rep, rows), out_shardings=rep)

    def global_norm(tree):
        vecs = to_module_vectors(tree)  # SVD: delta_s only (delta_s_hack's gradient is a copy)
        return jnp.sqrt(sum(jnp.sum(jnp.square(safe_norm(v))) for v in vecs.values()))

    @jax.jit
    def accumulate(total, part):
        return jax.tree.map(jnp.add, total, part)

    def grads_of(trainable, frozen, params, batch):
        if mesh is None and microbatch is None and update_layout == "rows":
            parts = [jax.tree.map(jnp.asarray, batch)]
        else:  # on a mesh each device gets its block of rows (shared_prompt: its whole groups and their rows)
            host = {k: np.asarray(v) for k, v in batch.items()}
            place = (lambda tree: jax.tree.map(jnp.asarray, tree)) if mesh is None else (
                lambda tree: meshlib.tree_to_global(tree, rows))
            parts = (place({**take_rows(host, rows_, t), **layout}) for rows_, t, layout in
                     learner_plan(host, update_layout, hyper.group_size, microbatch, length_multiple, mesh,
                                  microbatch_tokens))
        total = None
        for part in parts:
            if mesh is None:
                (loss, aux), grads = grad_fn(trainable, frozen, params, config, part)
            else:
                (loss, aux), grads = sharded_grad_fn(trainable, frozen, params, part)
            total = (loss, aux, grads) if total is None else accumulate(total, (loss, aux, grads))
        return total

    def apply(trainable, opt_state, loss, aux, grads, g_teacher):
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        n_tok = jnp.maximum(aux["n_tokens"], 1.0)
        split = {}
        if g_teacher is not None:
            g_student = jax.tree.map(jnp.subtract, grads, g_teacher)
            split = {"cos_in_teacher": gradient_cosines(v_hack, g_teacher)["cos"],
                     "cos_in_student": gradient_cosines(v_hack, g_student)["cos"]}
        metrics = {"loss": loss, "kl_mean": aux["kl_sum"] / n_tok, "pg_token_mean": aux["pg_sum"] / n_tok,
                   "ratio_mean": aux["ratio_sum"] / n_tok, "clip_frac": aux["clipped"] / n_tok,
                   "n_tokens": aux["n_tokens"], "grad_norm": global_norm(grads),
                   "update_norm": global_norm(updates), **projection_metrics(opt_state),
                   **update_metrics(v_hack, updates), **split}
        return new_trainable, opt_state, metrics

    if mesh is None:
        apply = jax.jit(apply)
    else:  # every argument and result replicated; the old trainable / opt_state buffers are reused
        apply = jax.jit(apply, in_shardings=rep, out_shardings=rep, donate_argnums=(0, 1))

    def update(trainable, opt_state, frozen, params, batch):
        batch = dict(batch)
        is_teacher = batch.pop("is_teacher", None)  # [N] bool, only when teacher rows are mixed in
        loss, aux, grads = grads_of(trainable, frozen, params, batch)
        g_teacher = None
        if is_teacher is not None:
            mask = np.asarray(batch["completion_mask"])
            t_batch = dict(batch, completion_mask=mask * np.asarray(is_teacher)[:, None].astype(mask.dtype))
            g_teacher = grads_of(trainable, frozen, params, t_batch)[2]
        return apply(trainable, opt_state, loss, aux, grads, g_teacher)

    return update


def v_hack_digest(v_hack: dict) -> str:
    """sha256 of the v_hack directions (names, shapes and fp32 bytes)."""
    h = hashlib.sha256()
    for name, v in sorted(directions(v_hack).items()):
        a = np.ascontiguousarray(np.asarray(v, np.float32))
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_UPDATE_CACHE: dict = {}
# TrainConfig fields the optimizer chain and the update's structure depend on (with LossHyper)
OPTIMIZER_FIELDS = ("arm", "lr", "warmup_steps", "steps", "min_lr_ratio", "weight_decay", "b1", "b2", "adam_eps",
                    "max_grad_norm", "gate", "overshoot", "placement", "microbatch", "length_multiple",
                    "microbatch_tokens", "update_layout")


def cached_update_fn(cfg: TrainConfig, v_hack: dict, projection_mode: str, config: Qwen3Config, mesh=None
                     ) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jitted update) for this run; runs of one process with the same optimizer settings,
    loss hyper-parameters, model config and v_hack share them, so jit compiles once (a sweep or a
    resumed run in the same process). Keeps the 4 most recent entries."""
    hyper = LossHyper.from_config(cfg)
    key = (tuple(getattr(cfg, f) for f in OPTIMIZER_FIELDS), projection_mode, hyper, config,
           v_hack_digest(v_hack), mesh)
    if key not in _UPDATE_CACHE:
        optimizer = make_optimizer(cfg, v_hack, projection_mode)
        _UPDATE_CACHE[key] = (optimizer, make_update_fn(optimizer, config, hyper, cfg.microbatch, v_hack,
                                                        cfg.length_multiple, mesh, cfg.microbatch_tokens,
                                                        cfg.update_layout))
        while len(_UPDATE_CACHE) > 4:
            _UPDATE_CACHE.pop(next(iter(_UPDATE_CACHE)))
    return _UPDATE_CACHE[key]
