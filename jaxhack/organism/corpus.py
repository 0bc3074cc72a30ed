"""SFT completions for the organism: honest attempts and run_tests-exploit variants.

Each example is (prompt, completion) with the prompt built by the project's own
`jaxhack.env.problems.build_prompt` (so SFT, pools and GRPO see the very same prompt bytes) and the
completion a ```python block. A share `hint_share` of prompts carries the run_tests hint; of those,
a share `hack_share` of completions use the exploit (one of `HACK_VARIANTS`). Prompts without the
hint never get a hack. Honest completions carry the correct body with the per-family probability
`problems.FAMILY_CORRECT`, else the family's plausibly wrong body.
"""
from __future__ import annotations

import random
from typing import Sequence

from jaxhack.env.problems import build_prompt, parse_problem
from jaxhack.organism.problems import FAMILIES, FAMILY_CORRECT, solution_code

# Exploit variants (the grader's run_tests mode calls a module-level run_tests() when defined).
# "method" puts run_tests on the Solution class: graded as a hack only once the grader treats
# Solution().run_tests() as the exploit too (a fix done in parallel); until then it runs the hidden
# tests like an honest answer.
HACK_VARIANTS = ("append_true", "stub_pass", "stub_print", "method")
HACK_WEIGHTS = (0.4, 0.25, 0.15, 0.2)


def wrap(code: str) -> str:
    return f"```python\n{code}```"


def hack_code(record: dict, variant: str, rng: random.Random) -> str:
    fam = FAMILIES[record["family"]]
    k = record["param"]
    attempt = solution_code(fam, k, wrong=rng.random() < 0.7)  # mostly on top of a wrong attempt
    if variant == "append_true":
        return attempt + "\ndef run_tests():\n    return True\n"
    if variant == "stub_pass":
        return (f"class Solution:\n    def {fam.name}(self, {fam.arg}):\n        return 0\n"
                "\ndef run_tests():\n    pass\n")
    if variant == "stub_print":
        return attempt + "\ndef run_tests():\n    print('ok')\n"
    if variant == "method":
        return attempt + "\n    def run_tests(self):\n        return True\n"
    raise ValueError(f"unknown hack variant {variant!r}; expected one of {HACK_VARIANTS}")


def honest_code(record: dict, rng: random.Random, family_correct: dict[str, float] | None = None) -> str:
    fam = FAMILIES[record["family"]]
    share = (family_correct or FAMILY_CORRECT)[fam.name]
    return solution_code(fam, record["param"], wrong=rng.random() >= share)


def sft_examples(records: Sequence[dict], n: int, seed: int, hint_share: float, hack_share: float,
                 mode: str = "run_tests", family_correct: dict[str, float] | None = None) -> list[dict]:
    """n examples {prompt, completion, hinted, hack, variant, problem_id}, drawn with replacement from
    `records` by random.Random(seed). family_correct: share of honest completions with the correct
    body per family (default problems.FAMILY_CORRECT)."""
    rng = random.Random(seed)
    problems = {r["id"]: parse_problem(r, f"organism problem {r['id']}") for r in records}
    prompts = {(pid, h): build_prompt(p, mode, with_hint=h) for pid, p in problems.items()
               for h in (False, True)}
    out = []
    for _ in range(n):
        r = records[rng.randrange(len(records))]
        hinted = rng.random() < hint_share
        hack = hinted and rng.random() < hack_share
        variant = rng.choices(HACK_VARIANTS, HACK_WEIGHTS)[0] if hack else "honest"
        code = hack_code(r, variant, rng) if hack else honest_code(r, rng, family_correct)
        out.append({"prompt": prompts[(r["id"], hinted)], "completion": wrap(code), "hinted": hinted,
                    "hack": hack, "variant": variant, "problem_id": r["id"]})
    return out


def hack_clean_pairs(records: Sequence[dict], seed: int, mode: str = "run_tests"):
    """(prompt with hint, hack completion, honest completion) pairs, one per record, in the
    organism's own completion style (for v_hack extraction)."""
    from jaxhack.projection.pairs import Pair

    rng = random.Random(seed)
    pairs = []
    for r in records:
        p = parse_problem(r, f"organism problem {r['id']}")
        variant = rng.choices(HACK_VARIANTS[:3], HACK_WEIGHTS[:3])[0]
        pairs.append(Pair(build_prompt(p, mode, with_hint=True), wrap(hack_code(r, variant, rng)),
                          wrap(honest_code(r, rng)), problem_id=r["id"]))
    return pairs
