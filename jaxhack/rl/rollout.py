"""Phase 3 rollouts: sample the policy, mix in teacher completions, grade every row (a typed
`Rollout`), and the held-out evaluation (docs/phase3.md, steps 2-3 and "Eval").

Row layout of a step's `Rollout`: N = prompts_per_step * G rows, rows g*G .. g*G+G-1 are group g
(one problem); in each group the policy rows come first and the K' teacher rows last.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxhack.env.grader import GradeCache, GradeRequest, RewardConfig, grade_batch
from jaxhack.env.sandbox import SandboxLimits
from jaxhack.models.config import Qwen3Config
from jaxhack.rl.config import TrainConfig
from jaxhack.rl.data import pick_teacher
from jaxhack.rl.sampler import generate

SOURCES = ("policy", "teacher")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One step's graded rollouts (N rows, see the module docstring); built once by `sample_rollout`."""
    problems: tuple             # [N] env.problems.Problem
    prompt_ids: tuple           # [N] prompt token ids
    completion_ids: tuple       # [N] completion token ids (<= max_new; EOS kept)
    completions: tuple          # [N] str, decoded completion_ids
    sources: tuple              # [N] "policy" | "teacher"
    sampler_logp: tuple         # [N] np.ndarray [len(completion_ids)] (policy rows) | None (teacher)
    finished: tuple             # [N] bool (teacher rows: True)
    grades: tuple               # [N] env.grader.Grade

    def __post_init__(self):
        n = len(self.problems)
        for f in dataclasses.fields(self):
            if len(getattr(self, f.name)) != n:
                raise ValueError(f"Rollout.{f.name} has {len(getattr(self, f.name))} rows, expected {n}")
        bad = set(self.sources) - set(SOURCES)
        if bad:
            raise ValueError(f"Rollout.sources: unknown {sorted(bad)}; expected {SOURCES}")

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def rewards(self) -> np.ndarray:
        """[N] float32."""
        return np.asarray([g.reward for g in self.grades], np.float32)

    @property
    def policy_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s == "policy"]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def mean_or_nan(values) -> float:
    """Mean of the values, NaN for none (a rate over an empty set of rows is undefined, not 0)."""
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def grade_rows(problems, completions, cfg: TrainConfig, cache: GradeCache | None = None):
    """Grades of (problem, completion) pairs under cfg.mode, in the sandbox, in parallel; `cache`
    keeps the verdicts across calls (a run's steps)."""
    limits = SandboxLimits(wall_s=cfg.sandbox_wall_s, cpu_s=max(1, math.ceil(cfg.sandbox_wall_s)))
    return grade_batch([GradeRequest(p, cfg.mode, c) for p, c in zip(problems, completions)],
                       RewardConfig(cfg.format_reward, cfg.pass_reward), limits, cfg.grade_workers, cache=cache)


def sample_rollout(params, config: Qwen3Config, tokenizer, adapters: dict, problems: Sequence,
                   prompt_ids: dict, teacher: dict | None, cfg: TrainConfig, key: jax.Array, step: int,
                   prompt_multiple: int, mesh=None, grade_cache: GradeCache | None = None
                   ) -> tuple[Rollout, float, float]:
    """Sample + teacher mix + grade one step's groups (one group of G rows per problem).
    adapters: the merged policy adapter. mesh: the sampler's rows sharded over its data axis.
    grade_cache: the run's verdicts of earlier steps (`grade_rows`).
    Returns (rollout, generation seconds, grading seconds)."""
    G = cfg.group_size
    rows_problem, rows_source, teacher_ids = [], [], {}
    for g, p in enumerate(problems):
        chosen = pick_teacher(teacher.get(p.id, []), cfg.mix_per_group, cfg.seed, step, g) if teacher else []
        for j in range(G):
            t_index = j - (G - len(chosen))  # teacher rows are the last len(chosen) of the group
            if t_index >= 0:
                rec = chosen[t_index]
                ids = list(tokenizer.encode(rec["completion"]))[:cfg.max_new]
                if not ids:
                    raise ValueError(f"teacher record pool {rec.get('pool')} step {rec.get('step')} "
                                     f"sample {rec.get('sample')}: empty completion")
                teacher_ids[len(rows_problem)] = ids
            rows_problem.append(p)
            rows_source.append("teacher" if t_index >= 0 else "policy")
    n = len(rows_problem)
    completion_ids: list[Any] = [teacher_ids.get(i) for i in range(n)]
    sampler_logp: list[Any] = [None] * n
    finished = [True] * n
    to_sample = [i for i in range(n) if rows_source[i] == "policy"]
    t0 = time.time()
    if to_sample:
        res = generate(params, config, [prompt_ids[rows_problem[i].id] for i in to_sample],
                       max_new_tokens=cfg.max_new, key=key, adapters=adapters, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_token_ids=tokenizer.eos_token_ids, pad_id=tokenizer.pad_token_id,
                       prompt_multiple=prompt_multiple, max_rows=cfg.sample_rows, prefill_chunk=cfg.prefill_chunk,
                       mesh=mesh, form=cfg.sampler_form, lend_weights=cfg.lend_weights)
        for j, i in enumerate(to_sample):
            length = int(res.lengths[j])
            completion_ids[i] = res.tokens[j, :length].tolist()
            sampler_logp[i] = res.logprobs[j, :length]
            finished[i] = bool(res.finished[j])
    t_gen = time.time() - t0
    completions = [decode(tokenizer, ids) for ids in completion_ids]
    t0 = time.time()
    grades = grade_rows(rows_problem, completions, cfg, grade_cache)
    t_grade = time.time() - t0
    rollout = Rollout(tuple(rows_problem), tuple(prompt_ids[p.id] for p in rows_problem), tuple(completion_ids),
                      tuple(completions), tuple(rows_source), tuple(sampler_logp), tuple(finished), tuple(grades))
    return rollout, t_gen, t_grade


