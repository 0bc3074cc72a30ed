"""Analyze Phase 2 probe runs: report.md + plots + Phase 3 verdict.

    jaxhack analyze OUT [OUT ...] [--phase1 P1_OUT] [--report report.md] [--plots-dir DIR] [--json FILE]
    (or: python scripts/analyze.py ...)

Each OUT is one run directory (one arm) holding step_NNN.cos.jsonl.gz files and run.json.
Prints the verdict and the spec2 verification table; exit status 0 unless the input is invalid.
A run that did not finish (run.json status not 'done') is refused unless --allow-partial.
"""
from __future__ import annotations

from pathlib import Path

from jaxhack.commands import script_main
from jaxhack.io import UserError, atomic_write_text, check_writable
from jaxhack.probes.analyze import analyze_runs, format_summary, summary_to_json
from jaxhack.probes.records import ProbeRecordError


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="OUT", help="run directory, one per arm")
    parser.add_argument("--report", default=None, help="report path (default: OUT[0]/report.md)")
    parser.add_argument("--plots-dir", default=None, help="PNG directory (default: <report dir>/plots)")
    parser.add_argument("--json", default=None, help="also write the summary as strict JSON here")
    parser.add_argument("--phase1", default=None, metavar="DIR",
                        help="a `jaxhack phase1` run whose results go into the report")
    parser.add_argument("--allow-partial", action="store_true",
                        help="analyse runs whose run.json status is not 'done' (stated in the report)")


def run(args) -> int:
    report = Path(args.report) if args.report else Path(args.run_dirs[0]) / "report.md"
    check_writable(report)
    if args.json:
        check_writable(args.json)
    try:
        summary = analyze_runs(args.run_dirs, report_path=report, plots_dir=args.plots_dir,
                               allow_partial=args.allow_partial, phase1_dir=args.phase1)
    except (ProbeRecordError, FileNotFoundError, ValueError) as error:  # the input runs, named
        raise UserError(error) from None
    print(format_summary(summary))
    if args.json:
        atomic_write_text(args.json, summary_to_json(summary) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(__name__, argv)
