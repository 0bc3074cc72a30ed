"""Qwen3 decoder as pure functions over a param pytree (layout: docs/architecture.md).

Layers are stacked on a leading axis and run with `lax.scan` (unrolled when decoding with a KV cache);
each layer body can be rematerialised.
Adapters (SVD delta_S or LoRA, see `adapters.py`) are applied inside every target Linear.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxhack.models.adapters import add_adapter_delta
from jaxhack.models.config import Qwen3Config, module_shapes
from jaxhack.models.decode_attention import SPLIT, decode_attention, prefix_decode_attention, prompts_and_combine
from jaxhack.models.decode_layout import factored_output, group_projections, is_decode_group
from jaxhack.models.fused_decode import (fused_decode_attention, fused_decode_parts, kernel_choice, requested,
                                         rope_tables)
from jaxhack.models.packed_rows import gather_rows, gather_slots

Params = dict[str, Any]
_MASK_VALUE = -1e30  # finite, so a fully masked row (a pad query) gives a uniform softmax, not NaN

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # each Linear's output (base + adapter, summed) and the SVD adapter's projection x Vh^T: no matmul
    # is recomputed in the backward pass, at about half the memory of "dots" (which keeps the base and
    # adapter outputs apart)
    "linear": jax.checkpoint_policies.save_only_these_names("linear_out", "adapter_h"),
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
    cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :]  # [B,T,1,hd]
                for t in rope_tables(positions, hd, theta, x.dtype))  # [B,T,hd/2] each
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def linear(x: jax.Array, w: jax.Array | None, adapter: dict | None, delta_zero: bool = False) -> jax.Array:
    """y = x @ w (+ adapter delta). x: [..., d_in], w: [d_in, d_out]. The output is named
    "linear_out" for the "linear" remat policy. delta_zero: see `adapters.add_adapter_delta`. A factored module of
    `decode_layers(factored=True)` (adapter with "factor_scale" = S + delta; w is None) computes y from its factors."""
    if adapter is not None and "factor_scale" in adapter:
        h = jnp.einsum("...i,ri->...r", x, adapter["vh"].astype(x.dtype), preferred_element_type=jnp.float32)
        return checkpoint_name(factored_output(h, adapter, x.dtype), "linear_out")
    y = add_adapter_delta(x @ w, x, adapter, delta_zero)
    return checkpoint_name(y, "linear_out")


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


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Causal GQA attention without materialising the [T,T] scores on a GPU.

    q: [B,T,Hq,hd]; k, v: [B,T,Hkv,hd] -> [B,T,Hq,hd]. On a GPU with bf16/fp16 inputs this is cuDNN's
    flash attention (jax.nn.dot_product_attention(implementation="cudnn")); elsewhere XLA's reference
    implementation (which jax picks by default even on a GPU, and which materialises the scores).
    lengths: optional [B] int, each row's real (right-padded) length: the kernel then skips the padding
    (the same outputs at positions < length; positions past it are not meaningful).
    """
    fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    if lengths is not None:
        chex.assert_shape(lengths, (q.shape[0],))
        lengths = jnp.maximum(lengths, 1).astype(jnp.int32)  # an all-padding row: one (ignored) key, no NaN
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation="cudnn" if fused else "xla")


def grouped_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: dict) -> jax.Array:
    """Causal attention of the rows of shared-prompt groups, from their packed buffers.

    q: [Bg,Tp,Hq,hd]; k, v: [Bg,Tp,Hkv,hd]: each group's packed tokens (its prompt once, then its rows'
    completions back to back; `grads.shared_prompt.group_layout`). groups["row_source"] [Bg,G,T]: the
    packed slot of each position of each row's own sequence [prompt; completion; right padding];
    groups["out_row"], groups["out_pos"] [Bg,Tp]: the row and position whose output each slot takes
    (a prompt slot: row 0's); groups["slot_readers"], groups["row_slot"]: their inverse maps. Each row's
    sequence is gathered and run through `causal_attention` (exact for right-padded rows; each row's
    padding is skipped: a micro-batch's rows differ in length far more than the per-row layout's
    length-sorted ones), and each slot's output gathered back. -> [Bg,Tp,Hq,hd]. The gradient of a shared
    prompt key or value sums over the G rows that read it; both gathers' gradients are gathers by the
    inverse maps (`packed_rows`), not scatter-adds."""
    Bg, G, T = groups["row_source"].shape
    Tp = q.shape[1]
    rows = [gather_rows(a, groups["row_source"], groups["slot_readers"]).reshape(Bg * G, T, *a.shape[2:])
            for a in (q, k, v)]
    lengths = jnp.sum(groups["row_source"] < Tp - 1, axis=-1).reshape(Bg * G)  # real positions (the last slot is padding)
    out = causal_attention(*rows, lengths=lengths).reshape(Bg, G, T, *q.shape[2:])  # [Bg,G,T,Hq,hd]
    return gather_slots(out, groups["out_row"], groups["out_pos"], groups["row_slot"])


