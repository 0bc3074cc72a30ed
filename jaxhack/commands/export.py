"""Export a Phase 3 run's trained policy to Hugging Face (docs/export.md).

    jaxhack export --run-dir runs/p3/projected_s0 --out hf/projected_s0            # merged model, fp32
    jaxhack export --run-dir RUN --step 10 --out HF_DIR --dtype bf16                # rounds small deltas away
    jaxhack export --run-dir RUN --out ADAPTER_DIR --adapter-only                   # delta_s / PEFT LoRA
    jaxhack export --run-dir RUN --out BASE_DIR --base-only                         # the base it applies to

Merged: an HF Qwen3 directory (config.json, generation_config.json, safetensors shards, the tokenizer
files when the run's checkpoint had them, jaxhack_export.json) that
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads offline. The adapter is merged in
fp32 and cast once: SVD W + U diag(delta_s + delta_s_hack) Vh, LoRA W + scale B A.
--adapter-only: SVD arms -> adapter.safetensors (delta_s, delta_s_hack per module) + adapter.json
(SVD cache key and basis fingerprint); LoRA arms -> PEFT's adapter_config.json +
adapter_model.safetensors (load with peft.PeftModel.from_pretrained(base, ADAPTER_DIR)).
--ablate-hack zeroes delta_s_hack first (the route arm's deploy policy).
"""
from __future__ import annotations

from pathlib import Path

from jaxhack.commands import checks, script_main
from jaxhack.io import UserError, atomic_directory, claim_run_dir


def add_arguments(ap) -> None:
    ap.add_argument("--run-dir", required=True, type=Path, help="Phase 3 run directory (run.json + ckpt/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--adapter-only", action="store_true", help="write the trained adapter alone")
    what.add_argument("--base-only", action="store_true",
                      help="write the base model without the adapter (what --adapter-only output applies to)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="weight dtype of a merged export (bf16 rounds most of a small trained delta away: "
                         "docs/export.md)")
    ap.add_argument("--ablate-hack", action="store_true",
                    help="zero delta_s_hack before exporting (the route arm's deploy adapter)")
    ap.add_argument("--max-shard-mb", type=float, default=5000.0, help="safetensors shard size of a merged export")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")


def run(args) -> int:
    from jaxhack.models import export as E
    from jaxhack.rl.policy import load_trained_policy
    from jaxhack.rl.trainer import ablate_hack

    checks.existing("--run-dir", args.run_dir, "dir")
    checks.above_zero("--max-shard-mb", args.max_shard_mb)
    if args.step is not None:
        checks.positive("--step", args.step)
    claim_run_dir(args.out, what="export", force=args.force,
                  finished=lambda p: (p / E.EXPORT_META).is_file() or (p / E.ADAPTER_META).is_file())
    try:
        policy = load_trained_policy(args.run_dir, args.step)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(" ".join(str(err).split())) from None
    trainable = ablate_hack(policy.trainable) if args.ablate_hack else policy.trainable
    provenance = {"run_dir": str(Path(args.run_dir).resolve()), "step": policy.step, "arm": policy.cfg.arm,
                  "seed": policy.cfg.seed, "ckpt": policy.cfg.ckpt, "ablate_hack": bool(args.ablate_hack),
                  "tokenizer": getattr(policy.tokenizer, "name", "?")}
    kind = "base" if args.base_only else ("adapter" if args.adapter_only else "merged")
    with atomic_directory(args.out) as work:
        if args.adapter_only and "delta_s" in next(iter(trainable.values())):
            E.write_svd_adapter(work, policy.params, trainable, policy.frozen, provenance)
        elif args.adapter_only:
            base = str(policy.source_dir or policy.cfg.ckpt)
            E.write_peft_lora(work, trainable, policy.frozen, base, provenance)
        else:
            gen = next((d / "generation_config.json" for d in (policy.tokenizer_dir, policy.source_dir)
                        if d is not None and (d / "generation_config.json").is_file()), None)
            meta = E.write_hf_model(work, policy.params, policy.config,
                                    None if args.base_only else trainable,
                                    None if args.base_only else policy.frozen, dtype=args.dtype,
                                    max_shard_bytes=int(args.max_shard_mb * 2**20), tokenizer_dir=policy.tokenizer_dir,
                                    generation_config=gen, provenance=provenance)
            if not meta["tokenizer_files"]:
                print(f"note: the run's tokenizer is {provenance['tokenizer']!r}: no HF tokenizer files written")
    if args.dtype == "bf16" and kind == "merged":
        print("note: bf16 rounds most of a small trained delta away (docs/export.md); --dtype fp32 keeps it")
    print(f"exported {kind} ({policy.cfg.arm}, step {policy.step}) of {args.run_dir} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
