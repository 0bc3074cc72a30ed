"""Up-front checks of the commands' inputs: each raises `jaxhack.io.UserError` with one line naming
the flag or file and what was expected, before any model is loaded or any work is done."""
from __future__ import annotations

import json
from pathlib import Path

from jaxhack.io import UserError

CHECKPOINT_ROOT = Path("checkpoints")
EMBEDDED_CKPTS = ("tiny", "random-4b")

# Sizes of the embedded tiny model (byte tokenizer): the demo's, a few seconds per probe step on a CPU.
# A real checkpoint keeps the GPU-sized defaults of the flags; its completions are never cut by
# default (the exploit often sits at the end; a cut is warned, docs/analysis.md).
TINY_SIZES = {"max_prompt_tokens": 320, "max_completion_tokens": 192, "remat": "none", "pad_multiple": 64}
MODEL_SIZES = {"max_prompt_tokens": None, "max_completion_tokens": None, "remat": "linear", "pad_multiple": 128}


def positive(flag: str, value, minimum: int = 1) -> None:
    if value is None or value < minimum:
        raise UserError(f"{flag} must be >= {minimum}, got {value}")


def multiples(flag: str, values, of: int, why: str) -> None:
    """Each of a flag's values (a list) a multiple of `of`; `why` says what needs it."""
    bad = [v for v in values if v % of]
    if bad:
        raise UserError(f"{flag} {bad}: expected multiples of {of} ({why})")


def pallas_backend(implementation: str) -> None:
    """The benchmarks' --implementation: 'pallas' (the GPU kernels) needs a GPU; 'interpret' runs anywhere."""
    import jax

    if implementation == "pallas" and jax.default_backend() != "gpu":
        raise UserError(f"the Pallas kernels need a GPU (backend: {jax.default_backend()}); on a CPU pass "
                        "--implementation interpret --small")


def add_kernel_bench_flags(ap) -> None:
    """The flags the kernel benchmarks share (scripts/bench_decode_kernels.py, bench_fused_decode.py,
    bench_fused_mlp.py); `kernel_bench_flags` checks them."""
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="card bandwidth (H100 3.35, H200 4.8)")
    ap.add_argument("--implementation", choices=("pallas", "interpret"), default="pallas")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test with --implementation interpret)")
    ap.add_argument("--out", default=None)


def kernel_bench_flags(args) -> None:
    """`add_kernel_bench_flags`' values: a positive bandwidth, and a GPU for the Pallas kernels."""
    above_zero("--hbm-tbps", args.hbm_tbps)
    pallas_backend(args.implementation)


def at_least(args, dests: tuple[str, ...], minimum: int = 1) -> None:
    """`positive` for the argparse flags `dests` (attribute names of args, e.g. "sample_rows" for
    --sample-rows) that are set: None (not given, no default) passes; a list (nargs) is checked value
    by value."""
    for dest in dests:
        value = getattr(args, dest)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                positive("--" + dest.replace("_", "-"), v, minimum)


def above_zero(flag: str, value: float) -> None:
    """A real-valued flag that must be > 0 (NaN is refused too)."""
    if not value > 0:
        raise UserError(f"{flag} must be > 0, got {value}")


