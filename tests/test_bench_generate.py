"""scripts/bench_generate.py refuses bad sizes with one line naming the flag, before building a model
(`--new-tokens 0` used to fall back to the default silently, `--batches x` to raise a traceback)."""
from __future__ import annotations

import pytest

from helpers import load_script


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--batches", "4,x"], "--batches '4,x': expected comma-separated integers"),
    (["--batches", ","], "--batches: give at least one value"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--prompt-len", "-3"], "--prompt-len must be >= 1, got -3"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_bad_sizes_are_one_line_errors(argv, message, capsys):
    bench = load_script("bench_generate")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--small", "--skip-torch", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
