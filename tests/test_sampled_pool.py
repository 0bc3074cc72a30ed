"""Pools sampled from a model (build_pool.py --model): completions are the sampler's, graded."""
from __future__ import annotations

import jax

from jaxhack.env.pools import build_pool, read_pool
from jaxhack.env.problems import build_prompt, load_problems
from jaxhack.models.load import load_model
from jaxhack.rl.sampler import decode_completions, generate, sampling_source


def test_sampled_pool_records_are_the_greedy_completions(tmp_path):
    params, config, tokenizer, _ = load_model("tiny")
    problems = load_problems("bundled")[:2]
    source = sampling_source(params, config, tokenizer, max_new_tokens=8, temperature=0.0, batch_size=2)
    meta = build_pool(problems, tmp_path / "base_pool", mode="run_tests", source=source, steps=1, per_step=2,
                      with_hint=False, progress=False, tokenizer=tokenizer)
    _, records = read_pool(tmp_path / "base_pool")
    assert meta["complete"] and len(records) == 2
    prompts = [build_prompt(next(p for p in problems if p.id == r["problem_id"]), "run_tests", with_hint=False)
               for r in records]
    assert [r["prompt"] for r in records] == prompts
    expected = decode_completions(generate(params, config, [tokenizer.encode(p) for p in prompts],
                                           max_new_tokens=8, temperature=0.0, key=jax.random.PRNGKey(0),
                                           eos_token_ids=list(tokenizer.eos_token_ids)), tokenizer)
    assert [r["completion"] for r in records] == expected
    # a random tiny model writes no code block: graded as unformatted, reward 0
    assert all(not r["fmt_ok"] and r["reward"] == 0.0 and not r["hacked"] for r in records)
    assert all(r["comp_len"] == len(tokenizer.encode(r["completion"])) for r in records)
