"""scripts/check_sampler_form.py at --small (fp32, CPU): with the weights' own SVD factors the factored
sampler is the exact one, and the dense one is for any factors, so all three draw the same tokens and
match the learner's log-probs; the record is appended to --out; a bad number is one line and exit 2."""
from __future__ import annotations

import json

from helpers import load_script


def test_small_model_forms_agree_and_the_record_is_written(tmp_path, capsys):
    script = load_script("check_sampler_form")
    out = tmp_path / "fidelity.jsonl"
    assert script.main(["--small", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["factor_residual_max"] < 1e-5  # fp32 factors of the weights themselves
    for form in ("factored", "dense"):
        assert record[form]["identical_rows_to_exact"] == record["rows"] == 4
    for form in ("exact", "factored", "dense"):
        assert record[form]["mean_abs_logp_gap"] < 1e-4
    assert script.main(["--rows", "0"]) == 2
    assert "--rows must be >= 1, got 0" in capsys.readouterr().err
