"""Experiment tracking: TensorBoard event files and Weights & Biases runs behind one small interface
(docs/phase3.md, "Tracking"). Phase 2 and Phase 3 call `open_tracker(...)` once, then
`tracker.scalars(step, record)` / `tracker.histogram(step, tag, values)` / `tracker.close()`.

- TensorBoard: `tensorboardX` (the `tracking` extra; pure Python on numpy + protobuf, where
  `flax.metrics.tensorboard` needs TensorFlow). Event files go into the run directory itself, beside
  metrics.jsonl, so `tensorboard --logdir SWEEP_OUT` shows every OUT/ARM/seed_S run. Default "auto":
  on when tensorboardX is importable, else one note line and no events; an explicit
  `--tensorboard true` without it is a user error (`TrackingUnavailable`).
- W&B: `--wandb PROJECT` (wandb imported only then), the run config as the W&B config, name / group /
  tags (the trainer tags arm, seed and preset; the sweep groups its runs). The W&B run id is kept in
  RUN/tracking.json so a resumed run continues the same W&B run. WANDB_MODE=offline works without a
  network; WANDB_DIR chooses where W&B writes.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import math
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable

TRACKING_FILE = "tracking.json"
INSTALL_HINT = "pip install 'jaxhack[tracking]'"


class TrackingUnavailable(ValueError):
    """A tracker was asked for explicitly but its library is not installed."""


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    tensorboard: bool | None = None        # None: auto (on when tensorboardX is installed)
    wandb_project: str | None = None       # None: no W&B
    wandb_entity: str | None = None
    group: str | None = None               # W&B group (the sweep: its output directory's name)
    tags: tuple[str, ...] = ()
    name: str | None = None                # W&B run name (default: the run directory's name)

    def with_tags(self, *tags: str, group: str | None = None, name: str | None = None) -> "TrackingSettings":
        extra = tuple(t for t in tags if t not in self.tags)
        return dataclasses.replace(self, tags=self.tags + extra, group=self.group or group,
                                   name=self.name or name)


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboardX") is not None


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def check_available(settings: TrackingSettings) -> None:
    """TrackingUnavailable (one line) when a tracker asked for explicitly cannot be loaded."""
    if settings.tensorboard and not tensorboard_installed():
        raise TrackingUnavailable(f"--tensorboard: tensorboardX is not installed ({INSTALL_HINT})")
    if settings.wandb_project and not wandb_installed():
        raise TrackingUnavailable(f"--wandb {settings.wandb_project}: wandb is not installed ({INSTALL_HINT})")


def scalar_items(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a metrics record (ints and floats, not bools, not "step") as floats."""
    return {prefix + k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class Tracker:
    """Fan-out to the open writers; with none it does nothing."""

    def __init__(self, tb=None, wandb_run=None):
        self.tb, self.wandb_run = tb, wandb_run
        if self.active:  # flushed and finished even when the run dies with an exception or Ctrl-C
            atexit.register(self.close)

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb_run is not None

    def scalars(self, step: int, record: dict, prefix: str = "") -> None:
        values = scalar_items(record, prefix)
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def histogram(self, step: int, tag: str, values: Iterable[float]) -> None:
        import numpy as np

        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
        if v.size == 0:
            return
        if self.tb is not None:
            self.tb.add_histogram(tag, v, global_step=step)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Histogram(v)}, step=step)

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def open_tracker(settings: TrackingSettings | None, run_dir: str | Path, config: dict[str, Any],
                 purge_step: int | None = None, state_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Tracker:
    """The writers `settings` asks for, writing for the run in `run_dir`.

    config: the run's configuration (W&B config; a TensorBoard text summary). purge_step: on resume,
    the first step written again (TensorBoard then drops the old events from there on; W&B resumes
    the run id kept in `state_dir`/tracking.json, default run_dir)."""
    if settings is None:
        return Tracker()
    check_available(settings)
    run_dir = Path(run_dir)
    tb = None
    if settings.tensorboard or (settings.tensorboard is None and tensorboard_installed()):
        from tensorboardX import SummaryWriter

        tb = SummaryWriter(logdir=str(run_dir), purge_step=purge_step or None, flush_secs=30)
        tb.add_text("run/config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")
        if settings.tags:
            tb.add_text("run/tags", ", ".join(settings.tags))
    elif settings.tensorboard is None:
        log(f"note: tensorboardX is not installed, so no TensorBoard events are written ({INSTALL_HINT})")
    wandb_run = None
    if settings.wandb_project:
        import wandb

        state_path = Path(state_dir or run_dir) / TRACKING_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        run_id = state.get("wandb_id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        wandb_run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity, id=run_id,
                               resume="allow", name=settings.name or run_dir.name, group=settings.group,
                               tags=list(settings.tags), config=config, reinit="finish_previous")
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({**state, "wandb_id": run_id, "wandb_project": settings.wandb_project},
                                         indent=2, sort_keys=True) + "\n")
    return Tracker(tb, wandb_run)


# ---------------------------------------------------------------- CLI

def add_tracking_args(parser) -> None:
    """--tensorboard [BOOL], --wandb PROJECT, --wandb-entity, --wandb-group, --wandb-tags."""
    def parse_bool(text: str) -> bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)

    parser.add_argument("--tensorboard", type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                        help="TensorBoard event files in the run directory (default: on when tensorboardX "
                             f"is installed, {INSTALL_HINT}); the bare flag requires it, false turns it off")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log to this Weights & Biases project (WANDB_MODE=offline: no network)")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (team or user)")
    parser.add_argument("--wandb-group", default=None, help="W&B group (default: none; a sweep: its --out name)")
    parser.add_argument("--wandb-tags", default="", help="comma-separated extra W&B tags")


def settings_from_args(args) -> TrackingSettings:
    """TrackingSettings from the flags; TrackingUnavailable when an asked-for library is missing."""
    tags = tuple(t.strip() for t in (getattr(args, "wandb_tags", "") or "").split(",") if t.strip())
    settings = TrackingSettings(tensorboard=getattr(args, "tensorboard", None),
                                wandb_project=getattr(args, "wandb", None),
                                wandb_entity=getattr(args, "wandb_entity", None),
                                group=getattr(args, "wandb_group", None), tags=tags)
    check_available(settings)
    return settings
