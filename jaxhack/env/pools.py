"""Rollout pools on disk, and building them from a completion source (templates now, a model later).

Layout of a pool directory DIR:
- DIR/step_NNN.jsonl.gz: one gzip'd json line per sample of step NNN (zero-padded to 3 digits).
- DIR/pool.json: how the pool was made (see `build_pool`), with "complete": true once every step is
  written.

Record fields (`POOL_RECORD_FIELDS`; extra fields are allowed and kept):
- pool (str): pool name. step (int), sample (int): position in the pool.
- problem_id (str), mode (str): the problem and the loophole mode whose grader scored the sample.
- prompt (str): the full chat prompt. completion (str): the model's (or template's) answer.
- reward (float), passed, gt_pass, hacked, fmt_ok (bool): the grade (see jaxhack.env.grader).
- comp_len (int): completion length, in tokens when the pool was built with a tokenizer, else in
  characters; pool.json "comp_len_unit" says which.
Optional fields (`POOL_OPTIONAL_FIELDS`, type-checked when present; pools written before they existed
lack them):
- attempted_hack (bool): the completion carries the mode's exploit (see jaxhack.env.grader).

Every file is written atomically (written to a temp file in DIR, then os.replace).
"""
from __future__ import annotations

import gzip
import io
import json
import random
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from jaxhack.io import iter_jsonl
from jaxhack.io import atomic_write_bytes
from jaxhack.env.grader import GradeRequest, RewardConfig, grade_batch
from jaxhack.env.hints import DEFAULT_HINT_STYLE, check_hint_style, check_mode
from jaxhack.env.problems import Problem, build_prompt
from jaxhack.env.sandbox import SandboxLimits
from jaxhack.env.templates import (HACK_CORRECT_MODES, clean_completion, hack_completion,
                                   unformatted_completion, wrong_completion)

POOL_FORMAT_VERSION = 1
POOL_META_FILE = "pool.json"
STEP_FILE_RE = re.compile(r"^step_(\d{3,})\.jsonl\.gz$")

POOL_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "pool": (str,),
    "step": (int,),
    "sample": (int,),
    "problem_id": (str,),
    "mode": (str,),
    "prompt": (str,),
    "completion": (str,),
    "reward": (float, int),
    "passed": (bool,),
    "gt_pass": (bool,),
    "hacked": (bool,),
    "fmt_ok": (bool,),
    "comp_len": (int,),
}


POOL_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "attempted_hack": (bool,),
}


class PoolFormatError(ValueError):
    """A pool file that does not fit the format; the message names file, line and field."""


def step_file_name(step: int) -> str:
    return f"step_{step:03d}.jsonl.gz"


