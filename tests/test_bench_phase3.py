"""scripts/bench_phase3.py runs end to end at tiny size on CPU and writes its JSON line; its floors and
memory model (jaxhack/phase3_floor.py, jaxhack/rl/memory.py) by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import load_script
from jaxhack import phase3_floor as floors
from jaxhack.profiling import DECODE_ROLES, decode_roles
from jaxhack.rl import memory


def load():
    return load_script("bench_phase3")


def test_tiny_worst_case_step_both_samplers(tmp_path):
    bench = load()
    out = tmp_path / "p3.jsonl"
    assert bench.main(["--tiny", "--regime", "worst", "--grade", "none", "--steps", "1", "--sampler", "both",
                       "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("sampler") for r in recs] == ["groups", "refill"]
    for rec in recs:
        assert "error" not in rec, rec.get("error")
        for key in ("preset", "regime", "device", "step_s", "floor_s", "peak_bytes", "sample_s", "grade_s", "ref_s",
                    "update_s", "decode_steps"):
            assert key in rec
        assert rec["regime"] == "worst" and rec["mean_completion"] == rec["max_new"] == 24
        assert rec["floor_s"] > 0 and rec["floor_slots_s"] >= rec["floor_s"]
        assert abs(rec["step_s"] - sum(rec[k] for k in ("sample_s", "grade_s", "ref_s", "update_s"))) < 1e-6
    groups, refill = recs
    # 6 rows of 24 tokens: 2 groups of 4 rows (48 steps); 4 slots refilled when free (48 steps too)
    assert groups["sampler_groups"] == 2 and groups["decode_steps"] == 48
    assert refill["sampler_batch"] == 4 and refill["decode_steps"] == 48
    assert refill["planned_decode_steps"] == 48 and groups["planned_decode_steps"] is None
    assert refill["refill_plan"]["96"]["decode_steps"] == 24  # every row at once: its 24 tokens
    # each slot holds its generated tokens only; the prompt pool (one entry per prompt) does not grow with the slots
    kv = {b: refill["refill_plan"][str(b)]["kv_gb"] for b in (64, 96, 192)}
    np.testing.assert_allclose(kv[192] - kv[96], 3 * (kv[96] - kv[64]), rtol=1e-9)
    assert kv[96] < 96 / 64 * kv[64] and kv[192] < 2 * kv[96]  # + the pool, the same for every slot count
    assert refill["slot_positions"] == 128 and refill["prompt_pool"] * refill["prompt_positions"] > 0


def test_tiny_realistic_sample_only_refill_runs_fewer_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXHACK_DECODE_KERNEL", "split")  # recorded with each line, for before/after runs
    bench = load()
    out = tmp_path / "p3.jsonl"
    assert bench.main(["--tiny", "--regime", "realistic", "--sample-only", "--sampler", "both", "--max-new", "96",
                       "--prompts-per-step", "6", "--refill-rows", "2", "--steps", "1", "--out", str(out)]) == 0
    groups, refill = [json.loads(line) for line in out.read_text().splitlines()]
    assert groups["sample_only"] and "update_s" not in groups and groups["max_completion"] > groups["mean_completion"]
    assert refill["decode_steps"] < groups["decode_steps"]
    assert refill["sample_floor_slots_s"] >= refill["sample_floor_s"] > 0
    assert groups["decode_kernel"] == refill["decode_kernel"] == "split"


def test_profiled_sampler_call_is_written_per_decode_step(tmp_path):
    """--profile-sample: one more sampler call under the profiler, its table written with that call's decode
    steps (on the CPU the trace has no GPU plane, so no kernel rows: the GPU's table is docs/benchmarks.md's)."""
    out, prof = tmp_path / "p3.jsonl", tmp_path / "prof.json"
    assert load().main(["--tiny", "--regime", "worst", "--sample-only", "--steps", "1", "--out", str(out),
                        "--profile-sample", str(prof)]) == 0
    rec, table = json.loads(out.read_text()), json.loads(prof.read_text())
    assert table["decode_steps"] == rec["decode_steps"] > 0 and table["regime"] == "worst"
    assert table["sample_rows"] == rec["sample_rows"] and table["planes"] == [] and table["kernels"] == []
    assert list(table["roles"]) == list(DECODE_ROLES)  # all zero without kernels


def test_decode_roles_sort_a_sampler_calls_kernels_by_what_they_do():
    """`profiling.decode_roles` on a made-up trace of 10 decode steps of a 4-layer model: each kernel
    lands in the role its name and launch count say (the refill sampler's attention kernels too, and a
    per-layer kernel run in every other layer), and the layer matmuls' rate is their bytes over their
    time."""
    rows = [("mha_forward", "other fusion", 40, 2.0), ("nvjet_gate_up", "gemm", 40, 4.0),
            ("cublasLt::splitKreduce_kernel", "gemm", 40, 0.5), ("fusion_rms_norm", "other fusion", 80, 0.8),
            ("fusion_1577", "other fusion", 20, 0.4),  # a layer loop unrolled by 2: half the layers each
            ("nvjet_head", "gemm", 10, 1.0), ("input_reduce_fusion", "reduction fusion", 10, 0.3),
            ("nvjet_prefill", "gemm", 2, 0.6), ("fused_decode_attention_kernel", "other fusion", 40, 1.0),
            ("fused_decode_parts", "other fusion", 40, 0.7), ("parts_attention__1", "other fusion", 40, 0.2),
            ("combine_prefix_parts", "other fusion", 40, 0.1)]
    summary = {"kernels": [{"kernel": k, "category": c, "calls_per_step": n, "ms_per_step": ms} for k, c, n, ms in rows]}
    roles = decode_roles(summary, decode_steps=10, layers=4, layer_matmul_bytes=9e6)
    got = {role: (round(r["us_per_decode_step"], 6), r["kernels"]) for role, r in roles.items()}
    assert got == {"layer matmuls": (450.0, 2), "decode attention": (400.0, 5), "small per-layer kernels": (120.0, 2),
                   "LM head": (100.0, 1), "per-step kernels": (30.0, 1), "prefill and the rest": (60.0, 1)}
    assert roles["layer matmuls"]["tbps"] == pytest.approx(9e6 / 450e-6 / 1e12)
    assert roles["small per-layer kernels"]["launches_per_decode_step"] == 10.0
    assert "tbps" not in decode_roles(summary, 10, 4)["layer matmuls"]


def test_realistic_lengths_and_floor_terms():
    lengths = floors.completion_lengths("realistic", 4000, 1536)
    assert 470 < lengths.mean() < 530 and lengths.min() >= 16 and lengths.max() <= 1536
    from jaxhack.models.config import QWEN3_4B
    prompts = np.full(258, 400)
    worst = floors.step_floor(QWEN3_4B, prompts, np.full(258, 1536), 989e12, 3.35e12)
    short = floors.step_floor(QWEN3_4B, prompts, np.full(258, 500), 989e12, 3.35e12)
    assert short["floor_s"] < worst["floor_s"] and short["prefill_s"] == worst["prefill_s"]
    # decode reads all weights + full-rank adapter bases each step: 8.52 G params -> ~17 GB in bf16
    assert 16 < worst["decode_fixed_gb_per_step"] < 19
    # the shared-prompt learner: the Linears run each prompt once per group of 6 (attention stays per row)
    shared = floors.step_floor(QWEN3_4B, prompts, np.full(258, 500), 989e12, 3.35e12, shared_prompt_groups=6)
    assert shared["prefill_s"] == short["prefill_s"] and shared["decode_s"] == short["decode_s"]
    # the refill sampler's prompt pool: each of the 43 prompts prefilled once, and read once per decode
    # step for its 6 rows (43 x 400 prompt positions a step, not 258 x 400)
    from jaxhack.rl.refill import PromptRuns
    book = PromptRuns(np.repeat(np.arange(43), 6), 152, 8)
    once = floors.step_floor(QWEN3_4B, prompts, np.full(258, 500), 989e12, 3.35e12, prefilled=book.first,
                            slots=152)
    np.testing.assert_allclose(once["prefill_s"], short["prefill_s"] * 43 / 258, rtol=1e-12)
    pooled = floors.step_floor(QWEN3_4B, prompts, np.full(258, 500), 989e12, 3.35e12, prefilled=book.first,
                              prompt_runs=book.run_of_row, slots=152)
    kv_position = 2 * QWEN3_4B.num_hidden_layers * QWEN3_4B.num_key_value_heads * QWEN3_4B.head_dim * 2
    fixed = once["decode_fixed_gb_per_step"] * 1e9
    by_hand = sum(fixed + (43 * 400 + 258 * (t + 1)) * kv_position for t in range(500)) / 3.35e12
    np.testing.assert_allclose(pooled["decode_s"], by_hand, rtol=1e-9)
    assert pooled["decode_s"] < once["decode_s"] == short["decode_s"]
    # at 152 slots: each prompt read for its longest row's 500 steps, at least
    saved = (258 - 43) * 400 * 500 * kv_position / 3.35e12
    np.testing.assert_allclose(once["decode_slots_s"] - pooled["decode_slots_s"], saved, rtol=1e-9)
    p = memory.linear_params(QWEN3_4B)
    saved_tokens = 258 * 400 - 43 * 400  # 5 of each group's 6 prompts
    np.testing.assert_allclose((short["update_tflop"] - shared["update_tflop"]) * 1e12,
                               4 * (p["p_lin"] + p["p_vh"] + p["p_u"]) * saved_tokens, rtol=1e-9)
    np.testing.assert_allclose((short["ref_tflop"] - shared["ref_tflop"]) * 1e12, 2 * p["p_lin"] * saved_tokens,
                               rtol=1e-9)


def test_sampler_forms_bytes_per_decode_step_and_memory():
    """What each sampler form reads per decode step (the floor's fixed bytes) and holds while sampling,
    from the Linears' sizes by hand: exact W + U + Vh, factored U + Vh, dense W + dW (Qwen3-4B:
    7.27 GB of target Linears, 9.76 GB of full-rank bases)."""
    from jaxhack.models.config import QWEN3_4B
    p = memory.linear_params(QWEN3_4B)
    lin, bases = p["p_lin"] * 2, (p["p_vh"] + p["p_u"]) * 2
    assert 7.2e9 < lin < 7.3e9 and 9.7e9 < bases < 9.8e9
    prompts, lengths = np.full(12, 400), np.full(12, 100)
    fixed = {form: floors.step_floor(QWEN3_4B, prompts, lengths, 989e12, 3.35e12, sampler_form=form)
             ["decode_fixed_gb_per_step"] * 1e9 for form in ("exact", "factored", "dense")}
    np.testing.assert_allclose(fixed["exact"] - fixed["dense"], bases - lin, rtol=1e-12)
    np.testing.assert_allclose(fixed["exact"] - fixed["factored"], lin, rtol=1e-12)
    mem = {(form, lend): memory.memory_estimate(QWEN3_4B, 152, 1536, 8, 2048, 256, 512, sampler_form=form,
                                                lend=lend)["sample_gb"] * 1e9
           for form in ("exact", "factored", "dense") for lend in (False, True)}
    # lent: the exact and factored layouts replace what they copy; the dense one adds dW (the bases stay)
    assert mem[("exact", True)] == mem[("factored", True)]
    np.testing.assert_allclose(mem[("dense", True)] - mem[("exact", True)], lin, rtol=1e-9)
    np.testing.assert_allclose(mem[("exact", False)] - mem[("exact", True)], lin + bases, rtol=1e-9)
    np.testing.assert_allclose(mem[("dense", False)] - mem[("dense", True)], lin, rtol=1e-9)
    with pytest.raises(ValueError, match="sampler_form 'fused': expected one of"):
        floors.step_floor(QWEN3_4B, prompts, lengths, 989e12, 3.35e12, sampler_form="fused")


def test_lent_sampler_memory_counts_the_rebuild_of_the_stacked_arrays():
    """With lent weights the layout and the rebuilt stacked arrays are both held for a moment after
    sampling: a small KV cache (the `fast` preset's 48 rows x 1024 positions) puts the sampler's peak
    there for the exact form. Measured on an H200 (session 17): exact 36.1 GB, dense 32.8 GB."""
    from jaxhack.models.config import QWEN3_4B
    p = memory.linear_params(QWEN3_4B)
    params = (p["p_lin"] + QWEN3_4B.vocab_size * QWEN3_4B.hidden_size + p["p_vh"] + p["p_u"]) * 2
    small = {(form, lend): memory.memory_estimate(QWEN3_4B, 48, 1024, 8, 1024, 256, 512, sampler_form=form,
                                                  lend=lend)["sample_gb"] * 1e9
             for form in ("exact", "dense") for lend in (False, True)}
    rebuild = {form: params + memory.sampler_params(p, form) * 2 for form in ("exact", "dense")}
    # exact: the layout holds W and the bases (17.0 GB), more than the 7.2 GB cache: the rebuild is the peak
    assert small[("exact", True)] == pytest.approx(rebuild["exact"], rel=1e-12)
    assert 34.0e9 < small[("exact", True)] < 36.1e9
    # dense: the layout adds dW while sampling, so sampling (with its cache) stays the larger
    assert small[("dense", True)] > rebuild["dense"] and 32.8e9 < small[("dense", True)] < 35.0e9
    # without lending both copies and the cache are held while sampling: never below the lent estimate
    assert all(small[(form, False)] > small[(form, True)] for form in ("exact", "dense"))
    # the full preset's 152 slots: the cache is larger than the layout, the peak is while sampling
    full = memory.memory_estimate(QWEN3_4B, 152, 1536, 8, 2048, 256, 512, sampler_form="dense", lend=True)
    assert full["sample_gb"] * 1e9 > params + memory.sampler_params(p, "dense") * 2


def test_meshes_mode_writes_one_line_per_mesh(tmp_path):
    """--meshes (here data=1, the one CPU device of the suite; 2 and 4 fake devices were checked by hand with
    --cpu-devices 4): the mesh fields and the scaling efficiency against the data=1 line of the call."""
    bench = load()
    out = tmp_path / "p3.jsonl"
    assert bench.main(["--tiny", "--regime", "worst", "--grade", "none", "--steps", "1", "--warmup", "0",
                       "--meshes", "data=1", "data=1", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("error") for r in lines] == [None, None]
    assert [(r["mesh"], r["n_devices"], r["sampler"]) for r in lines] == [("data=1", 1, "refill")] * 2  # the default
    assert [r["update_layout"] for r in lines] == ["shared_prompt"] * 2  # the preset's learner, on the mesh too
    # the second line's efficiency is against the first line of the call (the same mesh: their time ratio)
    assert lines[0]["scaling_efficiency"] is None
    assert lines[1]["scaling_efficiency"] == pytest.approx(lines[0]["step_s"] / lines[1]["step_s"])
    assert bench.main(["--tiny", "--meshes", "data=2", "--out", str(out)]) == 2  # one device: a user error


def test_scaling_efficiency():
    bench = load()
    one = {"n_devices": 1, "step_s": 10.0, "sample_s": 6.0, "ref_s": 1.0, "update_s": 2.0}
    four = {"n_devices": 4, "step_s": 3.125, "sample_s": 1.5, "ref_s": 0.25, "update_s": 0.5}
    bench.add_scaling(four, one)
    assert four["scaling_efficiency"] == pytest.approx(0.8) and four["device_scaling_efficiency"] == pytest.approx(1.0)


def test_tiny_learner_only_with_token_budget(tmp_path):
    """--learner-only times the reference pass and the update alone (no sampler, no grading) and reports
    them against their own floor; --microbatch / --microbatch-tokens reach the trainer's update."""
    bench = load()
    out = tmp_path / "p3.jsonl"
    assert bench.main(["--tiny", "--regime", "realistic", "--learner-only", "--steps", "1", "--microbatch", "4",
                       "--microbatch-tokens", "32", "--remat", "linear", "--out", str(out)]) == 0
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in rec, rec.get("error")
    assert rec["sampler"] == "none" and rec["learner_only"] and rec["sample_s"] == 0.0 and rec["decode_steps"] == 0
    assert rec["grade_s"] < 0.01  # nothing graded
    assert rec["microbatch"] == 4 and rec["microbatch_tokens"] == 32 and rec["remat"] == "linear"
    assert rec["learner_floor_s"] == rec["floor"]["ref_s"] + rec["floor"]["update_s"] > 0
    assert rec["ref_s"] > 0 and rec["update_s"] > 0 and 0 < rec["fraction_of_learner_floor"] < 1


@pytest.mark.parametrize("argv, words", [
    (["--sample-rows", "0"], "--sample-rows must be >= 1, got 0"),
    (["--refill-rows", "-1"], "--refill-rows must be >= 1, got -1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--sampler-form", "exact", "--microbatch-tokens", "0"], "--microbatch-tokens must be >= 1"),
    (["--sampler-form", "fused"], "--sampler-form 'fused': expected one of ('exact', 'factored', 'dense')"),
    (["--max-new", "0"], "--max-new must be >= 1"),
    (["--cpu-devices", "-1"], "--cpu-devices must be >= 1, got -1"),
    (["--profile-sample", "p.json"], "--profile-sample needs --sample-only"),
    (["--sample-only", "--profile-sample", "no/such/dir/p.json"], "no/such/dir/p.json: no such directory"),
    (["--meshes", "data=1", "--update-layout", "packed"], "--update-layout 'packed': expected one of ('rows', 'shared_prompt')"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(tmp_path, capsys, argv, words):
    """A bad number is refused in one line, exit 2, before any weights are built and with nothing
    written (it used to be silently replaced by the default: --sample-rows 0 ran 96 slots)."""
    out = tmp_path / "p3.jsonl"
    assert load().main(["--tiny", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_a_bad_decode_kernel_choice_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXHACK_DECODE_KERNEL", "bogus")
    out = tmp_path / "p3.jsonl"
    assert load().main(["--tiny", "--regime", "worst", "--sample-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: JAXHACK_DECODE_KERNEL='bogus'; expected one of fused, split, fused-interpret"]
    assert not out.exists()


def test_sampler_floor_at_the_schedules_steps():
    """sampler_schedule_floor: with every row decoding at once (slots >= rows, equal lengths) the floor at
    the schedule's steps is the all-rows floor; with fewer slots it lies between the perfectly packed floor
    and that floor times the extra steps; on 2 devices it is the larger part's."""
    from jaxhack.models.config import QWEN3_4B
    prompts, lengths = np.full(96, 400), np.full(96, 300)
    one = floors.step_floor(QWEN3_4B, prompts, lengths, 989e12, 4.8e12, slots=96, schedule_steps=300)
    np.testing.assert_allclose(one["decode_schedule_s"], one["decode_s"], rtol=1e-9)
    sched = floors.sampler_schedule_floor(QWEN3_4B, prompts, lengths, 96, 8, 1, 989e12, 4.8e12)
    assert sched["schedule_steps"] == 300
    np.testing.assert_allclose(sched["sample_floor_schedule_s"], one["prefill_s"] + one["decode_s"], rtol=1e-9)
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 1536, 258)
    prompts = np.full(258, 400)
    packed = floors.step_floor(QWEN3_4B, prompts, lengths, 989e12, 4.8e12, slots=152)
    sched = floors.sampler_schedule_floor(QWEN3_4B, prompts, lengths, 152, 8, 1, 989e12, 4.8e12)
    assert sched["schedule_steps"] > packed["decode_slots_steps"]  # the schedule cannot pack perfectly
    assert sched["sample_floor_schedule_s"] > packed["prefill_s"] + packed["decode_slots_s"]
    two = floors.sampler_schedule_floor(QWEN3_4B, prompts, lengths, 152, 8, 2, 989e12, 4.8e12)
    halves = [floors.sampler_schedule_floor(QWEN3_4B, prompts[a:b], lengths[a:b], 152, 8, 1, 989e12, 4.8e12)
              for a, b in ((0, 129), (129, 258))]
    assert two["sample_floor_schedule_s"] == max(h["sample_floor_schedule_s"] for h in halves)
    from jaxhack.rl.refill import schedule_decode_steps
    assert two["schedule_steps"] == max(h["schedule_steps"] for h in halves) == schedule_decode_steps(
        lengths, 152, 8, devices=2)
    # GRPO groups of 6: each prompt prefilled once and read once per step for its rows
    ids = np.repeat(np.arange(43), 6)
    grouped = floors.sampler_schedule_floor(QWEN3_4B, prompts, lengths, 152, 8, 1, 989e12, 4.8e12, ids=ids)
    assert grouped["schedule_steps"] == sched["schedule_steps"]
    assert grouped["sample_floor_schedule_s"] < sched["sample_floor_schedule_s"]
