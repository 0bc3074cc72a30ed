"""Device time per kernel from a `jax.profiler` trace: which kernels a step runs and how long each takes.

`profile(run, steps)` calls run() `steps` times under `jax.profiler.trace` and reads the trace back
(`jax.profiler.ProfileData`): every GPU kernel's device time summed by name, with the HLO instruction
that launched it where the trace records one, and by a coarse category (gemm, attention, copy,
reduction / elementwise fusion). Used by scripts/profile_kernels.py and `bench_phase3.py
--profile-sample`. On a CPU the trace holds no GPU plane: the table is empty.
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path


def category(kernel: str, hlo: str) -> str:
    """Coarse class of a kernel from its name and the HLO that launched it."""
    text = f"{kernel} {hlo}".lower()
    if any(s in text for s in ("flash", "cudnn", "fmha", "custom-call.attention", "__cudnn$fmha")):
        return "attention (cuDNN)"
    if any(s in text for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "dot", "wgmma", "matmul")):
        return "gemm"
    if any(s in text for s in ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice",
                               "dynamic_update_slice", "dynamic-slice", "dynamic_slice")):
        return "copy / transpose / slice"
    if any(s in text for s in ("reduce", "reduction")):
        return "reduction fusion"
    return "other fusion"


def _event_stats(event) -> dict:
    out = {}
    try:
        for name, value in event.stats:
            out[name] = value
    except Exception:  # stats are best effort: names vary between jax versions
        pass
    return out


def summarize_trace(trace_dir: Path, steps: int) -> dict:
    """Sum device kernel time per kernel name over every GPU plane of the xplane trace."""
    from jax.profiler import ProfileData

    files = sorted(trace_dir.rglob("*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(str(files[-1]))
    per_kernel = collections.defaultdict(lambda: {"ns": 0, "count": 0})  # (kernel, HLO op) -> totals
    planes, line_ms = [], collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        planes.append(plane.name)
        for line in plane.lines:
            line_ms[f"{plane.name} | {line.name}"] += sum(e.duration_ns for e in line.events) / 1e6 / steps
            # kernel launches sit on the stream lines; skip XLA's op/module summary lines
            lname = line.name.lower()
            if "xla op" in lname or "xla module" in lname or "step" in lname or "source" in lname:
                continue
            for event in line.events:
                stats = _event_stats(event)
                hlo = str(stats.get("hlo_op") or stats.get("long_name") or stats.get("tf_op") or "")[:400]
                # one entry per (kernel, launching HLO op): with XLA's command buffers off
                # (--xla_gpu_enable_command_buffer=) the same cuBLAS kernel of different matmuls splits
                entry = per_kernel[(event.name, hlo)]
                entry["ns"] += event.duration_ns
                entry["count"] += 1
    rows = [{"kernel": kernel, "ms_per_step": v["ns"] / 1e6 / steps, "calls_per_step": v["count"] / steps,
             "hlo": hlo, "category": category(kernel, hlo)} for (kernel, hlo), v in per_kernel.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_category = collections.defaultdict(float)
    for r in rows:
        by_category[r["category"]] += r["ms_per_step"]
    return {"planes": planes, "line_ms_per_step": dict(line_ms), "total_ms_per_step": sum(r["ms_per_step"] for r in rows),
            "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])), "kernels": rows}


def profile(run, steps: int) -> dict:
    """run() `steps` times under the profiler (each result waited for) -> summarize_trace's table,
    per step."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                jax.block_until_ready(run())
        return summarize_trace(Path(tmp), steps)


DECODE_ROLES = ("layer matmuls", "decode attention", "small per-layer kernels", "LM head",
                "per-step kernels", "prefill and the rest")


# the Pallas decode-attention kernels, by name: JAX's (`mha_forward*`), the fused ones (`models/fused_decode`:
# norms, RoPE and cache writes included) and the refill sampler's key parts and their combine (`attention_parts`)
ATTENTION_KERNELS = ("mha_forward", "fused_decode_attention", "fused_decode_parts", "parts_attention",
                     "combine_prefix_parts")


def decode_roles(summary: dict, decode_steps: int, layers: int, layer_matmul_bytes: float | None = None) -> dict:
    """A sampler call's kernels (`summarize_trace` of one call) grouped by what they do in a decode step,
    from their names and how often they run: the Pallas decode attention (ATTENTION_KERNELS); kernels
    run in at least 45% of the layers each step (calls >= 0.45 x layers x steps, and twice a step: a
    layer loop unrolled by 2 gives one layer's kernel two names, each run in half the layers): the layer
    matmuls (gemm, cuBLAS's split-K reductions included) and the small per-layer kernels (norms, RoPE,
    cache writes, SiLU, residual adds); kernels run about once per step: the LM head (gemm) and the
    per-step rest (sampling, bookkeeping); everything rarer: prefill and the rest.
    -> {role: {"us_per_decode_step", "kernels", "launches_per_decode_step"}}, with "tbps" for the layer
    matmuls when layer_matmul_bytes (the bytes of one step's layer weights) is given."""
    roles = {role: {"us_per_decode_step": 0.0, "kernels": 0, "launches_per_decode_step": 0.0} for role in DECODE_ROLES}
    for row in summary["kernels"]:
        per_step = row["calls_per_step"] / decode_steps
        gemm = row["category"] == "gemm"
        if any(name in row["kernel"] for name in ATTENTION_KERNELS):
            role = "decode attention"
        elif per_step >= max(0.45 * layers, 2):
            role = "layer matmuls" if gemm else "small per-layer kernels"
        elif per_step >= 0.9:
            role = "LM head" if gemm else "per-step kernels"
        else:
            role = "prefill and the rest"
        roles[role]["us_per_decode_step"] += 1e3 * row["ms_per_step"] / decode_steps
        roles[role]["kernels"] += 1
        roles[role]["launches_per_decode_step"] += per_step
    if layer_matmul_bytes and roles["layer matmuls"]["us_per_decode_step"] > 0:
        roles["layer matmuls"]["tbps"] = layer_matmul_bytes / (roles["layer matmuls"]["us_per_decode_step"] * 1e-6) / 1e12
    return roles
