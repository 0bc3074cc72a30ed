"""The Phase 3 step's device memory, modelled (owner of the model; `phase3_floor` and
`scripts/bench_phase3.py` report with it), and the sampler's slots fitted to the card.

- `linear_params`, `sampler_params`: multiply-adds per token of the target Linears (and so the bytes a
  decode step reads) in each sampler form.
- `memory_estimate`: GB held at the peak of the sampler and of the update (analytic).
- `fit_sample_rows`: the most refill slots (<= `sample_rows`) whose sampler estimate fits the device's
  allocator limit, for the run's real prompt bucket. The preset's 152 slots are sized for LeetCode
  prompts of a few hundred tokens; prompts several times longer (a byte tokenizer, long statements)
  grow the prompt pool and the prefill, and 152 slots no longer fit in 80 GB. The slot count changes
  no token (rows draw with their own keys, `rl.sampler.generate`), only how many rows decode at once.

jax (and the sampler's modules) are imported only inside the functions that need them: importing this
module leaves XLA's flags and memory fraction to be set by a script.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# share of the device's limit left out of the fit: what `memory_estimate` does not model (the sampler's
# temporaries, measured 1.1-4.5 GB above it on an H200, docs/benchmarks.md sessions 8, 16 and 21) and XLA's
# autotuning scratch while the sampler compiles next to the allocated cache
FIT_HEADROOM = 0.10
SLOT_STEP = 8  # slot counts tried: sample_rows, then multiples of 8 below it, then 7 .. 1


def linear_params(config) -> dict:
    """Multiply-adds per token of the 252 target Linears (p_lin), and of the SVD adapter's Vh (p_vh)
    and U (p_u) factors, full rank r = min(in, out)."""
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dims = [(D, config.q_dim), (D, config.kv_dim), (D, config.kv_dim), (config.q_dim, D), (D, F), (D, F), (F, D)]
    return {"p_lin": L * sum(i * o for i, o in dims), "p_vh": L * sum(i * min(i, o) for i, o in dims),
            "p_u": L * sum(min(i, o) * o for i, o in dims)}


def sampler_params(p: dict, sampler_form: str) -> int:
    """Multiply-adds per token (= weights read per decode step) of the target Linears in the sampler's
    form: exact x W + ((x Vh^T) delta) U^T: p_lin + p_vh + p_u; factored ((x Vh^T)(S + delta)) U^T:
    p_vh + p_u; dense x W + x dW: 2 p_lin. p: `linear_params`."""
    forms = {"exact": p["p_lin"] + p["p_vh"] + p["p_u"], "factored": p["p_vh"] + p["p_u"], "dense": 2 * p["p_lin"]}
    if sampler_form not in forms:
        raise ValueError(f"sampler_form {sampler_form!r}: expected one of {tuple(forms)}")
    return forms[sampler_form]


def memory_estimate(config, n_rows_group: int, cache_slots: int, microbatch: int, max_len: int,
                    prefill_chunk: int, prompt_bucket: int, bytes_per_el: int = 2, tokens: int | None = None,
                    sampler_form: str = "exact", prefill_rows: int | None = None, lend: bool = False,
                    pool_positions: int = 0) -> dict:
    """GB held at the peak of each phase (analytic). sample: params + adapter bases + their per-layer
    decode copies (`decode_layout.decode_layers`: the Linear weights and the bases; the factored form
    copies the bases only; the dense form the weights and their dense changes dW) + the group's KV cache
    (n_rows_group x cache_slots positions, plus the refill sampler's prompt pool, `pool_positions` =
    entries x positions) + the prefill scores of `prefill_rows` rows (default: the group; the refill
    schedule prefills the U prompts new to its pool per refill at a time; lend: the stacked arrays the
    copies duplicate are freed while sampling, `rl.lend`, so one copy is held, plus the dense form's dW);
    update: params + bases + one micro-batch's saved layer inputs (remat full) + one layer's recompute +
    the vocab-chunked LM head. With lend, sample is at least params + bases + the whole layout: the moment
    the stacked arrays are rebuilt after sampling. (Other remat policies keep more: `linear` about 4 MB per token at Qwen3-4B shape; not modelled.) Temporaries are
    not modelled either: the measured sampler peaks were 4.5 GB (exact, 96 slots) and 1.1 GB (factored,
    128 slots) above this estimate (H200, session 8)."""
    p = linear_params(config)
    L, D, V, F = config.num_hidden_layers, config.hidden_size, config.vocab_size, config.intermediate_size
    weights = (p["p_lin"] + V * D) * bytes_per_el
    bases = (p["p_vh"] + p["p_u"]) * bytes_per_el
    kv = 2 * L * (n_rows_group * cache_slots + pool_positions) * config.num_key_value_heads * config.head_dim * bytes_per_el
    scores = (n_rows_group if prefill_rows is None else prefill_rows) * config.num_attention_heads * prefill_chunk * prompt_bucket * 4 * 2
    # the decode layout's copies: the exact form W and the bases, factored the bases, dense W and dW
    # (lend: the stacked arrays the layout holds exactly are freed, so only dW is extra)
    layout = sampler_params(p, sampler_form) * bytes_per_el
    copies = (p["p_lin"] * bytes_per_el if sampler_form == "dense" else 0) if lend else layout
    sample = weights + bases + copies + kv + scores
    # lend: after sampling the stacked arrays are rebuilt from the layout, which is freed only when the
    # rebuild ends, so both copies are held for a moment (the KV cache is gone by then); this is the
    # sampler's peak when the cache is smaller than the layout (48 rows x 1024 positions, exact form:
    # 36.1 GB measured, 26.7 GB without this term; H200, session 17)
    sample = max(sample, weights + bases + layout) if lend else sample
    tokens = microbatch * max_len if tokens is None else tokens  # one micro-batch (or its token budget)
    update = (weights + bases + L * tokens * D * bytes_per_el  # saved layer inputs
              + tokens * (2 * F + 4 * D) * bytes_per_el * 3  # one layer's recompute and its gradient
              + microbatch * 256 * V * 4 * 2)  # one LM-head chunk of fp32 logits and its cotangent
    return {"sample_gb": sample / 1e9, "kv_gb": kv / 1e9, "update_gb": update / 1e9,
            "peak_gb": max(sample, update) / 1e9}


def device_limit_bytes() -> int | None:
    """The allocator's limit on the first local device (XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU's
    memory), or None where the backend reports none (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


@dataclasses.dataclass(frozen=True)
class SlotFit:
    """`fit_sample_rows`' answer. requested: the config's sample_rows (None: all rows at once); slots:
    what the sampler is given (== requested unless it did not fit); estimate_gb: the sampler's estimated
    peak at `slots`; budget_gb: the device limit less FIT_HEADROOM (None: no limit known, no fit made)."""
    requested: int | None
    slots: int | None
    estimate_gb: float
    budget_gb: float | None

    @property
    def reduced(self) -> bool:
        return self.slots != self.requested

    def to_dict(self) -> dict:
        return {"sample_rows_requested": self.requested, "sample_rows": self.slots,
                "estimate_gb": round(self.estimate_gb, 2),
                "budget_gb": None if self.budget_gb is None else round(self.budget_gb, 2)}


def sampler_estimate_gb(config, n_rows: int, group_size: int, max_new: int, prompt_bucket: int,
                        slots: int | None, prefill_chunk: int | None, sampler_form: str, lend: bool,
                        devices: int = 1, refill_rows: int = 8, bytes_per_el: int = 2, refill: bool = True) -> float:
    """The sampler's estimated peak (GB, one device) for one step's n_rows rollouts (groups of
    group_size rows sharing a prompt) as `rl.sampler.generate` would run them with max_rows = slots:
    the refill schedule (slots per device, max_new cache positions each, plus the prompt pool of
    `PromptRuns`) when the rows do not all fit, else row groups of up to `slots` rows per device
    (prompt + max_new positions a row). refill False: row groups always (several processes, where
    `generate` does not refill)."""
    from jaxhack.rl.refill import SPLIT as split  # the refill cache's position multiple
    from jaxhack.rl.refill import PromptRuns
    from jaxhack.rl.sampler import refill_slots

    per_device = -(-n_rows // devices)
    chunk = prompt_bucket if prefill_chunk is None else min(prefill_chunk, prompt_bucket)
    if refill and slots is not None and n_rows > slots * devices:  # refill
        b = refill_slots(n_rows, slots, devices)
        ids = np.repeat(np.arange(-(-per_device // group_size)), group_size)[:per_device]
        book = PromptRuns(ids, b, refill_rows)
        pp = -(-prompt_bucket // split) * split
        mem = memory_estimate(config, b, -(-max_new // split) * split, 1, 1, chunk, prompt_bucket, bytes_per_el,
                              tokens=1, sampler_form=sampler_form, prefill_rows=book.U, lend=lend,
                              pool_positions=book.pool_size * pp)
    else:  # row groups of up to `slots` rows per device (one group of all rows when they fit)
        rows = per_device if slots is None else min(slots, per_device)
        mem = memory_estimate(config, rows, prompt_bucket + max_new, 1, 1, chunk, prompt_bucket, bytes_per_el,
                              tokens=1, sampler_form=sampler_form, lend=lend)
    return mem["sample_gb"]


def fit_sample_rows(config, n_rows: int, group_size: int, max_new: int, prompt_bucket: int,
                    sample_rows: int | None, prefill_chunk: int | None, sampler_form: str, lend: bool,
                    devices: int = 1, limit_bytes: int | None = None, bytes_per_el: int = 2,
                    refill: bool = True) -> SlotFit:
    """The sampler's slots for this run on this device: sample_rows when its estimate fits the device's
    limit less FIT_HEADROOM, else the largest of `slot_candidates` that fits. limit_bytes: the
    allocator's limit (None: `device_limit_bytes()`; no limit known: sample_rows unchanged). refill:
    as `sampler_estimate_gb`'s. Raises ValueError when not even one slot fits (the message names what to shorten)."""
    limit_bytes = device_limit_bytes() if limit_bytes is None else limit_bytes

    def estimate(slots):
        return sampler_estimate_gb(config, n_rows, group_size, max_new, prompt_bucket, slots, prefill_chunk,
                                   sampler_form, lend, devices, bytes_per_el=bytes_per_el, refill=refill)

    first = estimate(sample_rows)
    if limit_bytes is None:
        return SlotFit(sample_rows, sample_rows, first, None)
    budget = limit_bytes * (1 - FIT_HEADROOM) / 1e9
    if first <= budget:
        return SlotFit(sample_rows, sample_rows, first, budget)
    top = -(-n_rows // devices) if sample_rows is None else sample_rows
    for slots in slot_candidates(top):
        gb = estimate(slots)
        if gb <= budget:
            return SlotFit(sample_rows, slots, gb, budget)
    raise ValueError(f"the sampler needs ~{estimate(1):.1f} GB even with 1 row at a time (prompts of up to "
                     f"{prompt_bucket} tokens, max_new {max_new}), more than this device's {budget:.1f} GB "
                     f"({limit_bytes / 1e9:.1f} GB less {FIT_HEADROOM:.0%} headroom): use shorter prompts or a "
                     f"smaller --max-new")


def slot_candidates(top: int) -> list[int]:
    """Slot counts below `top` to try, largest first: multiples of SLOT_STEP, then 7 .. 1."""
    return [b for b in range(top - 1, 0, -1) if b % SLOT_STEP == 0 or b < SLOT_STEP]
