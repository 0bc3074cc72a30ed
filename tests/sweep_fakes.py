"""A cheap stand-in trainer for the Ray sweep tests (tests/test_sweep_ray.py). Its own module with
stdlib imports only: the Ray workers unpickle it without importing the test module (jaxhack's
driver side, scipy) -- eight workers start faster."""
from __future__ import annotations

import json
import time
from pathlib import Path


class FakeTrain:
    """A cheap trainer for the scheduling tests: writes RUN/metrics.jsonl (2 steps) and
    RUN/done.json with the chosen peak hack rate per (arm, seed), and records in the summary the
    JAX device it computed on and when it ran."""

    def __init__(self, peaks: dict, sleep_s: float = 0.5):
        self.peaks, self.sleep_s = peaks, sleep_s

    def __call__(self, cfg, resume=True, model=None):
        import jax
        import jax.numpy as jnp

        t0 = time.time()
        run = Path(cfg.run_dir)
        peak = self.peaks.get((cfg.arm, cfg.seed), 0.0)
        for step in range(2):
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "hack_rate_policy": peak}) + "\n")
            time.sleep(self.sleep_s)
        device = str(next(iter(jnp.zeros(()).devices())))
        summary = {"steps_done": 2, "train_hack_rate_max_windowed": peak, "train_hack_rate_final": peak,
                   "train_gt_pass_rate_final": float("nan"), "device_used": device,
                   "n_devices": len(jax.devices()), "t0": t0, "t1": time.time()}
        (run / "done.json").write_text(json.dumps({"summary": summary}))
        return summary
