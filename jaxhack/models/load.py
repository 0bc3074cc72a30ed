"""One place that turns a `--ckpt` argument into (params, config, tokenizer).

- "tiny": the embedded default, config.TINY with random weights (fixed seed) and the byte tokenizer;
  built in a second on a CPU, no downloads.
- "random-4b": Qwen3-4B shapes with random bf16 weights (benchmarks and memory checks on a GPU) and
  the byte tokenizer (its ids fit in the 151,936-token vocabulary).
- anything else: a checkpoint written by scripts/convert.py (a name under checkpoints/ or a path),
  with the tokenizer files copied there (CKPT/tokenizer/); without them, the byte tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxhack.models import qwen3
from jaxhack.models.config import QWEN3_4B, TINY, Qwen3Config
from jaxhack.tokenizer import ByteTokenizer, load_tokenizer

EMBEDDED = ("tiny", "random-4b")


def load_model(ckpt: str, seed: int = 0, root: str | Path = "checkpoints"):
    """Returns (params, config, tokenizer, description)."""
    if ckpt == "tiny":
        return qwen3.init_params(TINY, jax.random.PRNGKey(seed)), TINY, ByteTokenizer(), \
            f"tiny random Qwen3 (seed {seed}, {TINY.num_hidden_layers} layers, d={TINY.hidden_size})"
    if ckpt == "random-4b":
        params = jax.jit(qwen3.init_params, static_argnums=(0, 2))(QWEN3_4B, jax.random.PRNGKey(seed),
                                                                 jnp.bfloat16)
        return params, QWEN3_4B, ByteTokenizer(), f"Qwen3-4B shapes, random bf16 weights (seed {seed})"
    from jaxhack.checkpoint import checkpoint_dir, load_checkpoint

    path = checkpoint_dir(ckpt, root)
    params, config, _ = load_checkpoint(path)
    tok_dir = path / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer_config.json").is_file() else ByteTokenizer()
    return params, config, tokenizer, f"checkpoint {path}"


def check_vocab(config: Qwen3Config, tokenizer) -> None:
    """The tokenizer's ids must index the embedding."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is not None and size > config.vocab_size:
        raise ValueError(f"tokenizer has {size} ids but the model's vocab_size is {config.vocab_size}")


def svd_cache_dir(ckpt: str, root: str | Path = "checkpoints") -> Path:
    """Where the SVD factors of a model are cached: beside a converted checkpoint, or under
    checkpoints/_svd_cache/<name> for the embedded models (keyed by content hash either way)."""
    if ckpt in EMBEDDED:
        return Path(root) / "_svd_cache" / ckpt
    from jaxhack.checkpoint import checkpoint_dir

    return checkpoint_dir(ckpt, root) / "svd_cache"


def make_adapter(kind: str, params, config: Qwen3Config, *, ckpt: str, lora_rank: int = 8,
                 lora_alpha: float = 16.0, lora_seed: int = 0, root: str | Path = "checkpoints"):
    """(trainable, frozen) adapter trees: "svd" (delta_s, SVD cached by weight hash) or "lora"
    (A from PRNGKey(lora_seed): the same seed gives the same basis, which a LoRA v_hack depends on)."""
    from jaxhack.models.adapters import init_lora_adapter, init_svd_adapter

    if kind == "svd":
        return init_svd_adapter(params, config, cache_dir=svd_cache_dir(ckpt, root))
    if kind == "lora":
        return init_lora_adapter(params, config, jax.random.PRNGKey(lora_seed), rank=lora_rank,
                                 alpha=lora_alpha)
    raise ValueError(f"adapter kind {kind!r}: expected 'svd' or 'lora'")
