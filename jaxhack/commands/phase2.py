"""Phase 2 mixed-replay GRPO probe (../shared/seed/spec2.md).

    jaxhack phase2 --ckpt tiny --replay-dirs runs/teacher_pool,runs/base_pool \
        --v-hack runs/v_hack_svd --loss-mode grpo --arm vanilla --steps 20 --per-pool 4 --out runs/p2/vanilla
    (or: python scripts/phase2_replay.py ...)

Arms: vanilla (SVD basis, measure only), projected (SVD basis, one-sided erase), lora_projected (LoRA
basis, erase; --v-hack must then be a LoRA-basis v_hack, whose meta gives rank/alpha/seed). Writes
OUT/step_NNN.cos.jsonl.gz (slim schema) and OUT/run.json; then run `jaxhack analyze`.
OUT is written in a temporary sibling directory and moved into place when complete; an existing run
in OUT is refused unless --force (which replaces it whole). Sequence sizes default to the model:
small for --ckpt tiny, GPU-sized otherwise.
"""
from __future__ import annotations

from pathlib import Path

from jaxhack.commands import checks, script_main
from jaxhack.io import atomic_directory, claim_run_dir
from jaxhack.probes.phase2 import ARMS, ReplaySettings, load_replay_pool, run_replay, v_hack_control
from jaxhack.probes.records import read_run_info
from jaxhack.tracking import TrackingUnavailable, add_tracking_args, settings_from_args


