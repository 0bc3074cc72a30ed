"""Extract v_hack (per-module hack directions) from contrastive (hack, clean) completions.

    jaxhack extract --ckpt tiny --adapter svd --pairs-from templates \
        --problems bundled --mode run_tests --out runs/v_hack_svd
    jaxhack extract --ckpt qwen3-4b --adapter svd --pairs-from pools \
        --teacher runs/teacher_pool --base runs/base_pool --out runs/v_hack_svd
    jaxhack extract ... --pairs-from file --pairs pairs.jsonl   # {prompt, hack, clean}
    (or: python scripts/extract_vhack.py ...)

Negative controls: --control random (random orthonormal V, matched k), shuffled (label-shuffled
pairs), clean_vs_clean (two clean completions per problem). Writes OUT/{tree/, meta.json,
v_hack.safetensors}; the meta records the adapter settings a later probe needs to rebuild the basis
and a fingerprint of the basis factors (checked wherever the v_hack is used). Sequence sizes
default to the model (small for --ckpt tiny).
"""
from __future__ import annotations

from pathlib import Path

from jaxhack.commands import checks, script_main
from jaxhack.env.hints import MODES
from jaxhack.env.problems import ProblemFormatError, load_problems
from jaxhack.io import UserError, claim_run_dir
from jaxhack.models.basis import FINGERPRINT_KEY, basis_fingerprint
from jaxhack.models.load import make_adapter
from jaxhack.projection import pairs as pairs_lib
from jaxhack.projection.v_hack import META_FILE, extract_v_hack, random_v_hack, save_v_hack


def build_pairs(args) -> list:
    """The contrastive pairs; UserError for a missing flag or a malformed input file."""
    if args.pairs_from == "templates":
        try:
            problems = load_problems(args.problems)
        except (ProblemFormatError, OSError) as err:
            raise UserError(err) from None
        if args.n_problems:
            problems = problems[: args.n_problems]
        return pairs_lib.pairs_from_env_templates(problems, args.mode,
                                                  pairs_lib.pair_variants(args.variants, args.seed))
    try:
        if args.pairs_from == "pools":
            if not (args.teacher and args.base):
                raise UserError("--pairs-from pools needs --teacher DIR and --base DIR")
            for flag, d in (("--teacher", args.teacher), ("--base", args.base)):
                checks.check_pool(flag, d, args.allow_partial)
            pairs = pairs_lib.pairs_from_pools(args.teacher, args.base, max_per_problem=args.max_per_problem,
                                               require_gt_pass=args.require_gt_pass)
        else:
            if not args.pairs:
                raise UserError("--pairs-from file needs --pairs FILE.jsonl")
            checks.existing("--pairs", args.pairs, "file")
            pairs = pairs_lib.read_pairs_jsonl(args.pairs)
    except (ValueError, OSError) as err:  # the readers' messages name the file, line and field
        raise UserError(err) from None
    check_text(pairs, args.pairs if args.pairs_from == "file" else "pools")
    return pairs


def check_text(pairs: list, where) -> None:
    """Every string must be encodable (a lone surrogate such as "\\ud800" is not text)."""
    for i, pair in enumerate(pairs, start=1):
        for field in ("prompt", "hack", "clean"):
            try:
                getattr(pair, field).encode("utf-8")
            except UnicodeEncodeError as err:
                raise UserError(f"{where}: pair {i}: field {field!r}: not valid text ({err.reason} at "
                                f"position {err.start})") from None


