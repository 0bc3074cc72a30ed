"""The fused decode kernel (norms, RoPE, cache write and attention in one Pallas program per row and
KV head), run by Pallas' interpreter on CPU: it writes the split path's cache (bf16: bit for bit) and
gives its attention within the dtype's rounding, alone, inside qwen3.forward and in the sampler."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jaxhack.io import UserError
from jaxhack.models import fused_decode, qwen3
from jaxhack.models.config import TINY
from jaxhack.models.decode_attention import ONE_PART_MIN_PROGRAMS, SPLIT, decode_attention_reference
from jaxhack.models.fused_decode import ENV, fused_decode_attention, fused_decode_parts, kernel_choice, rope_tables

THETA, EPS = 10000.0, 1e-6


def _inputs(seed, dtype, B=3, Hq=8, Hkv=2, S=2 * SPLIT, hd=32):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(3 * rng.standard_normal((B, Hq + 2 * Hkv, hd)), dtype)
    q_norm = jnp.asarray(1 + 0.1 * rng.standard_normal(hd), dtype)
    k_norm = jnp.asarray(1 + 0.1 * rng.standard_normal(hd), dtype)
    k_cache = jnp.asarray(rng.standard_normal((B, Hkv, S, hd)), dtype)
    v_cache = jnp.asarray(rng.standard_normal((B, Hkv, S, hd)), dtype)
    return qkv, q_norm, k_norm, k_cache, v_cache


def _split_path(qkv, q_norm, k_norm, k_cache, v_cache, start, slot, positions, Hq):
    """What qwen3._layer does without the kernel: norms, RoPE, the cache writes, then attention over
    [start, slot]. Returns (out [B,Hq,hd], k_cache, v_cache)."""
    Hkv = k_cache.shape[1]
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    q = qwen3.rope(qwen3.rms_norm(q[:, None], q_norm, EPS), positions[:, None], THETA)[:, 0]
    k = qwen3.rope(qwen3.rms_norm(k[:, None], k_norm, EPS), positions[:, None], THETA)[:, 0]
    rows = jnp.arange(qkv.shape[0])
    k_cache = k_cache.at[rows, :, slot, :].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[rows, :, slot, :].set(v.astype(v_cache.dtype))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k_cache, v_cache))
    return decode_attention_reference(q32, k32, v32, start, slot + 1), k_cache, v_cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_writes_the_split_paths_cache_and_gives_its_attention(dtype):
    """Rows whose range starts inside a block, spans blocks, and is the new token alone (start == slot,
    as for a finished row); the attention against an fp32 softmax of the same rounded q and keys."""
    Hq = 8
    qkv, q_norm, k_norm, k_cache, v_cache = _inputs(0, dtype, Hq=Hq)
    start, slot, positions = jnp.array([0, 5, 70]), jnp.array([3, 200, 70]), jnp.array([3, 195, 11])
    cos, sin = rope_tables(positions, qkv.shape[-1], THETA, dtype)
    out, k_new, v_new = fused_decode_attention(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot,
                                               num_q_heads=Hq, eps=EPS, implementation="interpret")
    ref, k_ref, v_ref = _split_path(qkv, q_norm, k_norm, k_cache, v_cache, start, slot, positions, Hq)
    # bf16: every rounding as the split path's, bit for bit; fp32: the norm's sum is taken in another order
    check = np.testing.assert_array_equal if dtype == jnp.bfloat16 else lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-6, atol=2e-6)
    check(np.asarray(k_new, np.float32), np.asarray(k_ref, np.float32))
    check(np.asarray(v_new, np.float32), np.asarray(v_ref, np.float32))
    assert out.dtype == dtype and out.shape == (3, Hq, qkv.shape[-1])
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert np.linalg.norm(out - ref) <= tol * np.linalg.norm(ref), np.linalg.norm(out - ref) / np.linalg.norm(ref)
    # row 2 attends to its new token only: each query head's output is its KV head's new value
    Hkv = k_cache.shape[1]
    for head in range(Hkv):
        np.testing.assert_allclose(out[2, 4 * head:4 * head + 4],
                                   np.broadcast_to(np.asarray(qkv[2, Hq + Hkv + head], np.float32), (4, qkv.shape[-1])),
                                   rtol=1e-6)


def test_slots_outside_the_range_are_not_read():
    """Garbage (huge values, NaN) in the cache outside [start, slot) changes nothing."""
    Hq = 8
    qkv, q_norm, k_norm, k_cache, v_cache = _inputs(1, jnp.float32, Hq=Hq)
    start, slot = jnp.array([10, 64, 0]), jnp.array([100, 130, 1])
    cos, sin = rope_tables(jnp.array([90, 66, 1]), qkv.shape[-1], THETA, jnp.float32)
    run = lambda k, v: fused_decode_attention(qkv, q_norm, k_norm, cos, sin, k, v, start, slot,  # noqa: E731
                                              num_q_heads=Hq, eps=EPS, implementation="interpret")[0]
    clean = np.asarray(run(k_cache, v_cache))
    k_bad = k_cache.at[0, :, :10].set(1e4).at[0, :, 100:].set(jnp.nan).at[1, :, :64].set(jnp.nan)
    v_bad = v_cache.at[0, :, :10].set(jnp.nan).at[2, :, 1:].set(1e6)
    np.testing.assert_array_equal(np.asarray(run(k_bad, v_bad)), clean)


def _merge_live_parts(out, total, peak, start, end, split):
    """numpy: each row's attention from its live parts [start // split, ceil(end / split)) -> [B,Hq,hd]."""
    B, Hkv, _, g, hd = out.shape
    merged = np.zeros((B, Hkv, g, hd))
    for b in range(B):
        live = range(start[b] // split, -(-end[b] // split))
        top = np.max([peak[b, :, j] for j in live], axis=0)  # [Hkv,g]
        weights = [total[b, :, j] * np.exp(peak[b, :, j] - top) for j in live]
        merged[b] = sum(w[..., None] * out[b, :, j] for w, j in zip(weights, live)) / sum(weights)[..., None]
    return merged.reshape(B, Hkv * g, hd)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_parts_kernel_writes_the_split_paths_cache_queries_and_parts(dtype):
    """`fused_decode_parts` (the refill sampler's form, rows at their own slots): the split path's
    cache and rotated queries (bf16: bit for bit), and live parts whose merge is the attention over
    [start, slot]; ranges inside one part, across parts, the new token alone, the new token first
    in its part."""
    Hq, split = 8, SPLIT // 2
    qkv, q_norm, k_norm, k_cache, v_cache = _inputs(3, dtype, B=4, Hq=Hq)
    start, slot = jnp.array([0, 5, 70, 30]), jnp.array([3, 200, 70, 2 * split])
    positions = jnp.array([3, 195, 11, 200])
    cos, sin = rope_tables(positions, qkv.shape[-1], THETA, dtype)
    q, (out, total, peak), k_new, v_new = fused_decode_parts(
        qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot, num_q_heads=Hq, eps=EPS, split=split,
        implementation="interpret")
    ref, k_ref, v_ref = _split_path(qkv, q_norm, k_norm, k_cache, v_cache, start, slot, positions, Hq)
    q_ref = qwen3.rope(qwen3.rms_norm(qkv[:, None, :Hq], q_norm, EPS), positions[:, None], THETA)[:, 0]
    check = np.testing.assert_array_equal if dtype == jnp.bfloat16 else lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-6, atol=2e-6)
    for got, want in ((k_new, k_ref), (v_new, v_ref), (q, q_ref)):
        check(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert out.shape == (4, 2, k_cache.shape[2] // split, Hq // 2, qkv.shape[-1]) and out.dtype == dtype
    merged = _merge_live_parts(*(np.asarray(x, np.float64) for x in (out, total, peak)), np.asarray(start),
                               np.asarray(slot) + 1, split)
    ref = np.asarray(ref, np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert np.linalg.norm(merged - ref) <= tol * np.linalg.norm(ref), np.linalg.norm(merged - ref) / np.linalg.norm(ref)


def test_parts_kernel_reads_only_the_range_and_writes_only_live_parts():
    """NaN in the cache outside [start, slot) changes no live part; parts outside the range keep
    what the output buffers held (they are not written)."""
    Hq, split = 8, SPLIT // 2
    qkv, q_norm, k_norm, k_cache, v_cache = _inputs(4, jnp.float32, Hq=Hq)
    start, slot = jnp.array([70, 64, 0]), jnp.array([100, 200, 1])
    cos, sin = rope_tables(jnp.array([90, 66, 1]), qkv.shape[-1], THETA, jnp.float32)
    run = lambda k, v: fused_decode_parts(qkv, q_norm, k_norm, cos, sin, k, v, start, slot,  # noqa: E731
                                          num_q_heads=Hq, eps=EPS, split=split, implementation="interpret")
    q, clean, k_out, _ = run(k_cache, v_cache)
    k_bad = k_cache.at[0, :, :70].set(jnp.nan).at[0, :, 101:].set(jnp.nan).at[1, :, :64].set(1e4)
    v_bad = v_cache.at[0, :, :70].set(jnp.nan).at[2, :, 1:].set(jnp.nan)
    q_bad, dirty, k_bad_out, _ = run(k_bad, v_bad)
    live = [(0, 1), (1, 1), (1, 2), (1, 3), (2, 0)]  # (row, part) holding a slot of [start, slot]
    for a, b in zip(clean, dirty):
        for row, part in live:
            np.testing.assert_array_equal(np.asarray(b[row, :, part]), np.asarray(a[row, :, part]))
    np.testing.assert_array_equal(np.asarray(q_bad), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(k_bad_out[1, :, 200]), np.asarray(k_out[1, :, 200]))


def test_choice_follows_the_environment_and_the_split_paths_tiling(monkeypatch):
    bf16, S = jnp.bfloat16, 2 * SPLIT
    monkeypatch.delenv(ENV, raising=False)
    assert kernel_choice(bf16, S, ONE_PART_MIN_PROGRAMS, True) is None  # CPU: no Pallas GPU kernel
    monkeypatch.setattr(fused_decode, "default_implementation", lambda dtype, cache_len: "pallas")  # as on a GPU
    assert kernel_choice(bf16, S, ONE_PART_MIN_PROGRAMS, True) == "pallas"
    assert kernel_choice(bf16, S, ONE_PART_MIN_PROGRAMS - 8, True) is None  # few pairs: split the key axis
    assert kernel_choice(bf16, S, 4 * ONE_PART_MIN_PROGRAMS, False) is None  # rows at different steps, one part each
    assert kernel_choice(bf16, S, 8, False, key_parts=True) == "pallas"  # the refill sampler: in key parts
    monkeypatch.setenv(ENV, "split")
    assert kernel_choice(bf16, S, ONE_PART_MIN_PROGRAMS, True) is None
    assert kernel_choice(bf16, S, 8, False, key_parts=True) is None
    monkeypatch.setenv(ENV, "fused-interpret")
    assert kernel_choice(bf16, S, 2, False) == "interpret"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(UserError, match="JAXHACK_DECODE_KERNEL='fast'; expected one of fused, split"):
        kernel_choice(bf16, S, ONE_PART_MIN_PROGRAMS, True)


def test_bad_shapes_are_refused():
    qkv, q_norm, k_norm, k_cache, v_cache = _inputs(2, jnp.float32)
    cos, sin = rope_tables(jnp.zeros(3, jnp.int32), qkv.shape[-1], THETA, jnp.float32)
    args = (q_norm, k_norm, cos, sin, k_cache, v_cache, jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32))
    with pytest.raises(AssertionError):
        fused_decode_attention(qkv, *args, num_q_heads=6, eps=EPS, implementation="interpret")
    with pytest.raises(ValueError, match="expected 'pallas' or 'interpret'"):
        fused_decode_attention(qkv, *args, num_q_heads=8, eps=EPS, implementation="xla")


def _decode_step(params, B=3, P=6, S=SPLIT, seed=5):
    lengths = np.array([6, 2, 4])[:B]
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, P)), jnp.int32)
    prompt_mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    mask = jnp.asarray(np.concatenate([prompt_mask, np.zeros((B, S - P), bool)], axis=1))
    cache = qwen3.init_cache(TINY, B, S, jnp.float32)
    _, cache = qwen3.forward(params, TINY, ids, mask, cache=cache, cache_index=0)
    token = jnp.asarray(rng.integers(0, TINY.vocab_size, (B, 1)), jnp.int32)
    return qwen3.forward(params, TINY, token, mask.at[:, P].set(True), cache=cache, cache_index=P, attention="decode")


