"""Convert a local Hugging Face Qwen3 directory (+ optional PEFT LoRA, merged) to an orbax checkpoint.

    jaxhack convert --hf-dir /models/Qwen3-4B --name qwen3-4b [--lora-dir DIR]
                    [--dtype bfloat16|float32] [--out-root checkpoints] [--force]
    (or: python scripts/convert.py ...)

Writes OUT_ROOT/NAME/{params/, config.json, metadata.json}; load with
`jaxhack.checkpoint.load_checkpoint(NAME)`.
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from jaxhack.checkpoint import save_checkpoint
from jaxhack.commands import fail, script_main
from jaxhack.commands.checks import existing
from jaxhack.io import UserError, check_writable
from jaxhack.models.convert import DTYPES, count_params, load_hf_params
from jaxhack.tokenizer import HF_TOKENIZER_FILES

TOKENIZER_FILES = HF_TOKENIZER_FILES + ("generation_config.json",)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def copy_tokenizer_files(hf_dir: Path, out_dir: Path) -> list[str]:
    """Copy the HF tokenizer files that exist into CKPT/tokenizer/ so the checkpoint is self-contained."""
    present = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if present:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in present:
            shutil.copyfile(hf_dir / f, out_dir / f)
    return present


def add_arguments(ap) -> None:
    ap.add_argument("--hf-dir", required=True, type=Path, help="local HF model directory (config.json + safetensors)")
    ap.add_argument("--name", required=True, help="checkpoint name (directory under --out-root)")
    ap.add_argument("--lora-dir", type=Path, default=None, help="PEFT LoRA adapter directory to merge")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="parameter dtype")
    ap.add_argument("--out-root", type=Path, default=Path("checkpoints"), help="checkpoints directory")
    ap.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    out = args.out_root / args.name
    if out.exists() and not args.force:
        return fail(f"{out} already exists (use --force to overwrite)")
    existing("--hf-dir", args.hf_dir, "dir")
    if args.lora_dir is not None:
        existing("--lora-dir", args.lora_dir, "dir")
    check_writable(out)
    t0 = time.time()
    try:
        params, config = load_hf_params(args.hf_dir, dtype=args.dtype, lora_dir=args.lora_dir,
                                        progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(e) from None
    t_convert, rss_convert = time.time() - t0, peak_rss_gib()
    n = count_params(params)
    metadata = {"source": str(args.hf_dir.resolve()), "lora": str(args.lora_dir.resolve()) if args.lora_dir else None,
                "dtype": args.dtype, "n_params": n}
    path = save_checkpoint(out, params, config, metadata=metadata, force=args.force)
    copied = copy_tokenizer_files(args.hf_dir, path / "tokenizer")
    dt = time.time() - t0
    print(f"converted {args.hf_dir} -> {path}")
    print(f"  layers={config.num_hidden_layers} hidden={config.hidden_size} vocab={config.vocab_size} "
          f"tied={config.tie_word_embeddings} lora={'merged from ' + str(args.lora_dir) if args.lora_dir else 'none'}")
    print(f"  tokenizer files: {', '.join(copied) if copied else 'none found (load_model falls back to bytes)'}")
    print(f"  parameters={n:,} ({n / 1e9:.3f} B) dtype={args.dtype}")
    print(f"  seconds: convert={t_convert:.1f} total={dt:.1f}")
    print(f"  peak RSS: after convert={rss_convert:.2f} GiB, after save={peak_rss_gib():.2f} GiB "
          "(includes page cache of the memory-mapped safetensors files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
