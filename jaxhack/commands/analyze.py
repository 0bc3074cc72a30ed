"""Analyze Phase 2 probe runs: report.md + plots + Phase 3 verdict.

    jaxhack analyze OUT [OUT ...] [--report report.md] [--plots-dir DIR] [--json FILE]
    (or: python scripts/analyze.py ...)

Each OUT is one run directory (one arm) holding step_NNN.cos.jsonl.gz files and run.json.
Prints the verdict and the spec2 verification table; exit status 0 unless the input is invalid.
"""
from __future__ import annotations

import sys
from pathlib import Path

from jaxhack.commands import script_main
from jaxhack.probes.analyze import analyze_runs, format_summary, summary_to_json
from jaxhack.probes.records import ProbeRecordError


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="OUT", help="run directory, one per arm")
    parser.add_argument("--report", default=None, help="report path (default: OUT[0]/report.md)")
    parser.add_argument("--plots-dir", default=None, help="PNG directory (default: <report dir>/plots)")
    parser.add_argument("--json", default=None, help="also write the summary as strict JSON here")


def run(args) -> int:
    try:
        summary = analyze_runs(args.run_dirs, report_path=args.report, plots_dir=args.plots_dir)
    except (ProbeRecordError, FileNotFoundError, ValueError) as error:
        print(f"analyze: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(summary_to_json(summary) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
