"""Subprocess of tests/test_mesh_runs.py: Phase 3 smoke runs on meshes of fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_runs.py OUT_DIR

(the flag must be set before jax is imported, so this runs in its own process; the rest of the suite
sees one device). Writes OUT_DIR/metrics.json: {run name: [metrics records]} for
  none        no mesh (the single-device path), 2 steps
  data8       mesh data=8, 2 steps
  8to1        1 step on mesh data=8, then --resume without a mesh for the 2nd
  1to8        1 step without a mesh, then --resume on mesh data=8 for the 2nd
  data2_refill  mesh data=2 with sample_rows 1: the sampler's refill schedule on each device, 2 steps
The runs use the trainer test's short problems and teacher pool (reward variance: real gradients).
Mesh data=2 is the two-process run of tests/multihost_run.py (one device per process): one compile
set less on the test machine's 2 cores.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from jaxhack.env.problems import load_problems  # noqa: E402
from jaxhack.rl import trainer as T  # noqa: E402
from test_trainer import base_config, write_short_problems, write_teacher_pool  # noqa: E402

RUN_OVERRIDES = dict(steps=2, eval_every=0, ckpt_every=1, max_new=48, microbatch=4)


def main(out: Path) -> None:
    assert len(jax.devices()) >= 8, f"needs 8 devices, got {jax.devices()}"
    out.mkdir(parents=True, exist_ok=True)
    problems = write_short_problems(out / "short.jsonl")
    env = (out, problems, write_teacher_pool(load_problems(problems), out / "teacher"))

    def run(name, mesh, resume=False, stop_after=None, **extra):
        cfg = base_config(env, out / name, mesh=mesh, **RUN_OVERRIDES, **extra)
        T.train(cfg, resume=resume, stop_after=stop_after, progress=False)

    results = {}
    for name, mesh in (("none", None), ("data8", "data=8")):
        run(name, mesh)
    # 4 sampled rows per step > 1 slot x 2 devices: the refill schedule, one part per device
    from jaxhack.rl import sampler
    on_devices, calls = sampler.generate_slots_on_devices, []

    def counted(devices, *args, **kwargs):
        calls.append(len(devices))
        return on_devices(devices, *args, **kwargs)

    sampler.generate_slots_on_devices = counted
    run("data2_refill", "data=2", sample_rows=1)
    sampler.generate_slots_on_devices = on_devices
    for name, first, second in (("8to1", "data=8", None), ("1to8", None, "data=8")):
        run(name, first, stop_after=1)
        run(name, second, resume=True)
    for name in ("none", "data8", "8to1", "1to8", "data2_refill"):
        results[name] = T.read_jsonl(out / name / T.METRICS_FILE)
    results["refill_calls_data2"] = calls  # the devices of each sampler call of the data2_refill run
    results["run_json_mesh"] = {n: json.loads((out / n / T.RUN_FILE).read_text()).get("mesh")
                                for n in ("none", "data8")}
    (out / "metrics.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before running this")
    main(Path(sys.argv[1]))
