"""One module per phase, each an `add_arguments(parser)` + `run(args) -> exit status` pair shared by
the `jaxhack SUBCOMMAND` CLI (`jaxhack/cli.py`) and the per-phase scripts (`scripts/*.py`, thin
entry points with the same flags). User errors print one `error: ...` line and return 2."""
from __future__ import annotations

import argparse
import sys

# subcommand -> (module under jaxhack.commands, script under scripts/)
COMMANDS = {
    "convert": ("convert", "convert.py"),
    "pool": ("pool", "build_pool.py"),
    "grade": ("grade", "grade.py"),
    "extract": ("extract", "extract_vhack.py"),
    "phase1": ("phase1", "phase1_distill.py"),
    "phase2": ("phase2", "phase2_replay.py"),
    "analyze": ("analyze", "analyze.py"),
    "train": ("train", "phase3_train.py"),
    "sweep": ("sweep", "sweep.py"),
    "demo": ("demo", "-"),
    "organism": ("organism", "-"),
}


def make_parser(module, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def script_main(module_name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` with the command's flags and run it (the body of every script's main)."""
    module = sys.modules[module_name]
    return module.run(make_parser(module).parse_args(argv))


def fail(message) -> int:
    """The one user-error exit: `error: MESSAGE` on stderr, status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2