def test_forward_decode_with_the_kernel_equals_the_split_path(monkeypatch):
    """qwen3.forward(attention="decode") with JAXHACK_DECODE_KERNEL=fused-interpret: same hidden states
    (fp32 rounding) and the same cache as the split path; the kernel did run."""
    params = random_params(TINY, seed=4)
    monkeypatch.setenv(ENV, "split")
    h_split, c_split = _decode_step(params)
    calls = []
    original = qwen3.fused_decode_attention
    monkeypatch.setattr(qwen3, "fused_decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv(ENV, "fused-interpret")
    h_fused, c_fused = _decode_step(params)
    assert len(calls) == TINY.num_hidden_layers
    np.testing.assert_allclose(np.asarray(h_fused), np.asarray(h_split), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_fused), jax.tree.leaves(c_split)):  # later layers see rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bench_fused_decode_times_both_paths_and_checks_them(tmp_path, capsys):
    """scripts/bench_fused_decode.py on CPU (the interpreter, tiny shapes): a record per path, the fused
    kernel's output against the split path's within bf16 rounding, and bad flags are one-line errors."""
    import json

    from helpers import load_script

    bench = load_script("bench_fused_decode")
    out = tmp_path / "fused.jsonl"
    assert bench.main(["--small", "--implementation", "interpret", "--batch", "2", "--cache-len", "128",
                       "--calls", "2", "--runs", "1", "--hbm-tbps", "4.8", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in records] == ["split", "fused", "fused"]
    assert records[0]["rel_diff_vs_split"] == 0.0 and all(0 < r["rel_diff_vs_split"] < 1e-2 for r in records[1:])
    assert all(r["us"] > 0 and r["live_bytes"] > 0 and r["batch"] == 2 for r in records)
    assert "best fused" in capsys.readouterr().out
    for flags, message in ((["--cache-len", "100"], "--cache-len [100]: expected multiples of 128"),
                           (["--hbm-tbps", "0"], "--hbm-tbps must be > 0"), (["--calls", "0"], "--calls must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sampler_gives_the_split_paths_tokens_with_the_kernel(monkeypatch):
    """The sampler's greedy tokens with the kernel (interpreted) are the split path's, log-probs within
    fp32 rounding: the guard rail 'sampler outputs unchanged' for the fused path. Compiled programs are
    cleared around it (the kernel choice is read when a program is traced)."""
    import dataclasses

    from jaxhack.rl import sampler

    config = dataclasses.replace(TINY, eos_token_ids=(2,))
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    params["lm_head"] = params["lm_head"] * 40.0  # clear greedy winners
    prompts = [[5, 17, 33], [1, 9, 8, 7, 100, 200, 300], [4] * 5 + [11, 12, 13]]

    def run(choice):
        monkeypatch.setenv(ENV, choice)
        jax.clear_caches()
        return sampler.generate(params, config, prompts, max_new_tokens=12, temperature=0.0,
                                key=jax.random.PRNGKey(1), eos_token_ids=[])

    try:
        split, fused = run("split"), run("fused-interpret")
    finally:
        jax.clear_caches()
    np.testing.assert_array_equal(fused.tokens, split.tokens)
    assert len(np.unique(split.tokens)) > 4  # not a degenerate sequence
    np.testing.assert_allclose(fused.logprobs, split.logprobs, atol=2e-5)


def test_refill_sampler_gives_the_split_paths_tokens_with_the_parts_kernels(monkeypatch):
    """The refill sampler (rows at different steps, a prompt pool) with `fused_decode_parts` and
    `attention_parts`' kernels (interpreted: JAXHACK_DECODE_KERNEL=fused-interpret) gives the split
    path's greedy tokens and finished rows, log-probs within fp32 rounding."""
    import dataclasses

    from jaxhack.models import decode_attention
    from jaxhack.rl import sampler

    traced, fused_parts = [], []
    combine = decode_attention.combine_prefix_parts
    monkeypatch.setattr(decode_attention, "combine_prefix_parts",
                        lambda *a, **kw: traced.append(kw["implementation"]) or combine(*a, **kw))
    own_parts = qwen3.fused_decode_parts
    monkeypatch.setattr(qwen3, "fused_decode_parts",
                        lambda *a, **kw: fused_parts.append(kw["implementation"]) or own_parts(*a, **kw))
    config = dataclasses.replace(TINY, eos_token_ids=(2,))
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    params["lm_head"] = params["lm_head"] * 40.0
    prompts = [[5, 17, 33], [5, 17, 33], [1, 9, 8, 7, 100, 200, 300], [4] * 5 + [11, 12, 13]]

    def run(choice):
        monkeypatch.setenv(ENV, choice)
        jax.clear_caches()
        return sampler.generate(params, config, prompts, max_new_tokens=6, temperature=0.0,
                                key=jax.random.PRNGKey(1), eos_token_ids=[], max_rows=2, refill_rows=1,
                                max_lengths=[6, 3, 5, 6], schedule="refill")

    try:
        split = run("split")
        assert not traced  # the split path: JAX's stock kernel (the reference on a CPU), merged by XLA
        fused = run("fused-interpret")
    finally:
        jax.clear_caches()
    assert traced and set(traced) == {"interpret"}
    assert fused_parts and set(fused_parts) == {"interpret"}  # norms, RoPE, cache writes in the own-key parts
    assert split.decode_steps > 6  # rows joined the slots at different steps
    np.testing.assert_array_equal(fused.tokens, split.tokens)
    np.testing.assert_array_equal(fused.lengths, split.lengths)
    np.testing.assert_allclose(fused.logprobs, split.logprobs, atol=2e-5)


@pytest.mark.parametrize("script, argv", [("check_sampler_form", ["--small"]),
                                          ("profile_kernels", ["generate", "--small"]),
                                          ("bench_decode_step", ["--small"]), ("gpu_check_kernels", [])])
def test_scripts_that_decode_refuse_a_bad_choice_in_one_line(script, argv, monkeypatch, capsys):
    """Every script whose work reads JAXHACK_DECODE_KERNEL refuses a bad value up front (bench_generate.py
    and bench_phase3.py: their own tests): exit 2 and one error line (profile_kernels reports through
    argparse: its usage lines, then the error), no traceback."""
    from helpers import load_script

    module = load_script(script)
    monkeypatch.setenv(ENV, "bogus")
    try:
        code = module.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and (len(err) == 1 or err[0].startswith("usage:")), err
    assert err[-1].endswith("JAXHACK_DECODE_KERNEL='bogus'; expected one of fused, split, fused-interpret"), err
