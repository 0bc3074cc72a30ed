"""`hack_projection`: an optax GradientTransformation that removes the hack-ward part of the
adapter gradient (or update) per module, and reports cosines in its state (docs/projection.md).

Per module m with V [k, dim] (orthonormal, hack-ward rows) and gradient vector g [dim] (SVD: the
delta_s gradient; LoRA: concat(a.ravel(), b.ravel())), in the LOSS-gradient sign convention:
  c = V g                                  [k]
  one_sided: removed = overshoot * relu(c) V    (only the hack-ward part)
  no_gate:   removed = overshoot * c V          (the whole span(V) component)
  reverse:   removed = 2 * overshoot * relu(c) V  (the reference's reverse, c_use = 2c: the hack-ward
                                                  part is reflected, V g_out = -c where c > 0)
  anti_one_sided: removed = -overshoot * relu(-c) V  (only the anti-hack part; a control arm:
                                                  g_out = g + overshoot * relu(-c) V; the old "reverse")
  erase:   g <- g - removed
  route:   delta_s <- g - removed, delta_s_hack <- removed  (SVD only)
  measure: g unchanged (bit-identical), state still reports the cosines
delta_s_hack (SVD) is trained only under route: with erase and measure its incoming gradient is
replaced by zeros (its raw gradient is an exact copy of delta_s's, since the forward uses their sum).

Placement: placement="gradient" goes BEFORE the optimizer (optax.chain(hack_projection(...),
optax.adamw(...))) and sees loss gradients. placement="update" goes AFTER it (optax.chain(
optax.adamw(...), hack_projection(..., placement="update"))) and sees updates, which point along
-gradient: the transform negates them, projects in the gradient convention, and negates back, so a
hack-ward update (one that moves along -v) is what gets removed. Reported cosines are always in the
gradient convention (cos > 0: hack-ward). `chain_with_projection` builds either chain.
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxhack.projection.cosines import HIGHEST, coefficients, directions, module_mean, safe_norm
from jaxhack.projection.modules import adapter_kind, from_module_vector, module_vector

Mode = Literal["erase", "route", "measure"]
Gate = Literal["one_sided", "no_gate", "reverse", "anti_one_sided"]
GATES = ("one_sided", "no_gate", "reverse", "anti_one_sided")
# gates that erase (overshoot <= 1): each module's cosine may only fall to min(cos_in, 0); lower is
# over-projection (counted per module in `n_overprojected`; a bug when non-zero)
ERASE_GATES = ("one_sided", "no_gate")
OVERPROJECTION_TOL = 1e-4  # cosine slack for fp32 rounding
Placement = Literal["gradient", "update"]


class HackProjectionState(NamedTuple):
    """Metrics of the last update (zeros after init). Per module: {name: [L]}; means: scalars."""
    cos_in: dict[str, jax.Array]   # top-1 cos of the incoming gradient, per module [L]
    cos_out: dict[str, jax.Array]  # same after projection (delta_s part under route) [L]
    fired: dict[str, jax.Array]    # 1.0 where the projection removed anything [L]
    mean_cos_in: jax.Array         # [] mean over valid modules
    mean_cos_out: jax.Array        # []
    frac_fired: jax.Array          # [] share of valid modules that fired
    frac_positive: jax.Array       # [] share of valid modules with any c > 0 before projection
    removed_norm: jax.Array        # [] global norm of what was removed (0 under measure)
    in_norm: jax.Array             # [] global norm of the incoming projected modules' vectors
    n_overprojected: jax.Array     # [] valid modules where some row j has (c_out_j - min(c_in_j, 0)) / |g_in|
                                   #    < -OVERPROJECTION_TOL (cos_out below min(cos_in, 0), over |g_in|)


def gate_weights(c: jax.Array, gate: Gate) -> jax.Array:
    """Coefficients of the part to remove. c: [..., k] -> [..., k]."""
    if gate == "one_sided":
        return jax.nn.relu(c)
    if gate == "no_gate":
        return c
    if gate == "reverse":
        return 2.0 * jax.nn.relu(c)
    if gate == "anti_one_sided":
        return -jax.nn.relu(-c)
    raise ValueError(f"unknown gate {gate!r}; expected one of {', '.join(GATES)}")


def project_vector(v: jax.Array, g: jax.Array, gate: Gate = "one_sided", overshoot: float = 1.0):
    """Project one module's gradient. v: [L, k, dim]; g: [..., L, dim] (gradient convention).

    Returns (g_out [..., L, dim] fp32, removed [..., L, dim] fp32, c [..., L, k]), g_out = g - removed.
    The target coefficients are t = c - overshoot * gate(c); after the first subtraction one
    refinement step removes the fp32 rounding left in span(V) ("twice is enough"), so V g_out = t
    to ~1e-7 relative instead of ~|g| * 1e-6.
    """
    v32 = v.astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    c = coefficients(v32, g32)  # [..., L, k]
    w = overshoot * gate_weights(c, gate)
    target = c - w
    g1 = g32 - jnp.einsum("...lk,lkd->...ld", w, v32, precision=HIGHEST)
    err = coefficients(v32, g1) - target  # [..., L, k] rounding error along V
    g_out = g1 - jnp.einsum("...lk,lkd->...ld", err, v32, precision=HIGHEST)
    return g_out, g32 - g_out, c


def _cos_top(c: jax.Array, g: jax.Array) -> jax.Array:
    """Top-1 cosine from coefficients c [L, k] and g [L, dim]; 0 where |g| = 0."""
    norm = safe_norm(g)
    ok = norm > 0
    return jnp.where(ok, c[..., 0] / jnp.where(ok, norm, 1.0), 0.0)


def _sqrt0(sq: jax.Array) -> jax.Array:
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _check_args(mode, gate, placement, overshoot):
    if mode not in ("erase", "route", "measure"):
        raise ValueError(f"unknown mode {mode!r}; expected one of erase, route, measure")
    gate_weights(jnp.zeros(1), gate)  # validates the gate name
    if placement not in ("gradient", "update"):
        raise ValueError(f"unknown placement {placement!r}; expected gradient or update")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot}")


def hack_projection(v_hack: dict, mode: Mode = "erase", gate: Gate = "one_sided",
                    overshoot: float = 1.0, placement: Placement = "gradient"
                    ) -> optax.GradientTransformation:
    """Optax transform projecting the adapter gradient/update against v_hack ({name: [L, k, dim]}
    or a bundle with key "V"). The update tree must be the trainable adapter tree {name: module}."""
    _check_args(mode, gate, placement, overshoot)
    V = {name: jnp.asarray(v, jnp.float32) for name, v in directions(v_hack).items()}  # [L, k, dim]
    for name, v in V.items():
        chex.assert_rank(v, 3)
    valid = {name: jnp.any(v[:, 0, :] != 0, axis=-1) for name, v in V.items()}  # [L]
    sign = 1.0 if placement == "gradient" else -1.0

    def init_fn(params):
        del params
        zeros = {name: jnp.zeros(v.shape[0], jnp.float32) for name, v in V.items()}
        z = jnp.zeros((), jnp.float32)
        return HackProjectionState(zeros, dict(zeros), dict(zeros), z, z, z, z, z, z, z)

    def update_fn(updates, state, params=None):
        del state, params
        kind = adapter_kind(updates)
        if mode == "route" and kind != "svd":
            raise ValueError("mode='route' needs an SVD adapter (delta_s_hack); got a LoRA tree")
        missing = sorted(set(V) - set(updates))
        if missing:
            raise ValueError(f"v_hack modules {missing} not in the update tree (has {sorted(updates)})")
        out, cos_in, cos_out, fired, positive, over = {}, {}, {}, {}, {}, {}
        removed_sq = jnp.zeros((), jnp.float32)
        in_sq = jnp.zeros((), jnp.float32)
        for name, module in updates.items():
            new = dict(module)
            if kind == "svd":  # not trained outside route; under route it gets the removed part below
                new["delta_s_hack"] = jnp.zeros_like(module["delta_s_hack"])
            if name in V:
                x = module_vector(module)  # [L, dim]
                g = sign * x.astype(jnp.float32)
                g_out, removed, c = project_vector(V[name], g, gate, overshoot)
                w_fired = jnp.any(overshoot * gate_weights(c, gate) != 0, axis=-1)  # [L]
                positive[name] = jnp.any(c > 0, axis=-1).astype(jnp.float32)
                cos_in[name] = _cos_top(c, g)
                in_sq = in_sq + jnp.sum(jnp.square(g))
                if mode == "measure":
                    cos_out[name] = cos_in[name]
                    fired[name] = jnp.zeros_like(cos_in[name])
                else:
                    cos_out[name] = _cos_top(coefficients(V[name], g_out), g_out)
                    fired[name] = w_fired.astype(jnp.float32)
                    removed_sq = removed_sq + jnp.sum(jnp.square(removed))
                    new = from_module_vector((sign * g_out).astype(x.dtype), new)
                    if mode == "route":
                        new["delta_s_hack"] = (sign * removed).astype(module["delta_s_hack"].dtype)
                # over-projection: some row's coefficient pushed below min(c_in, 0), in units of the
                # incoming norm (cos_out_j < min(cos_in_j, 0) - tol with both cosines over |g_in|, so
                # the norm shrink of an honest erase with k > 1 is not counted)
                c_out = coefficients(V[name], g_out)  # [L, k]
                n_in = safe_norm(g)[..., None]  # [L, 1]
                below = (c_out - jnp.minimum(c, 0.0)) < -OVERPROJECTION_TOL * jnp.where(n_in > 0, n_in, 0.0)
                over[name] = jnp.any(below & (n_in > 0), axis=-1).astype(jnp.float32)
            out[name] = new
        n_over = sum(jnp.sum(over[n] * valid[n]) for n in over) if over else jnp.zeros((), jnp.float32)
        state = HackProjectionState(
            cos_in=cos_in, cos_out=cos_out, fired=fired,
            mean_cos_in=module_mean(cos_in, valid), mean_cos_out=module_mean(cos_out, valid),
            frac_fired=module_mean(fired, valid), frac_positive=module_mean(positive, valid),
            removed_norm=_sqrt0(removed_sq), in_norm=_sqrt0(in_sq), n_overprojected=n_over)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def chain_with_projection(optimizer: optax.GradientTransformation, v_hack: dict,
                          placement: Placement = "gradient",
                          before: tuple[optax.GradientTransformation, ...] = (),
                          clip: optax.GradientTransformation | None = None,
                          **kwargs) -> optax.GradientTransformation:
    """The one chain builder. placement="gradient": chain(*before, projection, clip, optimizer);
    placement="update": chain(*before, zero_hack_duplicate, clip, optimizer, projection) (kwargs:
    mode, gate, overshoot). The clip (e.g. clip_by_global_norm) always sees what is actually
    trained: after the projection (which zeroes delta_s_hack's duplicate gradient outside route), or,
    for placement="update", after the duplicate is zeroed. `before` holds e.g. `freeze_lora_a`."""
    proj = hack_projection(v_hack, placement=placement, **kwargs)
    clip = () if clip is None else (clip,)
    if placement == "gradient":
        return optax.chain(*before, proj, *clip, optimizer)
    return optax.chain(*before, zero_hack_duplicate(), *clip, optimizer, proj)


def zero_hack_duplicate() -> optax.GradientTransformation:
    """Zero delta_s_hack's gradient (SVD; an exact copy of delta_s's) so that a clip or an optimizer
    before an update-placement projection does not count it twice. LoRA trees pass unchanged."""
    def update_fn(updates, state, params=None):
        del params
        out = {name: (dict(m, delta_s_hack=jnp.zeros_like(m["delta_s_hack"])) if "delta_s_hack" in m else m)
               for name, m in updates.items()}
        return out, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def freeze_lora_a() -> optax.GradientTransformation:
    """LoRA-FA: zero the gradient of every LoRA `a` (A stays at its init; only B trains). Used by the
    lora_projected arm: v_hack extracted at B = 0 has no A-part, so A updates would go unprojected."""
    def update_fn(updates, state, params=None):
        del params
        out = {name: (dict(m, a=jnp.zeros_like(m["a"])) if "a" in m else m) for name, m in updates.items()}
        return out, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def projected_adamw(v_hack: dict, learning_rate, *, mode: Mode, gate: Gate = "one_sided",
                    overshoot: float = 1.0, placement: Placement = "gradient", b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                    max_grad_norm: float = 1.0, freeze_a: bool = False) -> optax.GradientTransformation:
    """The Phase 3 optimizer chain (also Phase 2 with lr > 0): [freeze_lora_a] -> projection ->
    clip_by_global_norm -> adamw (placement "gradient"), or [freeze_lora_a] -> zero_hack_duplicate ->
    clip -> adamw -> projection (placement "update"). learning_rate: float or optax schedule."""
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else None
    before = (freeze_lora_a(),) if freeze_a else ()
    return chain_with_projection(adamw, v_hack, placement=placement, before=before, clip=clip,
                                 mode=mode, gate=gate, overshoot=overshoot)


def chain_names(placement: Placement, freeze_a: bool = False, clip: bool = True) -> list[str]:
    """The transforms of `projected_adamw` in order (for run.json)."""
    head = ["freeze_lora_a"] if freeze_a else []
    c = ["clip_by_global_norm"] if clip else []
    if placement == "gradient":
        return head + ["hack_projection"] + c + ["adamw"]
    return head + ["zero_hack_duplicate"] + c + ["adamw", "hack_projection(update)"]


def update_metrics(v_hack: dict, updates: dict) -> dict[str, jax.Array]:
    """The Adam leak: cosines of the APPLIED update with v_hack, in the gradient convention (the
    update moves along -g, so it is negated first; > 0 = the step moves hack-ward).
    update_cos: mean over valid modules of the top-1 cosine of -update; update_frac_positive: share
    of valid modules with cos > 0."""
    V = {name: jnp.asarray(v, jnp.float32) for name, v in directions(v_hack).items()}
    valid = {name: jnp.any(v[:, 0, :] != 0, axis=-1) for name, v in V.items()}
    cos = {}
    for name, v in V.items():
        g = -module_vector(updates[name]).astype(jnp.float32)  # [L, dim]
        cos[name] = _cos_top(coefficients(v, g), g)
    return {"update_cos": module_mean(cos, valid),
            "update_frac_positive": module_mean({n: (c > 0).astype(jnp.float32) for n, c in cos.items()}, valid)}


def null_cos_sd(v_hack: dict) -> float:
    """Null baseline: the standard deviation of the mean (over valid modules) top-1 cosine of a
    random direction, sqrt(sum_m 1/dim_m) / M (a random unit vector in dim_m dims has cos with a fixed
    row ~ N(0, 1/dim_m)). A step's z = mean_cos / null_cos_sd."""
    import numpy as np
    inv = []
    for v in directions(v_hack).values():
        v = np.asarray(v)
        n_valid = int(np.sum(np.any(v[:, 0, :] != 0, axis=-1)))
        inv += [1.0 / v.shape[-1]] * n_valid
    return float(np.sqrt(np.sum(inv)) / len(inv)) if inv else float("nan")