def _projections(x, layer, ad, names: tuple[str, ...], fused_name: str, sizes: tuple[int, ...],
                 delta_zero: bool = False):
    """The Linears `names` (output widths `sizes`) that all read x -> list of [..., size]: one matmul
    for the group on `decode_layout.decode_layers`' per-layer layout, else one linear() each."""
    if is_decode_group(layer, names, fused_name):
        return group_projections(x, layer, ad, names, fused_name, sizes)
    return [linear(x, layer.get(name), ad(name), delta_zero) for name in names]


def _write_cache(buffer: jax.Array, new: jax.Array, cache_index) -> jax.Array:
    """buffer [B,Hkv,S,hd] with new [B,Hkv,T,hd] written at slots cache_index.. (a scalar: one
    dynamic_update_slice; a [B] array, T == 1: row b's token at its own slot cache_index[b], a
    scatter of B x Hkv x hd values). Both update the loop-carried buffer in place."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, 0, cache_index, 0))
    rows = jnp.arange(buffer.shape[0])
    return buffer.at[rows, :, cache_index, :].set(new[:, :, 0, :], mode="promise_in_bounds")


def _layer(h, layer, layer_adapters, cache_kv, positions, query_slots, key_mask, cache_index,
           config: Qwen3Config, attention_kind: str = "masked", decode_range=None, key_len=None,
           delta_zero: bool = False, groups: dict | None = None, prefix: dict | None = None):
    """One decoder layer. h: [B,T,D]. cache_kv: None or this layer's cache (k, v), each [B,Hkv,S,hd];
    the new keys/values are written in place at [:, :, cache_index]. The head-major layout lets both
    attention matmuls read the cache as it lies (a [B,S,Hkv,hd] layout made XLA re-lay out the whole
    cache on every decode step). decode_range: ([B] first, [B] one-past-last) cache slot each row
    attends to, for attention_kind "decode". key_len (static): masked attention reads only cache slots
    [0, key_len) (a prefill chunk never attends past its own end). delta_zero: see `adapters.add_adapter_delta`.
    prefix: this layer's shared prompts for "decode" (`prefix_decode_attention`; "k", "v" [NP,Hkv,Pp,hd])."""
    B, T, _ = h.shape
    hd, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    ad = (lambda name: None) if layer_adapters is None else (lambda name: layer_adapters.get(name))

    x = rms_norm(h, layer["input_norm"], config.rms_norm_eps)
    q, k, v = _projections(x, layer, ad, ("q_proj", "k_proj", "v_proj"), "qkv_proj",
                           (config.q_dim, config.kv_dim, config.kv_dim), delta_zero)
    fused = _fused_decode_choice(q, layer, cache_kv, attention_kind, prefix, jnp.ndim(cache_index) == 0)
    if fused is not None:  # norms, RoPE, cache write and attention in one kernel (`fused_decode`)
        qkv = jnp.concatenate([q, k, v], axis=-1).reshape(B, Hq + 2 * Hkv, hd)  # the fused matmul's output
        cos, sin = rope_tables(positions[:, 0], hd, config.rope_theta, q.dtype)  # [B,hd/2]
        args = (qkv, layer["q_norm"], layer["k_norm"], cos, sin, *cache_kv, decode_range[0],
                jnp.broadcast_to(cache_index, (B,)))
        kw = dict(num_q_heads=Hq, eps=config.rms_norm_eps, implementation=fused)
        if prefix is None:
            attn, k_cache, v_cache = fused_decode_attention(*args, **kw)
        else:  # the refill sampler: the rows' own keys in parts, then the prompt pool's and one combine
            q_rot, own, k_cache, v_cache = fused_decode_parts(*args, split=SPLIT, **kw)
            attn = prompts_and_combine(q_rot, own, *decode_range, prefix, fused)
        return _mlp_block(h, attn.reshape(B, T, Hq * hd), layer, ad, config, delta_zero), (k_cache, v_cache)
    q, k, v = q.reshape(B, T, Hq, hd), k.reshape(B, T, Hkv, hd), v.reshape(B, T, Hkv, hd)
    q = rope(rms_norm(q, layer["q_norm"], config.rms_norm_eps), positions, config.rope_theta)
    k = rope(rms_norm(k, layer["k_norm"], config.rms_norm_eps), positions, config.rope_theta)
    if attention_kind == "grouped":  # shared-prompt groups, packed (rows gathered for causal attention)
        attn = grouped_causal_attention(q, k, v, groups).reshape(B, T, Hq * hd)
        new_kv = None
    elif attention_kind == "causal":  # fused kernel (cuDNN flash attention on GPU); right padding only
        attn = causal_attention(q, k, v).reshape(B, T, Hq * hd)
        new_kv = None
    else:
        k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,Hkv,T,hd]
        if cache_kv is not None:  # this layer's own buffers [B,Hkv,S,hd]: written in place, read as they lie
            k_cache = _write_cache(cache_kv[0], k_heads, cache_index)
            v_cache = _write_cache(cache_kv[1], v_heads, cache_index)
            k_heads, v_heads = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
            new_kv = (k_cache, v_cache)
        else:
            new_kv = None
        if attention_kind == "decode" and prefix is not None:  # + the row's prompt, held once per prompt
            choice = requested()  # the key-parts kernels, run by the interpreter with "fused-interpret"
            attn = prefix_decode_attention(q[:, 0], k_heads, v_heads, *decode_range, prefix,
                                           "interpret" if choice == "fused-interpret" else None,
                                           parts_kernel=choice != "split").reshape(B, T, Hq * hd)
        elif attention_kind == "decode":  # one query per row over its live cache slots only
            # one cache_index for all rows: they decode in lockstep (the kernel's tiles depend on it)
            attn = decode_attention(q[:, 0], k_heads, v_heads, *decode_range,
                                    lockstep=jnp.ndim(cache_index) == 0).reshape(B, T, Hq * hd)
        elif key_len is not None:  # static prefix of the slots: scores [B,Hkv,g,T,key_len], not [..,S]
            attn = attention(q, k_heads[:, :, :key_len], v_heads[:, :, :key_len], query_slots,
                             key_mask[:, :key_len], config)
        else:
            attn = attention(q, k_heads, v_heads, query_slots, key_mask, config)
    return _mlp_block(h, attn, layer, ad, config, delta_zero), new_kv


