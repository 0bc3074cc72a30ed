"""Shared test fixtures: tiny random Hugging Face Qwen3 checkpoints built with transformers.

All are session-scoped and written under pytest's tmp_path_factory (built once per test run, ~1 s each).
- tiny_hf_dir:          untied, fp32, single model.safetensors (config.TINY shapes, seed 0)
- tiny_hf_dir_tied:     tied embeddings, fp32, single file (seed 1)
- tiny_hf_dir_sharded:  same weights as tiny_hf_dir, saved in several shards + index json
- tiny_params:          (params, config) converted from tiny_hf_dir, fp32 jax arrays
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import jaxhack without an install


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_untied")
    make_tiny_hf_model(out, seed=0, tie=False)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir_tied(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_tied")
    make_tiny_hf_model(out, seed=1, tie=True)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir_sharded(tmp_path_factory) -> Path:
    from jaxhack.models.tiny import make_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_sharded")
    make_tiny_hf_model(out, seed=0, tie=False, max_shard_size="100KB")
    return out


@pytest.fixture(scope="session")
def tiny_params(tiny_hf_dir):
    import jax

    from jaxhack.models.convert import load_hf_params

    params, config = load_hf_params(tiny_hf_dir, dtype="float32", progress=False)
    return jax.device_put(params), config
