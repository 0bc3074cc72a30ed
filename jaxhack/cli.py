"""`jaxhack` command: the embedded-default demo, and pointers to the per-phase scripts."""
from __future__ import annotations

import argparse
import sys

PHASE_SCRIPTS = """per-phase scripts (run from the repository root):
  scripts/convert.py         HF directory -> orbax checkpoint
  scripts/build_pool.py      template or sampled rollout pools, graded in the sandbox
  scripts/grade.py           grade a completions file
  scripts/extract_vhack.py   v_hack from (hack, clean) pairs
  scripts/phase1_distill.py  Phase 1 NLL distillation probe
  scripts/phase2_replay.py   Phase 2 mixed-replay GRPO probe
  scripts/analyze.py         report.md, plots and the Phase 3 verdict
  scripts/phase3_train.py    Phase 3 GRPO training;  scripts/sweep.py  seeds x arms
a policy that really hacks: jaxhack organism build|run --out DIR [--size cpu|gpu] (docs/organism.md)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxhack", description=__doc__, epilog=PHASE_SCRIPTS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded default (tiny Qwen3, "
                                       "bundled problems, template pools); no downloads")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--mode", default="run_tests", help="loophole mode of the pools")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--per-pool", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    # ---- organism (jaxhack/organism, docs/organism.md): self-contained block
    org = sub.add_parser("organism", help="a small policy trained in-repo that learns to hack under "
                                          "GRPO, and the experiment around it (docs/organism.md)")
    org.add_argument("action", choices=("build", "run"))
    org.add_argument("--out", default="runs/organism")
    org.add_argument("--size", default="cpu", choices=("cpu", "gpu", "test"))
    org.add_argument("--seeds", default=None, help="comma-separated seeds (run; default: the size's)")
    org.add_argument("--arms", default=None, help="comma-separated arms (run; default: the size's)")
    org.add_argument("--steps", type=int, default=None, help="GRPO steps (run; default: the size's)")
    org.add_argument("--grade-workers", type=int, default=None)
    org.add_argument("--tiny", action="store_true", help="the size's code path at tiny scale (smoke check)")
    org.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    if args.command == "organism":
        from jaxhack.organism.experiment import organism_main

        return organism_main(args)

    if args.command == "demo":
        from jaxhack.demo import DemoSettings, run_demo

        run_demo(DemoSettings(out=args.out, mode=args.mode, steps=args.steps, per_pool=args.per_pool,
                              seed=args.seed), progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
