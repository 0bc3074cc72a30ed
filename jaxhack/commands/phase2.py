"""Phase 2 mixed-replay GRPO probe (../shared/seed/spec2.md).

    jaxhack phase2 --ckpt tiny --replay-dirs runs/teacher_pool,runs/base_pool \
        --v-hack runs/v_hack_svd --loss-mode grpo --arm vanilla --steps 20 --per-pool 4 --out runs/p2/vanilla
    jaxhack phase2 --config runs/p2/vanilla/run.json --out runs/p2/vanilla_again   # rerun it exactly
    (or: python scripts/phase2_replay.py ...)

Arms: vanilla (SVD basis, measure only), projected (SVD basis, one-sided erase), lora_projected (LoRA
basis, erase; --v-hack must then be a LoRA-basis v_hack, whose meta gives rank/alpha/seed). Writes
OUT/step_NNN.cos.jsonl.gz (slim schema) and OUT/run.json; then run `jaxhack analyze`.
OUT is written in a temporary sibling directory and moved into place when complete; an existing run
in OUT is refused unless --force (which replaces it whole); --run-dir is the same flag as --out.
Sequence sizes default to the model: small for --ckpt tiny, GPU-sized otherwise.

run.json's "config" records every input (paths as given; "config_paths": resolved absolute), and
--config FILE takes it back: a Phase 2 run.json, or a JSON / YAML file of those fields; flags given
explicitly override the file (docs/analysis.md, "Run configs").
"""
from __future__ import annotations

import sys
from pathlib import Path

from jaxhack.commands import checks, script_main
from jaxhack.io import atomic_directory, claim_run_dir
from jaxhack.probes import replay_config
from jaxhack.probes.phase2 import ARMS, ReplaySettings, load_replay_pool, run_replay, v_hack_control
from jaxhack.probes.records import read_run_info
from jaxhack.tracking import TrackingUnavailable, add_tracking_args, settings_from_args


# Defaults of the flags Phase 1 and Phase 2 share. The flags themselves default to None ("not given"),
# so that a --config file's value is overridden only by flags given explicitly.
PROBE_DEFAULTS = {"ckpt": "tiny", "tokenizer": None, "steps": 20, "lr": 0.0, "gate": "one_sided",
                  "overshoot": 1.0, "seed": 0, "allow_partial": False}
SIZE_FIELDS = ("max_completion_tokens", "max_prompt_tokens", "remat", "pad_multiple")  # checks.model_sizes
PHASE2_DEFAULTS = {**PROBE_DEFAULTS, "loss_mode": "grpo", "arm": "vanilla", "per_pool": 4}