def _fused_decode_choice(q, layer, cache_kv, attention_kind: str, prefix, lockstep: bool) -> str | None:
    """`fused_decode.kernel_choice` where a fused kernel applies: one new token per row ("decode") with
    a cache, and the projections, norms and caches in one dtype (the kernels round as the split path
    does in that dtype); with shared prompts (the refill sampler) their cache of whole parts too.
    None: the split path."""
    if attention_kind != "decode":
        return None
    requested()  # a bad JAXHACK_DECODE_KERNEL is an error wherever decoding runs
    if cache_kv is None:
        return None
    dtypes = {q.dtype, cache_kv[0].dtype, layer["q_norm"].dtype, layer["k_norm"].dtype}
    if prefix is not None:
        dtypes.add(prefix["k"].dtype)
        if prefix["k"].shape[2] % SPLIT:
            return None
    if dtypes != {q.dtype}:
        return None
    B, Hkv, S, _ = cache_kv[0].shape
    return kernel_choice(q.dtype, S, B * Hkv, lockstep, key_parts=prefix is not None)


def _mlp_block(h, attn, layer, ad, config: Qwen3Config, delta_zero: bool):
    """The rest of a layer after attention: h + o_proj(attn), then the MLP and its residual. attn [B,T,Hq*hd]."""
    h = h + _projections(attn, layer, ad, ("o_proj",), "o_proj", (config.hidden_size,), delta_zero)[0]
    x = rms_norm(h, layer["post_attn_norm"], config.rms_norm_eps)
    gate, up = _projections(x, layer, ad, ("gate_proj", "up_proj"), "gate_up_proj",
                            (config.intermediate_size, config.intermediate_size), delta_zero)
    return h + _projections(jax.nn.silu(gate) * up, layer, ad, ("down_proj",), "down_proj", (config.hidden_size,),
                            delta_zero)[0]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: cumsum(mask) - 1, clipped at 0. [B,S] -> [B,S] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """KV cache {"k", "v": tuple of L arrays [B,Hkv,S,hd]}: one buffer per layer, so a decode step
    updates and reads each layer's keys in place (slices of one stacked [L,...] buffer were copied on
    every step: docs/benchmarks.md)."""
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    return {"k": tuple(jnp.zeros(shape, dtype) for _ in layers), "v": tuple(jnp.zeros(shape, dtype) for _ in layers)}


