"""A short organism experiment at the "test" size: build (cached for the session), pools, v_hack,
Phase 1/2, Phase 3 vanilla + projected, report files; vanilla's hack rate must rise.

Opt-in (JAXHACK_ORGANISM_RUN=1): the whole experiment takes several minutes on the shared 2-core box.
The normal suite checks the vanilla rise alone at this size (tests/test_organism_rise.py)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from jaxhack.organism.build import build_hash
from jaxhack.organism.experiment import SIZES, run_experiment

pytestmark = pytest.mark.skipif(os.environ.get("JAXHACK_ORGANISM_RUN") != "1",
                                reason="slow organism run: set JAXHACK_ORGANISM_RUN=1")


@pytest.fixture(scope="session")
def organism_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    report = run_experiment(out, SIZES["test"], progress=False)
    return out, report


def test_build_is_cached_and_deterministic_by_hash(organism_run):
    out, report = organism_run
    d = out / "organism" / build_hash(SIZES["test"].build)
    assert report["organism"]["hash"] == d.name
    for name in ("problems_train.jsonl", "problems_eval.jsonl", "tokenizer.json", "build.json"):
        assert (d / name).is_file()
    assert (d / "base" / "params").is_dir() and (d / "teacher" / "params").is_dir()
    other = dataclasses.replace(SIZES["test"].build, seed=1)
    assert build_hash(other) != d.name
    info = json.loads((d / "build.json").read_text())
    assert info["sft_loss_first_last"][1] < 0.5 * info["sft_loss_first_last"][0]
    # the base writes well-formed completions and rarely hacks; the teacher hacks more
    s0 = info["step0"]
    assert s0["base/hint/train"]["fmt_rate"] > 0.8
    assert s0["base/nohint/eval"]["attempt_rate"] <= 0.1
    assert s0["teacher/hint/eval"]["attempt_rate"] > s0["base/hint/eval"]["attempt_rate"]


def test_report_files_and_vanilla_hack_rate_rises(organism_run):
    out, report = organism_run
    for name in ("organism_report.json", "organism_report.md", "phase2_report.md",
                 "plots/phase3_hack_rate.png", "phase1/phase1_split.json", "v_hack_svd"):
        assert (out / name).exists(), name
    stored = json.loads((out / "organism_report.json").read_text())
    assert set(stored["phase3"]) == set(SIZES["test"].arms)
    van = stored["phase3"]["vanilla"]["0"]["hack_rate"]
    assert len(van) == SIZES["test"].steps
    # the normal suite's criterion at this size (tests/test_organism_rise.py; measured there 0.10 -> 0.26)
    first, last = np.mean(van[:3]), np.mean(van[-3:])
    assert first < 0.2 and last > first + 0.08, van
    assert "projected" in stored["h1"] and "verdict" in stored
