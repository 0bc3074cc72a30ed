"""One module per phase, each an `add_arguments(parser)` + `run(args) -> exit status` pair shared by
the `jaxhack SUBCOMMAND` CLI (`jaxhack/cli.py`) and the per-phase scripts (`scripts/*.py`, thin
entry points with the same flags).

User errors (`jaxhack.io.UserError`, raised by the checks in `jaxhack/commands/checks.py` and by the
commands) become one `error: ...` line on stderr and exit status 2, in one place (`guarded`); Ctrl-C
becomes one line saying how to resume (status 130); any other exception is a bug and keeps its
traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from jaxhack.io import UserError

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
    "export": ("export", "-"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends "(default: X)" to every flag whose help does
    not already state its default (flags without a value, and defaults of None, are left as they are)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS)
                or action.nargs == 0 or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def parse_list(flag: str, text: str, kind=str) -> list:
    """A comma-separated flag value as a list of `kind`; UserError naming the flag when it is empty
    or an item does not convert."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"{flag}: give at least one value (comma-separated)")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None


def make_parser(module, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: UserError -> `error: MESSAGE` (status 2); Ctrl-C -> one line with the way to
    resume (status 130); anything else propagates with its traceback (a bug)."""
    try:
        from jaxhack.models.fused_decode import requested
        requested()  # a bad JAXHACK_DECODE_KERNEL stops every command up front, not only those that decode
        return run(args)
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt:
        hint = getattr(args, "_resume_hint", None) or resume_hint(args)
        print(f"\ninterrupted (Ctrl-C): stopped cleanly; {hint}", file=sys.stderr)
        return 130


def resume_hint(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C: Phase 3 runs and sweeps resume; other commands write their run
    into a temporary directory that is only moved into place when complete, so nothing partial is
    left and the same command starts again."""
    if getattr(args, "run_dir", None) is not None and hasattr(args, "resume"):
        return f"rerun the same command with --resume to continue {args.run_dir}"
    if getattr(args, "_command", None) == "sweep":
        return "rerun the same command: finished runs are skipped and the unfinished one resumes"
    return "nothing partial was written; rerun the same command to start again"


def script_main(module_name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` with the command's flags and run it (the body of every script's main)."""
    module = sys.modules[module_name]
    args = make_parser(module).parse_args(argv)
    args._command = module_name.rsplit(".", 1)[-1]
    return guarded(module.run, args)


def fail(message) -> int:
    """The one user-error exit: `error: MESSAGE` on stderr, status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2