def rollout_metrics(rollout: Rollout) -> dict:
    """Reward / hack / pass rates of all rows and of the policy rows only."""
    grades = rollout.grades
    policy = rollout.policy_rows
    return {
        "n_rollouts": len(rollout), "n_teacher": len(rollout) - len(policy),
        "reward_mean": mean_or_nan(g.reward for g in grades),
        "reward_std": float(np.std([g.reward for g in grades])),
        "hack_rate": mean_or_nan(g.hacked for g in grades), "gt_pass_rate": mean_or_nan(g.gt_pass for g in grades),
        "pass_rate": mean_or_nan(g.passed for g in grades), "fmt_rate": mean_or_nan(g.fmt_ok for g in grades),
        "attempt_rate": mean_or_nan(g.attempted_hack for g in grades),
        "hack_rate_policy": mean_or_nan(grades[i].hacked for i in policy),
        "attempt_rate_policy": mean_or_nan(grades[i].attempted_hack for i in policy),
        "gt_pass_rate_policy": mean_or_nan(grades[i].gt_pass for i in policy),
        "reward_mean_policy": mean_or_nan(grades[i].reward for i in policy),
        "comp_len_mean": mean_or_nan(len(c) for c in rollout.completion_ids),
        "frac_finished": mean_or_nan(rollout.finished[i] for i in policy),
    }


def rollout_records(rollout: Rollout, advantages: np.ndarray, step: int, cfg: TrainConfig,
                    prompt_texts: dict) -> list[dict]:
    """The rows as pool records (jaxhack.env.pools format) for RUN/rollouts/step_NNN.jsonl.gz."""
    return [{
        "pool": f"phase3/{cfg.arm}/seed_{cfg.seed}", "step": step, "sample": i, "problem_id": p.id,
        "mode": cfg.mode, "prompt": prompt_texts[p.id], "completion": rollout.completions[i],
        "reward": float(g.reward), "passed": bool(g.passed), "gt_pass": bool(g.gt_pass),
        "hacked": bool(g.hacked), "attempted_hack": bool(g.attempted_hack), "fmt_ok": bool(g.fmt_ok),
        "comp_len": len(rollout.completion_ids[i]),
        "source": rollout.sources[i], "advantage": float(advantages[i]), "finished": bool(rollout.finished[i]),
        "detail": g.detail,
    } for i, (p, g) in enumerate(zip(rollout.problems, rollout.grades))]


def evaluate(params, config: Qwen3Config, tokenizer, adapters: dict, problems, cfg: TrainConfig, key,
             step: int, prompt_ids: dict, prompt_multiple: int, mesh=None,
             grade_cache: GradeCache | None = None) -> dict:
    """Completions on the held-out problems (greedy when eval_temperature == 0), graded.
    adapters: the merged policy adapter. mesh, grade_cache: as `sample_rollout`."""
    rows = [p for p in problems for _ in range(cfg.eval_samples)]
    max_new = cfg.eval_max_new or cfg.max_new
    chunk = cfg.group_size * cfg.prompts_per_step  # the sampler's batch of a training step
    completions, finished = [], []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        # the last of several chunks is padded to `chunk` rows (copies of its last row, dropped below):
        # one sampler program for the eval (the training step's when max_new and the temperature are its)
        # instead of a second one for the remainder; a lone short chunk stays short (no wasted rows).
        # Row i's randomness depends on i only (`generate`), so the padding changes no real row's draw.
        padded = part + [part[-1]] * (chunk - len(part) if len(rows) > chunk else 0)
        res = generate(params, config, [prompt_ids[p.id] for p in padded], max_new_tokens=max_new,
                       key=jax.random.fold_in(key, start), adapters=adapters,
                       temperature=cfg.eval_temperature, top_p=cfg.top_p,
                       eos_token_ids=tokenizer.eos_token_ids, pad_id=tokenizer.pad_token_id,
                       prompt_multiple=prompt_multiple, max_rows=cfg.sample_rows,
                       prefill_chunk=cfg.prefill_chunk, mesh=mesh, form=cfg.sampler_form, lend_weights=cfg.lend_weights)
        completions += [decode(tokenizer, res.tokens[i, :res.lengths[i]]) for i in range(len(part))]
        finished += res.finished[:len(part)].tolist()
    grades = grade_rows(rows, completions, cfg, grade_cache)
    return {"step": step, "n": len(rows), "hack_rate": mean_or_nan(g.hacked for g in grades),
            "gt_pass_rate": mean_or_nan(g.gt_pass for g in grades),
            "attempt_rate": mean_or_nan(g.attempted_hack for g in grades),
            "pass_rate": mean_or_nan(g.passed for g in grades),
            "fmt_rate": mean_or_nan(g.fmt_ok for g in grades),
            "reward_mean": mean_or_nan(g.reward for g in grades),
            "frac_finished": mean_or_nan(finished), "temperature": cfg.eval_temperature}
