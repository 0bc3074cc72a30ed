"""Qwen3 decoder as pure functions over a param pytree (layout: docs/architecture.md).

Layers are stacked on a leading axis and run with `lax.scan`; each layer body can be rematerialised.
Adapters (SVD delta_S or LoRA, see `adapters.py`) are applied inside every target Linear.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from jaxhack.models.adapters import adapter_delta
from jaxhack.models.config import Qwen3Config

Params = dict[str, Any]
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MASK_VALUE = -1e30  # finite, so a fully masked row (a pad query) gives a uniform softmax, not NaN

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def module_shapes(config: Qwen3Config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every target Linear."""
    D, F = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (D, config.q_dim), "k_proj": (D, config.kv_dim), "v_proj": (D, config.kv_dim),
        "o_proj": (config.q_dim, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D),
    }


def init_params(config: Qwen3Config, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random Qwen3 params (for tests and full-size shape benchmarks). Norm weights are 1 + noise."""
    L, D, hd = config.num_hidden_layers, config.hidden_size, config.head_dim
    shapes = module_shapes(config)
    keys = iter(jax.random.split(key, 16))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def norm_weight(shape):
        return (1.0 + 0.1 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = {name: normal((L, d_in, d_out)) for name, (d_in, d_out) in shapes.items()}
    layers.update(input_norm=norm_weight((L, D)), post_attn_norm=norm_weight((L, D)),
                  q_norm=norm_weight((L, hd)), k_norm=norm_weight((L, hd)))
    params = {"embed": normal((config.vocab_size, D)), "layers": layers, "final_norm": norm_weight((D,))}
    if not config.tie_word_embeddings:
        params["lm_head"] = normal((D, config.vocab_size))
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """As HF Qwen3RMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (half-split layout). x: [B,T,H,hd]; positions: [B,T] int."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # [hd/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,hd/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,hd]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def linear(x: jax.Array, w: jax.Array, adapter: dict | None) -> jax.Array:
    """y = x @ w (+ adapter delta). x: [..., d_in], w: [d_in, d_out]."""
    y = x @ w
    if adapter is None:
        return y
    return y + adapter_delta(x, adapter).astype(y.dtype)


def attention(q, k, v, query_slots, key_mask, config: Qwen3Config):
    """q: [B,T,Hq,hd]; k, v: [B,Hkv,S,hd] (head-major, the cache layout); query_slots: [T] slot index of
    each query; key_mask: [B,S] bool. Causal over slots and masked by key_mask. Returns [B,T,Hq*hd]."""
    B, T, Hq, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    causal = query_slots[:, None] >= jnp.arange(S)[None, :]  # [T,S]
    allowed = causal[None, :, :] & key_mask[:, None, :]  # [B,T,S]
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(B, T, Hq * hd)


def _layer(h, layer, layer_adapters, cache_kv, layer_index, positions, query_slots, key_mask,
           cache_index, config: Qwen3Config, attention_kind: str = "masked"):
    """One decoder layer. h: [B,T,D]. cache_kv: None or the whole cache (k, v), each
    [L,B,Hkv,S,hd]; this layer's new keys/values are written in place at [layer_index, :, :, cache_index].
    The head-major cache layout lets both attention matmuls read the cache as it lies (a [B,S,Hkv,hd]
    layout made XLA re-lay out the whole cache on every decode step)."""
    B, T, _ = h.shape
    hd, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    ad = (lambda name: None) if layer_adapters is None else (lambda name: layer_adapters.get(name))

    x = rms_norm(h, layer["input_norm"], config.rms_norm_eps)
    q = linear(x, layer["q_proj"], ad("q_proj")).reshape(B, T, Hq, hd)
    k = linear(x, layer["k_proj"], ad("k_proj")).reshape(B, T, Hkv, hd)
    v = linear(x, layer["v_proj"], ad("v_proj")).reshape(B, T, Hkv, hd)
    q = rope(rms_norm(q, layer["q_norm"], config.rms_norm_eps), positions, config.rope_theta)
    k = rope(rms_norm(k, layer["k_norm"], config.rms_norm_eps), positions, config.rope_theta)
    if attention_kind == "causal":  # fused kernel (cuDNN flash attention on GPU); right padding only
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, Hq * hd)
        new_kv = None
    else:
        k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,Hkv,T,hd]
        if cache_kv is not None:
            start = (layer_index, 0, 0, cache_index, 0)
            k_cache = jax.lax.dynamic_update_slice(cache_kv[0], k_heads[None].astype(cache_kv[0].dtype), start)
            v_cache = jax.lax.dynamic_update_slice(cache_kv[1], v_heads[None].astype(cache_kv[1].dtype), start)
            k_heads = jax.lax.dynamic_index_in_dim(k_cache, layer_index, 0, keepdims=False).astype(q.dtype)
            v_heads = jax.lax.dynamic_index_in_dim(v_cache, layer_index, 0, keepdims=False).astype(q.dtype)
            new_kv = (k_cache, v_cache)
        else:
            new_kv = None
        attn = attention(q, k_heads, v_heads, query_slots, key_mask, config)
    h = h + linear(attn, layer["o_proj"], ad("o_proj"))

    x = rms_norm(h, layer["post_attn_norm"], config.rms_norm_eps)
    gate = linear(x, layer["gate_proj"], ad("gate_proj"))
    up = linear(x, layer["up_proj"], ad("up_proj"))
    h = h + linear(jax.nn.silu(gate) * up, layer["down_proj"], ad("down_proj"))
    return h, new_kv


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: cumsum(mask) - 1, clipped at 0. [B,S] -> [B,S] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward(params: Params, config: Qwen3Config, input_ids: jax.Array, attention_mask: jax.Array,
            adapters: dict | None = None, cache: dict | None = None, cache_index=None,
            remat: str = "none", positions: jax.Array | None = None, attention: str = "masked"):
    """Final hidden states of the decoder.

    input_ids: [B,T] int; attention_mask: [B,S] bool (S == T without a cache, S = cache length with one);
    adapters: per-module adapter dicts stacked over layers (merged frozen + trainable), or None;
    cache: {"k","v": [L,B,Hkv,S,hd]} (init_cache) or None; cache_index: slot of input_ids[:, 0] in the cache.
    attention: "masked" (causal AND attention_mask, any padding, scores materialised) or "causal"
    (jax.nn.dot_product_attention with is_causal: cuDNN flash attention on a GPU; exact for real
    tokens only when every row is right-padded, i.e. no pad before a real token, and no cache; the
    outputs at pad positions are then meaningless and must be masked by the caller, as losses do).
    Returns (hidden [B,T,D], new_cache or None).
    """
    if attention not in ("masked", "causal"):
        raise ValueError(f"attention={attention!r}; expected 'masked' or 'causal'")
    if attention == "causal" and cache is not None:
        raise ValueError("attention='causal' is for full sequences; decoding with a cache needs 'masked'")
    B, T = input_ids.shape
    S = attention_mask.shape[1]
    chex.assert_rank([input_ids, attention_mask], 2)
    if cache is None:
        chex.assert_equal(S, T)
        cache_index = 0
    attention_mask = attention_mask.astype(bool)
    query_slots = cache_index + jnp.arange(T)
    if positions is None:
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache_index, T, axis=1)

    h = params["embed"][input_ids]  # [B,T,D]

    # The cache rides in the scan carry and each layer updates its slice in place (no per-step copy
    # of the whole cache, which would dominate decoding time and double its memory).
    def body(carry, xs):
        h, cache_kv = carry
        layer, layer_adapters, layer_index = xs
        h, cache_kv = _layer(h, layer, layer_adapters, cache_kv, layer_index, positions, query_slots,
                             attention_mask, cache_index, config, attention)
        return (h, cache_kv), None

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        body = jax.checkpoint(body, policy=policy)
    cache_kv = None if cache is None else (cache["k"], cache["v"])
    layer_indices = jnp.arange(config.num_hidden_layers)
    (h, cache_kv), _ = jax.lax.scan(body, (h, cache_kv), (params["layers"], adapters, layer_indices))
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    new_cache = None if cache is None else {"k": cache_kv[0], "v": cache_kv[1]}
    return h, new_cache


