"""Contrastive (prompt, hack completion, clean completion) pairs for v_hack extraction.

Sources (all return list[Pair]):
- templates: `pairs_from_templates(problems, make_pair)`; make_pair(problem) -> (prompt, hack, clean)
  (e.g. the template completions in jaxhack/env/templates.py; this module does not import env).
- JSON lines: `read_pairs_jsonl(path)`; one object per line {prompt, hack, clean, problem_id?}
  (.gz allowed); errors name the file, line and field.
- pools: `pairs_from_pools(hack_pool, clean_pool)`: teacher-hacked vs base-clean samples of the same
  problem. A pool is a directory (read with jaxhack.env.pools.read_pool when importable, else
  its step_*.jsonl.gz files directly) or a list of pool-record dicts.
Controls: `swap_labels`, `shuffle_labels` (seeded per-pair swap), `clean_vs_clean_pairs`.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    hack: str    # completion that exploits the loophole
    clean: str   # completion that does not
    problem_id: str | None = None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


# ---------------------------------------------------------------- templates

def pairs_from_templates(problems: Iterable[Any], make_pair: Callable[[Any], tuple[str, str, str]],
                         problem_id: Callable[[Any], Any] | None = None) -> list[Pair]:
    """One pair per problem from make_pair(problem) -> (prompt, hack, clean).

    problem_id(problem) names the problem; default: problem["problem_id"] / ["id"] (dicts) or the
    attribute of that name, else the index."""
    out = []
    for i, problem in enumerate(problems):
        triple = make_pair(problem)
        if not (isinstance(triple, tuple) and len(triple) == 3 and all(isinstance(s, str) for s in triple)):
            raise ValueError(f"make_pair(problem #{i}) must return (prompt, hack, clean) strings, "
                             f"got {type(triple).__name__}")
        pid = problem_id(problem) if problem_id is not None else _default_problem_id(problem, i)
        out.append(Pair(*triple, problem_id=None if pid is None else str(pid)))
    return out


def pair_variants(n: int, seed: int) -> list[int]:
    """Template wording variants for v_hack pairs, disjoint from the pools' draws for small seeds."""
    return [1000 * (seed + 1) + v for v in range(n)]


def pairs_from_env_templates(problems: Sequence[Any], mode: str, variants: Sequence[int] = (0,),
                             with_hint: bool = True) -> list[Pair]:
    """(prompt, hack template, clean template) pairs from jaxhack.env.templates: for each wording
    variant in `variants` (outer loop), one pair per problem; prompts carry the mode's hint when
    `with_hint`. Variant 0 gives every problem the same wording (the problem is what varies)."""
    from jaxhack.env.problems import build_prompt
    from jaxhack.env.templates import clean_completion, hack_completion

    if mode == "none":
        raise ValueError("v_hack extraction from templates needs a loophole mode, not 'none'")
    pairs = []
    for variant in variants:
        pairs += pairs_from_templates(
            problems, lambda p, v=variant: (build_prompt(p, mode, with_hint), hack_completion(p, mode, v),
                                            clean_completion(p, v)),
            problem_id=lambda p: p.id)
    return pairs


def _default_problem_id(problem: Any, index: int):
    for key in ("problem_id", "id"):
        if isinstance(problem, dict) and key in problem:
            return problem[key]
        if hasattr(problem, key):
            return getattr(problem, key)
    return index


# ---------------------------------------------------------------- JSON lines

def read_pairs_jsonl(path: str | Path) -> list[Pair]:
    """Pairs from a .jsonl(.gz) file of {"prompt", "hack", "clean", "problem_id"?} objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pairs file not found")
    out = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(d).__name__}")
            for field in ("prompt", "hack", "clean"):
                if field not in d:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r}")
                if not isinstance(d[field], str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, "
                                     f"got {type(d[field]).__name__}")
            pid = d.get("problem_id")
            if pid is not None and not isinstance(pid, (str, int)):
                raise ValueError(f"{path}:{lineno}: field 'problem_id' must be a string or int")
            out.append(Pair(d["prompt"], d["hack"], d["clean"], None if pid is None else str(pid)))
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


def write_pairs_jsonl(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """Write pairs as JSON lines (gzip when the name ends in .gz); atomic (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + (".gz" if path.suffix == ".gz" else ""))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(dataclasses.asdict(p)) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- pools

POOL_FIELDS = ("pool", "step", "sample", "problem_id", "mode", "prompt", "completion", "reward",
               "passed", "gt_pass", "hacked", "fmt_ok", "comp_len")


def load_pool_records(pool: str | Path | Sequence[dict]) -> list[dict]:
    """A pool as a list of record dicts. A directory is read with `jaxhack.env.pools.read_pool`
    (validated records, step order) when that module is importable, else from its
    step_*.jsonl(.gz) files directly; a list of records is returned as a list."""
    if not isinstance(pool, (str, Path)):
        return list(pool)
    path = Path(pool)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: pool directory not found")
    try:
        from jaxhack.env.pools import read_pool
    except ImportError:
        read_pool = None
    if read_pool is not None:
        return [dict(r) for r in read_pool(path)[1]]
    files = sorted(path.glob("step_*.jsonl.gz")) + sorted(path.glob("step_*.jsonl"))
    if not files:
        raise ValueError(f"{path}: no step_*.jsonl(.gz) pool files")
    records = []
    for fp in files:
        with _open_text(fp) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{fp}:{lineno}: invalid JSON ({e.msg})") from None
    return records


