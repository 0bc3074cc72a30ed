"""Phase 1: NLL distillation probe over a teacher pool (../shared/seed/spec2.md, "Phase 1").

The replay machinery of `phase2.py` with loss_mode "nll" and the teacher pool alone: every step takes
G samples of the pool, computes each one's NLL gradient (vmap of grad) and its cosine with v_hack,
and pushes the batch gradient through the arm's projection (cos_in / cos_out / frac_fired per step).
The per-sample cosines are then split into pure-hack samples (hacked: the flawed grader passed, the
oracle failed) and hack+correct samples (passed and gt_pass: in a teacher pool, whose prompts carry
the hint, these attempt the hack on top of a correct solution), compared with Welch's t-test.
"""
from __future__ import annotations

import dataclasses

from jaxhack.probes.stats import summarize, welch_t_test


def split_pure_vs_correct(records: list[dict]) -> dict:
    """Summary of cos_S_contrib for pure-hack (hacked) vs hack+correct samples, with Welch's t-test.
    hack+correct = attempted_hack and gt_pass where the records carry attempted_hack (the grader's
    label); honest-correct = gt_pass and not attempted_hack is then reported too. Records without the
    label fall back to not hacked and gt_pass (which also counts honest correct answers)."""
    labelled = bool(records) and all("attempted_hack" in r for r in records)
    pure = [r["cos_S_contrib"] for r in records if r["hacked"]]
    if labelled:
        correct = [r["cos_S_contrib"] for r in records if r["attempted_hack"] and r["gt_pass"] and not r["hacked"]]
        honest = [r["cos_S_contrib"] for r in records if r["gt_pass"] and not r["attempted_hack"]]
    else:
        correct = [r["cos_S_contrib"] for r in records if (not r["hacked"]) and r["gt_pass"]]
        honest = []
    test = welch_t_test(pure, correct)
    steps = {}
    for r in records:
        steps[r["step"]] = (r["mean_cos_in"], r["mean_cos_out"], r["frac_fired"])
    reduced = sum(1 for cin, cout, _ in steps.values() if cout < cin)
    return {
        "pure_hack": dataclasses.asdict(summarize(pure)),
        "hack_correct": dataclasses.asdict(summarize(correct)),
        "honest_correct": dataclasses.asdict(summarize(honest)),
        "hack_correct_rule": "attempted_hack and gt_pass" if labelled else "not hacked and gt_pass (no attempted_hack)",
        "welch_t": test.t, "welch_dof": test.dof, "welch_p": test.p_two_sided,
        "n_steps": len(steps), "steps_cos_out_below_in": reduced,
        "mean_frac_fired": sum(f for _, _, f in steps.values()) / max(len(steps), 1),
    }


def format_split(split: dict) -> str:
    def line(name, s):
        return (f"  {name:<13} n={s['n']:<4} mean cos={s['mean']:+.4f} "
                f"95% CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]")
    return "\n".join([
        "Phase 1 (NLL distillation): per-sample cos(NLL grad, v_hack)",
        line("pure hack", split["pure_hack"]), line("hack+correct", split["hack_correct"]),
        line("honest-correct", split["honest_correct"]) if split.get("honest_correct", {}).get("n") else
        f"  (hack+correct = {split.get('hack_correct_rule', 'not hacked and gt_pass')})",
        f"  Welch t={split['welch_t']:+.3f} dof={split['welch_dof']:.1f} p={split['welch_p']:.3g}",
        f"  projection: cos_out < cos_in on {split['steps_cos_out_below_in']}/{split['n_steps']} steps, "
        f"mean frac_fired={split['mean_frac_fired']:.3f}",
    ])
