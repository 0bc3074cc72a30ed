"""Tests for jaxhack.rl.sampler (tiny random fp32 Qwen3 on CPU)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxhack.models import decode_layout, qwen3
from jaxhack.models.config import TINY
from jaxhack.rl import lend, sampler

CONFIG = dataclasses.replace(TINY, eos_token_ids=(2,))
PROMPTS = [[5, 17, 33], [1, 9, 8, 7, 100, 200, 300], [4] * 5 + [11, 12, 13, 14, 15, 16, 17]]
MAX_NEW = 20


@pytest.fixture(scope="module")
def params():
    p = qwen3.init_params(CONFIG, jax.random.PRNGKey(0), jnp.float32)
    # Sharpen the output distribution so greedy has clear winners and sampling is non-uniform.
    p["lm_head"] = p["lm_head"] * 40.0
    return p


def lora_adapters(config, key, rank=4, b_scale=0.5):
    """Hand-built LoRA adapters (merged frozen + trainable) for every target module."""
    L = config.num_hidden_layers
    out = {}
    for i, (name, (d_in, d_out)) in enumerate(qwen3.module_shapes(config).items()):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        out[name] = {"a": jax.random.normal(ka, (L, rank, d_in)) * 0.3,
                     "b": jax.random.normal(kb, (L, d_out, rank)) * b_scale,
                     "scale": jnp.full((L,), 2.0)}
    return out


def svd_adapters(config, key, rank=4):
    L = config.num_hidden_layers
    out = {}
    for i, (name, (d_in, d_out)) in enumerate(qwen3.module_shapes(config).items()):
        ku, kv, ks = jax.random.split(jax.random.fold_in(key, i), 3)
        out[name] = {"u": jax.random.normal(ku, (L, d_out, rank)) * 0.3,
                     "vh": jax.random.normal(kv, (L, rank, d_in)) * 0.3,
                     "delta_s": jax.random.normal(ks, (L, rank)),
                     "delta_s_hack": jnp.zeros((L, rank))}
    return out


REF_LEN = 64


@jax.jit
def _full_forward_logits(params, ids, mask, adapters):
    """No cache: ids, mask [1, REF_LEN] -> logits [1, REF_LEN, V]."""
    hidden, _ = qwen3.forward(params, CONFIG, ids, mask, adapters=adapters)
    return qwen3.lm_logits(params, CONFIG, hidden)


def reference_greedy(params, prompt, n_new, adapters=None):
    """Re-run the full (cache-free) forward on the growing sequence; argmax each step.
    The sequence sits at the start of a fixed REF_LEN window followed by masked pads, which cannot
    influence it (causal attention), so there is one compilation instead of one per length.
    Returns tokens [n_new] and their temperature-1 log-probs [n_new]."""
    seq = list(prompt)
    tokens, logps = [], []
    for _ in range(n_new):
        n = len(seq)
        assert n <= REF_LEN
        ids = np.zeros((1, REF_LEN), np.int32); ids[0, :n] = seq
        mask = np.arange(REF_LEN)[None, :] < n
        logits = _full_forward_logits(params, jnp.asarray(ids), jnp.asarray(mask), adapters)[0, n - 1]
        tok = int(jnp.argmax(logits))
        tokens.append(tok)
        logps.append(float(jax.nn.log_softmax(logits)[tok]))
        seq.append(tok)
    return np.asarray(tokens), np.asarray(logps)


@pytest.fixture(scope="module")
def greedy_no_eos(params):
    return sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                            key=jax.random.PRNGKey(1), eos_token_ids=[])


def test_greedy_matches_full_forward_argmax(params, greedy_no_eos):
    res = greedy_no_eos
    assert res.tokens.shape == (len(PROMPTS), MAX_NEW)
    np.testing.assert_array_equal(res.prompt_lengths, [len(p) for p in PROMPTS])
    np.testing.assert_array_equal(res.lengths, [MAX_NEW] * len(PROMPTS))
    assert not res.finished.any()
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logp = reference_greedy(params, prompt, MAX_NEW)
        np.testing.assert_array_equal(res.tokens[i], ref_tokens)
        np.testing.assert_allclose(res.logprobs[i], ref_logp, atol=2e-4, rtol=1e-4)
    # the sharpened model should not be degenerate (otherwise the comparison is weak)
    assert len(np.unique(res.tokens)) > 5


def test_eos_stops_and_pads(params, greedy_no_eos):
    base = greedy_no_eos.tokens
    k = 6
    eos = int(base[1, k])  # the greedy token of sequence 1 at step k becomes the EOS
    pad_id = CONFIG.vocab_size - 1
    assert eos != pad_id
    res = sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                           key=jax.random.PRNGKey(1), eos_token_ids=[eos, 99999], pad_id=pad_id)
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(base[i] == eos)
        expected_len = int(hits[0]) + 1 if hits.size else MAX_NEW
        assert res.lengths[i] == expected_len
        assert res.finished[i] == bool(hits.size)
        np.testing.assert_array_equal(res.tokens[i, :expected_len], base[i, :expected_len])
        assert (res.tokens[i, expected_len:] == pad_id).all()
        assert (res.logprobs[i, expected_len:] == 0.0).all()
        np.testing.assert_allclose(res.logprobs[i, :expected_len],
                                   greedy_no_eos.logprobs[i, :expected_len], atol=1e-5)
        np.testing.assert_array_equal(res.completion_mask[i], np.arange(MAX_NEW) < expected_len)
    assert res.lengths[1] <= k + 1 and res.finished[1]


def test_config_eos_default_and_all_done_early(params, greedy_no_eos):
    # eos_token_ids=None uses config.eos_token_ids: make every sequence's first token an EOS.
    firsts = tuple(sorted(set(int(t) for t in greedy_no_eos.tokens[:, 0])))
    cfg = dataclasses.replace(CONFIG, eos_token_ids=firsts)
    res = sampler.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                           key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(res.lengths, [1] * len(PROMPTS))
    assert res.finished.all()
    assert (res.tokens[:, 1:] == 0).all()  # default pad_id
    np.testing.assert_array_equal(res.tokens[:, 0], greedy_no_eos.tokens[:, 0])


def test_top_p_near_zero_equals_greedy(params, greedy_no_eos):
    res = sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.3, top_p=1e-6,
                           key=jax.random.PRNGKey(7), eos_token_ids=[])
    np.testing.assert_array_equal(res.tokens, greedy_no_eos.tokens)
    np.testing.assert_allclose(res.logprobs, greedy_no_eos.logprobs, atol=1e-5)


def _next_token_probs(params, prompt):
    ids = jnp.asarray([prompt], jnp.int32)
    hidden, _ = qwen3.forward(params, CONFIG, ids, jnp.ones_like(ids, bool))
    return qwen3.lm_logits(params, CONFIG, hidden[0, -1])  # [V]


def _chi_square(counts, probs, n):
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    return stat, int(keep.sum()) - 1


def test_temperature_sampling_frequencies(params):
    prompt = PROMPTS[0]
    n = 512
    temperature = 1.5
    res = sampler.generate(params, CONFIG, [prompt] * n, max_new_tokens=1, temperature=temperature,
                           key=jax.random.PRNGKey(3), eos_token_ids=[])
    logits = np.asarray(_next_token_probs(params, prompt), np.float64)
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    counts = np.bincount(res.tokens[:, 0], minlength=CONFIG.vocab_size).astype(np.float64)
    stat, df = _chi_square(counts, probs, n)
    assert df >= 3, "distribution too peaked for a meaningful test"
    assert stat < df + 5 * np.sqrt(2 * df), (stat, df)
    # and it is not the temperature-1 distribution
    probs1 = np.exp(logits - logits.max()); probs1 /= probs1.sum()
    stat1, df1 = _chi_square(counts, probs1, n)
    assert stat1 > df1 + 5 * np.sqrt(2 * df1), (stat1, df1)
    # logprobs are the temperature-1 log-probs of the sampled tokens
    logp1 = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(res.logprobs[:, 0], logp1[res.tokens[:, 0]], atol=1e-4)


def test_top_p_restricts_to_nucleus(params):
    prompt = PROMPTS[0]
    n, top_p = 512, 0.6
    res = sampler.generate(params, CONFIG, [prompt] * n, max_new_tokens=1, temperature=1.0, top_p=top_p,
                           key=jax.random.PRNGKey(4), eos_token_ids=[])
    logits = np.asarray(_next_token_probs(params, prompt), np.float64)
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[mass_before < top_p]
    assert 1 < len(nucleus) < CONFIG.vocab_size // 2
    sampled = set(res.tokens[:, 0].tolist())
    assert sampled <= set(nucleus.tolist())
    renorm = np.zeros_like(probs); renorm[nucleus] = probs[nucleus]; renorm /= renorm.sum()
    counts = np.bincount(res.tokens[:, 0], minlength=CONFIG.vocab_size).astype(np.float64)
    stat, df = _chi_square(counts, renorm, n)
    assert stat < df + 5 * np.sqrt(2 * max(df, 1)), (stat, df)


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_adapters_change_output_and_match_reference(params, greedy_no_eos, kind):
    make = lora_adapters if kind == "lora" else svd_adapters
    adapters = make(CONFIG, jax.random.PRNGKey(11))
    res = sampler.generate(params, CONFIG, PROMPTS, adapters=adapters, max_new_tokens=MAX_NEW,
                           temperature=0.0, key=jax.random.PRNGKey(1), eos_token_ids=[])
    assert not np.allclose(res.logprobs, greedy_no_eos.logprobs, atol=1e-3)
    assert (res.tokens != greedy_no_eos.tokens).any()
    if kind == "svd":  # the cache path with adapters is checked against the reference once (LoRA)
        return
    ref_tokens, ref_logp = reference_greedy(params, PROMPTS[1], MAX_NEW, adapters=adapters)
    np.testing.assert_array_equal(res.tokens[1], ref_tokens)
    np.testing.assert_allclose(res.logprobs[1], ref_logp, atol=2e-4, rtol=1e-4)


def test_zero_lora_equals_base(params, greedy_no_eos):
    adapters = lora_adapters(CONFIG, jax.random.PRNGKey(11), b_scale=0.0)
    res = sampler.generate(params, CONFIG, PROMPTS, adapters=adapters, max_new_tokens=MAX_NEW,
                           temperature=0.0, key=jax.random.PRNGKey(1), eos_token_ids=[])
    np.testing.assert_array_equal(res.tokens, greedy_no_eos.tokens)
    np.testing.assert_allclose(res.logprobs, greedy_no_eos.logprobs, atol=1e-5)


@pytest.fixture
def trace_count(monkeypatch):
    """Counts traces of the generation program: qwen3.forward runs (in Python) only while jit traces."""
    calls = []
    forward = qwen3.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(qwen3, "forward", counting_forward)
    return lambda: len(calls)


def test_no_recompile_within_bucket(params, trace_count):
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_ids=[])
    sampler.generate(params, CONFIG, [[3, 4, 5], [6, 7], [8]], key=jax.random.PRNGKey(0), **kwargs)
    count = trace_count()
    # different prompt lengths (same 64-bucket), batch sizes in the same bucket (3, 4 -> 4), other
    # sampling modes / EOS ids (traced values): all reuse the compiled program
    r = sampler.generate(params, CONFIG, [[3] * 40, [6, 7, 8], [9] * 17, [1]], key=jax.random.PRNGKey(1),
                         **kwargs)
    sampler.generate(params, CONFIG, [[1] * 64, [2], [3]], key=jax.random.PRNGKey(2), temperature=0.0,
                     top_p=0.5, max_new_tokens=MAX_NEW, eos_token_ids=[5, 6])
    sampler.generate(params, CONFIG, [[1] * 64, [2], [3]], key=jax.random.PRNGKey(2), top_p=0.5, **kwargs)
    assert trace_count() == count
    assert r.tokens.shape == (4, MAX_NEW)
    # a longer prompt moves to the next bucket and does compile
    sampler.generate(params, CONFIG, [[1] * 65, [2], [3]], key=jax.random.PRNGKey(2), **kwargs)
    assert trace_count() > count


def test_buckets_and_left_pad():
    assert [sampler.prompt_bucket(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert [sampler.batch_bucket(n) for n in (1, 3, 4, 5, 64, 65, 256)] == [1, 4, 4, 8, 64, 128, 256]
    tokens, mask = sampler.left_pad([[7, 8], [9]], 4, 3, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_sampling_is_deterministic_per_key_and_varies_across_keys(params):
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, eos_token_ids=[])
    a = sampler.generate(params, CONFIG, PROMPTS, key=jax.random.PRNGKey(5), **kwargs)
    b = sampler.generate(params, CONFIG, PROMPTS, key=jax.random.PRNGKey(5), **kwargs)
    c = sampler.generate(params, CONFIG, PROMPTS, key=jax.random.PRNGKey(6), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_bad_arguments(params):
    with pytest.raises(ValueError, match="empty"):
        sampler.generate(params, CONFIG, [[1], []], max_new_tokens=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(params, CONFIG, [[1]], max_new_tokens=2, top_p=0.0, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_row_groups_and_prefill_chunks_do_not_change_tokens(params, temperature):
    """Same key -> same tokens (and log-probs up to float order) whether the rows decode together or in
    groups of max_rows, and whether the prompt is prefilled at once or in small token chunks."""
    prompts = PROMPTS + [[7] * 70, [3, 1, 4, 1, 5, 9, 2, 6]]  # a 70-token prompt: bucket 128
    kwargs = dict(max_new_tokens=12, temperature=temperature, key=jax.random.PRNGKey(9))
    whole = sampler.generate(params, CONFIG, prompts, prefill_chunk=None, **kwargs)
    parts = sampler.generate(params, CONFIG, prompts, max_rows=2, prefill_chunk=32, **kwargs)  # 3 groups, 4 chunks
    np.testing.assert_array_equal(parts.tokens, whole.tokens)
    np.testing.assert_array_equal(parts.lengths, whole.lengths)
    np.testing.assert_array_equal(parts.finished, whole.finished)
    np.testing.assert_allclose(parts.logprobs, whole.logprobs, atol=1e-4)
    assert sampler.row_groups(5, 2) == ([(0, 2), (2, 4), (4, 5)], 2)
    assert sampler.row_groups(258, 136) == ([(0, 129), (129, 258)], 136)
    assert sampler.row_groups(258, 96) == ([(0, 86), (86, 172), (172, 258)], 88)
    # max_lengths caps rows like an EOS (without `finished`), leaving the other tokens as they were
    caps = [3, 12, 1, 12, 7]
    capped = sampler.generate(params, CONFIG, prompts, max_rows=2, prefill_chunk=32, max_lengths=caps, **kwargs)
    np.testing.assert_array_equal(capped.lengths, np.minimum(caps, whole.lengths))
    for i, n in enumerate(capped.lengths):
        np.testing.assert_array_equal(capped.tokens[i, :n], whole.tokens[i, :n])
        assert (capped.tokens[i, n:] == 0).all()


def test_finished_rows_read_no_cache(params):
    """A decode step gives the live rows the same output whether the finished rows' slots hold data or
    not (they read only the current slot now)."""
    B, S = 3, 128
    cache = qwen3.init_cache(CONFIG, B, S, jnp.float32)
    rng = np.random.default_rng(0)
    cache = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), cache)
    mask = np.zeros((B, S), bool)
    mask[:, :10] = True
    mask[1, 10] = False  # row 1 finished: slot 10 masked out
    mask[[0, 2], 10] = True
    tokens = jnp.asarray([[5], [6], [7]])
    h, _ = qwen3.forward(params, CONFIG, tokens, jnp.asarray(mask), cache=cache, cache_index=10,
                         attention="decode")
    ref, _ = qwen3.forward(params, CONFIG, tokens, jnp.asarray(mask), cache=cache, cache_index=10)
    np.testing.assert_allclose(np.asarray(h)[[0, 2]], np.asarray(ref)[[0, 2]], rtol=1e-4, atol=1e-5)
    assert np.isfinite(np.asarray(h)).all()


@pytest.fixture(scope="module")
def refill_greedy_no_eos(params):
    """3 prompts through 2 slots, one row prefilled at a time: the third row waits for a free slot."""
    return sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                            key=jax.random.PRNGKey(1), eos_token_ids=[], max_rows=2, refill_rows=1,
                            prefill_chunk=16, schedule="refill")


def test_refill_greedy_matches_full_forward_argmax(params, refill_greedy_no_eos):
    res = refill_greedy_no_eos
    np.testing.assert_array_equal(res.lengths, [MAX_NEW] * len(PROMPTS))
    assert res.decode_steps == 2 * MAX_NEW  # rows 0, 1 together, then row 2 alone
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logp = reference_greedy(params, prompt, MAX_NEW)
        np.testing.assert_array_equal(res.tokens[i], ref_tokens)
        np.testing.assert_allclose(res.logprobs[i], ref_logp, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refill_gives_the_same_rows_as_row_groups_in_fewer_steps(params, temperature):
    """Slot refill (4 slots, 3 rows prefilled at a time in 32-token chunks, rows finishing at an EOS
    or at their max_lengths cap) gives the same tokens, lengths and `finished` as the row groups,
    whose decode runs until each group's longest row is done; refill runs fewer decode steps."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n).tolist() for n in rng.integers(1, 70, 11)]  # bucket 128
    caps = rng.integers(1, 25, 11)
    kwargs = dict(max_new_tokens=24, temperature=temperature, key=jax.random.PRNGKey(3),
                  max_lengths=caps.tolist())
    free = sampler.generate(params, CONFIG, prompts, eos_token_ids=[], schedule="groups", **kwargs)
    values, counts = np.unique(free.tokens[free.completion_mask], return_counts=True)
    eos = [int(values[counts.argmax()])]  # the most frequent token: some rows stop at an EOS
    whole = sampler.generate(params, CONFIG, prompts, eos_token_ids=eos, prefill_chunk=None, schedule="groups",
                             **kwargs)
    groups = sampler.generate(params, CONFIG, prompts, eos_token_ids=eos, max_rows=4, schedule="groups", **kwargs)
    refill = sampler.generate(params, CONFIG, prompts, eos_token_ids=eos, max_rows=4, refill_rows=3,
                              prefill_chunk=32, **kwargs)  # schedule "auto": 11 prompts > 4 rows -> refill
    assert whole.finished.any() and (whole.lengths < caps).any() and (whole.lengths == caps).any()
    for res in (groups, refill):
        np.testing.assert_array_equal(res.tokens, whole.tokens)
        np.testing.assert_array_equal(res.lengths, whole.lengths)
        np.testing.assert_array_equal(res.finished, whole.finished)
        np.testing.assert_allclose(res.logprobs, whole.logprobs, atol=1e-4)
    assert -(-int(whole.lengths.sum()) // 4) <= refill.decode_steps < groups.decode_steps
    # the schedule's step count follows from the rows' lengths alone (for planning slots against memory)
    from jaxhack.rl.refill import schedule_decode_steps
    assert schedule_decode_steps(refill.lengths, slots=4, refill_rows=3) == refill.decode_steps
    assert schedule_decode_steps(refill.lengths, slots=2, refill_rows=2) > refill.decode_steps  # fewer slots


def test_each_distinct_prompt_is_prefilled_once(params):
    """GRPO groups (3 prompts x 4 rows): a row group of all 12 rows prefills its 3 prompts (U = 4, a
    power of two), the refill schedule each prompt once into its pool, and each row still gets its
    own prompt's keys and next-token logits: both give the tokens, lengths and log-probs of row groups
    of one row each, where no prompt is shared. With 2 slots the refill pool (3 entries for 7 runs)
    hands entries on as runs finish, and a prompt repeated apart from itself is a run of its own."""
    from jaxhack.rl.refill import prompt_windows

    ids = np.repeat(np.arange(43), 6)  # a mesh device's row group, in windows of 8 rows
    source, firsts, U = prompt_windows(ids, 8)
    assert U == 2 and sum(len(f) for f in firsts) == 65
    for j, f in enumerate(firsts):  # row i's source names the first row of its own prompt in its window
        rows = np.arange(8 * j, min(8 * j + 8, len(ids)))
        np.testing.assert_array_equal(ids[f[source[rows]]], ids[rows])
    assert prompt_windows(np.arange(11), 3)[2] == 3 and prompt_windows([5, 5, 1, 5, 2], 8)[2] == 4

    rng = np.random.default_rng(1)
    prompts = [p for n in (9, 30, 17) for p in [rng.integers(3, 200, n).tolist()] * 4]
    kwargs = dict(max_new_tokens=12, temperature=1.0, key=jax.random.PRNGKey(5), eos_token_ids=[],
                  max_lengths=rng.integers(1, 13, 12).tolist())
    from jaxhack.rl.refill import distinct_prompts
    tokens, mask = sampler.left_pad(prompts, 64, 12, 0)
    shared, shared_mask, source, U = distinct_prompts(tokens, mask, 12, 0)  # one window: the whole row group
    assert U == 4 and shared.shape == (4, 64) and shared_mask[3].sum() == 0  # 3 prompts, padded to U = 4
    np.testing.assert_array_equal(shared[source], tokens)
    two = distinct_prompts(tokens, mask, 6, 0)  # two devices' halves: 2 prompts each
    assert two[0].shape == (4, 64) and (two[2] < 2).all()
    np.testing.assert_array_equal(two[0][np.arange(12) // 6 * 2 + two[2]], tokens)
    alone = sampler.generate(params, CONFIG, prompts, max_rows=1, schedule="groups", **kwargs)  # no sharing
    groups = sampler.generate(params, CONFIG, prompts, schedule="groups", **kwargs)
    refill = sampler.generate(params, CONFIG, prompts, max_rows=4, refill_rows=3, prefill_chunk=32,
                              schedule="refill", **kwargs)
    for res in (groups, refill):
        np.testing.assert_array_equal(res.tokens, alone.tokens)
        np.testing.assert_array_equal(res.lengths, alone.lengths)
        np.testing.assert_allclose(res.logprobs, alone.logprobs, atol=1e-4)
    assert len({tuple(t) for t in groups.tokens[:4]}) > 1  # a group's rows draw their own tokens

    reused = [prompts[4 * (i % 3)] for i in (0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0)] + [[7, 8, 9]] * 2  # 8 runs
    kwargs["max_lengths"] = rng.integers(1, 13, len(reused)).tolist()
    alone = sampler.generate(params, CONFIG, reused, max_rows=1, schedule="groups", **kwargs)
    refill = sampler.generate(params, CONFIG, reused, max_rows=2, refill_rows=1, prefill_chunk=32,
                              schedule="refill", **kwargs)
    np.testing.assert_array_equal(refill.tokens, alone.tokens)
    np.testing.assert_array_equal(refill.lengths, alone.lengths)
    np.testing.assert_allclose(refill.logprobs, alone.logprobs, atol=1e-4)


def test_prompt_pool_book_never_runs_out_nor_double_books():
    """PromptRuns: the full preset's 43 runs of 6 rows fit a 48-entry pool with U = 2 prompts per refill
    of 8 rows; with few slots entries are handed on, and no entry is ever held by two runs at once."""
    from jaxhack.rl.refill import PromptRuns

    full = PromptRuns(np.repeat(np.arange(43), 6), slots=152, refill_rows=8)
    assert (full.pool_size, full.U, full.most_rows) == (48, 2, 8)
    assert [PromptRuns(np.arange(n), 152, 8).pool_size for n in (3, 8, 9, 17)] == [4, 8, 16, 24]
    assert PromptRuns(np.arange(300), 152, 8).pool_size == 153  # distinct prompts: at most B + 1 entries
    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = np.repeat(rng.integers(0, 5, 30), rng.integers(1, 5, 30))  # runs of 1-4 rows, prompts repeat apart
        B, R = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        book = PromptRuns(ids, B, R)
        R = min(R, B)
        left = rng.integers(1, 6, len(ids))  # decode steps per row
        slot_row, held, next_row = np.full(B, -1), {}, 0
        while next_row < len(ids) or (slot_row >= 0).any():
            free = np.flatnonzero(slot_row < 0)
            k = min(R, len(ids) - next_row)
            if k and len(free) >= k:
                rows = np.arange(next_row, next_row + k)
                firsts, pool_rows, entry, member = book.refill(rows)
                assert len(firsts) <= book.U and (entry < book.pool_size).all()
                for f, e in zip(firsts, pool_rows):  # a new run's entry is free
                    assert e not in held
                    held[e] = book.run_of_row[f]
                for r, e in zip(rows, entry):
                    assert held[e] == book.run_of_row[r] and ids[book.first[book.run_of_row[r]] + member[r - next_row]] == ids[r]
                slot_row[free[:k]] = rows
                next_row += k
                continue
            live = np.flatnonzero(slot_row >= 0)
            left[slot_row[live]] -= 1
            stopped = live[left[slot_row[live]] == 0]
            before = set(book.entry)
            book.finished(slot_row[stopped])
            for r in before - set(book.entry):
                held = {e: run for e, run in held.items() if run != r}
            slot_row[stopped] = -1
        assert not book.entry and len(book.free) == book.pool_size


def test_refill_slots_fit_the_largest_device_part():
    """refill_slots: max_rows slots per device, fewer when the largest of device_parts' parts fits a
    smaller batch bucket (the generate call and bench_phase3 both size the slots with it)."""
    from jaxhack.rl.refill import device_parts

    assert sampler.refill_slots(258, 96) == 96 and sampler.refill_slots(258, 96, devices=4) == 96
    assert sampler.refill_slots(11, 8, devices=4) == 4  # parts of 3 rows: bucket 4
    assert sampler.refill_slots(6, None) == 8
    for n in range(1, 40):
        for d in (1, 2, 3, 4, 8):
            largest = int(np.diff(device_parts(n, d)).max())
            assert largest == -(-n // d)  # consecutive parts differ by at most one row
            assert sampler.refill_slots(n, 16, d) == min(16, sampler.batch_bucket(largest))


def test_schedule_plans_the_devices_parts():
    """schedule_decode_steps(devices=D): the largest of generate_slots_on_devices' D parts."""
    from jaxhack.rl.refill import device_parts, schedule_decode_steps

    lengths = [8, 8, 8, 8, 1, 1, 1, 1]
    assert device_parts(8, 2).tolist() == [0, 4, 8] and device_parts(3, 4).tolist() == [0, 1, 2, 2, 3]
    assert schedule_decode_steps(lengths, slots=1, refill_rows=1) == 36
    assert schedule_decode_steps(lengths, slots=1, refill_rows=1, devices=2) == 32  # the long half
    assert schedule_decode_steps(lengths, slots=1, refill_rows=1, devices=8) == 8  # a row each
    assert schedule_decode_steps(lengths[:3], slots=1, refill_rows=1, devices=4) == 8  # an empty part
    with pytest.raises(ValueError, match="devices must be >= 1"):
        schedule_decode_steps(lengths, slots=1, refill_rows=1, devices=0)


def test_refill_does_not_recompile_across_calls(params, trace_count):
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_ids=[], max_rows=2, schedule="refill")
    sampler.generate(params, CONFIG, [[3, 4, 5], [6, 7], [8]], key=jax.random.PRNGKey(0), **kwargs)
    count = trace_count()
    # other prompt count and lengths (same bucket), sampling mode, caps: the same two programs
    r = sampler.generate(params, CONFIG, [[3] * 40, [6, 7, 8], [9] * 17, [1], [2, 2]], key=jax.random.PRNGKey(1),
                         temperature=0.0, max_lengths=[1, 2, 3, 4, 5], **kwargs)
    assert trace_count() == count
    np.testing.assert_array_equal(r.lengths, [1, 2, 3, 4, 5])


def true_svd_adapters(params, key, targets=None, delta_scale=0.3):
    """SVD adapters whose u / vh are the weights' own SVD factors (as `adapters.init_svd_adapter`),
    with a random non-zero delta_s of about delta_scale x S: the factored form must equal the exact one."""
    out = {}
    for i, name in enumerate(targets or qwen3.module_shapes(CONFIG)):
        w_torch = jnp.swapaxes(params["layers"][name], 1, 2)  # [L,out,in] = U diag(S) Vh
        u, s, vh = jnp.linalg.svd(w_torch, full_matrices=False)
        delta = jax.random.normal(jax.random.fold_in(key, i), s.shape) * delta_scale * s
        out[name] = {"u": u, "vh": vh, "delta_s": delta, "delta_s_hack": -0.5 * delta}
    return out


@pytest.mark.parametrize("targets", [None, ("q_proj", "up_proj", "down_proj")], ids=["all", "some"])
def test_factored_and_dense_forms_give_the_exact_forms_tokens(params, targets):
    """Both forms sample the same tokens as the exact x W + adapter form (fp32: they differ by float
    rounding only), in both schedules, greedy and at temperature 1, and greedy parity holds with the
    full (training) forward. factored: ((x Vh^T)(S + delta)) U^T, which needs the weights' own SVD
    (used here); dense: x W + x (U diag(delta) Vh)^T, which never uses that property (the same function
    for any bases; `test_dense_delta_is_the_adapters_change_of_the_weight` takes random ones). With some
    modules adapted, the q/k/v and gate/up groups mix the form's path and the plain one. The adapter is
    large enough to change the tokens."""
    adapters = true_svd_adapters(params, jax.random.PRNGKey(5), targets)
    kw = dict(max_new_tokens=MAX_NEW, key=jax.random.PRNGKey(1), eos_token_ids=[], adapters=adapters)
    base = sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0,
                            key=jax.random.PRNGKey(1), eos_token_ids=[])
    for temperature, extra in ((0.0, {}), (1.0, dict(max_rows=2, refill_rows=1))):
        exact = sampler.generate(params, CONFIG, PROMPTS, temperature=temperature, form="exact", **kw, **extra)
        if temperature == 0.0:
            assert (exact.tokens != base.tokens).any()
        for form in ("factored", "dense"):
            other = sampler.generate(params, CONFIG, PROMPTS, temperature=temperature, form=form, **kw, **extra)
            np.testing.assert_array_equal(other.tokens, exact.tokens, err_msg=form)
            np.testing.assert_allclose(other.logprobs, exact.logprobs, atol=2e-4, err_msg=form)
    ref_tokens, ref_logp = reference_greedy(params, PROMPTS[1], MAX_NEW, adapters=adapters)
    for form in ("factored", "dense"):
        greedy = sampler.generate(params, CONFIG, PROMPTS, temperature=0.0, form=form, **kw)
        np.testing.assert_array_equal(greedy.tokens[1], ref_tokens, err_msg=form)
        np.testing.assert_allclose(greedy.logprobs[1], ref_logp, atol=2e-4, rtol=1e-4, err_msg=form)


def test_dense_delta_is_the_adapters_change_of_the_weight():
    """dense_delta(u, delta, vh) is (U diag(delta) Vh)^T: x @ it equals the adapter's ((x Vh^T) delta) U^T,
    in fp32 to float rounding, and in bf16 within bf16 rounding of the change."""
    ku, kv, kd, kx = jax.random.split(jax.random.PRNGKey(3), 4)
    u, vh = jax.random.normal(ku, (48, 32)), jax.random.normal(kv, (32, 40))  # [out,r], [r,in]
    delta, x = 0.01 * jax.random.normal(kd, (32,)), jax.random.normal(kx, (5, 40))
    want = ((x @ vh.T) * delta) @ u.T  # [5, 48]
    np.testing.assert_allclose(x @ decode_layout.dense_delta(u, delta, vh, jnp.float32), want, rtol=1e-5, atol=1e-6)
    got = x.astype(jnp.bfloat16) @ decode_layout.dense_delta(u, delta, vh, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.02 * float(jnp.max(jnp.abs(want))))


def test_factored_scales_are_the_singular_values_and_flag_foreign_bases(params):
    """factored_scales recovers S from the SVD factors (residual ~0) and reports a residual near 1 for
    bases that are not the weights' (the random bases of svd_adapters): the check the trainer runs."""
    real = true_svd_adapters(params, jax.random.PRNGKey(5))
    scales, residual = decode_layout.factored_scales(params, real, residual=True)
    for name, a in real.items():
        s_true = jnp.linalg.svd(jnp.swapaxes(params["layers"][name], 1, 2), compute_uv=False)
        np.testing.assert_allclose(scales[name], s_true, rtol=1e-4, atol=1e-6)
        assert float(jnp.max(residual[name])) < 1e-4
    _, foreign = decode_layout.factored_scales(params, svd_adapters(CONFIG, jax.random.PRNGKey(2)), residual=True)
    assert min(float(jnp.min(r)) for r in foreign.values()) > 0.5


def test_bad_sampler_form_is_refused(params):
    with pytest.raises(ValueError, match="form must be one of"):
        sampler.generate(params, CONFIG, PROMPTS, max_new_tokens=2, key=jax.random.PRNGKey(0), form="fused")


@pytest.mark.parametrize("form", ["factored", "dense"])
def test_factored_and_dense_forms_leave_lora_exact(params, form):
    """Only SVD adapters have factors: with LoRA the factored and dense forms are the exact computation."""
    adapters = lora_adapters(CONFIG, jax.random.PRNGKey(11))
    kw = dict(max_new_tokens=8, temperature=1.0, key=jax.random.PRNGKey(4), eos_token_ids=[], adapters=adapters)
    exact = sampler.generate(params, CONFIG, PROMPTS, form="exact", **kw)
    other = sampler.generate(params, CONFIG, PROMPTS, form=form, **kw)
    np.testing.assert_array_equal(other.tokens, exact.tokens)
    np.testing.assert_array_equal(other.logprobs, exact.logprobs)


def test_refill_on_devices_raises_a_parts_error_and_stops_the_others(params, monkeypatch):
    """generate_slots_on_devices (here twice the one CPU device): an error in one device's part reaches
    the caller, the other parts' loops stop at their next round (the stop flag: SamplingStopped), and
    without an error the parts give generate_slots' rows."""
    import threading

    from jaxhack.rl import refill

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 200, n).tolist() for n in rng.integers(1, 30, 6)]
    tokens, mask = sampler.left_pad(prompts, 64, 6, 0)
    eos = np.full((sampler.MAX_EOS_IDS,), -1, np.int32)
    with lend.decode_weights(params, None, form="exact", lend=False) as (laid_out, _):
        pass  # the decode layout generate_slots reads (sampler.generate builds it once per call)
    args = (laid_out, None, tokens, mask, np.full((6,), 5, np.int32), eos, 0, jax.random.PRNGKey(2), sampler.TEMPERATURE,
            1.0, 1.0)
    kw = dict(config=CONFIG, max_new=5, cache_dtype=jnp.float32, prefill_chunk=32, slots=2, refill_rows=1)
    with pytest.raises(ValueError, match="must be laid out"):  # the stacked weights: a clear error
        refill.generate_slots(params, *args[1:], **kw)
    device = jax.devices()[0]
    whole = refill.generate_slots(*args, **kw)
    split = refill.generate_slots_on_devices([device, device], *args, **kw)
    for a, b in zip(whole[:4], split[:4]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    stop = threading.Event()
    stop.set()
    with pytest.raises(refill.SamplingStopped):
        refill.generate_slots(*args, stop=stop, **kw)
    inner = refill.generate_slots

    def failing(*a, row_offset=0, **k):
        if row_offset == 0:
            raise ValueError("boom on the first part")
        return inner(*a, row_offset=row_offset, **k)

    monkeypatch.setattr(refill, "generate_slots", failing)
    with pytest.raises(ValueError, match="boom on the first part"):
        refill.generate_slots_on_devices([device, device], *args, **kw)
