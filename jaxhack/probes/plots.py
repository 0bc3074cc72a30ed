"""Phase 2 analysis, plots: PNGs of the cosine trajectories, the cos_S_contrib buckets and the
advantages (matplotlib Figure on the Agg canvas, no pyplot)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxhack.probes.tables import (Run, contrib_buckets, defined, step_column)
from jaxhack.probes.verdict import (STRONG_COS_IN)

# ---- plots -------------------------------------------------------------------------------------
def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_cos_trajectory(steps_by_arm: dict[str, list[dict]], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    for index, (arm, rows) in enumerate(steps_by_arm.items()):
        color = f"C{index}"
        steps = step_column(rows, "step")
        axes.plot(steps, step_column(rows, "cos_in"), "-o", color=color, markersize=3, label=f"{arm} cos_in")
        axes.plot(steps, step_column(rows, "cos_out"), "--s", color=color, markersize=3, label=f"{arm} cos_out")
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.axhline(STRONG_COS_IN, color="gray", linestyle=":", linewidth=0.8, label=f"{STRONG_COS_IN} (strong)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("mean cos over modules (batch gradient vs v_hack)")
    axes.set_title("cos_in / cos_out per step")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_contrib_buckets(runs: list[Run], path: Path) -> Path:
    figure = new_figure(max(6.0, 1.6 * sum(len(contrib_buckets(run)) for run in runs)), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    labels, position = [], 0
    for run in runs:
        for (src_pool, hacked), values in contrib_buckets(run).items():
            values = defined(values)
            position += 1
            labels.append(f"{run.arm}\n{src_pool.rstrip('/').split('/')[-1]}\nhacked={hacked}")
            if values.size:
                axes.boxplot([values], positions=[position], widths=0.5, showfliers=False)
                axes.scatter(position + jitter.uniform(-0.15, 0.15, values.size), values, s=8, alpha=0.5)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(range(1, position + 1))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_xlim(0.4, position + 0.6)
    axes.set_ylabel("cos_S_contrib (per-sample gradient vs v_hack)")
    axes.set_title("per-sample cos_S_contrib by (src_pool, hacked)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_advantages(runs: list[Run], path: Path) -> Path | None:
    """Histogram of `adv` per arm; None (no file) when no record logged adv."""
    advantage_by_arm = {run.arm: np.array([record["adv"] for record in run.records if "adv" in record])
                        for run in runs}
    advantage_by_arm = {arm: values for arm, values in advantage_by_arm.items() if values.size}
    if not advantage_by_arm:
        return None
    figure = new_figure(6, 4)
    axes = figure.add_subplot(1, 1, 1)
    for arm, values in advantage_by_arm.items():
        axes.hist(values, bins=30, alpha=0.5, label=arm)
    axes.set_xlabel("advantage (r_i - mean r)")
    axes.set_ylabel("samples")
    axes.set_title("advantage distribution")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