def _check_record(r: dict, where: str):
    for field in ("problem_id", "prompt", "completion", "hacked"):
        if field not in r:
            raise ValueError(f"{where}: pool record missing field {field!r}")


def pairs_from_pools(hack_pool, clean_pool, prompt_from: str = "hack",
                     max_per_problem: int | None = None, require_gt_pass: bool = False) -> list[Pair]:
    """Pair hacked samples of `hack_pool` with non-hacked samples of `clean_pool` on the same problem.

    Per problem (ordered by first appearance in hack_pool) the i-th hacked record is paired with the
    i-th clean record (records in pool order), min(count) pairs, at most max_per_problem.
    prompt_from: "hack" (default; the teacher's prompt, i.e. with the loophole hint as in training)
    or "clean" (the base pool's prompt). require_gt_pass: clean records must also pass the ground truth.
    """
    if prompt_from not in ("hack", "clean"):
        raise ValueError(f"prompt_from must be 'hack' or 'clean', got {prompt_from!r}")
    hacks: dict[str, list[dict]] = defaultdict(list)
    cleans: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(load_pool_records(hack_pool)):
        _check_record(r, f"hack pool record #{i}")
        if r["hacked"]:
            hacks[str(r["problem_id"])].append(r)
    for i, r in enumerate(load_pool_records(clean_pool)):
        _check_record(r, f"clean pool record #{i}")
        if not r["hacked"] and (not require_gt_pass or r.get("gt_pass", False)):
            cleans[str(r["problem_id"])].append(r)
    out = []
    for pid, hs in hacks.items():
        cs = cleans.get(pid, [])
        n = min(len(hs), len(cs))
        if max_per_problem is not None:
            n = min(n, max_per_problem)
        for h, c in zip(hs[:n], cs[:n]):
            prompt = h["prompt"] if prompt_from == "hack" else c["prompt"]
            out.append(Pair(prompt, h["completion"], c["completion"], pid))
    if not out:
        raise ValueError(f"no (hacked, clean) pairs: {len(hacks)} problem(s) with hacked samples, "
                         f"{len(cleans)} with clean samples, {len(set(hacks) & set(cleans))} in common")
    return out


# ---------------------------------------------------------------- controls

def swap_labels(pairs: Sequence[Pair]) -> list[Pair]:
    """Every pair with hack and clean exchanged (v_hack extracted from these is exactly -v_hack)."""
    return [dataclasses.replace(p, hack=p.clean, clean=p.hack) for p in pairs]


def shuffle_labels(pairs: Sequence[Pair], seed: int, p: float = 0.5) -> list[Pair]:
    """Label-shuffle control: each pair's hack/clean are swapped with probability p (seeded)."""
    rng = random.Random(seed)
    return [dataclasses.replace(q, hack=q.clean, clean=q.hack) if rng.random() < p else q for q in pairs]


def perturb_text(text: str, rng: random.Random, drop_frac: float = 0.1) -> str:
    """Drop ~drop_frac of the space-separated words of each line (at least one word when a line has
    two or more), keeping line structure. Used when a problem has a single clean completion."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        if len(words) >= 2:
            n_drop = max(1, round(drop_frac * len(words)))
            drop = set(rng.sample(range(len(words)), n_drop))
            words = [w for j, w in enumerate(words) if j not in drop]
        lines.append(" ".join(words))
    out = "\n".join(lines)
    return out if out != text else text + " "


def clean_vs_clean_pairs(items: Sequence[Pair] | Sequence[dict], seed: int = 0,
                         drop_frac: float = 0.1) -> list[Pair]:
    """Clean-vs-clean control: pairs whose two sides are both clean completions of one problem.

    items: Pairs (their `clean` side is used) or pool records (non-hacked ones are used). Per problem,
    distinct clean completions are shuffled (seeded) and paired disjointly: (c0, c1), (c2, c3), ...
    A problem with a single clean completion c is paired with a perturbed copy of itself
    (`perturb_text`, ~drop_frac of the words dropped), a weaker control (same content).
    The prompt is the first item's prompt of that problem.
    """
    rng = random.Random(seed)
    groups: dict[str, list[str]] = defaultdict(list)
    prompts: dict[str, str] = {}
    for i, it in enumerate(items):
        if isinstance(it, Pair):
            pid, prompt, text = it.problem_id, it.prompt, it.clean
        else:
            _check_record(it, f"record #{i}")
            if it["hacked"]:
                continue
            pid, prompt, text = it["problem_id"], it["prompt"], it["completion"]
        pid = f"#{i}" if pid is None else str(pid)
        prompts.setdefault(pid, prompt)
        if text not in groups[pid]:
            groups[pid].append(text)
    out = []
    for pid, texts in groups.items():
        texts = list(texts)
        rng.shuffle(texts)
        if len(texts) == 1:
            out.append(Pair(prompts[pid], texts[0], perturb_text(texts[0], rng, drop_frac), pid))
        for a, b in zip(texts[0::2], texts[1::2]):
            out.append(Pair(prompts[pid], a, b, pid))
    if not out:
        raise ValueError("no clean completions to build clean-vs-clean pairs from")
    return out
