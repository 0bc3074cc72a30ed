"""Parity of jaxhack.models.qwen3 (weights from convert.py) with transformers' Qwen3ForCausalLM.

Relative error is max|jax - torch| / max|torch| over the logits of real (unpadded) token positions.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxhack.models import qwen3
from jaxhack.models.convert import load_hf_params

REL_TOL = 1e-4
N_NEW = 20

# (padding side, number of real tokens) per row; T = 12
ROWS = [("none", 12), ("left", 8), ("right", 5), ("left", 3)]
T = 12


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """True fp32 matmuls in JAX: on GPU the default precision for fp32 dots is TF32-like (~1e-3 error)."""
    with jax.default_matmul_precision("highest"):
        yield


def padded_batch(seed: int = 0):
    """ids [B,T] int32 (pad 0), mask [B,T] bool: a full row, left- and right-padded rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(ROWS), T), np.int32)
    mask = np.zeros((len(ROWS), T), bool)
    for b, (side, n) in enumerate(ROWS):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[b, sl] = rng.integers(4, 512, size=n)
        mask[b, sl] = True
    return ids, mask


def torch_model(hf_dir) -> transformers.Qwen3ForCausalLM:
    return transformers.Qwen3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF forward with explicit positions cumsum(mask)-1 (what generate() does for left padding)."""
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(position_ids.astype(np.int64)))
    return out.logits.float().numpy()


@partial(jax.jit, static_argnums=1)  # config is hashable: one compile per (config, shape)
def _logits(params, config, ids, mask):
    return qwen3.lm_logits(params, config, qwen3.forward(params, config, ids, mask)[0])


def jax_logits(params, config, ids, mask) -> np.ndarray:
    return np.asarray(_logits(params, config, jnp.asarray(ids), jnp.asarray(mask)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_logits_parity(hf_dir):
    params, config = load_hf_params(hf_dir, dtype="float32", progress=False)
    ids, mask = padded_batch()
    ref = torch_logits(torch_model(hf_dir), ids, mask)  # [B,T,V]
    got = jax_logits(jax.device_put(params), config, ids, mask)
    assert got.shape == ref.shape == (len(ROWS), T, config.vocab_size)
    err = rel_err(got[mask], ref[mask])
    assert err < REL_TOL, f"relative logits error {err:.3g} >= {REL_TOL}"
    # the reference is not degenerate: logits vary across positions and rows
    assert np.std(ref[mask]) > 1e-3
    return err


def test_logits_parity_untied(tiny_hf_dir):
    check_logits_parity(tiny_hf_dir)


def test_logits_parity_tied(tiny_hf_dir_tied):
    params, config = load_hf_params(tiny_hf_dir_tied, progress=False)
    assert config.tie_word_embeddings and "lm_head" not in params
    check_logits_parity(tiny_hf_dir_tied)


def test_logits_parity_sharded(tiny_hf_dir_sharded):
    check_logits_parity(tiny_hf_dir_sharded)


def test_padding_does_not_change_real_logits(tiny_params):
    """A row's logits do not depend on which side its padding is on (checks mask + positions)."""
    params, config = tiny_params
    ids, mask = padded_batch()
    flipped_ids, flipped_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b in range(len(ROWS)):  # move the real tokens to the other side of the row
        n = int(mask[b].sum())
        sl = slice(0, n) if ROWS[b][0] == "left" else slice(T - n, T)
        flipped_ids[b, sl], flipped_mask[b, sl] = ids[b][mask[b]], True
    assert not np.array_equal(flipped_mask, mask)
    a = jax_logits(params, config, ids, mask)[mask]
    b = jax_logits(params, config, flipped_ids, flipped_mask)[flipped_mask]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


def greedy_jax(params, config, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy decoding, re-running the full forward every step (no cache). Prompts are left padded
    into a fixed buffer [B, P + n_new] whose unfilled tail slots are masked out (one compile)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + n_new
    ids = np.zeros((B, S), np.int32)
    mask = np.zeros((B, S), bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):P] = p
        mask[b, P - len(p):P] = True

    @jax.jit
    def next_token(ids, mask, cur):  # logits at slot cur-1 -> argmax
        h, _ = qwen3.forward(params, config, ids, mask)
        h_last = jax.lax.dynamic_index_in_dim(h, cur - 1, axis=1, keepdims=False)  # [B,D]
        return jnp.argmax(qwen3.lm_logits(params, config, h_last), axis=-1).astype(jnp.int32)

    for cur in range(P, S):
        tok = np.asarray(next_token(jnp.asarray(ids), jnp.asarray(mask), cur))
        ids[:, cur] = tok
        mask[:, cur] = True
    return [ids[b, P:].tolist() for b in range(B)]


def greedy_torch(model, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Manual argmax loop with the full forward each step (left padded, explicit positions)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = p
        mask[b, P - len(p):] = True
    out = []
    for _ in range(n_new):
        tok = torch_logits(model, ids, mask)[:, -1].argmax(-1)
        out.append(tok)
        ids = np.concatenate([ids, tok[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((B, 1), bool)], axis=1)
    return np.stack(out, axis=1).tolist()


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_greedy_continuation_matches_torch(variant, tiny_hf_dir, tiny_hf_dir_tied):
    hf_dir = tiny_hf_dir if variant == "untied" else tiny_hf_dir_tied
    params, config = load_hf_params(hf_dir, progress=False)
    prompts = [[3, 10, 200, 31, 77, 5, 400], [3, 88, 9]]
    got = greedy_jax(jax.device_put(params), config, prompts, N_NEW)
    want = greedy_torch(torch_model(hf_dir), prompts, N_NEW)
    assert got == want
    assert len(got[0]) == N_NEW
    assert len(set(got[0]) | set(got[1])) > 1, "degenerate continuation (one token): test is too weak"


def test_bf16_checkpoint_reads_exactly(tmp_path):
    """A bf16 HF checkpoint converts to fp32 params equal to torch's bf16 weights, bit for bit."""
    from jaxhack.models.tiny import make_tiny_hf_model

    model = make_tiny_hf_model(tmp_path, seed=3, dtype="bfloat16")
    params, _ = load_hf_params(tmp_path, dtype="float32", progress=False)
    sd = model.state_dict()
    np.testing.assert_array_equal(np.asarray(params["layers"]["q_proj"][1]),
                                  sd["model.layers.1.self_attn.q_proj.weight"].float().numpy().T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["k_norm"][0]),
                                  sd["model.layers.0.self_attn.k_norm.weight"].float().numpy())
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].float().numpy().T)


def test_bf16_conversion_rounds_like_torch(tiny_hf_dir):
    """fp32 -> bf16 conversion gives the same bits as torch's .to(torch.bfloat16)."""
    params, _ = load_hf_params(tiny_hf_dir, dtype="bfloat16", progress=False)
    assert params["layers"]["down_proj"].dtype == jnp.bfloat16
    sd = torch_model(tiny_hf_dir).state_dict()
    for ours, name, transpose in [("down_proj", "model.layers.0.mlp.down_proj.weight", True),
                                  ("input_norm", "model.layers.1.input_layernorm.weight", False)]:
        i = int(name.split(".")[2])
        want = sd[name].to(torch.bfloat16)
        want = (want.T if transpose else want).contiguous().view(torch.int16).numpy().view(np.uint16)
        got = np.asarray(params["layers"][ours][i]).view(np.uint16)
        np.testing.assert_array_equal(got, want)
