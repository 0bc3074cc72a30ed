"""The coding environment: problems and prompts, loophole modes and hints, the sandboxed grader,
template completions, and rollout pools.

Entry points other modules call:
- load_problems(path | "bundled") -> list[Problem]; build_prompt(problem, mode, with_hint=True) -> str
- grade_batch([GradeRequest(problem, mode, completion), ...]) -> list[Grade]
- write_pool_step / write_pool_meta / read_pool / read_pool_step
- build_pool(..., source=...) and build_template_pool(...)
"""
from jaxhack.env.grader import (Grade, GradeRequest, RewardConfig, compute_reward, extract_code,
                                grade_batch, grade_completion)
from jaxhack.env.hints import LOOPHOLE_MODES, MODES, apply_hint, hint_clause
from jaxhack.env.pools import (POOL_RECORD_FIELDS, CompletionSource, PoolFormatError, PoolSlot,
                               build_pool, build_template_pool, list_pool_steps, plan_step, read_pool,
                               read_pool_meta, read_pool_step, summarize_records, template_source,
                               write_pool_meta, write_pool_step)
from jaxhack.env.problems import (Problem, ProblemFormatError, TestCase, build_prompt, chat_prompt,
                                  load_problems, user_message)
from jaxhack.env.sandbox import ExecResult, SandboxJob, SandboxLimits, run_program, run_programs

__all__ = [
    "Grade", "GradeRequest", "RewardConfig", "compute_reward", "extract_code", "grade_batch",
    "grade_completion", "LOOPHOLE_MODES", "MODES", "apply_hint", "hint_clause", "POOL_RECORD_FIELDS",
    "CompletionSource", "PoolFormatError", "PoolSlot", "build_pool", "build_template_pool",
    "list_pool_steps", "plan_step", "read_pool", "read_pool_meta", "read_pool_step",
    "summarize_records", "template_source", "write_pool_meta", "write_pool_step", "Problem",
    "ProblemFormatError", "TestCase", "build_prompt", "chat_prompt", "load_problems", "user_message",
    "ExecResult", "SandboxJob", "SandboxLimits", "run_program", "run_programs",
]
