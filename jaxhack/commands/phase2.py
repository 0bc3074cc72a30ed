"""Phase 2 mixed-replay GRPO probe (../shared/seed/spec2.md).

    jaxhack phase2 --ckpt tiny --replay-dirs runs/teacher_pool,runs/base_pool \
        --v-hack runs/v_hack_svd --loss-mode grpo --arm vanilla --steps 20 --per-pool 4 --out runs/p2/vanilla
    (or: python scripts/phase2_replay.py ...)

Arms: vanilla (SVD basis, measure only), projected (SVD basis, one-sided erase), lora_projected (LoRA
basis, erase; --v-hack must then be a LoRA-basis v_hack, whose meta gives rank/alpha/seed). Writes
OUT/step_NNN.cos.jsonl.gz (slim schema) and OUT/run.json; then run `jaxhack analyze`.
"""
from __future__ import annotations

from jaxhack.commands import fail, script_main
from jaxhack.probes.phase2 import (ARMS, ReplaySettings, load_probe_setup, load_replay_pool, run_replay,
                                   v_hack_control)


def add_probe_arguments(ap) -> None:
    """The flags Phase 1 and Phase 2 share."""
    ap.add_argument("--ckpt", default="tiny", help="tiny | random-4b | checkpoint name or path")
    ap.add_argument("--v-hack", required=True, help="directory written by `jaxhack extract`")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.0,
                    help="> 0: the Phase 3 chain (projection -> clip -> adamw) steps delta_s, so the arms "
                         "diverge; 0: the pure probe (measure at init)")
    ap.add_argument("--gate", default="one_sided", choices=("one_sided", "no_gate", "reverse", "anti_one_sided"))
    ap.add_argument("--overshoot", type=float, default=1.0)
    ap.add_argument("--max-completion-tokens", type=int, default=None,
                    help="cut completions (default: none, the pool's own length; a cut is warned)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="keep the prompt's last N tokens")
    ap.add_argument("--remat", default="linear", choices=("none", "full", "dots", "linear"),
                    help="linear: no matmul recomputed, 61 GB at Qwen3-4B, G=8 x 1.5k (fits 80 GB); "
                         "full: least memory (24 GB), 25%% slower; dots: 84 GB; none: CPU/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)


def probe_settings(args, arm: str, loss_mode: str, per_pool: int) -> ReplaySettings:
    return ReplaySettings(arm=arm, loss_mode=loss_mode, steps=args.steps, per_pool=per_pool, lr=args.lr,
                          seed=args.seed, gate=args.gate, overshoot=args.overshoot,
                          max_completion_tokens=args.max_completion_tokens,
                          max_prompt_tokens=args.max_prompt_tokens, remat=args.remat)


def add_arguments(ap) -> None:
    ap.add_argument("--replay-dirs", required=True, help="comma-separated pool dirs, e.g. TEACHER,BASE")
    ap.add_argument("--loss-mode", default="grpo", choices=("grpo", "nll"))
    ap.add_argument("--arm", default="vanilla", choices=sorted(ARMS))
    ap.add_argument("--per-pool", type=int, default=4)
    add_probe_arguments(ap)


def run(args) -> int:
    kind, _ = ARMS[args.arm]
    try:
        params, config, tokenizer, desc, trainable, frozen, v_hack = load_probe_setup(
            args.ckpt, args.v_hack, kind, args.seed)
    except (ValueError, FileNotFoundError) as err:
        return fail(err)
    pools = [load_replay_pool(d) for d in args.replay_dirs.split(",") if d]
    settings = probe_settings(args, args.arm, args.loss_mode, args.per_pool)
    records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, args.out,
                         run_info={"model": desc, "v_hack": str(args.v_hack), "phase": 2,
                                   "v_hack_control": v_hack_control(args.v_hack)})
    steps = {r["step"]: (r["mean_cos_in"], r["mean_cos_out"], r["frac_fired"]) for r in records}
    below = sum(1 for cin, cout, _ in steps.values() if cout < cin)
    mean_in = sum(c for c, _, _ in steps.values()) / len(steps)
    print(f"{args.arm}: {len(records)} samples over {len(steps)} steps; mean cos_in={mean_in:+.4f}; "
          f"cos_out < cos_in on {below}/{len(steps)} steps -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
