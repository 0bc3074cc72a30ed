"""Phase 3 train-state checkpoints: RUN/ckpt/step_NNNNNN/{state/ (orbax), meta.json}, written
atomically, the newest `keep` kept (docs/phase3.md, "Files" and "Resume")."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.checkpoint import restore_pytree, save_pytree
from jaxhack.io import atomic_directory

CKPT_DIR = "ckpt"


def ckpt_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """[(step, dir)] of the complete checkpoints of a run, oldest first."""
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
    final = ckpt_path(run_dir, step)
    with atomic_directory(final) as tmp:
        save_pytree(tmp / "state", state)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "cursor": int(state["cursor"]),
                                                   "time_unix": time.time()}) + "\n")
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def restore_train_state(path: Path, target: dict) -> dict:
    """Inverse of save_train_state; `target` gives the tree structure (optax namedtuples)."""
    host = jax.tree.map(np.asarray, target)
    state = restore_pytree(Path(path) / "state", target=host, as_jax=False)
    return jax.tree.map(lambda t, x: jnp.asarray(x, dtype=jnp.asarray(t).dtype), target, state)