def add_probe_arguments(ap) -> None:
    """The flags Phase 1 and Phase 2 share."""
    ap.add_argument("--ckpt", default="tiny", help="tiny | random-4b | checkpoint name or path")
    ap.add_argument("--tokenizer", default=None,
                    help='"byte" or a local HF tokenizer dir (default: the checkpoint\'s own)')
    ap.add_argument("--v-hack", required=True, help="directory written by `jaxhack extract`")
    ap.add_argument("--steps", type=int, default=20, help="probe steps")
    ap.add_argument("--lr", type=float, default=0.0,
                    help="> 0: the Phase 3 chain (projection -> clip -> adamw) steps delta_s, so the arms "
                         "diverge; 0: the pure probe (measure at init)")
    ap.add_argument("--gate", default="one_sided", choices=("one_sided", "no_gate", "reverse", "anti_one_sided"),
                    help="projection gate of the projected arms (docs/projection.md)")
    ap.add_argument("--overshoot", type=float, default=1.0, help="projection overshoot factor")
    ap.add_argument("--max-completion-tokens", type=int, default=None,
                    help="truncate completions (default: 192 for --ckpt tiny, else no cut; a cut is warned)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="keep the prompt's last N tokens (default: 320 for --ckpt tiny, else all)")
    ap.add_argument("--remat", default=None, choices=("none", "full", "dots", "linear"),
                    help="linear: no matmul recomputed, 61 GB at Qwen3-4B, G=8 x 1.5k (fits 80 GB); "
                         "full: least memory (24 GB), 25%% slower; dots: 84 GB; none: CPU/tiny "
                         "(default: none for --ckpt tiny, else linear)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the probe groups")
    ap.add_argument("--out", required=True, type=Path, help="run directory to write")
    ap.add_argument("--force", action="store_true", help="replace an existing run in --out")
    ap.add_argument("--allow-partial", action="store_true",
                    help="accept pools whose pool.json says complete: false (stated in run.json and the report)")


def probe_settings(args, arm: str, loss_mode: str, per_pool: int) -> ReplaySettings:
    sizes = checks.model_sizes(args.ckpt)
    pick = lambda name: sizes[name] if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    return ReplaySettings(arm=arm, loss_mode=loss_mode, steps=args.steps, per_pool=per_pool, lr=args.lr,
                          seed=args.seed, gate=args.gate, overshoot=args.overshoot,
                          max_completion_tokens=pick("max_completion_tokens"),
                          max_prompt_tokens=pick("max_prompt_tokens"), remat=pick("remat"),
                          pad_multiple=sizes["pad_multiple"])


def check_probe_args(args, per_pool_flag: str, per_pool: int) -> None:
    """Everything about the flags that can be checked before loading anything."""
    checks.positive("--steps", args.steps)
    checks.positive(per_pool_flag, per_pool)
    if args.lr < 0:
        raise checks.UserError(f"--lr must be >= 0, got {args.lr}")
    for flag in ("max_completion_tokens", "max_prompt_tokens"):
        if getattr(args, flag) is not None:
            checks.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    checks.check_ckpt(args.ckpt)
    checks.existing("--v-hack", args.v_hack)
    claim_run_dir(args.out, what="probe run", force=args.force,
                  finished=lambda p: read_run_info(p).get("status") == "done")


def probe_setup(args, adapter: str):
    """(params, config, tokenizer, desc, trainable, frozen, v_hack) with the v_hack checked against the
    model's adapter (kind, shapes, basis fingerprint) before any probe work."""
    from jaxhack.models.load import make_adapter

    v_hack, meta = checks.load_v_hack_checked("--v-hack", args.v_hack, adapter)
    params, config, tokenizer, desc = checks.load_model_checked(args.ckpt, args.tokenizer, args.seed)
    checks.check_v_hack_shape("--v-hack", args.v_hack, v_hack, meta, params, adapter)  # before the SVD
    trainable, frozen = make_adapter(adapter, params, config, ckpt=args.ckpt,
                                     lora_rank=int(meta.get("lora_rank", 8)),
                                     lora_alpha=float(meta.get("lora_alpha", 16.0)),
                                     lora_seed=int(meta.get("lora_seed", 0)))
    checks.check_v_hack_fits("--v-hack", args.v_hack, v_hack, meta, trainable, frozen)
    return params, config, tokenizer, desc, trainable, frozen, v_hack


def load_pools(flag: str, dirs: list[str], allow_partial: bool) -> tuple[list, list[str]]:
    """(replay pools, notes on partial pools accepted with --allow-partial)."""
    notes = [n for n in (checks.check_pool(flag, d, allow_partial) for d in dirs) if n]
    try:
        return [load_replay_pool(d) for d in dirs], notes
    except ValueError as err:
        raise checks.UserError(f"{flag}: {err}") from None


def add_arguments(ap) -> None:
    ap.add_argument("--replay-dirs", required=True, help="comma-separated pool dirs, e.g. TEACHER,BASE")
    ap.add_argument("--loss-mode", default="grpo", choices=("grpo", "nll"), help="per-sample loss")
    ap.add_argument("--arm", default="vanilla", choices=sorted(ARMS), help="probe arm")
    ap.add_argument("--per-pool", type=int, default=4, help="samples drawn from each pool per step")
    add_probe_arguments(ap)
    add_tracking_args(ap)


def run(args) -> int:
    dirs = [d for d in args.replay_dirs.split(",") if d]
    if not dirs:
        raise checks.UserError("--replay-dirs: give at least one pool directory")
    check_probe_args(args, "--per-pool", args.per_pool)
    try:
        tracking = settings_from_args(args)
    except TrackingUnavailable as err:
        raise checks.UserError(str(err)) from None
    kind, _ = ARMS[args.arm]
    pools, notes = load_pools("--replay-dirs", dirs, args.allow_partial)
    params, config, tokenizer, desc, trainable, frozen, v_hack = probe_setup(args, kind)
    settings = probe_settings(args, args.arm, args.loss_mode, args.per_pool)
    info = {"model": desc, "v_hack": str(args.v_hack), "phase": 2, "v_hack_control": v_hack_control(args.v_hack),
            **({"partial_inputs": notes} if notes else {})}
    with atomic_directory(args.out) as work:
        records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, work,
                             run_info=info, tracking=tracking.with_tags(name=args.out.name))
    steps = {r["step"]: (r["mean_cos_in"], r["mean_cos_out"], r["frac_fired"]) for r in records}
    below = sum(1 for cin, cout, _ in steps.values() if cout < cin)
    mean_in = sum(c for c, _, _ in steps.values()) / len(steps)
    print(f"{args.arm}: {len(records)} samples over {len(steps)} steps; mean cos_in={mean_in:+.4f}; "
          f"cos_out < cos_in on {below}/{len(steps)} steps -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
