"""Phase 3 data order: the train / held-out split, the seeded per-epoch problem order, and the
teacher pool mixed into the groups (docs/phase3.md).

`--mix-teacher templates` (the smoke preset's default) needs no pool on disk: the teacher rows are the
environment's template hack completions of each problem (`env.templates.hack_completion`, clean
canonical solutions in mode "none"), so a random tiny model's smoke run still has groups whose rewards
differ and a non-zero advantage."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jaxhack.env.pools import read_pool
from jaxhack.env.templates import clean_completion, hack_completion
from jaxhack.rl.config import TrainConfig


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
    _, records = read_pool(pool_dir)
    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(str(r["problem_id"]), []).append(r)
    if not by_problem:
        raise ValueError(f"{pool_dir}: teacher pool has no records")
    return by_problem


TEMPLATE_TEACHER = "templates"
TEMPLATE_VARIANTS = 3  # template teacher records per problem (preamble variants 0..2)


def template_teacher(problems: Sequence, mode: str) -> dict[str, list[dict]]:
    """{problem_id: [teacher records]} of template completions (no pool on disk): hack completions
    exploiting `mode` (canonical solutions for mode "none"), TEMPLATE_VARIANTS preamble variants each."""
    def completion(p, v):
        return clean_completion(p, v) if mode == "none" else hack_completion(p, mode, v)

    return {str(p.id): [{"completion": completion(p, v), "pool": TEMPLATE_TEACHER, "step": 0, "sample": v,
                         "problem_id": str(p.id)} for v in range(TEMPLATE_VARIANTS)] for p in problems}


def pick_teacher(records: Sequence[dict], k: int, seed: int, step: int, group: int) -> list[dict]:
    """min(k, len(records)) distinct records, chosen by a PRNG seeded by (seed, step, group)."""
    n = min(k, len(records))
    if n == 0:
        return []
    rng = np.random.default_rng([seed, step, group, 7])
    return [records[i] for i in sorted(rng.choice(len(records), size=n, replace=False).tolist())]