def forward(params: Params, config: Qwen3Config, input_ids: jax.Array, attention_mask: jax.Array,
            adapters: dict | None = None, cache: dict | None = None, cache_index=None,
            remat: str = "none", positions: jax.Array | None = None, attention: str = "masked",
            scan_layers: bool = True, key_len: int | None = None, delta_zero: bool = False,
            groups: dict | None = None, prefix: dict | None = None):
    """Final hidden states of the decoder.

    input_ids: [B,T] int; attention_mask: [B,S] bool (S == T without a cache, S = cache length with one);
    adapters: per-module adapter dicts stacked over layers (merged frozen + trainable), or None;
    params["layers"] (and adapters) may instead be the per-layer tuples of `decode_layers` (then the
    layers run unrolled with fused q/k/v and gate/up matmuls);
    cache: {"k","v": L-tuples of [B,Hkv,S,hd]} (init_cache) or None; cache_index: slot of input_ids[:, 0]
    (an int), or with attention "decode" a [B] int array: row b's token goes to its own slot
    cache_index[b] (the refill sampler, whose slots are at different steps).
    attention: "masked" (causal AND attention_mask, any padding, scores materialised), "causal"
    (`causal_attention`: cuDNN flash attention on a GPU; exact for real tokens only when every row
    is right-padded, i.e. no pad before a real token, and no cache; the outputs at pad positions are
    then meaningless and must be masked by the caller, as losses do) or "decode" (T == 1 with a
    cache: each row attends to the slots from its first masked-in slot to cache_index, which must
    all be masked in, as in the sampler; `decode_attention` reads only those slots; a row whose
    slot cache_index is masked out, i.e. a finished or padding row, reads that one slot only and its
    output is meaningless).
    key_len: with a cache and "masked" attention, attend only to slots [0, key_len) (static; the
    sampler's prefill chunks: queries at slots < key_len never attend past it, so this is exact).
    attention "grouped" (with `groups` and `positions`, no cache): input_ids [Bg,Tp] are the packed
    buffers of shared-prompt groups (`grads.shared_prompt`), each row's sequence gathered for causal
    attention (`grouped_causal_attention`); positions [Bg,Tp] are each packed token's position in its
    row; attention_mask marks the real packed tokens (only its shape is used).
    delta_zero: the SVD adapter's delta_s + delta_s_hack is exactly zero (the caller's promise, e.g.
    per-sample gradients at the base model): the adapter's forward term and its activation-gradient
    term are skipped (exact there; `adapters.zero_delta_tap`). Static.
    prefix: with attention "decode" and a per-row cache_index (the refill sampler), each row's prompt
    is not in `cache` but in a cache shared by the rows of a prompt: {"k", "v": L-tuples of
    [NP,Hkv,Pp,hd]; "start", "end", "members", "prompt", "member": see
    `decode_attention.prefix_decode_attention`; "offset": [B] int, each row's real prompt length}.
    `cache` and attention_mask then hold the row's generated tokens only, at slots 0, 1, ...; a token's
    position is offset + its slot's position in attention_mask.
    scan_layers: run the layers with `lax.scan` (one compiled layer body) or unrolled in Python (one
    copy of the body per layer; no per-layer weight slice is copied, see docs/benchmarks.md). With a
    cache the layers are always unrolled (each layer has its own cache buffers).
    Returns (hidden [B,T,D], new_cache or None).
    """
    if attention not in ("masked", "causal", "decode", "grouped"):
        raise ValueError(f"attention={attention!r}; expected 'masked', 'causal', 'decode' or 'grouped'")
    if attention in ("causal", "grouped") and cache is not None:
        raise ValueError(f"attention={attention!r} is for full sequences; decoding with a cache needs 'masked'")
    if (attention == "grouped") != (groups is not None) or (groups is not None and positions is None):
        raise ValueError("attention='grouped' goes with groups= and positions= (grads.shared_prompt), and only it")
    B, T = input_ids.shape
    if attention == "decode" and (cache is None or T != 1):
        raise ValueError(f"attention='decode' is for one new token per row with a cache (got T={T}, "
                         f"cache={'none' if cache is None else 'given'})")
    S = attention_mask.shape[1]
    chex.assert_rank([input_ids, attention_mask], 2)
    if cache is None:
        chex.assert_equal(S, T)
        cache_index = 0
    attention_mask = attention_mask.astype(bool)
    per_row = jnp.ndim(cache_index) == 1  # decode at each row's own slot (the refill sampler)
    if per_row and attention != "decode":
        raise ValueError("a per-row cache_index [B] is for attention='decode' only")
    if per_row:
        chex.assert_shape(cache_index, (B,))
        cache_index = cache_index.astype(jnp.int32)
    if prefix is not None and not per_row:
        raise ValueError("prefix= (shared prompts) goes with attention='decode' and a per-row cache_index [B]")
    query_slots = None if per_row else cache_index + jnp.arange(T)
    if positions is None and per_row:
        positions = jnp.take_along_axis(positions_from_mask(attention_mask), cache_index[:, None], axis=1)
        if prefix is not None:  # the row's generated tokens follow its prompt's real tokens
            chex.assert_shape(prefix["offset"], (B,))
            positions = positions + prefix["offset"][:, None]
    elif positions is None:
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache_index, T, axis=1)

    h = params["embed"][input_ids]  # [B,T,D]
    decode_range = None
    if attention == "decode":  # first masked-in slot .. the slot being written, inclusive
        first = jnp.argmax(attention_mask, axis=1).astype(jnp.int32)
        # rows not live at this slot (finished or padding) read one slot instead of their whole cache
        if per_row:
            live = jnp.take_along_axis(attention_mask, cache_index[:, None], axis=1)[:, 0]
        else:
            live = jax.lax.dynamic_index_in_dim(attention_mask, cache_index, axis=1, keepdims=False)
        first = jnp.where(live, first, cache_index).astype(jnp.int32)
        decode_range = (first, jnp.broadcast_to(cache_index + 1, (B,)).astype(jnp.int32))
    if key_len is not None and (cache is None or attention != "masked" or not 0 < key_len <= S):
        raise ValueError(f"key_len={key_len} needs a cache, attention='masked' and 0 < key_len <= {S}")

    def body(h, layer, layer_adapters, layer_cache, layer_prefix=None):
        return _layer(h, layer, layer_adapters, layer_cache, positions, query_slots, attention_mask,
                      cache_index, config, attention, decode_range, key_len, delta_zero, groups, layer_prefix)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    per_layer = isinstance(params["layers"], (tuple, list))  # decode_layers() output
    if cache is None and scan_layers and not per_layer:
        def scan_body(h, xs):
            return body(h, *xs, None)[0], None
        h, _ = jax.lax.scan(scan_body, h, (params["layers"], adapters))
        new_cache = None
    else:  # unrolled: static per-layer slices of the weights, each layer's own cache buffers
        L = config.num_hidden_layers
        if cache is not None:
            chex.assert_equal((len(cache["k"]), len(cache["v"])), (L, L))
        new_k, new_v = [], []
        for index in range(L):
            if per_layer:
                layer, layer_adapters = params["layers"][index], None if adapters is None else adapters[index]
            else:
                layer, layer_adapters = jax.tree.map(lambda x: x[index], (params["layers"], adapters))
            layer_cache = None if cache is None else (cache["k"][index], cache["v"][index])
            layer_prefix = None if prefix is None else {**prefix, "k": prefix["k"][index], "v": prefix["v"][index]}
            h, layer_cache = body(h, layer, layer_adapters, layer_cache, layer_prefix)
            if cache is not None:
                new_k.append(layer_cache[0]), new_v.append(layer_cache[1])
        new_cache = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    return h, new_cache


