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


ARM_STYLES = [  # (marker, linewidth, marker size): earlier arms are drawn wider underneath
    ("o", 3.2, 7), ("s", 1.8, 4.5), ("^", 1.0, 3), ("D", 0.8, 2.5), ("v", 0.8, 2.5)]


def plot_cos_trajectory(steps_by_arm: dict[str, list[dict]], path: Path) -> Path:
    """cos_in (solid) and cos_out (dashed) per probe step, one colour and marker per arm; an arm whose
    cos_out equals its cos_in (no projection, e.g. vanilla) gets one line. Arms drawn first are
    wider and underneath, so identical curves stay visible; the legend sits outside the data."""
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(9, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    for index, (arm, rows) in enumerate(steps_by_arm.items()):
        color = f"C{index}"
        marker, width, size = ARM_STYLES[min(index, len(ARM_STYLES) - 1)]
        steps = step_column(rows, "step")
        cos_in, cos_out = step_column(rows, "cos_in"), step_column(rows, "cos_out")
        same = bool(np.allclose(cos_in, cos_out, equal_nan=True))
        style = dict(color=color, marker=marker, markersize=size, linewidth=width, zorder=2 + index,
                     markerfacecolor="none" if index == 0 else color)
        axes.plot(steps, cos_in, "-", label=f"{arm} cos_in" + (" = cos_out" if same else ""), **style)
        if not same:
            axes.plot(steps, cos_out, "--", label=f"{arm} cos_out", **style)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.axhline(STRONG_COS_IN, color="gray", linestyle=":", linewidth=0.8, label=f"{STRONG_COS_IN} (strong)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("probe step")
    axes.set_ylabel("mean cos over modules\n(batch gradient vs v_hack)")
    axes.set_title("cos_in (before projection) / cos_out (after) per probe step")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_contrib_buckets(runs: list[Run], path: Path) -> Path:
    """Box + points of cos_S_contrib per (arm, src_pool, hacked), with n under each box. The per-sample
    gradients are taken before projection, so two arms in the same basis replaying the same samples
    show the same boxes."""
    figure = new_figure(max(6.0, 1.6 * sum(len(contrib_buckets(run)) for run in runs)), 4.8)
    axes = figure.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    labels, position = [], 0
    for index, run in enumerate(runs):
        for (src_pool, hacked), values in contrib_buckets(run).items():
            values = defined(values)
            position += 1
            labels.append(f"{run.arm}\n{src_pool.rstrip('/').split('/')[-1]}\nhacked={hacked}\nn={values.size}")
            if values.size:
                axes.boxplot([values], positions=[position], widths=0.5, showfliers=False)
                axes.scatter(position + jitter.uniform(-0.15, 0.15, values.size), values, s=8, alpha=0.5,
                             color=f"C{index}")
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(range(1, position + 1))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_xlim(0.4, position + 0.6)
    axes.set_ylabel("cos_S_contrib\n(per-sample gradient vs v_hack)")
    axes.set_title("per-sample cos_S_contrib by (src_pool, hacked); n = samples per box\n"
                   "(measured before projection: arms in one basis over the same samples coincide)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_advantages(runs: list[Run], path: Path) -> Path | None:
    """Step histogram of `adv` per arm (outlines in the legend's colours and line styles, so
    identical histograms stay distinguishable); None (no file) when no record logged adv."""
    advantage_by_arm = {run.arm: np.array([record["adv"] for record in run.records if "adv" in record])
                        for run in runs}
    advantage_by_arm = {arm: values for arm, values in advantage_by_arm.items() if values.size}
    if not advantage_by_arm:
        return None
    figure = new_figure(7.5, 4)
    axes = figure.add_subplot(1, 1, 1)
    every = np.concatenate(list(advantage_by_arm.values()))
    bins = np.histogram_bin_edges(every, bins=30)
    styles = ["-", "--", ":", "-."]
    for index, (arm, values) in enumerate(advantage_by_arm.items()):
        axes.hist(values, bins=bins, histtype="step", color=f"C{index}", linestyle=styles[index % len(styles)],
                  linewidth=3.0 - 0.8 * min(index, 2), label=f"{arm} (n={values.size})")
    same = len({v.tobytes() for v in advantage_by_arm.values()}) == 1 and len(advantage_by_arm) > 1
    axes.set_xlabel("advantage (r_i - mean r of the group)")
    axes.set_ylabel("samples")
    axes.set_title("advantage distribution" + (" (identical across arms: same replayed samples)" if same else ""),
                   fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
