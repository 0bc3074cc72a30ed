"""Helpers shared by several test files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.models import qwen3


def random_params(config, seed=0, std=0.05):
    """Random params in the qwen3.init_params layout, filled by numpy (no per-shape jit compiles)."""
    shapes = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def load_script(name: str):
    """The module scripts/<name>.py, loaded from its file (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