def lm_head_weight(params: Params, config: Qwen3Config) -> jax.Array:
    """[D, V]"""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def lm_logits(params: Params, config: Qwen3Config, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> logits [..., V] in fp32."""
    return jnp.dot(hidden, lm_head_weight(params, config), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _head_logits(hidden: jax.Array, w: jax.Array) -> jax.Array:
    """fp32 logits hidden @ w ([..., D] x [D, V]) whose backward runs in the operands' dtype.

    The forward accumulates and returns fp32 (log-probs need it). In the backward the fp32 cotangent
    is cast to the hidden dtype before the two matmuls, as PyTorch's autocast does; otherwise a bf16
    model would pay an fp32 (tf32) matmul against the whole vocabulary. For fp32 models it is exact.
    """
    return jnp.dot(hidden, w, preferred_element_type=jnp.float32)


def _head_logits_fwd(hidden, w):
    return _head_logits(hidden, w), (hidden, w)


def _head_logits_bwd(residuals, g):
    hidden, w = residuals
    g = g.astype(hidden.dtype)  # [..., V]
    d_hidden = jnp.dot(g, w.T.astype(hidden.dtype), preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_w = jnp.einsum("...d,...v->dv", hidden, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return d_hidden, d_w


_head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


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
        logits = _head_logits(h, w)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked - logz

    _, logp = jax.lax.scan(lambda c, x: (c, chunk_logp(*x)), None, (hidden_c, targets_c))
    return logp.swapaxes(0, 1).reshape(B, n_chunks * chunk)[:, :T]