def null_abs_cos(v_hack: dict) -> float:
    """The reference's null: mean over valid modules of sqrt(k / dim_m), the expected norm of a random
    unit direction's projection onto the k-dim span(V_m) (|relu(V g)| / |g| is about half of it)."""
    import numpy as np
    vals = []
    for v in directions(v_hack).values():
        v = np.asarray(v)
        n_valid = int(np.sum(np.any(v[:, 0, :] != 0, axis=-1)))
        vals += [np.sqrt(v.shape[1] / v.shape[-1])] * n_valid
    return float(np.mean(vals)) if vals else float("nan")


def find_projection_state(opt_state: Any) -> HackProjectionState:
    """The HackProjectionState inside a (possibly chained / nested) optax state (optax.tree_utils)."""
    state = optax.tree_utils.tree_get(opt_state, HackProjectionState.__name__)
    if state is None:
        raise LookupError("no HackProjectionState in the optimizer state")
    return state


def projection_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Scalar metrics of the last step: mean_cos_in, mean_cos_out, frac_fired, frac_positive,
    removed_norm, removed_frac (removed_norm / in_norm: the removed mass), n_overprojected."""
    s = find_projection_state(opt_state)
    ok = s.in_norm > 0
    return {"mean_cos_in": s.mean_cos_in, "mean_cos_out": s.mean_cos_out, "frac_fired": s.frac_fired,
            "frac_positive": s.frac_positive, "removed_norm": s.removed_norm,
            "removed_frac": jnp.where(ok, s.removed_norm / jnp.where(ok, s.in_norm, 1.0), 0.0),
            "n_overprojected": s.n_overprojected}
