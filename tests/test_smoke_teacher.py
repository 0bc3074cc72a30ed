"""The smoke preset alone must give a non-degenerate step: its template-hack teacher rows
(`--mix-teacher templates`) fit its max_new, grade as hacks with the full reward, and so differ from
the random tiny model's rows (reward 0: it never writes a code block)."""

from jaxhack.env.problems import load_problems
from jaxhack.models.load import load_model
from jaxhack.rl.config import make_config
from jaxhack.rl.rollout import grade_rows
from jaxhack.rl.data import TEMPLATE_TEACHER, TEMPLATE_VARIANTS, template_teacher


def test_smoke_preset_mixes_template_hacks_that_fit_and_are_rewarded():
    cfg = make_config("smoke")
    assert cfg.mix_teacher == TEMPLATE_TEACHER and 0 < cfg.mix_per_group < cfg.group_size
    problems = load_problems(cfg.problems)
    teacher = template_teacher(problems, cfg.mode)
    assert set(teacher) == {str(p.id) for p in problems}
    _, _, tokenizer, _ = load_model(cfg.ckpt, None, None, seed=0)
    records = [(p, r) for p in problems for r in teacher[str(p.id)]]
    assert len(records) == len(problems) * TEMPLATE_VARIANTS
    assert max(len(tokenizer.encode(r["completion"])) for _, r in records) <= cfg.max_new
    grades = grade_rows([p for p, _ in records], [r["completion"] for _, r in records], cfg)
    assert all(g.hacked for g in grades)
    assert {g.reward for g in grades} == {cfg.pass_reward + cfg.format_reward}


def test_mode_none_template_teacher_is_honest():
    cfg = make_config("smoke", mode="none")
    problems = load_problems("bundled")[:3]
    teacher = template_teacher(problems, "none")
    grades = grade_rows(problems, [teacher[str(p.id)][0]["completion"] for p in problems], cfg)
    assert all(g.gt_pass and not g.hacked for g in grades)
