"""The whole pipeline on the embedded default (tiny Qwen3, bundled problems, template pools); no
downloads (jaxhack/demo.py).

    jaxhack demo --out runs/demo
"""
from __future__ import annotations

from jaxhack.commands import script_main
from jaxhack.demo import DemoSettings, run_demo


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--mode", default="run_tests", help="loophole mode of the pools")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-pool", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def run(args) -> int:
    run_demo(DemoSettings(out=args.out, mode=args.mode, steps=args.steps, per_pool=args.per_pool,
                          seed=args.seed), progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
