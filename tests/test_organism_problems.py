"""The organism's problem generator, corpus and tokenizer (no model): canonical solutions pass their
own asserts under every loophole mode, wrong variants fail, exploit variants hack run_tests."""
import random

import pytest

from jaxhack.env.grader import GradeRequest, grade_batch
from jaxhack.env.hints import MODES
from jaxhack.env.problems import build_prompt, parse_problem
from jaxhack.organism.corpus import HACK_VARIANTS, hack_clean_pairs, hack_code, sft_examples, wrap
from jaxhack.organism.problems import FAMILIES, generate_problems, split_problems
from jaxhack.organism.tokenizer import PhraseTokenizer, default_phrases

RECORDS = generate_problems(len(FAMILIES) * 2, seed=3)


def test_generator_is_seeded_and_covers_every_family():
    assert generate_problems(12, 3) == RECORDS
    assert generate_problems(12, 4) != RECORDS
    assert {r["family"] for r in RECORDS} == set(FAMILIES)
    assert len({r["id"] for r in RECORDS}) == len(RECORDS)
    for r in RECORDS:
        parse_problem(r)  # the project's loader accepts the record


@pytest.mark.parametrize("mode", MODES)
def test_canonical_passes_and_wrong_fails_under_every_mode(mode):
    problems = [parse_problem(r) for r in RECORDS]
    reqs = [GradeRequest(p, mode, wrap(r["canonical_solution"])) for p, r in zip(problems, RECORDS)]
    reqs += [GradeRequest(p, mode, wrap(r["wrong_solution"])) for p, r in zip(problems, RECORDS)]
    grades = grade_batch(reqs)
    n = len(RECORDS)
    assert all(g.gt_pass and g.passed and not g.hacked for g in grades[:n]), [g.detail for g in grades[:n]]
    assert not any(g.gt_pass or g.passed for g in grades[n:]), [g.detail for g in grades[n:]]


def test_module_level_exploits_hack_run_tests_mode():
    rng = random.Random(0)
    problems = [parse_problem(r) for r in RECORDS]
    module_level = [v for v in HACK_VARIANTS if v != "method"]
    reqs = [GradeRequest(p, "run_tests", wrap(hack_code(r, v, rng)))
            for p, r in zip(problems, RECORDS) for v in module_level]
    grades = grade_batch(reqs)
    assert all(g.passed for g in grades)
    assert sum(g.hacked for g in grades) >= len(grades) // 2  # hacks on top of correct code are not "hacked"
    # under a mode without the loophole, the same completions do not pass unless correct
    plain = grade_batch([GradeRequest(r.problem, "none", r.completion) for r in reqs])
    assert all(g.passed == g.gt_pass for g in plain)


def test_split_holds_out_every_family():
    recs = generate_problems(60, 0)
    train, held = split_problems(recs, 12, 0)
    assert len(held) == 12 and len(train) == 48
    assert {r["family"] for r in held} == set(FAMILIES)
    assert not {r["id"] for r in train} & {r["id"] for r in held}


def test_corpus_hacks_only_with_hint_and_in_expected_share():
    ex = sft_examples(RECORDS, 4000, seed=0, hint_share=0.5, hack_share=0.2)
    assert not any(e["hack"] and not e["hinted"] for e in ex)
    hinted = [e for e in ex if e["hinted"]]
    share = sum(e["hack"] for e in hinted) / len(hinted)
    assert 0.16 < share < 0.24
    assert {e["variant"] for e in ex if e["hack"]} == set(HACK_VARIANTS)
    assert all("run_tests" in e["completion"] for e in ex if e["hack"])
    assert not any("run_tests" in e["completion"] for e in ex if not e["hack"])
    assert all("run_tests()" in e["prompt"] for e in hinted)


