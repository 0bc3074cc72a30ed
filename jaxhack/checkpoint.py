"""Orbax save / restore of params + config (+ metadata), and of any pytree.

Checkpoint directory layout (`checkpoints/NAME/`):
    params/          orbax PyTreeCheckpointer data (exact dtypes; bf16 stays bf16)
    config.json      Qwen3Config.to_dict(), human readable
    metadata.json    free-form JSON dict (conversion source, dtype, step, ...)

Leaves are written as host numpy arrays, so the checkpoint records no device sharding and restores on
any machine (a checkpoint made on a CPU box restores on a GPU one). Only the plain
`ocp.PyTreeCheckpointer().save/restore(path, args=ocp.args.PyTreeSave/PyTreeRestore(...))` API is used
(present in orbax-checkpoint 0.12.x).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxhack.io import atomic_directory
from jaxhack.models.config import Qwen3Config, check_params

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


def _to_host(tree: Any) -> Any:
    """Every leaf as a numpy array (jax arrays are copied to the host; bf16 -> ml_dtypes.bfloat16)."""
    return jax.tree.map(np.asarray, tree)


def _checkpointer():
    """orbax's PyTreeCheckpointer; with several jax processes (multi-host) one that involves only this
    process (no cross-process barrier): the callers write host copies from process 0 and read them
    back on every process (jaxhack.rl.trainer)."""
    if jax.process_count() == 1:
        return ocp.PyTreeCheckpointer()
    me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=me), multiprocessing_options=me)


def save_pytree(path: str | Path, tree: Any, force: bool = False) -> Path:
    """Write `tree` (nested dicts / lists / tuples / namedtuples of arrays) to the orbax directory
    `path`. The directory must not exist unless force=True (then it is replaced). Returns the path."""
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (pass force=True to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _checkpointer().save(path, args=ocp.args.PyTreeSave(_to_host(tree)), force=force)
    return path


def restore_pytree(path: str | Path, target: Any = None, as_jax: bool = True) -> Any:
    """Read a tree written by `save_pytree`, with the saved dtypes and shapes.

    target: optional tree with the saved structure (e.g. an optax state made by `opt.init`) so that
    namedtuples / tuples come back as such; without it containers come back as dicts / lists.
    as_jax: leaves as jax arrays on the default device (else numpy). Note jax without x64 turns
    float64 / int64 leaves into 32-bit ones; pass as_jax=False to keep them.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: orbax checkpoint directory not found")
    ckptr = _checkpointer()
    try:
        if target is None:
            tree = ckptr.restore(path)
        else:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not a complete orbax checkpoint ({e})") from None
    tree = _to_host(tree)
    return jax.tree.map(jnp.asarray, tree) if as_jax else tree


def checkpoint_dir(name_or_path: str | Path, root: str | Path = "checkpoints") -> Path:
    """An existing directory path is used as is; otherwise `root/name`."""
    p = Path(name_or_path)
    return p if p.is_dir() or p.is_absolute() or len(p.parts) > 1 else Path(root) / p


def save_checkpoint(name_or_path: str | Path, params: dict, config: Qwen3Config,
                    metadata: dict | None = None, root: str | Path = "checkpoints",
                    force: bool = False) -> Path:
    """Save params + config (+ JSON-serialisable metadata) to `root/NAME/` (or the given path).

    Written to a temporary sibling directory first and renamed at the end, so an interrupted save
    never leaves a half-written checkpoint under the final name. Returns the checkpoint directory.
    """
    out = checkpoint_dir(name_or_path, root).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out}: checkpoint already exists (pass force=True / --force to overwrite)")
    try:
        meta_text = json.dumps(metadata or {}, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        save_pytree(tmp / PARAMS_DIR, params)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / METADATA_FILE).write_text(meta_text + "\n")
    return out


def load_config(name_or_path: str | Path, root: str | Path = "checkpoints") -> Qwen3Config:
    path = checkpoint_dir(name_or_path, root) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint config not found")
    try:
        return Qwen3Config.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except TypeError as e:
        raise ValueError(f"{path}: not a jaxhack Qwen3Config ({e})") from None


def load_checkpoint(name_or_path: str | Path, root: str | Path = "checkpoints",
                    as_jax: bool = True) -> tuple[dict, Qwen3Config, dict]:
    """Restore (params, config, metadata) saved by `save_checkpoint`; dtypes exactly as saved."""
    ckpt = checkpoint_dir(name_or_path, root)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: checkpoint directory not found")
    config = load_config(ckpt)
    meta_path = ckpt / METADATA_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    params = restore_pytree(ckpt / PARAMS_DIR, as_jax=as_jax)
    try:
        check_params(params, config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{ckpt}: params do not match {CONFIG_FILE}: {e}") from None
    return params, config, metadata
