"""Bad numbers given to the probe and export benchmarks: one line, exit 2, before any work (they used to
end in tracebacks from numpy or inside the traced model, or run with a negative depth)."""
from __future__ import annotations

import pytest

from helpers import load_script


def _exit_code(script: str, argv: list[str]) -> int:
    try:
        return load_script(script).main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("script, argv, words", [
    ("bench_probe", ["--small", "--layers", "-1"], "--layers must be >= 1, got -1"),
    ("bench_probe", ["--small", "--runs", "0"], "--runs must be >= 1, got 0"),
    ("bench_probe", ["--small", "--torch-timeout", "0"], "--torch-timeout must be > 0"),
    ("bench_export_bf16", ["--seed", "-1"], "expected sizes >= 1 and a seed >= 0"),
    ("bench_export_bf16", ["--sizes", "-1"], "expected sizes >= 1 and a seed >= 0"),
    ("bench_export_bf16", ["--sizes", "64,x"], "--sizes '64,x': expected comma-separated integers"),
])
def test_bad_flags_are_one_line_errors(script, argv, words, capsys):
    assert _exit_code(script, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and "Traceback" not in "\n".join(err), err
    assert len(err) == 1 or err[0].startswith("usage:"), err
