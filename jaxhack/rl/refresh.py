"""v_hack refresh during Phase 3 (the reference's `refresh V` with a basis-overlap guard;
docs/phase3.md, "v_hack refresh").

Every `vhack_refresh_every` steps (TrainConfig; None / 0: off) the trainer re-extracts v_hack from
the run's own rollouts of the last N steps: per problem, hacked rows are paired with non-hacked rows
(`projection.pairs.pairs_from_pools`, teacher rows included: they are the run's hacks), and
`extract_v_hack` runs at the CURRENT adapter with the run's k and noise-floor options. Guard: the
new basis is accepted only when its overlap with the current one,
    overlap = mean over valid modules of |V_old V_new^T|_F^2 / k      (1: same span, ~k/dim: random)
is at least `vhack_refresh_min_overlap`; otherwise the old v_hack stays (a refresh from a handful of
pairs that points elsewhere is noise, not a drifted hack direction). Only arms with the real v_hack
refresh (control "none"): random_v and shuffled stay controls. Each attempt is a line of
RUN/vhack_refresh.jsonl; an accepted v_hack is saved in RUN/v_hack_refresh/step_NNNN (resume loads
the last one at or before the resumed step).
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxhack.projection.cosines import directions
from jaxhack.projection.pairs import pairs_from_pools
from jaxhack.projection.v_hack import extract_v_hack, load_v_hack, save_v_hack

REFRESH_LOG = "vhack_refresh.jsonl"
REFRESH_DIR = "v_hack_refresh"


def basis_overlap(old: dict, new: dict) -> float:
    """Mean over modules valid in both of |V_old V_new^T|_F^2 / k (k = rows of the old basis)."""
    vals = []
    for name, v_old in directions(old).items():
        a = np.asarray(v_old, np.float64)
        b = np.asarray(directions(new)[name], np.float64)  # [L, k, dim]
        for layer in range(a.shape[0]):
            rows_a = a[layer][np.any(a[layer] != 0, axis=-1)]
            rows_b = b[layer][np.any(b[layer] != 0, axis=-1)]
            if len(rows_a) and len(rows_b):
                vals.append(float(np.sum((rows_a @ rows_b.T) ** 2) / len(rows_a)))
    return float(np.mean(vals)) if vals else float("nan")


def due(cfg, done: int) -> bool:
    every = cfg.vhack_refresh_every or 0
    return every > 0 and done % every == 0 and done < cfg.steps


def refresh_v_hack(ctx, trainable, recent_records: list[dict], done: int) -> tuple[dict | None, dict]:
    """(new bundle or None, log entry). recent_records: the rollout records of the last N steps."""
    cfg = ctx.cfg
    entry = {"step": done, "n_records": len(recent_records)}
    try:
        pairs = pairs_from_pools(recent_records, recent_records)
    except ValueError as err:  # no (hacked, clean) pair yet
        return None, dict(entry, accepted=False, reason=str(err))
    if cfg.vhack_pairs:
        pairs = pairs[:cfg.vhack_pairs]
    bundle, info = extract_v_hack(pairs, ctx.tokenizer, trainable, ctx.frozen, ctx.params, ctx.config, k=cfg.k,
                                  batch_size=cfg.vhack_batch, max_len=cfg.vhack_max_len,
                                  axis_threshold=cfg.vhack_axis_threshold,
                                  noise_floor_quantile=cfg.vhack_noise_floor_quantile, progress=False)
    overlap = basis_overlap(ctx.v_hack, bundle)
    accepted = bool(overlap >= cfg.vhack_refresh_min_overlap)
    entry.update(n_pairs=len(pairs), overlap=overlap, min_overlap=cfg.vhack_refresh_min_overlap, accepted=accepted,
                 reason="accepted" if accepted else "basis overlap below the guard: kept the old v_hack")
    if accepted and jax.process_index() == 0:  # several processes: process 0 writes the files
        save_v_hack(Path(ctx.run_dir) / REFRESH_DIR / f"step_{done:04d}", bundle,
                    {**{k: v for k, v in info.items() if isinstance(v, (int, float, str, type(None)))},
                     "source": "refresh from the run's own rollouts", "step": done, "overlap": overlap}, force=True)
    return (bundle if accepted else None), entry


def latest_refresh(run_dir, start: int) -> dict | None:
    """The last accepted refreshed v_hack saved at or before step `start` (for resume), else None."""
    root = Path(run_dir) / REFRESH_DIR
    if not root.is_dir():
        return None
    steps = sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if p.is_dir())
    steps = [s for s in steps if s <= start]
    return load_v_hack(root / f"step_{steps[-1]:04d}")[0] if steps else None
