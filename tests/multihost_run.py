"""Subprocess of tests/test_mesh_runs.py: one of two jax processes (one CPU device each) of a
multi-host smoke run through the `jaxhack train` CLI (--coordinator / --num-processes / --process-id,
mesh data=2 spanning both processes), with the same TrainConfig as tests/mesh_runs.py's runs.

    python tests/multihost_run.py PROCESS_ID PORT OUT_DIR
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from jaxhack.commands.train import main as train_main  # noqa: E402
from jaxhack.rl.config import make_config  # noqa: E402
from mesh_runs import RUN_OVERRIDES  # noqa: E402
from test_trainer import base_config  # noqa: E402


def config_argv(cfg) -> list[str]:
    """`jaxhack train` flags that rebuild cfg (every field that differs from its preset's value)."""
    argv, preset = ["--preset", cfg.preset], make_config(cfg.preset)
    for name, value in dataclasses.asdict(cfg).items():
        if name == "preset" or value == getattr(preset, name):
            continue
        argv += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


if __name__ == "__main__":
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    env = (out, out / "short.jsonl", out / "teacher")
    cfg = base_config(env, out / "multihost", mesh="data=2", **RUN_OVERRIDES)
    sys.exit(train_main(config_argv(cfg) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid), "--no-progress"]))