def fraction(flag: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{flag} must be within [0, 1], got {value}")


def existing(flag: str, path, kind: str = "any") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: no such file or directory")
    if kind == "dir" and not p.is_dir():
        raise UserError(f"{flag} {path}: not a directory")
    if kind == "file" and not p.is_file():
        raise UserError(f"{flag} {path}: not a file")
    return p


def checkpoint_names(root: Path = CHECKPOINT_ROOT) -> list[str]:
    names = list(EMBEDDED_CKPTS)
    if root.is_dir():
        names += sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    return names


def check_ckpt(ckpt: str, root: Path = CHECKPOINT_ROOT) -> None:
    """UserError unless `ckpt` is an embedded model, a directory, or a name under checkpoints/;
    the message lists the valid names."""
    if ckpt in EMBEDDED_CKPTS or Path(ckpt).is_dir() or (root / ckpt).is_dir():
        return
    raise UserError(f"--ckpt {ckpt!r}: no such checkpoint; valid names: {', '.join(checkpoint_names(root))} "
                    f"(or a directory written by `jaxhack convert`)")


def load_model_checked(ckpt: str, tokenizer: str | None = None, seed: int = 0, dtype: str | None = None):
    """`models.load.load_model` after `check_ckpt`; a checkpoint that cannot be read (missing
    tokenizer files, malformed config, vocab mismatch) is a UserError."""
    from jaxhack.models.load import load_model

    check_ckpt(ckpt)
    if tokenizer and tokenizer != "byte":
        existing("--tokenizer", tokenizer, "dir")
    try:
        return load_model(ckpt, dtype, tokenizer, seed=seed)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None


def model_sizes(ckpt: str) -> dict:
    """Sequence-size defaults for `ckpt`: small for the embedded tiny model, GPU-sized otherwise."""
    return dict(TINY_SIZES if ckpt == "tiny" else MODEL_SIZES)


def pool_complete(pool_dir: Path) -> bool:
    try:
        return bool(json.loads((Path(pool_dir) / "pool.json").read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def check_pool(flag: str, pool_dir, allow_partial: bool) -> str | None:
    """UserError unless `pool_dir` is a pool directory whose pool.json says complete (or
    `allow_partial`); returns a note for the report when a partial pool is accepted."""
    p = existing(flag, pool_dir, "dir")
    if not (p / "pool.json").is_file():
        raise UserError(f"{flag} {pool_dir}: not a pool directory (no pool.json; build one with `jaxhack pool`)")
    if pool_complete(p):
        return None
    if not allow_partial:
        raise UserError(f"{flag} {pool_dir}: pool.json says complete: false (the build was killed or "
                        f"failed); rebuild it, or pass --allow-partial to use its finished steps")
    return f"partial input: pool {pool_dir} is incomplete (complete: false), used with --allow-partial"


def load_v_hack_checked(flag: str, path, adapter: str | None = None):
    """(bundle, meta) of a v_hack file; UserError when it is missing, unreadable or of another
    adapter kind than `adapter`."""
    from jaxhack.projection.v_hack import load_v_hack

    existing(flag, path)
    try:
        bundle, meta = load_v_hack(path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{flag} {path}: not a v_hack written by `jaxhack extract` ({err})") from None
    if adapter and meta.get("adapter", adapter) != adapter:
        raise UserError(f"{flag} {path} is a {meta['adapter']}-basis v_hack; this arm needs {adapter}")
    return bundle, meta


def check_v_hack_shape(flag: str, path, v_hack: dict, meta: dict, params, kind: str) -> None:
    """The v_hack's adapter kind and shapes against the model's weights, before the adapter (SVD) is built."""
    from jaxhack.models.basis import BasisMismatch, check_v_hack_shape as check, expected_dims
    from jaxhack.models.config import TARGET_MODULES

    targets = [name for name in TARGET_MODULES if name in params["layers"]]
    try:
        check(v_hack, meta, expected_dims(params, kind, int(meta.get("lora_rank", 8)), targets), kind,
              f"{flag} {path}")
    except BasisMismatch as err:
        raise UserError(str(err)) from None


def check_v_hack_fits(flag: str, path, v_hack: dict, meta: dict, trainable, frozen) -> None:
    """`models.basis.check_v_hack_fits` as a UserError (shape, adapter kind, basis fingerprint)."""
    from jaxhack.models.basis import BasisMismatch, check_v_hack_fits as check

    try:
        check(v_hack, meta, trainable, frozen, f"{flag} {path}")
    except BasisMismatch as err:
        raise UserError(str(err)) from None
