"""The Phase 3 step's floors and memory model at a model's shape (`scripts/bench_phase3.py` reports its
measured step against them; derivation: docs/benchmarks.md, "Phase 3 step").

- `step_floor`: FLOPs of prefill, reference pass and update at the card's dense bf16 peak, decode at the
  HBM bandwidth floor (each step reads all weights and adapter bases once plus the live rows' KV
  cache; for the refill sampler's prompt pool each live prompt once for its rows), compute-bound
  decode steps at the FLOP peak instead; optionally at a number of slots and at a schedule's steps.
- `sampler_schedule_floor`: the refill sampler's floor at the decode steps its schedule runs, per
  device part.
- `slot_plan`: the KV cache and decode steps per slot count (the memory model itself: `rl.memory`).
- `completion_lengths`: the benchmark's two regimes (realistic: gamma, mean ~500 at max_new 1536;
  worst: every row to max_new).

jax is imported only inside the two functions that need the refill schedule's planner: the
benchmark sets XLA's flags (e.g. --cpu-devices) before it imports jax.
"""
from __future__ import annotations

import numpy as np

from jaxhack.rl.memory import linear_params, sampler_params


def step_floor(config, prompt_lens, comp_lens, peak_flops: float, hbm_bps: float, bytes_per_el: int = 2,
               slots: int | None = None, sampler_form: str = "exact", shared_prompt_groups: int | None = None,
               schedule_steps: int | None = None, prefilled=None, prompt_runs=None) -> dict:
    """Seconds of one step at the card's peaks (see the module docstring).

    prefill: 2 (p_lin + p_vh + p_u) per prompt token + causal attention 2 P^2 Hq hd per layer, for the
             rows `prefilled` (indices; the refill sampler prefills each prompt once, the first row of
             each run of rows sharing it, `refill.PromptRuns`), default every row's prompt.
    decode:  per step t, max(bytes / HBM, FLOPs / peak): bytes = weights + adapter bases + KV of the live
             rows (their prompt + t slots, K and V, all layers); FLOPs = 2 (p_lin + p_vh + p_u + D V)
             per live row.
    reference: base model forward, 2 p_lin per token + attention + LM head 2 D V per completion token.
    update: forward + backward of the adapted model (no remat): 4 (p_lin + p_vh + p_u) per token,
             attention 3 x forward, LM head 4 D V per completion token (forward + input gradient).
    Tokens are the real ones (prompt + completion) of each row.
    slots: also the decode floor when at most `slots` rows decode at once (the sampler's memory limit),
    perfectly packed (refill without idle slots): ceil(sum(lengths) / slots) steps reading weights +
    bases, plus every row's own KV reads (independent of the packing): `decode_slots_s`, and
    `floor_slots_s` = floor_s with that decode term.
    schedule_steps (with slots): the decode steps the sampler's schedule runs (`schedule_decode_steps`: the
    refill schedule cannot pack perfectly, its last long rows decode alone): `decode_schedule_s`, the
    same bytes floor at that many steps, which separates the schedule's cost from the kernels'.
    sampler_form "factored" (`sampler.generate(form="factored")`): prefill and decode compute each Linear
    from its SVD factors, p_vh + p_u instead of p_lin + p_vh + p_u, and decode reads the bases but not
    the Linear weights (the embedding / LM head and norms still); "dense" (`form="dense"`): each Linear
    as x W + x dW, 2 p_lin, and decode reads W and dW, not the bases.
    prompt_runs: [N] the run each row belongs to (rows of a run share their prompt and the refill
    sampler's prompt pool holds it once, `refill.PromptRuns`): decode then reads a run's prompt once per
    step while any of its rows is live (with slots: at least for its longest row's steps), not once per
    live row. Default: every row reads its own prompt (the issue's floor).
    shared_prompt_groups G (the learner's `update_layout` "shared_prompt"; rows g*G .. g*G+G-1 share
    their prompt): the reference pass's and the update's Linears run each group's prompt once; their
    attention and LM head stay per row (that is what the layout computes).
    """
    p = linear_params(config)
    p_all = p["p_lin"] + p["p_vh"] + p["p_u"]
    L, D, V, Hq, hd = (config.num_hidden_layers, config.hidden_size, config.vocab_size,
                       config.num_attention_heads, config.head_dim)
    prompt_lens = np.asarray(prompt_lens, np.float64)
    comp_lens = np.asarray(comp_lens, np.float64)
    total = prompt_lens + comp_lens
    attn_fwd = lambda T: float(np.sum(2.0 * T * T * Hq * hd * L))  # causal: half of 4 T^2 Hq hd
    p_sample = sampler_params(p, sampler_form)  # per token, prefill and decode
    prefill_lens = prompt_lens if prefilled is None else prompt_lens[np.asarray(prefilled, int)]
    prefill = 2 * p_sample * prefill_lens.sum() + attn_fwd(prefill_lens)
    learner_tokens = total.sum() if shared_prompt_groups is None else (
        prompt_lens.reshape(-1, shared_prompt_groups)[:, 0].sum() + comp_lens.sum())  # tokens the Linears see
    reference = 2 * p["p_lin"] * learner_tokens + attn_fwd(total) + 2 * D * V * comp_lens.sum()
    update = 4 * p_all * learner_tokens + 3 * attn_fwd(total) + 4 * D * V * comp_lens.sum()
    # decode: weights (tied embedding once) + adapter bases, every step; KV of each live row
    n_weights = p["p_lin"] + V * D + L * (4 * D + 2 * hd) + D
    fixed_bytes = (n_weights - p["p_lin"] + sampler_params(p, sampler_form)) * bytes_per_el
    kv_per_slot = 2 * L * config.num_key_value_heads * hd * bytes_per_el
    decode_s = 0.0
    runs = None if prompt_runs is None else np.unique(np.asarray(prompt_runs), return_index=True, return_inverse=True)
    for t in range(int(comp_lens.max())):
        live = comp_lens > t
        n_live = int(live.sum())
        if runs is None:
            kv_bytes = float(np.sum(prompt_lens[live] + t + 1)) * kv_per_slot
        else:  # each run's prompt once while one of its rows is live
            run_live = np.zeros(len(runs[0]), bool)
            run_live[runs[2].reshape(-1)[live]] = True
            kv_bytes = float(np.sum(prompt_lens[runs[1]][run_live]) + n_live * (t + 1)) * kv_per_slot
        flops = 2 * (p_sample + D * V) * n_live
        decode_s += max((fixed_bytes + kv_bytes) / hbm_bps, flops / peak_flops)
    out = {"prefill_s": prefill / peak_flops, "decode_s": decode_s, "ref_s": reference / peak_flops,
           "update_s": update / peak_flops}
    out["floor_s"] = sum(out.values())
    if slots is not None:
        steps = -(-int(comp_lens.sum()) // slots)
        if runs is None:
            prompt_reads = float(np.sum(comp_lens * prompt_lens))
        else:  # a run's prompt is read at least while its longest row decodes
            longest = np.zeros(len(runs[0]))
            np.maximum.at(longest, runs[2].reshape(-1), comp_lens)
            prompt_reads = float(np.sum(longest * prompt_lens[runs[1]]))
        kv_reads = (prompt_reads + float(np.sum(comp_lens * (comp_lens + 1) / 2))) * kv_per_slot
        flops = 2 * (p_sample + D * V) * comp_lens.sum()
        out["decode_slots_s"] = max((steps * fixed_bytes + kv_reads) / hbm_bps, flops / peak_flops)
        out["decode_slots_steps"] = steps
        out["floor_slots_s"] = out["floor_s"] - out["decode_s"] + out["decode_slots_s"]
        if schedule_steps is not None:
            out["decode_schedule_s"] = max((schedule_steps * fixed_bytes + kv_reads) / hbm_bps, flops / peak_flops)
    out.update(prefill_tflop=prefill / 1e12, ref_tflop=reference / 1e12, update_tflop=update / 1e12,
               decode_fixed_gb_per_step=fixed_bytes / 1e9)
    return out


def sampler_schedule_floor(config, prompt_lens, comp_lens, slots: int, refill_rows: int, devices: int,
                           peak_flops: float, hbm_bps: float, sampler_form: str = "exact", ids=None) -> dict:
    """The refill sampler's floor at the decode steps its schedule runs: for each device's part of the rows
    (`refill.device_parts`), prefill (of each run's prompt once, `refill.PromptRuns`: ids [N], the rows'
    prompt identities, default all distinct) + `step_floor(schedule_steps=, prompt_runs=)`'s decode
    term (each run's prompt read once per step); the largest part's
    (devices sample at once). {"sample_floor_schedule_s", "schedule_steps": the largest part's decode
    steps, as `schedule_decode_steps(devices=)` counts them}."""
    from jaxhack.rl.refill import PromptRuns, device_parts, schedule_decode_steps

    prompt_lens, comp_lens = np.asarray(prompt_lens), np.asarray(comp_lens)
    ids = np.arange(len(comp_lens)) if ids is None else np.asarray(ids)
    floors, steps = [0.0], [0]
    bounds = device_parts(len(comp_lens), devices)
    for a, b in zip(bounds, bounds[1:]):
        if b == a:
            continue
        steps.append(schedule_decode_steps(comp_lens[a:b], slots, refill_rows))
        book = PromptRuns(ids[a:b], slots, refill_rows)
        part = step_floor(config, prompt_lens[a:b], comp_lens[a:b], peak_flops, hbm_bps, slots=slots,
                          sampler_form=sampler_form, schedule_steps=steps[-1], prefilled=book.first,
                          prompt_runs=book.run_of_row)
        floors.append(part["prefill_s"] + part["decode_schedule_s"])
    return {"sample_floor_schedule_s": max(floors), "schedule_steps": max(steps)}


def slot_plan(config, comp_lens, cache_slots: int, refill_rows: int, bytes_per_el: int = 2,
              slots=(64, 96, 128, 160, 192, 256), ids=None, prompt_positions: int = 0) -> dict:
    """For each refill slot count: the decode steps the schedule runs for these completion lengths
    (`rl.refill.schedule_decode_steps`, exact) and the KV cache it holds (GB: cache_slots positions per
    slot, plus the prompt pool's entries for the rows' prompt ids, `refill.PromptRuns`, of
    prompt_positions each), to weigh slots against memory."""
    from jaxhack.rl.refill import PromptRuns, schedule_decode_steps

    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_per_el
    ids = np.arange(len(comp_lens)) if ids is None else ids
    return {str(b): {"decode_steps": schedule_decode_steps(comp_lens, b, refill_rows),
                     "kv_gb": (b * cache_slots + PromptRuns(ids, b, refill_rows).pool_size * prompt_positions)
                     * per_position / 1e9}
            for b in slots}


def completion_lengths(regime: str, n: int, max_new: int, seed: int = 0) -> np.ndarray:
    if regime == "worst":
        return np.full((n,), max_new, np.int32)
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.gamma(4.0, 125.0 * max_new / 1536, n)), min(16, max_new), max_new).astype(np.int32)
