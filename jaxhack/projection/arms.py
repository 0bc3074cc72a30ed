"""The one arms table: an arm names an adapter kind, a projection mode and a v_hack control.

Phase 3 (`rl.config.TrainConfig.arm`) accepts every arm; Phase 2 (`probes.phase2`) the ones that
need no v_hack control or routing (`PHASE2_ARMS`); Phase 1 `PHASE1_ARMS`.
"""
from __future__ import annotations

from typing import NamedTuple


class Arm(NamedTuple):
    adapter: str      # "svd" | "lora" (models.adapters)
    projection: str   # hack_projection mode: "measure" | "erase" | "route"
    control: str      # v_hack control: "none" | "random" (random_v) | "shuffled" (label-shuffled pairs)


ARMS: dict[str, Arm] = {
    "vanilla": Arm("svd", "measure", "none"),
    "projected": Arm("svd", "erase", "none"),
    "lora_projected": Arm("lora", "erase", "none"),
    "route": Arm("svd", "route", "none"),
    "random_v": Arm("svd", "erase", "random"),
    "shuffled": Arm("svd", "erase", "shuffled"),
}
ARM_NAMES = tuple(ARMS)
PHASE2_ARMS = ("vanilla", "projected", "lora_projected")
PHASE1_ARMS = ("vanilla", "projected")
