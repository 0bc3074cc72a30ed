"""Random-weight Hugging Face Qwen3 checkpoints for tests (torch + transformers, CPU, seconds)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxhack.models.config import TINY, Qwen3Config


def hf_config_kwargs(config: Qwen3Config) -> dict:
    """Keyword arguments for `transformers.Qwen3Config` equivalent to our `Qwen3Config`."""
    eos = list(config.eos_token_ids)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        bos_token_id=config.bos_token_id,
        pad_token_id=config.pad_token_id,
        attention_bias=False,
        use_sliding_window=False,
        hidden_act="silu",
    )


def make_tiny_hf_model(out_dir: str | Path, config_overrides: dict | None = None, seed: int = 0,
                       tie: bool = False, dtype: str = "float32", max_shard_size: str | int | None = None,
                       initializer_range: float = 0.02, norm_noise: float = 0.5):
    """Build a random `transformers.Qwen3ForCausalLM` shaped like config.TINY (+ overrides) and
    `save_pretrained(out_dir, safe_serialization=True)`.

    config_overrides: fields of our `Qwen3Config` to replace (e.g. {"num_hidden_layers": 3}).
    tie: tie_word_embeddings (no lm_head tensor is written then).
    max_shard_size: e.g. "100KB" to write sharded `model-0000x-of-0000y.safetensors` + index.
    norm_noise: every RMSNorm weight is drawn from U(1 - norm_noise, 1 + norm_noise) so that
    norm bugs change the logits. Returns the torch model (eval mode, in `dtype`).
    """
    import torch
    import transformers

    cfg = dataclasses.replace(TINY, tie_word_embeddings=tie, **(config_overrides or {}))
    hf_cfg = transformers.Qwen3Config(**hf_config_kwargs(cfg), initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, q/k_norm, norm
                p.uniform_(1.0 - norm_noise, 1.0 + norm_noise)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = model.to(torch_dtype).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), **kwargs)
    return model