def validate_record(record: object, where: str) -> dict:
    """Check one pool record's fields and types (and hacked == passed and not gt_pass); return it.

    Raises PoolFormatError("<where>: field 'x': expected ..., got ...").
    """
    if not isinstance(record, dict):
        raise PoolFormatError(f"{where}: expected a json object, got {type(record).__name__}")
    for name, kinds in POOL_RECORD_FIELDS.items():
        if name not in record:
            raise PoolFormatError(f"{where}: field {name!r}: missing")
        value = record[name]
        ok = isinstance(value, kinds) and not (bool not in kinds and isinstance(value, bool))
        if not ok:
            expected = " or ".join(k.__name__ for k in kinds)
            raise PoolFormatError(f"{where}: field {name!r}: expected {expected}, got {value!r:.80}")
    for name, kinds in POOL_OPTIONAL_FIELDS.items():
        if name in record and not isinstance(record[name], kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise PoolFormatError(f"{where}: field {name!r}: expected {expected}, got {record[name]!r:.80}")
    if record["hacked"] != (record["passed"] and not record["gt_pass"]):
        raise PoolFormatError(
            f"{where}: field 'hacked': expected passed and not gt_pass "
            f"({record['passed'] and not record['gt_pass']}), got {record['hacked']}")
    return record


def write_pool_step(pool_dir: str | Path, step: int, records: Sequence[dict]) -> Path:
    """Validate `records` and write DIR/step_NNN.jsonl.gz atomically; return its path."""
    path = Path(pool_dir) / step_file_name(step)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        for i, record in enumerate(records):
            validate_record(record, f"record {i} for {path}")
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_pool_meta(pool_dir: str | Path, meta: dict) -> Path:
    """Write DIR/pool.json atomically."""
    path = Path(pool_dir) / POOL_META_FILE
    atomic_write_bytes(path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_pool_step(path: str | Path) -> list[dict]:
    """Records of one step file, each validated; PoolFormatError names file, line and field."""
    path = Path(path)
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for where, record in iter_jsonl(f, path, PoolFormatError):
                records.append(validate_record(record, where))
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise PoolFormatError(f"{path}: not a readable gzip'd jsonl file: {err}") from None
    return records


def list_pool_steps(pool_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step file in DIR, by step."""
    pool_dir = Path(pool_dir)
    if not pool_dir.is_dir():
        raise FileNotFoundError(f"pool directory {pool_dir} does not exist")
    steps = []
    for path in pool_dir.iterdir():
        match = STEP_FILE_RE.match(path.name)
        if match:
            steps.append((int(match.group(1)), path))
    return sorted(steps)


def read_pool_meta(pool_dir: str | Path) -> dict:
    """DIR/pool.json as a dict."""
    path = Path(pool_dir) / POOL_META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PoolFormatError(f"{path}: not valid json: {err.msg} (line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise PoolFormatError(f"{path}: expected a json object")
    return meta


def read_pool(pool_dir: str | Path) -> tuple[dict, list[dict]]:
    """(pool.json, all records by step then sample). Checks each record's step against its file."""
    meta = read_pool_meta(pool_dir)
    records = []
    for step, path in list_pool_steps(pool_dir):
        for line_no, record in enumerate(read_pool_step(path), start=1):
            if record["step"] != step:
                raise PoolFormatError(
                    f"{path} line {line_no}: field 'step': expected {step} (from the file name), "
                    f"got {record['step']}")
            records.append(record)
    return meta, records


def summarize_records(records: Sequence[dict]) -> dict:
    """Counts and rates: n, hack_rate, pass_rate, gt_pass_rate, fmt_rate, mean_reward, and
    attempted_hack_rate when every record has attempted_hack."""
    n = len(records)
    if n == 0:
        return {"n": 0}

    def rate(name):
        return sum(bool(r[name]) for r in records) / n

    summary = {"n": n, "hack_rate": rate("hacked"), "pass_rate": rate("passed"),
               "gt_pass_rate": rate("gt_pass"), "fmt_rate": rate("fmt_ok"),
               "mean_reward": sum(r["reward"] for r in records) / n}
    if all("attempted_hack" in r for r in records):
        summary["attempted_hack_rate"] = rate("attempted_hack")
    return summary


# ---------------------------------------------------------------- building pools


@dataclass(frozen=True)
class PoolSlot:
    """One sample to produce: its step, index within the step, problem and full prompt."""

    step: int
    sample: int
    problem: Problem
    prompt: str


class CompletionSource(Protocol):
    """Where completions come from: given one step's slots, return one completion per slot."""

    def __call__(self, slots: Sequence[PoolSlot]) -> list[str]: ...


def plan_step(problems: Sequence[Problem], step: int, per_step: int, group_size: int,
              seed: int) -> list[Problem]:
    """The problems of one step's samples: a seed-fixed shuffle of `problems`, walked in order, each
    problem taking `group_size` consecutive samples. Pools built with the same problems, seed,
    per_step and group_size put the same problem at the same (step, sample)."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    groups_per_step = -(-per_step // group_size)
    return [order[(step * groups_per_step + sample // group_size) % len(order)]
            for sample in range(per_step)]


def _slot_rng(seed: int, step: int, sample: int) -> random.Random:
    return random.Random(f"{seed}/{step}/{sample}")


def template_source(kind: str, mode: str, seed: int = 0, hack_correct_fraction: float = 0.1,
                    base_correct_fraction: float = 0.25,
                    base_unformatted_fraction: float = 0.1) -> CompletionSource:
    """A CompletionSource of template completions.

    kind "teacher": hack completions for `mode`; a `hack_correct_fraction` of them build on the
    canonical solution (hack+correct) when the mode has such a template.
    kind "base": no hacks; `base_correct_fraction` clean (canonical) completions,
    `base_unformatted_fraction` answers without a code block, the rest formatted wrong attempts.
    Each slot's choice and wording depend only on (seed, step, sample).
    """
    check_mode(mode)
    if kind not in ("teacher", "base"):
        raise ValueError(f"unknown pool kind {kind!r}; expected 'teacher' or 'base'")
    if kind == "teacher" and mode == "none":
        raise ValueError("a teacher pool needs a loophole mode, not 'none'")

    def source(slots: Sequence[PoolSlot]) -> list[str]:
        completions = []
        for slot in slots:
            rng = _slot_rng(seed, slot.step, slot.sample)
            variant = rng.randrange(1000)
            draw = rng.random()
            if kind == "teacher":
                with_correct = mode in HACK_CORRECT_MODES and draw < hack_correct_fraction
                completions.append(hack_completion(slot.problem, mode, variant, with_correct))
            elif draw < base_correct_fraction:
                completions.append(clean_completion(slot.problem, variant))
            elif draw < base_correct_fraction + base_unformatted_fraction:
                completions.append(unformatted_completion(slot.problem, variant))
            else:
                completions.append(wrong_completion(slot.problem, variant))
        return completions

    return source


def build_pool(problems: Sequence[Problem], out_dir: str | Path, *, mode: str,
               source: CompletionSource, steps: int, per_step: int, group_size: int = 1,
               with_hint: bool = True, hint_style: str = DEFAULT_HINT_STYLE, seed: int = 0,
               pool_name: str | None = None,
               rewards: RewardConfig = RewardConfig(), limits: SandboxLimits = SandboxLimits(),
               max_workers: int | None = None, tokenizer=None, progress: bool = True,
               extra_meta: dict | None = None) -> dict:
    """Produce, grade and write a pool; return its pool.json dict.

    Per step: `plan_step` picks the problems, prompts are built (with the mode's hint in
    `hint_style` when `with_hint`), `source` returns the completions, the real grader scores them under `mode`, and the
    step file is written. tokenizer: anything with `.encode(text) -> list` (comp_len in tokens);
    None gives comp_len in characters. extra_meta: merged into pool.json (e.g. the source's
    settings or the generation config).
    """
    check_mode(mode)
    check_hint_style(hint_style)
    if steps < 1 or per_step < 1 or group_size < 1:
        raise ValueError("steps, per_step and group_size must be >= 1")
    out_dir = Path(out_dir)
    name = pool_name or out_dir.name
    meta = {
        "format_version": POOL_FORMAT_VERSION, "pool": name, "mode": mode, "hint_in_prompt": with_hint,
        "hint_style": hint_style,
        "steps": steps, "per_step": per_step, "group_size": group_size, "seed": seed,
        "n_problems": len(problems), "problem_ids": [p.id for p in problems],
        "comp_len_unit": "tokens" if tokenizer is not None else "chars",
        "rewards": {"format_reward": rewards.format_reward, "pass_reward": rewards.pass_reward},
        "sandbox_limits": limits.to_dict(), "record_fields": list(POOL_RECORD_FIELDS) + list(POOL_OPTIONAL_FIELDS),
        "created_unix": time.time(), "complete": False, **(extra_meta or {}),
    }
    write_pool_meta(out_dir, meta)
    all_records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps * per_step, desc=f"grading pool {name}", unit="sample")
    for step in range(steps):
        chosen = plan_step(problems, step, per_step, group_size, seed)
        slots = [PoolSlot(step, i, p, build_prompt(p, mode, with_hint, hint_style))
                 for i, p in enumerate(chosen)]
        completions = source(slots)
        if len(completions) != len(slots):
            raise ValueError(f"completion source returned {len(completions)} completions "
                             f"for {len(slots)} slots at step {step}")
        grades = grade_batch([GradeRequest(s.problem, mode, c) for s, c in zip(slots, completions)],
                             rewards, limits, max_workers)
        records = [
            {"pool": name, "step": step, "sample": slot.sample, "problem_id": slot.problem.id,
             "mode": mode, "prompt": slot.prompt, "completion": completion, "reward": grade.reward,
             "passed": grade.passed, "gt_pass": grade.gt_pass, "hacked": grade.hacked,
             "fmt_ok": grade.fmt_ok, "comp_len": completion_length(completion, tokenizer),
             "attempted_hack": grade.attempted_hack}
            for slot, completion, grade in zip(slots, completions, grades)
        ]
        write_pool_step(out_dir, step, records)
        all_records.extend(records)
        if bar is not None:
            bar.update(len(records))
    if bar is not None:
        bar.close()
    meta.update(complete=True, summary=summarize_records(all_records))
    write_pool_meta(out_dir, meta)
    return meta


def completion_length(completion: str, tokenizer=None) -> int:
    """Tokens via `tokenizer.encode` when given, else characters."""
    return len(tokenizer.encode(completion)) if tokenizer is not None else len(completion)


def build_template_pool(problems: Sequence[Problem], out_dir: str | Path, *, mode: str, kind: str,
                        steps: int = 20, per_step: int = 8, group_size: int = 1, seed: int = 0,
                        hack_correct_fraction: float = 0.1, base_correct_fraction: float = 0.25,
                        base_unformatted_fraction: float = 0.1, **build_kwargs) -> dict:
    """A teacher pool (hack templates for `mode`, prompts with the hint) or a base pool (clean, wrong
    and unformatted templates, prompts without the hint, graded under `mode`). Other keyword
    arguments go to `build_pool` (rewards, limits, max_workers, tokenizer, progress, pool_name)."""
    source = template_source(kind, mode, seed, hack_correct_fraction, base_correct_fraction,
                             base_unformatted_fraction)
    extra = {"kind": kind, "source": "templates",
             "template_settings": {"hack_correct_fraction": hack_correct_fraction,
                                   "base_correct_fraction": base_correct_fraction,
                                   "base_unformatted_fraction": base_unformatted_fraction}}
    extra.update(build_kwargs.pop("extra_meta", None) or {})
    return build_pool(problems, out_dir, mode=mode, source=source, steps=steps, per_step=per_step,
                      group_size=group_size, with_hint=(kind == "teacher"), seed=seed,
                      extra_meta=extra, **build_kwargs)
