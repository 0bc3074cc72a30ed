"""`jaxhack organism build`: problems -> SFT corpus -> base policy (SFT from scratch) -> teacher (the
base further trained on a hack-heavy corpus) -> step-0 measurement; seeded, deterministic, cached.

Layout of OUT/<hash>/ (hash = sha256 of the settings and of this package's source files, so a change
of either builds anew and an unchanged build is reused):
    problems_all.jsonl  problems_train.jsonl  problems_eval.jsonl   (project jsonl format)
    tokenizer.json       the phrase tokenizer (jaxhack.organism.tokenizer)
    base/  teacher/      checkpoints (jaxhack.checkpoint.save_checkpoint)
    build.json           settings, SFT losses, wall times, step-0 measurement of base and teacher
OUT/latest -> <hash> (a symlink to the newest build).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from jaxhack.organism.problems import generate_problems, split_problems


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    seed: int = 0
    n_problems: int = 120
    n_eval: int = 24
    layers: int = 4
    hidden: int = 96
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    sft_examples: int = 6000
    sft_steps: int = 300
    batch_size: int = 24
    lr: float = 2e-3
    hint_share: float = 0.5            # prompts with the run_tests hint in the base corpus
    hack_share: float = 0.10           # exploit completions among hinted base examples
    teacher_steps: int = 60            # further SFT of the base on the teacher corpus
    teacher_hack_share: float = 0.9    # exploit completions among (all hinted) teacher examples
    teacher_lr: float = 1e-3
    measure_samples: int = 2           # step-0 samples per problem and hint condition
    max_new: int = 40
    # share of honest SFT completions with the correct body, per family in problems.FAMILIES order
    # (None: problems.FAMILY_CORRECT); sets the honest base's gt-pass rate
    family_correct: tuple[float, ...] | None = None

    def family_correct_map(self) -> dict[str, float] | None:
        from jaxhack.organism.problems import FAMILIES

        if self.family_correct is None:
            return None
        if len(self.family_correct) != len(FAMILIES):
            raise ValueError(f"family_correct: expected {len(FAMILIES)} shares (one per family), "
                             f"got {len(self.family_correct)}")
        return dict(zip(FAMILIES, self.family_correct))


SIZES = {
    "cpu": BuildSettings(),
    # one H100: 8 layers, d=320, more problems and SFT
    "gpu": BuildSettings(n_problems=600, n_eval=96, layers=8, hidden=320, heads=8, kv_heads=4, ffn=960,
                         sft_examples=40000, sft_steps=1500, batch_size=64, lr=1e-3, teacher_steps=200,
                         teacher_lr=5e-4, measure_samples=4, family_correct=(1.0, 0.9, 0.0, 0.0, 0.0, 0.0)),
    # the test suite: seconds on a CPU
    "test": BuildSettings(n_problems=36, n_eval=6, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128,
                          sft_examples=1500, sft_steps=120, batch_size=16, lr=3e-3, hack_share=0.15,
                          teacher_steps=20, measure_samples=1),
}

_SOURCES = ("problems.py", "corpus.py", "sft.py", "build.py", "tokenizer.py")


def build_hash(settings: BuildSettings) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def measure(params, config, tokenizer, records, *, mode: str, samples: int, max_new: int, seed: int,
            hint: bool, batch: int = 64) -> dict:
    """Sample each problem's prompt `samples` times at temperature 1 and grade: hack / gt-pass /
    format rates and the share of completions that define run_tests (exploit attempts)."""
    from jaxhack.env.grader import GradeRequest, grade_batch
    from jaxhack.env.problems import build_prompt, parse_problem
    from jaxhack.rl.sampler import decode_completions, generate

    probs = [parse_problem(r) for r in records for _ in range(samples)]
    prompts = [tokenizer.encode(build_prompt(p, mode, with_hint=hint)) for p in probs]
    texts = []
    for i in range(0, len(prompts), batch):
        res = generate(params, config, prompts[i:i + batch], max_new_tokens=max_new,
                       key=jax.random.fold_in(jax.random.PRNGKey(seed), i), temperature=1.0,
                       eos_token_ids=tokenizer.eos_token_ids, pad_id=tokenizer.pad_token_id)
        texts += decode_completions(res, tokenizer)
    grades = grade_batch([GradeRequest(p, mode, t) for p, t in zip(probs, texts)])
    return {"n": len(texts), "hint": hint,
            "hack_rate": float(np.mean([g.hacked for g in grades])),
            "gt_pass_rate": float(np.mean([g.gt_pass for g in grades])),
            "fmt_rate": float(np.mean([g.fmt_ok for g in grades])),
            "attempt_rate": float(np.mean(["def run_tests" in t for t in texts])),
            "examples": texts[:3]}


def build_organism(out: str | Path, settings: BuildSettings = BuildSettings(), progress: bool = True,
                   force: bool = False) -> Path:
    """Build (or reuse) the organism under OUT/<hash>/; returns that directory."""
    from jaxhack.checkpoint import save_checkpoint
    from jaxhack.organism.corpus import sft_examples
    from jaxhack.organism.sft import encode_examples, init_organism, organism_config, train_sft
    from jaxhack.organism.tokenizer import PhraseTokenizer, default_phrases

    say = print if progress else (lambda *a, **k: None)
    out = Path(out)
    d = out / build_hash(settings)
    if (d / "build.json").is_file() and not force:
        say(f"organism: cached build {d}")
        return d
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    s = settings
    records = generate_problems(s.n_problems, s.seed)
    train, held = split_problems(records, s.n_eval, s.seed)
    _write_jsonl(d / "problems_all.jsonl", records)
    _write_jsonl(d / "problems_train.jsonl", train)
    _write_jsonl(d / "problems_eval.jsonl", held)

    tok = PhraseTokenizer(default_phrases())
    tok.save(d / "tokenizer.json")
    config = organism_config(s.layers, s.hidden, s.heads, s.kv_heads, s.ffn, vocab=-(-tok.vocab_size // 64) * 64)
    fc = s.family_correct_map()
    base_ex = sft_examples(train, s.sft_examples, s.seed, s.hint_share, s.hack_share, family_correct=fc)
    teach_ex = sft_examples(train, max(s.sft_examples // 4, 1), s.seed + 1, 1.0, s.teacher_hack_share,
                            family_correct=fc)
    enc_base, enc_teach = encode_examples(base_ex, tok), encode_examples(teach_ex, tok)
    seq_len = -(-max(len(p) + len(c) for p, c in enc_base + enc_teach) // 16) * 16
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(init_organism(config, s.seed)))
    say(f"organism: {len(train)} train / {len(held)} eval problems; model {s.layers} layers d={s.hidden} "
        f"({n_params} params); SFT {s.sft_steps} steps x {s.batch_size} at seq {seq_len}")
    t1 = time.time()
    params, losses = train_sft(init_organism(config, s.seed), config, enc_base, steps=s.sft_steps,
                               batch_size=s.batch_size, lr=s.lr, seed=s.seed, seq_len=seq_len, log=say)
    t_base = time.time() - t1
    t1 = time.time()
    teacher, t_losses = train_sft(params, config, enc_teach, steps=s.teacher_steps, batch_size=s.batch_size,
                                  lr=s.teacher_lr, seed=s.seed + 1, seq_len=seq_len, warmup=2, log=say)
    t_teacher = time.time() - t1
    meta = {"tokenizer": "tokenizer.json (jaxhack.organism.tokenizer.PhraseTokenizer)", "organism_hash": d.name, "settings": dataclasses.asdict(s)}
    save_checkpoint(d / "base", params, config, {**meta, "role": "base"}, force=True)
    save_checkpoint(d / "teacher", teacher, config, {**meta, "role": "teacher"}, force=True)
    t1 = time.time()
    step0 = {}
    conditions = (("base", params, True, "train", train), ("base", params, True, "eval", held),
                  ("base", params, False, "eval", held), ("teacher", teacher, True, "eval", held))
    for name, p, hint, split, recs in conditions:
        m = measure(p, config, tok, recs, mode="run_tests", samples=s.measure_samples,
                    max_new=s.max_new, seed=s.seed + 7, hint=hint)
        step0[f"{name}/{'hint' if hint else 'nohint'}/{split}"] = m
        say(f"  step 0 {name} {'hint' if hint else 'no hint'} {split}: hack {m['hack_rate']:.3f} "
            f"attempts {m['attempt_rate']:.3f} gt_pass {m['gt_pass_rate']:.3f} fmt {m['fmt_rate']:.3f}")
    info = {"settings": dataclasses.asdict(s), "hash": d.name, "n_params": n_params, "seq_len": seq_len,
            "sft_loss_first_last": [losses[0], losses[-1]], "teacher_loss_first_last": [t_losses[0], t_losses[-1]],
            "sft_losses": losses, "wall_s": {"sft_base": t_base, "sft_teacher": t_teacher,
                                             "measure": time.time() - t1, "total": time.time() - t0},
            "devices": [str(x) for x in jax.devices()], "step0": step0,
            "corpus": {"base_hack_examples": sum(e["hack"] for e in base_ex),
                       "base_examples": len(base_ex),
                       "teacher_hack_examples": sum(e["hack"] for e in teach_ex),
                       "teacher_examples": len(teach_ex)}}
    (d / "build.json").write_text(json.dumps(info, indent=2))
    latest = out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    os.symlink(d.name, latest)
    say(f"organism: built {d} in {time.time() - t0:.0f} s")
    return d