def add_probe_arguments(ap) -> None:
    """The flags Phase 1 and Phase 2 share."""
    d = PROBE_DEFAULTS
    ap.add_argument("--ckpt", default=None, help=f"tiny | random-4b | checkpoint name or path (default: {d['ckpt']})")
    ap.add_argument("--tokenizer", default=None,
                    help='"byte" or a local HF tokenizer dir (default: the checkpoint\'s own)')
    ap.add_argument("--v-hack", default=None, help="directory written by `jaxhack extract` (required)")
    ap.add_argument("--steps", type=int, default=None, help=f"probe steps (default: {d['steps']})")
    ap.add_argument("--lr", type=float, default=None,
                    help="> 0: the Phase 3 chain (projection -> clip -> adamw) steps delta_s, so the arms "
                         f"diverge; 0: the pure probe (measure at init) (default: {d['lr']})")
    ap.add_argument("--gate", default=None, choices=replay_config.CHOICES["gate"],
                    help=f"projection gate of the projected arms (docs/projection.md) (default: {d['gate']})")
    ap.add_argument("--overshoot", type=float, default=None,
                    help=f"projection overshoot factor (default: {d['overshoot']})")
    ap.add_argument("--max-completion-tokens", type=int, default=None,
                    help="truncate completions (default: 192 for --ckpt tiny, else no cut; a cut is warned)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="keep the prompt's last N tokens (default: 320 for --ckpt tiny, else all)")
    ap.add_argument("--remat", default=None, choices=replay_config.CHOICES["remat"],
                    help="linear: no matmul recomputed, 61 GB at Qwen3-4B, G=8 x 1.5k (fits 80 GB); "
                         "full: least memory (24 GB), 25%% slower; dots: 84 GB; none: CPU/tiny "
                         "(default: none for --ckpt tiny, else linear)")
    ap.add_argument("--seed", type=int, default=None,
                    help="sampling seed of the probe groups (and of the embedded models' weights) "
                         f"(default: {d['seed']})")
    ap.add_argument("--out", "--run-dir", dest="out", required=True, type=Path, help="run directory to write")
    ap.add_argument("--force", action="store_true", help="replace an existing run in --out")
    ap.add_argument("--allow-partial", action="store_true", default=None,
                    help="accept pools whose pool.json says complete: false (stated in run.json and the report)")


def probe_values(args, defaults: dict, from_file: dict | None = None, renamed: dict | None = None) -> dict:
    """A probe run's inputs: `defaults` <- the --config file's fields <- the flags given explicitly
    (not None), then the model-sized defaults (`checks.model_sizes`) for the size fields still unset.
    renamed: config field -> the flag's dest where they differ (Phase 1's --per-step is per_pool)."""
    renamed = renamed or {}
    names = set(defaults) | set(replay_config.config_fields())
    typed = {n: getattr(args, renamed.get(n, n)) for n in names if getattr(args, renamed.get(n, n), None) is not None}
    values = {**defaults, **(from_file or {}), **typed}
    sizes = checks.model_sizes(values["ckpt"])
    for name in SIZE_FIELDS:
        values.setdefault(name, sizes[name])
    return values


def probe_settings(values: dict) -> ReplaySettings:
    """The ReplaySettings of merged probe values (fields missing: ReplaySettings' defaults)."""
    return ReplaySettings(**{f: values[f] for f in replay_config.SETTINGS_FIELDS if f in values})


def check_probe_args(values: dict, per_pool_flag: str, out: Path, force: bool) -> None:
    """Everything about the inputs that can be checked before loading anything; claims `out`."""
    if values.get("v_hack") is None:
        raise checks.UserError("--v-hack is required" + (" (or --config FILE that gives v_hack)"
                                                          if "replay_dirs" in values else ""))
    checks.positive("--steps", values["steps"])
    checks.positive(per_pool_flag, values["per_pool"])
    if values["lr"] < 0:
        raise checks.UserError(f"--lr must be >= 0, got {values['lr']}")
    for flag in ("max_completion_tokens", "max_prompt_tokens", "pad_multiple", "chunk"):
        if values.get(flag) is not None:
            checks.positive("--" + flag.replace("_", "-"), values[flag])
    try:
        probe_settings(values).check()
    except ValueError as err:
        raise checks.UserError(str(err)) from None
    checks.check_ckpt(values["ckpt"])
    checks.existing("--v-hack", values["v_hack"])
    claim_run_dir(out, what="probe run", force=force,
                  finished=lambda p: read_run_info(p).get("status") == "done")


def probe_setup(values: dict, adapter: str):
    """(params, config, tokenizer, desc, trainable, frozen, v_hack, adapter_info) with the v_hack checked
    against the model's adapter (kind, shapes, basis fingerprint) before any probe work; adapter_info:
    what the adapter basis was built from (run.json "adapter")."""
    from jaxhack.models.load import make_adapter, svd_cache_dir

    path = values["v_hack"]
    v_hack, meta = checks.load_v_hack_checked("--v-hack", path, adapter)
    params, config, tokenizer, desc = checks.load_model_checked(values["ckpt"], values["tokenizer"], values["seed"])
    checks.check_v_hack_shape("--v-hack", path, v_hack, meta, params, adapter)  # before the SVD
    lora = {"lora_rank": int(meta.get("lora_rank", 8)), "lora_alpha": float(meta.get("lora_alpha", 16.0)),
            "lora_seed": int(meta.get("lora_seed", 0))}
    trainable, frozen = make_adapter(adapter, params, config, ckpt=values["ckpt"], **lora)
    checks.check_v_hack_fits("--v-hack", path, v_hack, meta, trainable, frozen)
    cache = svd_cache_dir(values["ckpt"]) if adapter == "svd" else None
    info = {"kind": adapter, **({"svd_cache": str(cache.resolve()) if cache else None} if adapter == "svd" else lora)}
    return params, config, tokenizer, desc, trainable, frozen, v_hack, info


def load_pools(flag: str, dirs: list[str], allow_partial: bool) -> tuple[list, list[str]]:
    """(replay pools, notes on partial pools accepted with --allow-partial)."""
    notes = [n for n in (checks.check_pool(flag, d, allow_partial) for d in dirs) if n]
    try:
        return [load_replay_pool(d) for d in dirs], notes
    except ValueError as err:
        raise checks.UserError(f"{flag}: {err}") from None


def config_file_fields(args, command: str, renamed: dict | None = None) -> dict | None:
    """The --config file's fields for `command` (phase1 / phase2), None without --config; its warnings
    (an input changed since the run) on stderr. renamed: config field -> the flag's dest where they
    differ (a typed flag's field is not checked to exist: the flag replaces it)."""
    if not args.config:
        return None
    renamed = renamed or {}
    typed = {n for n in replay_config.config_fields() if getattr(args, renamed.get(n, n), None) is not None}
    try:
        fields, warnings = replay_config.read_phase2_config(args.config, overridden=typed, command=command)
    except ValueError as err:
        raise checks.UserError(str(err)) from None
    for line in warnings:
        print(line, file=sys.stderr)
    return fields


def probe_run_info(args, phase: int, desc: str, values: dict, settings: ReplaySettings, adapter: dict,
                   notes: list[str], **extra) -> dict:
    """run.json's keys of a Phase 1 / Phase 2 run: model, v_hack, the run config (`replay_config`),
    the adapter, the run directory, the --config file and the partial inputs accepted."""
    return {"model": desc, "v_hack": str(values["v_hack"]), "phase": phase, **extra,
            **replay_config.run_config(values, settings), "adapter": adapter,
            "out": {"given": str(args.out), "resolved": str(Path(args.out).resolve())},
            **({"config_file": str(Path(args.config).resolve())} if args.config else {}),
            **({"partial_inputs": notes} if notes else {})}


def add_arguments(ap) -> None:
    ap.add_argument("--config", default=None, metavar="FILE",
                    help="a Phase 2 run's run.json (rerun it; give a new --out) or a JSON / YAML file of its "
                         "\"config\" fields; flags given explicitly override the file")
    ap.add_argument("--replay-dirs", default=None,
                    help="comma-separated pool dirs, e.g. TEACHER,BASE (required unless --config gives them)")
    ap.add_argument("--loss-mode", default=None, choices=("grpo", "nll"),
                    help=f"per-sample loss (default: {PHASE2_DEFAULTS['loss_mode']})")
    ap.add_argument("--arm", default=None, choices=sorted(ARMS), help=f"probe arm (default: {PHASE2_DEFAULTS['arm']})")
    ap.add_argument("--per-pool", type=int, default=None,
                    help=f"samples drawn from each pool per step (default: {PHASE2_DEFAULTS['per_pool']})")
    add_probe_arguments(ap)
    add_tracking_args(ap)


def phase2_values(args) -> dict:
    """Every input of the run: defaults <- the --config file <- flags given explicitly."""
    if isinstance(args.replay_dirs, str):
        dirs = [d for d in args.replay_dirs.split(",") if d]
        if not dirs:
            raise checks.UserError("--replay-dirs: give at least one pool directory")
        args.replay_dirs = dirs
    values = probe_values(args, PHASE2_DEFAULTS, config_file_fields(args, "phase2"))
    if not values.get("replay_dirs"):
        raise checks.UserError("--replay-dirs is required (or --config FILE that gives replay_dirs)")
    return values


def run(args) -> int:
    values = phase2_values(args)
    check_probe_args(values, "--per-pool", args.out, args.force)
    try:
        tracking = settings_from_args(args)
    except TrackingUnavailable as err:
        raise checks.UserError(str(err)) from None
    kind, _ = ARMS[values["arm"]]
    pools, notes = load_pools("--replay-dirs", values["replay_dirs"], values["allow_partial"])
    params, config, tokenizer, desc, trainable, frozen, v_hack, adapter = probe_setup(values, kind)
    settings = probe_settings(values)
    info = probe_run_info(args, 2, desc, values, settings, adapter, notes,
                          v_hack_control=v_hack_control(values["v_hack"]))
    with atomic_directory(args.out) as work:
        records = run_replay(pools, params, config, tokenizer, trainable, frozen, v_hack, settings, work,
                             run_info=info, tracking=tracking.with_tags(name=args.out.name))
    steps = {r["step"]: (r["mean_cos_in"], r["mean_cos_out"], r["frac_fired"]) for r in records}
    below = sum(1 for cin, cout, _ in steps.values() if cout < cin)
    mean_in = sum(c for c, _, _ in steps.values()) / len(steps)
    print(f"{settings.arm}: {len(records)} samples over {len(steps)} steps; mean cos_in={mean_in:+.4f}; "
          f"cos_out < cos_in on {below}/{len(steps)} steps -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
