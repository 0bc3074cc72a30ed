"""A finished (or checkpointed) Phase 3 run's trained policy, rebuilt from its run directory: the
base model and adapter basis by the same rules as `run.setup_run` (model seed, SVD cache, LoRA seed,
random bases), the trained adapter restored from RUN/ckpt/step_NNNNNN (docs/export.md)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxhack.checkpoint import METADATA_FILE, checkpoint_dir, restore_pytree
from jaxhack.models.load import load_model, make_adapter
from jaxhack.projection.arms import ARMS
from jaxhack.rl.checkpoints import list_checkpoints
from jaxhack.rl.config import TrainConfig
from jaxhack.rl.run import BASES_TAG, MODEL_SEED, RUN_FILE


@dataclasses.dataclass
class TrainedPolicy:
    cfg: TrainConfig
    info: dict                 # run.json
    step: int                  # the checkpoint's step (steps done)
    params: dict
    config: Any                # Qwen3Config
    tokenizer: Any
    trainable: dict            # restored adapter (fp32)
    frozen: dict
    tokenizer_dir: Path | None   # the HF tokenizer's files (None: the byte tokenizer)
    source_dir: Path | None      # the HF directory the checkpoint was converted from, if recorded


def read_run_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """(TrainConfig, run.json) of a Phase 3 run directory; ValueError naming the file otherwise."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a Phase 3 run directory (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text())
        return TrainConfig(**info["config"]), info
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: no valid 'config' object ({e})") from None


def pick_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, dir) of RUN/ckpt/step_NNNNNN: `step`, or the newest when None."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under {Path(run_dir) / 'ckpt'}")
    if step is None:
        return ckpts[-1]
    found = dict(ckpts)
    if step not in found:
        raise ValueError(f"{run_dir}: no checkpoint for step {step}; kept steps: {sorted(found)}")
    return step, found[step]


def load_trained_policy(run_dir: str | Path, step: int | None = None, model=None) -> TrainedPolicy:
    """Rebuild the run's base model and adapter basis and restore the trained adapter at `step`
    (default: the newest checkpoint). model: a preloaded (params, config, tokenizer)."""
    run_dir = Path(run_dir)
    cfg, info = read_run_config(run_dir)
    step, path = pick_checkpoint(run_dir, step)
    if model is None:
        params, config, tokenizer, _ = load_model(cfg.ckpt, cfg.dtype, cfg.tokenizer, seed=MODEL_SEED)
    else:
        params, config, tokenizer = model
    adapter = ARMS[cfg.arm].adapter
    bases_key = (jax.random.fold_in(jax.random.PRNGKey(cfg.seed), BASES_TAG)
                 if cfg.svd_random_bases and adapter == "svd" else None)
    lora_seed = info.get("lora_seed")
    trainable0, frozen = make_adapter(adapter, params, config, ckpt=cfg.ckpt, lora_rank=cfg.lora_rank,
                                      lora_alpha=cfg.lora_alpha,
                                      lora_seed=cfg.seed if lora_seed is None else int(lora_seed),
                                      random_bases_key=bases_key, progress=False)
    state = restore_pytree(path / "state", as_jax=False)
    trainable = state["trainable"]
    want = jax.tree.map(lambda x: (tuple(x.shape), str(np.dtype(x.dtype))), trainable0)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(np.dtype(x.dtype))), trainable)
    if want != got:
        raise ValueError(f"{path}: the checkpoint's adapter does not fit the run's model "
                         f"(expected {want}, found {got})")
    if adapter == "lora":  # A is the basis: the restored one must be the seeded one the run started from
        for name, m in trainable.items():
            if not np.array_equal(np.asarray(m["a"]), np.asarray(trainable0[name]["a"])):
                raise ValueError(f"{path}: LoRA A of {name} differs from the run's seeded basis")
    tok_dir = Path(tokenizer.name) if getattr(tokenizer, "name", "byte") != "byte" else None
    source = None
    if cfg.ckpt not in ("tiny", "random-4b"):
        meta_path = checkpoint_dir(cfg.ckpt) / METADATA_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        source = Path(meta["source"]) if meta.get("source") and Path(meta["source"]).is_dir() else None
    return TrainedPolicy(cfg, info, step, params, config, tokenizer, trainable, frozen, tok_dir, source)
