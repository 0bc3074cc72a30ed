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

from jaxhack.checkpoint import checkpoint_dir, load_checkpoint
from jaxhack.models import qwen3
from jaxhack.models.adapters import init_lora_adapter, init_svd_adapter
from jaxhack.models.config import QWEN3_4B, TINY, Qwen3Config
from jaxhack.models.random_init import random_orthonormal_svd_adapter
from jaxhack.tokenizer import ByteTokenizer, load_tokenizer

EMBEDDED = ("tiny", "random-4b")


def _has_tokenizer_files(d: Path) -> bool:
    return d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_model(ckpt: str, dtype: str | None = None, tokenizer: str | None = None, seed: int = 0,
               root: str | Path = "checkpoints"):
    """(params, config, tokenizer, description) for `ckpt`.

    dtype: cast the params (None: fp32 for tiny, bf16 for random-4b, as stored for a checkpoint).
    tokenizer: "byte" or a directory, overriding the default. A checkpoint's tokenizer is looked for in
    CKPT/tokenizer/ (copied there by scripts/convert.py), then in the HF directory it was converted
    from (metadata "source"); without either, a clear error.
    """
    if ckpt in EMBEDDED:
        config = TINY if ckpt == "tiny" else QWEN3_4B
        param_dtype = jnp.dtype(dtype or ("float32" if ckpt == "tiny" else "bfloat16"))
        init = jax.jit(qwen3.init_params, static_argnames=("config", "dtype"))  # no fp32 copy kept
        params = init(config=config, key=jax.random.PRNGKey(seed), dtype=param_dtype)
        tok = load_tokenizer(tokenizer) if tokenizer else ByteTokenizer()
        desc = (f"tiny random Qwen3 (seed {seed}, {config.num_hidden_layers} layers, d={config.hidden_size})"
                if ckpt == "tiny" else f"Qwen3-4B shapes, random {param_dtype} weights (seed {seed})")
        return params, config, tok, desc

    path = checkpoint_dir(ckpt, root)
    params, config, meta = load_checkpoint(path)
    if dtype is not None and any(x.dtype != jnp.dtype(dtype) for x in jax.tree.leaves(params)):
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    source = Path(str(meta.get("source", "")))
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif _has_tokenizer_files(path / "tokenizer"):
        tok = load_tokenizer(path / "tokenizer")
    elif meta.get("source") and _has_tokenizer_files(source):
        tok = load_tokenizer(source)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer files in {path / 'tokenizer'} nor in its source "
                                f"{meta.get('source')!r}; pass --tokenizer DIR (or 'byte')")
    check_vocab(config, tok)
    return params, config, tok, f"checkpoint {path}"


def check_vocab(config: Qwen3Config, tokenizer) -> None:
    """The tokenizer's ids must index the embedding."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is not None and size > config.vocab_size:
        raise ValueError(f"tokenizer has {size} ids but the model's vocab_size is {config.vocab_size}")


def svd_cache_dir(ckpt: str, root: str | Path = "checkpoints") -> Path | None:
    """The one rule for where the SVD factors of a model are cached (keyed by content hash):
    beside a converted checkpoint (<ckpt dir>/svd_cache), checkpoints/_svd_cache/tiny for the
    embedded tiny model, and nowhere (None) for random-4b (random weights, regenerated from a seed:
    caching their SVD would cost ~16 GB of disk)."""
    if ckpt == "random-4b":
        return None
    if ckpt in EMBEDDED:
        return Path(root) / "_svd_cache" / ckpt
    return checkpoint_dir(ckpt, root) / "svd_cache"


def make_adapter(kind: str, params, config: Qwen3Config, *, ckpt: str, lora_rank: int = 8,
                 lora_alpha: float = 16.0, lora_seed: int = 0, random_bases_key: jax.Array | None = None,
                 root: str | Path = "checkpoints", progress: bool = True):
    """The one adapter factory: (trainable, frozen) trees at the initial point (zero delta_s / B = 0).

    "svd": delta_s over the SVD of W, cached by weight hash under `svd_cache_dir(ckpt, root)`; with
    `random_bases_key` (BENCHMARK ONLY, Phase 3 --svd-random-bases) random orthonormal bases instead.
    "lora": A from PRNGKey(lora_seed) -- the one LoRA seed rule: the same seed gives the same basis,
    which a LoRA v_hack depends on (its meta records lora_seed)."""
    if kind == "svd":
        if random_bases_key is not None:
            return random_orthonormal_svd_adapter(params, random_bases_key)
        return init_svd_adapter(params, config, cache_dir=svd_cache_dir(ckpt, root), progress=progress)
    if kind == "lora":
        return init_lora_adapter(params, config, jax.random.PRNGKey(lora_seed), rank=lora_rank,
                                 alpha=lora_alpha)
    raise ValueError(f"adapter kind {kind!r}: expected 'svd' or 'lora'")