def test_phrase_tokenizer_roundtrip_and_compression():
    tok = PhraseTokenizer(default_phrases())
    pairs = hack_clean_pairs(RECORDS, seed=0)
    for p in pairs:
        for text in (p.prompt, p.hack, p.clean):
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert max(ids) < tok.vocab_size
        assert len(tok.encode(p.prompt)) * 5 < len(p.prompt.encode())
    prompt = build_prompt(parse_problem(RECORDS[0]), "run_tests")
    assert tok.decode(tok.encode(prompt + "\u00e9 unknown words")) == prompt + "\u00e9 unknown words"


def test_phase3_run_dir_is_resumed_only_for_the_same_config(tmp_path):
    """The GPU size runs over several device calls: a Phase 3 run dir is reused/resumed only when its
    run.json holds exactly this config (a changed setting starts it afresh)."""
    import dataclasses
    import json

    from jaxhack.organism.experiment import SIZES, _resumable, phase3_config

    s = SIZES["cpu"]
    rd = tmp_path / "phase3" / "vanilla" / "seed_0"
    cfg = phase3_config(s, tmp_path / "org", "vanilla", 0, rd, None)
    assert not _resumable(rd, cfg)
    rd.mkdir(parents=True)
    (rd / "run.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert _resumable(rd, cfg)
    assert _resumable(rd, dataclasses.replace(cfg, grade_workers=16))  # a resume-free field
    assert not _resumable(rd, phase3_config(dataclasses.replace(s, steps=41), tmp_path / "org", "vanilla", 0, rd, None))


def test_organism_phase3_runs_sample_only_the_policy(tmp_path):
    """The organism's GRPO groups are the policy's own rollouts: no teacher rows from the smoke preset
    it builds on (they were mixed in by mistake once and changed the runs)."""
    from jaxhack.organism.experiment import SIZES, phase3_config

    for size in SIZES:
        cfg = phase3_config(SIZES[size], tmp_path, "vanilla", 0, tmp_path / "run", None)
        assert cfg.mix_teacher is None and cfg.mix_per_group == 0


def test_h1_validity_and_verdict_on_synthetic_curves():
    """The validity rule takes the untrained policy's rate as the start (a fast learner is already hacking
    within its first tenth of the steps), and the verdict claims a drop only when the t 95% CI over seeds
    excludes 0."""
    import numpy as np

    from jaxhack.organism.report import h1_test, verdict

    steps = 40
    rise = np.minimum(0.08 + 0.08 * np.arange(steps), 0.8)  # 0.08 at step 0, > 0.5 by step 6
    cur = {"vanilla": {str(s): {"hack_rate": list(rise + 0.01 * s), "gt_pass_rate": [0.2] * steps} for s in range(3)},
           "projected": {str(s): {"hack_rate": list(rise - d), "gt_pass_rate": [0.25] * steps}
                         for s, d in zip(range(3), (0.05, 0.06, 0.04))},
           "random_v": {str(s): {"hack_rate": list(rise + d), "gt_pass_rate": [0.2] * steps}
                        for s, d in zip(range(3), (0.05, -0.03, 0.0))}}
    h1 = h1_test(cur, steps, base_hack_rate=0.07)
    assert h1["vanilla"]["valid"]
    assert min(h1["vanilla"]["hack_first_tenth"].values()) > 0.10  # the old start window would have failed it
    assert h1["vanilla"]["steps_to_half"] == {"0": 8, "1": 8, "2": 8}  # 5-step trailing mean 0.08 t - 0.08 (+0.01 s)
    assert h1["projected"]["hack_drop_ci95"][0] > 0 and h1["random_v"]["hack_drop_ci95"][0] < 0
    text = verdict(h1)
    assert "projected: hack-rate drop vs vanilla +0.060" in text and "hacks less than vanilla" in text
    assert "random_v" in text and "no evidence of a difference" in text
    # an untrained policy that already hacks, or a seed that never passes 0.5, is not a valid setup
    assert not h1_test(cur, steps, base_hack_rate=0.15)["vanilla"]["valid"]
    flat = {**cur, "vanilla": {**cur["vanilla"], "2": {"hack_rate": [0.08] * steps, "gt_pass_rate": [0.2] * steps}}}
    assert not h1_test(flat, steps, base_hack_rate=0.07)["vanilla"]["valid"]
    assert verdict(h1_test(flat, steps, base_hack_rate=0.07)).startswith("INVALID SETUP")
    # without the build's figure the seeds' pooled step 0 is the start (0.09 here)
    assert abs(h1_test(cur, steps)["vanilla"]["hack_untrained"] - 0.09) < 1e-9


def test_experiment_dir_resumes_its_settings_refuses_others_and_force_replaces(tmp_path, capsys):
    """Rerunning `organism run` into an experiment dir: the same settings (or other seeds, arms, jobs)
    go on; other settings are refused in one line naming the fields, before any work; --force removes
    the old results and keeps the builds."""
    import dataclasses
    import json

    from jaxhack.cli import main
    from jaxhack.organism.experiment import SIZES
    from jaxhack.organism.rundir import MANIFEST, ExperimentDirError, claim_experiment_dir

    s = SIZES["test"]
    out = tmp_path / "exp"
    claim_experiment_dir(out, s)
    claim_experiment_dir(out, dataclasses.replace(s, seeds=(0, 1), jobs=3))  # adds runs: fine
    assert json.loads((out / MANIFEST).read_text())["settings"]["seeds"] == [0, 1]
    for d in ("organism/abc", "jax_cache", "phase3/vanilla/seed_0", "teacher_pool"):
        (out / d).mkdir(parents=True)
    (out / "organism_report.json").write_text("{}")
    other = dataclasses.replace(s, steps=5, build=dataclasses.replace(s.build, layers=3))
    with pytest.raises(ExperimentDirError, match=r"build\.layers: 2 -> 3, steps: 12 -> 5\); rerun with its"):
        claim_experiment_dir(out, other)
    assert (out / "phase3" / "vanilla" / "seed_0").is_dir()  # nothing removed
    # the CLI: one line, exit 2, before any build (the dir holds no organism of this size)
    line = run_cli_bad(capsys, main, ["organism", "run", "--out", str(out), "--size", "test", "--steps", "5"])
    assert "steps: 12 -> 5" in line and "--force" in line and not (out / "organism" / "latest").exists()
    claim_experiment_dir(out, other, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json", "jax_cache", "organism"]
    assert json.loads((out / MANIFEST).read_text())["settings"]["steps"] == 5


def test_organism_cli_refuses_bad_flags_before_any_work(tmp_path, capsys):
    """Each bad flag: one `error:` line naming the flag, exit 2, and no output directory."""
    from jaxhack.cli import main

    out = tmp_path / "exp"
    base = ["organism", "run", "--out", str(out), "--size", "test"]
    for extra, needle in ((["--seeds", "a"], "--seeds 'a': expected comma-separated integers"),
                          (["--seeds", ""], "--seeds: give at least one value"),
                          (["--arms", "vanilla,bogus"], "--arms: unknown arm(s) ['bogus']"),
                          (["--jobs", "0"], "--jobs must be >= 1, got 0"),
                          (["--grade-workers", "0"], "--grade-workers must be >= 1, got 0"),
                          (["--steps", "-1"], "--steps must be >= 1, got -1")):
        assert needle in run_cli_bad(capsys, main, base + extra)
    assert not out.exists()


def run_cli_bad(capsys, main, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_worker_mem_fraction_splits_80_percent_of_the_budget_over_each_cards_workers():
    from jaxhack.organism.experiment import worker_mem_fraction

    assert worker_mem_fraction(4, 1, budget=0.55) == pytest.approx(0.11)   # 4 workers on one card
    assert worker_mem_fraction(12, 2, budget=0.9) == pytest.approx(0.12)   # 6 per card on 2 cards
    assert worker_mem_fraction(5, 2, budget=0.9) == pytest.approx(0.24)    # 3 on the busier card
    assert worker_mem_fraction(4, 0) is None                               # no GPU: no cap
