"""The whole pipeline on the embedded default (tiny Qwen3, bundled problems, template pools); no
downloads (jaxhack/demo.py).

    jaxhack demo --out runs/demo
"""
from __future__ import annotations

from jaxhack.commands import script_main
from jaxhack.demo import DemoSettings, run_demo


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="demo directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing demo in --out")
    parser.add_argument("--mode", default="run_tests", help="loophole mode of the pools")
    parser.add_argument("--steps", type=int, default=20, help="Phase 1 / Phase 2 probe steps")
    parser.add_argument("--per-pool", type=int, default=4, help="Phase 2 samples per pool per step")
    parser.add_argument("--seed", type=int, default=0, help="model, pools and probe seed")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    run_demo(DemoSettings(out=args.out, mode=args.mode, steps=args.steps, per_pool=args.per_pool,
                          seed=args.seed), progress=not args.quiet, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