def lm_head_weight(params: Params, config: Qwen3Config) -> jax.Array:
    """[D, V]"""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def lm_logits(params: Params, config: Qwen3Config, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> logits [..., V] in fp32."""
    return jnp.dot(hidden, lm_head_weight(params, config), preferred_element_type=jnp.float32)


def token_logprobs(params: Params, config: Qwen3Config, hidden: jax.Array, targets: jax.Array,
                   chunk: int = 256) -> jax.Array:
    """log p(targets) from hidden states, without materialising [B,T,V] logits.

    hidden: [B,T,D]; targets: [B,T] int (the token that follows each position). Returns [B,T] fp32.
    The vocabulary projection and log-softmax run over chunks of `chunk` positions, each
    rematerialised in the backward pass, so peak memory is O(B * chunk * V).
    """
    B, T, D = hidden.shape
    chex.assert_shape(targets, (B, T))
    w = lm_head_weight(params, config)
    chunk = min(chunk, T)
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    hidden_c = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n_chunks, chunk, D).swapaxes(0, 1)
    targets_c = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logp(h, t):  # h [B,chunk,D], t [B,chunk]
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - logz

    _, logp = jax.lax.scan(lambda c, x: (c, chunk_logp(*x)), None, (hidden_c, targets_c))
    return logp.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T]