def add_arguments(ap) -> None:
    ap.add_argument("--ckpt", default="tiny", help="tiny | random-4b | checkpoint name or path")
    ap.add_argument("--tokenizer", default=None,
                    help='"byte" or a local HF tokenizer dir (default: the checkpoint\'s own)')
    ap.add_argument("--adapter", choices=("svd", "lora"), default="svd", help="basis of the v_hack")
    ap.add_argument("--pairs-from", choices=("templates", "pools", "file"), default="templates",
                    help="where the (hack, clean) pairs come from")
    ap.add_argument("--problems", default="bundled", help='templates: problems jsonl, or "bundled"')
    ap.add_argument("--n-problems", type=int, default=0, help="use the first N problems (0: all)")
    ap.add_argument("--mode", default="run_tests", choices=MODES, help="templates: loophole mode")
    ap.add_argument("--variants", type=int, default=3, help="template pairs per problem")
    ap.add_argument("--teacher", help="pools: teacher pool dir")
    ap.add_argument("--base", help="pools: base pool dir")
    ap.add_argument("--pairs", help="file: jsonl of {prompt, hack, clean}")
    ap.add_argument("--allow-partial", action="store_true", help="pools: accept pools with complete: false")
    ap.add_argument("--max-per-problem", type=int, default=None, help="pools: pairs per problem (default: all)")
    ap.add_argument("--require-gt-pass", action="store_true",
                    help="pools: the clean side must also pass the ground-truth tests (correct, not just "
                         "not hacked)")
    ap.add_argument("--control", choices=("none", "random", "shuffled", "clean_vs_clean"), default="none",
                    help="negative control")
    ap.add_argument("--k", type=int, default=1, help="directions per module")
    ap.add_argument("--axis-threshold", type=float, default=None, help="keep directions above this agreement")
    ap.add_argument("--noise-floor-quantile", type=float, default=None, help="noise-floor mask quantile")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per gradient batch")
    ap.add_argument("--max-len", type=int, default=None,
                    help="truncate prompt+completion to this many tokens (default: 512 for --ckpt tiny, else none)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="keep the prompt's last N tokens (default: 320 for --ckpt tiny, else all)")
    ap.add_argument("--lora-rank", type=int, default=8, help="lora: rank")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="lora: alpha")
    ap.add_argument("--seed", type=int, default=0, help="model / LoRA basis / control seed")
    ap.add_argument("--out", required=True, type=Path, help="v_hack directory to write")
    ap.add_argument("--force", action="store_true", help="replace an existing v_hack in --out")


def check_args(args) -> None:
    for flag in ("k", "batch_size", "variants", "lora_rank"):
        checks.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    for flag in ("max_len", "max_prompt_tokens", "max_per_problem"):
        if getattr(args, flag) is not None:
            checks.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.n_problems < 0:
        raise UserError(f"--n-problems must be >= 0, got {args.n_problems}")
    checks.check_ckpt(args.ckpt)
    claim_run_dir(args.out, what="v_hack", force=args.force, finished=lambda p: (p / META_FILE).is_file())


def run(args) -> int:
    check_args(args)
    pairs = build_pairs(args)
    sizes = checks.model_sizes(args.ckpt)
    max_prompt = args.max_prompt_tokens or sizes["max_prompt_tokens"]
    max_len = args.max_len or (max_prompt + sizes["max_completion_tokens"] if args.ckpt == "tiny" else None)
    params, config, tokenizer, desc = checks.load_model_checked(args.ckpt, args.tokenizer, args.seed)
    trainable, frozen = make_adapter(args.adapter, params, config, ckpt=args.ckpt, lora_rank=args.lora_rank,
                                     lora_alpha=args.lora_alpha, lora_seed=args.seed)
    if args.control == "shuffled":
        pairs = pairs_lib.shuffle_labels(pairs, seed=args.seed)
    elif args.control == "clean_vs_clean":
        pairs = pairs_lib.clean_vs_clean_pairs(pairs, seed=args.seed)
    bundle, info = extract_v_hack(pairs, tokenizer, trainable, frozen, params, config, k=args.k,
                                  batch_size=args.batch_size, axis_threshold=args.axis_threshold,
                                  noise_floor_quantile=args.noise_floor_quantile, max_len=max_len,
                                  max_prompt_tokens=max_prompt)
    if args.control == "random":
        bundle = random_v_hack(bundle, seed=args.seed, k=args.k)
    info.update(control=args.control, ckpt=args.ckpt, model=desc, adapter=args.adapter,
                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_seed=args.seed,
                pairs_from=args.pairs_from, n_pairs=len(pairs), max_len=max_len, max_prompt_tokens=max_prompt)
    info[FINGERPRINT_KEY] = basis_fingerprint(trainable, frozen)
    path = save_v_hack(args.out, bundle, meta=info, force=True)  # atomic: a sibling temp dir swapped in
    n_modules = sum(int(v.shape[0]) for v in bundle["V"].values())
    print(f"v_hack ({args.adapter}, control={args.control}) from {len(pairs)} pairs: "
          f"{n_modules} modules x k={args.k} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
