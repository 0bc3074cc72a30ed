"""The sweep on Ray (jaxhack/rl/sweep_ray.py, docs/phase3.md "Sweep across GPUs / a cluster"), on
one local Ray with 2 CPUs (and 8 fake-device slots) started once for the module.

- a real tiny 2 arms x 2 seeds sweep: one run raises once (retried, resumes), one run's worker is
  killed twice (reported failed); the rerun resumes it; every run's metrics equal the sequential
  backend's (run in one fresh process, the same compile cache);
- the cost ceiling across workers (a cheap fake trainer): the vanilla wave runs, the rest does not;
- issue 18's layout on CPU: 3 arms x 3 seeds over 8 fake XLA devices, one slot per run, recorded.
Skipped, with the reason, when ray is not installed (`pip install -e '.[ray]'`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]'): Ray sweep tests skipped")

from jaxhack.io import read_jsonl  # noqa: E402
from jaxhack.rl import sweep as S  # noqa: E402
from jaxhack.rl import sweep_ray as R  # noqa: E402
from jaxhack.rl.config import make_config  # noqa: E402
from sweep_fakes import FakeTrain  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPU workers and 8 fake-device slots; workers import jaxhack
    and this test module (the fake trainer) from the checkout."""
    ray.init(address="local", num_cpus=2, resources={R.SLOT_RESOURCE: 8}, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{R.REPO_ROOT}:{TESTS}"}})
    yield ray
    ray.shutdown()


def strict_load(path: Path):
    def refuse(name):
        raise AssertionError(f"{path}: non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_ray_sweep_kill_retry_resume_matches_sequential(local_ray, tmp_path):
    import test_trainer as TT

    from jaxhack.env.problems import load_problems

    problems = TT.write_short_problems(tmp_path / "short.jsonl")
    teacher = TT.write_teacher_pool(load_problems(problems), tmp_path / "teacher")
    base = TT.base_config((tmp_path, problems, teacher), tmp_path / "unused", steps=3, eval_every=0, max_new=16,
                          group_size=2, mix_per_group=1, k=1, ckpt_every=1)
    arms, seeds, cache = ["vanilla", "projected"], [0, 1], tmp_path / "jax_cache"
    # the sequential backend first, in one fresh process: it also fills the compile cache the Ray
    # workers then load from (each program compiled once, not once per worker)
    @ray.remote(num_cpus=1)
    def sequential(cfg_dict, out_dir):
        R.enable_compile_cache(cache)
        S.run_sweep(S.TrainConfig(**cfg_dict), out_dir, arms, seeds, hack_threshold=0.0, log=lambda _: None)

    ray.get(sequential.remote(base.to_dict(), str(tmp_path / "seq")))
    faults = R.parse_faults("vanilla:0:1:1:raise,projected:1:1:2:exit")
    assert faults[("projected", 1)] == R.Fault(1, 2, "exit")
    out, logs = tmp_path / "ray", []
    first = R.run_sweep_ray(base, out, arms, seeds, hack_threshold=0.0, compile_cache=cache, faults=faults,
                            progress_every=2.0, log=logs.append)
    assert first["waves"] == [[["vanilla", 0], ["vanilla", 1]], [["projected", 0], ["projected", 1]]]
    runs = {(r["arm"], r["seed"]): r for r in first["runs"]}
    v0, p1 = runs[("vanilla", 0)], runs[("projected", 1)]
    assert v0["finished"] and v0["attempts"] == 2 and "retried after attempt 1: InjectedFault" in v0["status"]
    assert [f["arm"] + str(f["seed"]) for f in first["failed"]] == ["projected1"]
    assert not p1["finished"] and p1["attempts"] == 2 and all("WorkerCrashedError" in e for e in p1["errors"])
    assert len(p1["placement"]) == 2 and p1["placement"][0]["pid"] != p1["placement"][1]["pid"]  # two workers died
    p1_dir = Path(p1["run_dir"])
    assert not (p1_dir / "done.json").exists() and [m["step"] for m in read_jsonl(p1_dir / "metrics.jsonl")] == [0, 1]
    summary = strict_load(out / S.SUMMARY_JSON)  # strict JSON (NaN written as null)
    assert summary["backend"] == "ray" and summary["failed"][0]["arm"] == "projected" and not summary["stopped"]
    assert "FAILED runs" in (out / S.SUMMARY_MD).read_text()
    text = "\n".join(logs)
    assert "vanilla seed 1: running" in text and "step 3/3" in text  # the progress lines were refreshed

    # the rerun skips the finished runs and resumes the failed one from its checkpoint
    again = R.run_sweep_ray(base, out, arms, seeds, hack_threshold=0.0, compile_cache=cache, log=lambda _: None)
    status = {(r["arm"], r["seed"]): r["status"] for r in again["runs"]}
    assert not again["failed"] and status[("projected", 1)].startswith("resumed")
    assert [status[k] for k in [("vanilla", 0), ("vanilla", 1), ("projected", 0)]] == ["skipped (done)"] * 3

    # every run, killed or not, has the sequential backend's per-run metrics
    for arm in arms:
        for seed in seeds:
            got, want = (read_jsonl(S.run_dir_for(d, arm, seed) / "metrics.jsonl") for d in (out, tmp_path / "seq"))
            assert [m["step"] for m in got] == [0, 1, 2]
            strip = [[{k: v for k, v in m.items() if not k.startswith("time_")} for m in ms] for ms in (got, want)]
            np.testing.assert_equal(strip[0], strip[1])  # NaN == NaN; exact otherwise
    assert strict_load(tmp_path / "seq" / S.SUMMARY_JSON)["backend"] == "local"


def test_ray_ceiling_stops_after_the_vanilla_wave(local_ray, tmp_path):
    fake = FakeTrain({("vanilla", s): 0.05 for s in range(3)}, sleep_s=0.1)
    arms = ["vanilla", "projected", "lora_projected"]
    result = R.run_sweep_ray(make_config("smoke"), tmp_path, arms, [0, 1, 2], train_fn=fake, hack_threshold=0.1,
                             progress_every=1.0, log=lambda _: None)
    assert result["stopped"] and "no separation" in result["reason"]
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("vanilla", s) for s in range(3)]
    assert not (tmp_path / "projected").exists() and (tmp_path / S.STOPPED_FILE).is_file()
    summary = strict_load(tmp_path / S.SUMMARY_JSON)
    assert summary["stopped"] and summary["reason"] == result["reason"]
    assert summary["rows"][0]["gt_pass_rate_mean"] is None  # NaN -> null


def test_ray_layout_eight_fake_devices(local_ray, tmp_path):
    """Issue 18 on CPU: 3 arms x 3 seeds over 8 fake XLA devices (one slot each), the ceiling's
    vanilla wave first (3 runs), then the 6 others at once; every run computed on its slot."""
    peaks = {("vanilla", s): 0.5 for s in range(3)}
    fake = FakeTrain(peaks, sleep_s=1.0)
    arms = ["vanilla", "projected", "lora_projected"]
    result = R.run_sweep_ray(make_config("smoke"), tmp_path, arms, [0, 1, 2], train_fn=fake, fake_devices=8,
                             progress_every=1.0, log=lambda _: None)
    assert not result["stopped"] and not result["failed"] and len(result["runs"]) == 9
    assert [len(w) for w in result["waves"]] == [3, 6]
    spans = []
    for r in result["runs"]:
        (place,) = r["placement"]
        assert place["n_process_devices"] == 8 and len(place["slots"]) == 1
        assert place["devices"] == [f"cpu:{place['slots'][0]}"]
        assert r["summary"]["device_used"] == place["devices"][0] and r["summary"]["n_devices"] == 8
        spans.append((place["slots"][0], r["summary"]["t0"], r["summary"]["t1"]))
    for i, (slot, a0, a1) in enumerate(spans):  # runs that overlapped in time had different slots
        for slot2, b0, b1 in spans[i + 1:]:
            assert slot != slot2 or a1 <= b0 or b1 <= a0
    assert len({slot for slot, _, _ in spans[3:]}) == 6  # the 6 runs of wave 2 got 6 distinct slots
    summary = strict_load(tmp_path / S.SUMMARY_JSON)
    assert summary["ray"]["fake_devices"] == 8 and summary["ray"]["concurrent_runs"] == 8
    assert all(r["placement"][0]["devices"] for r in summary["runs"])
    assert not math.isnan(result["rows"][0]["hack_rate_mean"])


def test_fault_spec_errors():
    with pytest.raises(ValueError, match="ARM:SEED:STEP"):
        R.parse_faults("vanilla:0")
    with pytest.raises(ValueError, match="ARM:SEED:STEP"):
        R.parse_faults("vanilla:0:1:1:explode")
    assert R.DEFAULT_CEILING_METRIC == S.DEFAULT_CEILING_METRIC
    assert R.parse_faults("") == {} and R.mesh_devices("data=4,fsdp=2") == 8 and R.mesh_devices(None) == 1
