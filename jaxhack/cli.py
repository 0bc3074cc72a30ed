"""`jaxhack` command: one subcommand per phase (convert, pool, grade, extract, phase1, phase2,
analyze, train, sweep, demo, organism, export). Each is the same code as its script under scripts/ (same
flags): `jaxhack.commands.<module>.add_arguments` + `run`; demo, organism and export have no script. User errors print one `error: ...` line (exit 2)."""
from __future__ import annotations

import argparse
import importlib
import sys

from jaxhack.commands import COMMANDS, HelpFormatter, guarded


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxhack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, script) in COMMANDS.items():
        module = importlib.import_module(f"jaxhack.commands.{module_name}")
        summary = module.__doc__.strip().splitlines()[0]
        if script != "-":
            summary += f" [scripts/{script}]"
        p = sub.add_parser(name, help=summary, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _command=module_name)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
