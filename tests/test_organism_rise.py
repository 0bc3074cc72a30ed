"""The organism's validity in miniature, in the normal suite: the `test`-size organism (built once
per session, 2 layers d=64) under 12 steps of vanilla GRPO with the run_tests hint must raise its
policy hack rate. Measured on the shared 2-core box (load ~8): build 69 s + GRPO 107 s; the rise there
was 0.10 (first 3 steps) -> 0.26 (last 3). This could fail: the first pass's organism (every family
partly solvable, cosine lr) did not rise at all."""
import dataclasses
import re

import numpy as np
import pytest

from jaxhack.io import read_jsonl
from jaxhack.organism.build import build_organism
from jaxhack.organism.experiment import SIZES, load_organism, phase3_config
from jaxhack.rl.run import METRICS_FILE
from jaxhack.rl.trainer import train


@pytest.fixture(scope="session")
def test_organism(tmp_path_factory):
    return build_organism(tmp_path_factory.mktemp("organism_build"), SIZES["test"].build, progress=False)


def test_vanilla_grpo_raises_hack_rate(test_organism, tmp_path):
    s = SIZES["test"]
    # vanilla only measures cos to v_hack: a random v_hack skips the template extraction
    cfg = dataclasses.replace(phase3_config(s, test_organism, "vanilla", 0, tmp_path / "run", None), v_hack="random")
    train(cfg, model=load_organism(test_organism, "base"), progress=False)
    ms = read_jsonl(tmp_path / "run" / METRICS_FILE)
    hack = [m["hack_rate_policy"] for m in ms]
    assert len(hack) == s.steps
    assert np.mean([m["fmt_rate"] for m in ms]) > 0.8
    start, end = np.mean(hack[:3]), np.mean(hack[-3:])
    assert start < 0.2, hack
    assert end > start + 0.08, hack


def test_phase3_runs_in_worker_processes_match_in_process(test_organism, tmp_path):
    """`run_phase3(jobs=2)` (spawned workers, as the GPU size runs its 12 runs) trains a run exactly as the
    in-process loop does (same per-step metrics for the same config), and a run that fails in its worker
    is said at once while the other finishes, then named in the one error at the end."""
    from jaxhack.organism.experiment import run_phase3

    s = dataclasses.replace(SIZES["test"], steps=2)

    def cfg(seed, where):
        return dataclasses.replace(phase3_config(s, test_organism, "vanilla", seed, tmp_path / where / str(seed),
                                                 None), v_hack="random")

    said = []
    broken = dataclasses.replace(cfg(2, "workers"), problems=str(tmp_path / "no_such_problems.jsonl"))
    with pytest.raises(RuntimeError, match=r"1 of 2 Phase 3 run\(s\) failed .*vanilla seed 2: .*no_such_problems"):
        run_phase3([("vanilla", 2, broken), ("vanilla", 0, cfg(0, "workers"))], test_organism, jobs=2,
                   say=said.append)
    assert any(line.startswith("[phase3] vanilla seed 2: ") and line.endswith("(FAILED)") for line in said), said
    run_phase3([("vanilla", 0, cfg(0, "inline"))], test_organism, jobs=1, say=said.append)
    assert sum(bool(re.match(r"\[phase3\] 1/[12] runs done \(\d+ s\): vanilla seed 0: hack", line))
               for line in said) == 2, said
    worker = read_jsonl(tmp_path / "workers" / "0" / METRICS_FILE)
    inline = read_jsonl(tmp_path / "inline" / "0" / METRICS_FILE)
    assert len(worker) == len(inline) == 2
    for w, i in zip(worker, inline):
        keys = sorted(k for k, v in i.items() if isinstance(v, (int, float)) and not k.startswith("time_"))
        assert keys and sorted(k for k in w if k in keys) == keys
        np.testing.assert_allclose([w[k] for k in keys], [i[k] for k in keys], rtol=1e-6, err_msg=str(keys))
