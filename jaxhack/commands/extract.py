"""Extract v_hack (per-module hack directions) from contrastive (hack, clean) completions.

    jaxhack extract --ckpt tiny --adapter svd --pairs-from templates \
        --problems bundled --mode run_tests --out runs/v_hack_svd
    jaxhack extract --ckpt qwen3-4b --adapter svd --pairs-from pools \
        --teacher runs/teacher_pool --base runs/base_pool --out runs/v_hack_svd
    jaxhack extract ... --pairs-from file --pairs pairs.jsonl   # {prompt, hack, clean}
    (or: python scripts/extract_vhack.py ...)

Negative controls: --control random (random orthonormal V, matched k), shuffled (label-shuffled
pairs), clean_vs_clean (two clean completions per problem). Writes OUT/{tree/, meta.json,
v_hack.safetensors}; the meta records the adapter settings a later probe needs to rebuild the basis.
"""
from __future__ import annotations

from jaxhack.commands import fail, script_main
from jaxhack.env.problems import load_problems
from jaxhack.models.load import load_model, make_adapter
from jaxhack.projection import pairs as pairs_lib
from jaxhack.projection.v_hack import extract_v_hack, random_v_hack, save_v_hack


class UsageError(ValueError):
    """A missing flag for the chosen --pairs-from."""


def build_pairs(args) -> list:
    if args.pairs_from == "templates":
        problems = load_problems(args.problems)
        if args.n_problems:
            problems = problems[: args.n_problems]
        return pairs_lib.pairs_from_env_templates(problems, args.mode,
                                                  pairs_lib.pair_variants(args.variants, args.seed))
    if args.pairs_from == "pools":
        if not (args.teacher and args.base):
            raise UsageError("--pairs-from pools needs --teacher DIR and --base DIR")
        return pairs_lib.pairs_from_pools(args.teacher, args.base, max_per_problem=args.max_per_problem,
                                          require_gt_pass=args.require_gt_pass)
    if not args.pairs:
        raise UsageError("--pairs-from file needs --pairs FILE.jsonl")
    return pairs_lib.read_pairs_jsonl(args.pairs)


def add_arguments(ap) -> None:
    ap.add_argument("--ckpt", default="tiny", help="tiny | random-4b | checkpoint name or path")
    ap.add_argument("--adapter", choices=("svd", "lora"), default="svd")
    ap.add_argument("--pairs-from", choices=("templates", "pools", "file"), default="templates")
    ap.add_argument("--problems", default="bundled")
    ap.add_argument("--n-problems", type=int, default=0, help="use the first N problems (0: all)")
    ap.add_argument("--mode", default="run_tests")
    ap.add_argument("--variants", type=int, default=3, help="template pairs per problem")
    ap.add_argument("--teacher"), ap.add_argument("--base"), ap.add_argument("--pairs")
    ap.add_argument("--max-per-problem", type=int, default=None)
    ap.add_argument("--require-gt-pass", action="store_true",
                    help="pool pairs: the clean side must also pass the ground-truth tests (correct, not just "
                         "not hacked)")
    ap.add_argument("--control", choices=("none", "random", "shuffled", "clean_vs_clean"), default="none")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--axis-threshold", type=float, default=None)
    ap.add_argument("--noise-floor-quantile", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=None, help="truncate prompt+completion to this many tokens")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="keep the prompt's last N tokens")
    ap.add_argument("--lora-rank", type=int, default=8), ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")


def run(args) -> int:
    try:
        pairs = build_pairs(args)
    except UsageError as err:
        return fail(err)
    params, config, tokenizer, desc = load_model(args.ckpt, seed=args.seed)
    trainable, frozen = make_adapter(args.adapter, params, config, ckpt=args.ckpt, lora_rank=args.lora_rank,
                                     lora_alpha=args.lora_alpha, lora_seed=args.seed)
    if args.control == "shuffled":
        pairs = pairs_lib.shuffle_labels(pairs, seed=args.seed)
    elif args.control == "clean_vs_clean":
        pairs = pairs_lib.clean_vs_clean_pairs(pairs, seed=args.seed)
    bundle, info = extract_v_hack(pairs, tokenizer, trainable, frozen, params, config, k=args.k,
                                  batch_size=args.batch_size, axis_threshold=args.axis_threshold,
                                  noise_floor_quantile=args.noise_floor_quantile, max_len=args.max_len,
                                  max_prompt_tokens=args.max_prompt_tokens)
    if args.control == "random":
        bundle = random_v_hack(bundle, seed=args.seed, k=args.k)
    info.update(control=args.control, ckpt=args.ckpt, model=desc, adapter=args.adapter,
                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_seed=args.seed,
                pairs_from=args.pairs_from, n_pairs=len(pairs), require_gt_pass=bool(args.require_gt_pass))
    path = save_v_hack(args.out, bundle, meta=info, force=args.force)
    n_modules = sum(int(v.shape[0]) for v in bundle["V"].values())
    print(f"v_hack ({args.adapter}, control={args.control}) from {len(pairs)} pairs: "
          f"{n_modules} modules x k={args.k} -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
