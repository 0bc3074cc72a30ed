"""The sampler's slots fitted to the device (jaxhack/rl/memory.py) at Qwen3-4B shape, by hand. In a
training run: tests/test_trainer.py::test_slots_fitted_to_the_device_change_no_rollout."""
from __future__ import annotations

import pytest

from jaxhack.models.config import QWEN3_4B
from jaxhack.rl.memory import FIT_HEADROOM, fit_sample_rows, sampler_estimate_gb, slot_candidates

H100_LIMIT = int(0.54 * 139 * 2**30)  # the benchmarks' cap: XLA_PYTHON_CLIENT_MEM_FRACTION=0.54 of an H200


def full_fit(prompt_bucket: int, limit: int | None = H100_LIMIT, sample_rows: int | None = 152, max_new: int = 1536):
    """The `full` preset's sampler (258 rows in groups of 6, dense form, lent weights) at this bucket."""
    return fit_sample_rows(QWEN3_4B, 258, 6, max_new, prompt_bucket, sample_rows, 256, "dense", True,
                           limit_bytes=limit)


def test_the_preset_keeps_its_slots_at_leetcode_prompt_lengths():
    fit = full_fit(512)  # Qwen's tokenizer: LeetCode prompts of a few hundred tokens
    assert fit.slots == 152 and not fit.reduced
    assert fit.estimate_gb == pytest.approx(63.21, abs=0.01)  # a pool of 48 prompts (64.41 with 64: 65.7 GB measured)
    assert fit.budget_gb == pytest.approx(H100_LIMIT * (1 - FIT_HEADROOM) / 1e9)


def test_long_prompts_get_the_most_slots_that_fit():
    """The byte tokenizer's ~2,700-token prompts: 152 slots are estimated at ~80 GB (85.8 GB with a pool of
    64 prompts: the run that ran out of memory on the capped H200), over the budget, so fewer are
    fitted: the largest multiple of 8 under it."""
    assert full_fit(2752, limit=None).estimate_gb > full_fit(2752).budget_gb
    fit = full_fit(2752)
    assert fit.reduced and fit.slots % 8 == 0 and 8 <= fit.slots < 152
    assert fit.estimate_gb <= fit.budget_gb
    next_size = sampler_estimate_gb(QWEN3_4B, 258, 6, 1536, 2752, fit.slots + 8, 256, "dense", True)
    assert next_size > fit.budget_gb  # the next size does not fit
    assert fit.to_dict() == {"sample_rows_requested": 152, "sample_rows": fit.slots,
                             "estimate_gb": round(fit.estimate_gb, 2), "budget_gb": round(fit.budget_gb, 2)}


def test_the_estimate_grows_with_slots_prompts_and_max_new():
    def gb(slots=152, prompt_bucket=512, max_new=1536):
        return sampler_estimate_gb(QWEN3_4B, 258, 6, max_new, prompt_bucket, slots, 256, "dense", True)

    assert gb(64) < gb(96) < gb(152)
    assert gb(prompt_bucket=512) < gb(prompt_bucket=1024) < gb(prompt_bucket=2752)
    assert gb(max_new=512) < gb(max_new=1536)
    # all 258 rows in one group (no refill): every row holds its prompt and max_new positions
    assert gb(slots=None) > gb(slots=152)
    # several processes sample in row groups of `slots` rows (no prompt pool: each row holds its prompt)
    groups = sampler_estimate_gb(QWEN3_4B, 258, 6, 1536, 2752, 152, 256, "dense", True, refill=False)
    assert groups > gb(slots=152, prompt_bucket=2752)
    assert groups == sampler_estimate_gb(QWEN3_4B, 152, 6, 1536, 2752, None, 256, "dense", True)


def test_no_limit_known_leaves_the_config_alone():
    fit = full_fit(2752, limit=None)
    assert fit.slots == 152 and fit.budget_gb is None and not fit.reduced


def test_a_device_too_small_for_one_row_is_a_clear_error():
    with pytest.raises(ValueError, match=r"even with 1 row at a time \(prompts of up to 2752 tokens, max_new "
                                         r"1536\).*shorter prompts or a smaller --max-new"):
        full_fit(2752, limit=20 * 10**9)


def test_slot_candidates():
    assert slot_candidates(152)[:3] == [144, 136, 128] and slot_candidates(152)[-9:] == [16, 8, 7, 6, 5, 4, 3, 2, 1]
    assert slot_candidates(20) == [16, 8, 7, 6, 5, 4, 3, 2, 1]
    assert slot_candidates(1) == []
