"""An experiment: a decode step's MLP block as one persistent Pallas (Triton) kernel, against XLA's (GPU).

The decode step's layer matmuls read their weights at 47-78% of the bandwidth at batch 64 because each
kernel's start and tail cost several us whatever it reads (docs/benchmarks.md, sessions 9, 12, 17-18);
hiding them needs fewer, longer kernels. `fused_mlp` tries that for the MLP block (RMSNorm, gate/up,
SiLU x up, down, residual: 150 MB of weights a layer at Qwen3-4B) in one launch of exactly `programs`
programs (the SM count, all resident), in phases separated by grid barriers:

1. gate/up, stream-K: the (column block, K block) units of x [W_gate | W_up] split evenly over the
   programs; each writes its partial sums (and those of h's squares, for the RMSNorm) per block;
2. each block's partial sums added in a fixed order (deterministic), the RMSNorm's 1/rms applied (it
   is folded: x_norm W = diag(1/rms) (h * w_norm) W), SiLU(gate) x up written to a scratch [B, F];
3. down, stream-K likewise; 4. its partial sums added in a fixed order, plus the residual h.

The grid barrier is an atomic counter each program increments, then reads until all have arrived.
Measured on an H200 (docs/benchmarks.md, "Session 19"): correct and deterministic, but 0.73x of XLA's
block (71.6 against 52.1 us a layer at batch 64): the barriers cost ~4 us each, and Triton's pipelined
dot streams gate/up at 2.6 TB/s where cuBLAS reaches 3.7. The model keeps XLA's MLP. Pallas'
interpreter runs programs one after another, so on CPU (`--implementation interpret`) the phases run as
four calls of the same kernel with no barrier.

    PYTHONPATH=. python scripts/bench_fused_mlp.py --hbm-tbps 4.8 --per-phase --out docs/results/bench_fused_mlp_h200.jsonl
    PYTHONPATH=. python scripts/bench_fused_mlp.py --small --implementation interpret  # CPU smoke

The benchmark: the block at B rows for --layers layers chained (each layer's output is the next one's
input, each layer its own weights, so nothing is served from L2), `xla` (`reference_mlp`, what
`qwen3._mlp_block` runs after the o projection) against `fused` (one call) and `phased` (four calls, no
barriers); --per-phase times each phase alone (phase 0: the three barriers alone); --grid, a tile grid.
Each timing enqueues --runs calls and waits once. `fraction_of_bandwidth` = the weights' bytes / (time x
--hbm-tbps). JSON lines to --out, a table on stdout.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from jaxhack.commands import checks  # noqa: E402
from jaxhack.io import UserError  # noqa: E402
from jaxhack.models.qwen3 import rms_norm  # noqa: E402

# ----------------------------------------------------------------------------- the kernel
# tiles: columns per unit and K per unit of the two matmuls (gate/up: x [B,D] @ [D,BLOCK_F] twice;
# down: act [B,F] @ [F,BLOCK_D])
BLOCK_F = 128
BLOCK_K_GATE_UP = 64
BLOCK_D = 128
BLOCK_K_DOWN = 64
PHASES = (1, 2, 3, 4)


def _program_units(p, units: int, programs: int):
    """Stream-K: program p's units [p U / P, (p+1) U / P)."""
    return p * units // programs, (p + 1) * units // programs


def _owner(u, units: int, programs: int):
    """The program whose units hold unit u (the largest p with p U // P <= u)."""
    return ((u + 1) * programs + units - 1) // units - 1


def _segments(p, units: int, num_k: int, programs: int, max_segments: int, body) -> None:
    """Calls body(s, block, k_lo, k_hi) for each column block program p's units touch (segment s):
    K blocks [k_lo, k_hi) of that block. Units are numbered block-major (block * num_k + k)."""
    u0, u1 = _program_units(p, units, programs)
    first = u0 // num_k

    def segment(s, carry):
        block = first + s
        lo = jnp.maximum(u0, block * num_k) - block * num_k
        hi = jnp.minimum(u1, (block + 1) * num_k) - block * num_k

        @pl.when(lo < hi)
        def _():
            body(s, block, lo, hi)
        return carry

    jax.lax.fori_loop(0, max_segments, segment, 0)


def _reduce(block, units: int, num_k: int, programs: int, add, init):
    """Folds add(carry, q, s) over the segments (program q, its segment s) that hold column block
    `block`, in program order (a fixed order: the sums are deterministic)."""
    first = _owner(block * num_k, units, programs)
    last = _owner((block + 1) * num_k - 1, units, programs)

    def step(q, carry):
        s = block - _program_units(q, units, programs)[0] // num_k
        return add(carry, q, s)

    return jax.lax.fori_loop(first, last + 1, step, init)


def _each_block(p, blocks: int, programs: int, body) -> None:
    """body(block) for blocks p, p + P, p + 2P, ... < blocks."""
    def step(i, carry):
        body(p + i * programs)
        return carry
    jax.lax.fori_loop(0, (blocks - p + programs - 1) // programs, step, 0)


def _grid_barrier(count_ref, target: int) -> None:
    """Waits until `target` arrivals: every program's stores before it are visible after it."""
    plgpu.debug_barrier()  # the whole program's stores are issued before its arrival
    plgpu.atomic_add(count_ref, (0,), jnp.int32(1))

    def waiting(seen):
        return seen < target

    jax.lax.while_loop(waiting, lambda _: plgpu.atomic_add(count_ref, (0,), jnp.int32(0)),
                       plgpu.atomic_add(count_ref, (0,), jnp.int32(0)))
    plgpu.debug_barrier()


def _kernel(h_ref, norm_ref, w_gate_up_ref, w_down_ref, *refs, phases: tuple[int, ...], carried: bool, barriers: bool,
            programs: int, eps: float, max_segments: tuple[int, int], block_k: tuple[int, int]):
    """h_ref [B,D]; norm_ref [D]; w_gate_up_ref [D,2F] ([W_gate | W_up]); w_down_ref [F,D]; refs: the
    counter [1] (and, when `carried`, the scratch buffers carried from the previous phase's call),
    then the outputs: out [B,D], counter [1], part_gate / part_up [P,S1,B,BLOCK_F] fp32, part_sq
    [P,S1,B] fp32, act [B,F], part_down [P,S2,B,BLOCK_D] fp32. Scratch is always read from the
    outputs (aliased to the carried inputs, so it is the same buffer)."""
    n_in = 6 if carried else 1
    out_ref, count_ref, part_gate, part_up, part_sq, act_ref, part_down = refs[n_in:]
    p = pl.program_id(0)
    B, D = h_ref.shape
    F = act_ref.shape[1]
    dtype = h_ref.dtype
    block_f, block_d = part_gate.shape[-1], part_down.shape[-1]
    bk1, bk2 = block_k
    num_k1, num_k2 = D // bk1, F // bk2
    blocks1, blocks2 = F // block_f, D // block_d
    units1, units2 = blocks1 * num_k1, blocks2 * num_k2
    passed = 0

    def barrier():  # between phases run by one call: every program finishes one before the next starts
        nonlocal passed
        passed += 1
        if barriers:
            _grid_barrier(count_ref, passed * programs)

    if 1 in phases:  # gate/up partial sums, and the partial sums of squares of h
        def gate_up_segment(s, block, lo, hi):
            gate_cols, up_cols = pl.ds(block * block_f, block_f), pl.ds(F + block * block_f, block_f)

            def k_step(kb, carry):
                gate, up, sq = carry
                ks = pl.ds(kb * bk1, bk1)
                x = h_ref[:, ks]  # [B,bk1]
                x32 = x.astype(jnp.float32)
                xw = (x32 * norm_ref[ks].astype(jnp.float32)[None, :]).astype(dtype)
                gate = gate + plgpu.dot(xw, w_gate_up_ref[ks, gate_cols])
                up = up + plgpu.dot(xw, w_gate_up_ref[ks, up_cols])
                return gate, up, sq + jnp.sum(x32 * x32, axis=1)

            zeros = jnp.zeros((B, block_f), jnp.float32)
            gate, up, sq = jax.lax.fori_loop(lo, hi, k_step, (zeros, zeros, jnp.zeros((B,), jnp.float32)))
            part_gate[p, s] = gate
            part_up[p, s] = up
            part_sq[p, s] = sq

        _segments(p, units1, num_k1, programs, max_segments[0], gate_up_segment)
    barrier()

    if 2 in phases:  # SiLU(gate) x up per column block
        def activation(block):
            def add(carry, q, s):
                gate, up, sq = carry
                return gate + part_gate[q, s], up + part_up[q, s], sq + part_sq[q, s]

            zeros = jnp.zeros((B, block_f), jnp.float32)
            gate, up, sq = _reduce(block, units1, num_k1, programs, add,
                                   (zeros, zeros, jnp.zeros((B,), jnp.float32)))
            inv_rms = jax.lax.rsqrt(sq / D + eps)[:, None]  # [B,1]
            gate = (gate * inv_rms).astype(dtype).astype(jnp.float32)
            up = (up * inv_rms).astype(dtype).astype(jnp.float32)
            act_ref[:, pl.ds(block * block_f, block_f)] = (gate * jax.nn.sigmoid(gate) * up).astype(dtype)

        _each_block(p, blocks1, programs, activation)
    barrier()

    if 3 in phases:  # down partial sums
        def down_segment(s, block, lo, hi):
            cols = pl.ds(block * block_d, block_d)

            def k_step(kb, acc):
                ks = pl.ds(kb * bk2, bk2)
                return acc + plgpu.dot(act_ref[:, ks], w_down_ref[ks, cols])

            part_down[p, s] = jax.lax.fori_loop(lo, hi, k_step, jnp.zeros((B, block_d), jnp.float32))

        _segments(p, units2, num_k2, programs, max_segments[1], down_segment)
    barrier()

    if 4 in phases:  # the residual
        def residual(block):
            total = _reduce(block, units2, num_k2, programs, lambda acc, q, s: acc + part_down[q, s],
                            jnp.zeros((B, block_d), jnp.float32))
            cols = pl.ds(block * block_d, block_d)
            out_ref[:, cols] = (h_ref[:, cols].astype(jnp.float32)
                                + total.astype(dtype).astype(jnp.float32)).astype(dtype)

        _each_block(p, blocks2, programs, residual)


def _max_segments(units: int, num_k: int, programs: int) -> int:
    """The most column blocks one program's units can touch."""
    return max(_program_units(p, units, programs)[1] // num_k - _program_units(p, units, programs)[0] // num_k
               + 1 for p in range(programs))


def fused_mlp(h: jax.Array, norm: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, eps: float,
              programs: int, implementation: str = "pallas", num_warps: int = 4, num_stages: int = 4,
              block_f: int = BLOCK_F, block_d: int = BLOCK_D, block_k_gate_up: int = BLOCK_K_GATE_UP,
              block_k_down: int = BLOCK_K_DOWN, only_phase: int | None = None, scratch=None) -> jax.Array:
    """h + down(SiLU(gate) * up) with gate, up = RMSNorm(h) [W_gate | W_up], for decode rows.

    h: [B, D]; norm: [D] (post-attention RMSNorm weight); w_gate_up: [D, 2F]; w_down: [F, D]; all in
    one dtype. programs: the programs launched (on a GPU, at most the SMs that can hold one each; the
    SM count). implementation: 'pallas' (GPU, one call with grid barriers), 'phased' (GPU, four calls)
    or 'interpret' (Pallas' interpreter, four calls). only_phase (diagnostics): run that phase alone (0:
    the barriers alone) on `scratch` (the previous call's, or None), returning [out, counter, *scratch].
    Returns [B, D] in h's dtype."""
    B, D = h.shape
    F = w_down.shape[0]
    chex.assert_shape(norm, (D,))
    chex.assert_shape(w_gate_up, (D, 2 * F))
    chex.assert_shape(w_down, (F, D))
    chex.assert_type([norm, w_gate_up, w_down], h.dtype)
    if implementation not in ("pallas", "phased", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected 'pallas', 'phased' or 'interpret'")
    block_f, block_d = min(block_f, F), min(block_d, D)
    bk1, bk2 = min(block_k_gate_up, D), min(block_k_down, F)
    if F % block_f or F % bk2 or D % block_d or D % bk1:
        raise ValueError(f"hidden {D}, intermediate {F}: expected multiples of the tiles "
                         f"({block_d}, {bk1}; {block_f}, {bk2})")
    units1, units2 = (F // block_f) * (D // bk1), (D // block_d) * (F // bk2)
    if programs > min(units1, units2):
        raise ValueError(f"{programs} programs for {min(units1, units2)} units of work")
    segments = (_max_segments(units1, D // bk1, programs), _max_segments(units2, F // bk2, programs))
    f32 = jnp.float32
    scratch_shapes = [jax.ShapeDtypeStruct((programs, segments[0], B, block_f), f32),
                      jax.ShapeDtypeStruct((programs, segments[0], B, block_f), f32),
                      jax.ShapeDtypeStruct((programs, segments[0], B), f32),
                      jax.ShapeDtypeStruct((B, F), h.dtype),
                      jax.ShapeDtypeStruct((programs, segments[1], B, block_d), f32)]
    out_shape = [jax.ShapeDtypeStruct((B, D), h.dtype), jax.ShapeDtypeStruct((1,), jnp.int32), *scratch_shapes]

    def call(phases, carried_scratch, barriers=False):
        carried = carried_scratch is not None
        kernel = functools.partial(_kernel, phases=phases, carried=carried, barriers=barriers, programs=programs, eps=eps,
                                   max_segments=segments, block_k=(bk1, bk2))
        aliases = {4: 1, **({5 + i: 2 + i for i in range(5)} if carried else {})}
        return pl.pallas_call(
            kernel, grid=(programs,), out_shape=out_shape, input_output_aliases=aliases,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=implementation == "interpret", name=f"fused_mlp_{''.join(map(str, phases))}",
        )(h, norm, w_gate_up, w_down, jnp.zeros((1,), jnp.int32), *(carried_scratch or ()))

    if only_phase is not None:  # diagnostics (scripts/bench_fused_mlp.py): one phase (0: the 3 barriers
        return call((only_phase,), scratch, barriers=only_phase == 0)  # alone) on the given scratch
    if implementation == "pallas":
        return call(PHASES, None, barriers=True)[0]
    outs = call((1,), None)
    for phase in PHASES[1:]:
        outs = call((phase,), outs[2:])
    return outs[0]


def reference_mlp(h: jax.Array, norm: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *,
                  eps: float) -> jax.Array:
    """What `qwen3._mlp_block` runs after the o projection, with the decode layout's fused gate/up weight."""
    gate, up = jnp.split(rms_norm(h, norm, eps) @ w_gate_up, 2, axis=-1)
    return h + (jax.nn.silu(gate) * up) @ w_down


# ----------------------------------------------------------------------------- the benchmark
EPS = 1e-6
GRID = [{"num_warps": w, "num_stages": st, "block_k_gate_up": bk, "block_k_down": bk, "block_f": bf, "block_d": bf}
        for w, st, bk, bf in itertools.product((4, 8), (3, 4), (64, 128), (32, 64, 128))]


def bench_shape(args, B: int, grid: list[dict], emit) -> list[dict]:
    import numpy as np

    D, F = (256, 512) if args.small else (2560, 9728)
    programs = args.programs or (4 if args.small else jax.devices()[0].core_count)
    keys = jax.random.split(jax.random.PRNGKey(0), 2 + 3 * args.layers)
    h0 = jax.random.normal(keys[0], (B, D), jnp.bfloat16)
    layers = [((1 + 0.1 * jax.random.normal(keys[2 + 3 * i], (D,))).astype(jnp.bfloat16),
               (0.02 * jax.random.normal(keys[3 + 3 * i], (D, 2 * F))).astype(jnp.bfloat16),
               (0.02 * jax.random.normal(keys[4 + 3 * i], (F, D))).astype(jnp.bfloat16))
              for i in range(args.layers)]
    weight_bytes = (D * 2 * F + F * D) * 2  # per layer

    def chained(block):
        def run(h, layers):
            for norm, w_gate_up, w_down in layers:
                h = block(h, norm, w_gate_up, w_down)
            return h
        return jax.jit(run)

    def xla(h, norm, w_gate_up, w_down):
        return reference_mlp(h, norm, w_gate_up, w_down, eps=EPS)

    def fused(config):
        return lambda h, norm, w_gate_up, w_down: fused_mlp(
            h, norm, w_gate_up, w_down, eps=EPS, programs=programs, implementation=args.implementation, **config)

    one = np.asarray(chained(xla)(h0, layers[:1]), np.float32)
    records = []
    phased = lambda h, norm, w_gate_up, w_down: fused_mlp(  # noqa: E731
        h, norm, w_gate_up, w_down, eps=EPS, programs=programs,
        implementation="interpret" if args.implementation == "interpret" else "phased")
    for impl, config, block in [("xla", None, xla), ("fused", {}, fused({})), ("phased", {}, phased)] + [
            ("fused", c, fused(c)) for c in grid]:
        record = {"batch": B, "hidden": D, "intermediate": F, "layers": args.layers, "programs": programs,
                  "impl": impl, "config": config}
        try:
            run = chained(block)
            first = np.asarray(run(h0, layers[:1]), np.float32)
            again = np.asarray(run(h0, layers[:1]), np.float32)
            jax.block_until_ready(run(h0, layers))  # compile
            t0 = time.perf_counter()
            outs = [run(h0, layers) for _ in range(args.runs)]
            jax.block_until_ready(outs)
            seconds = (time.perf_counter() - t0) / (args.runs * args.layers)
        except Exception as e:  # a tile setting Triton refuses: recorded, the grid goes on
            emit({**record, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"B={B} {impl} {config}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        record.update(us=round(seconds * 1e6, 2),
                      fraction_of_bandwidth=round(weight_bytes / (seconds * args.hbm_tbps * 1e12), 3),
                      rel_diff_vs_xla=float(np.linalg.norm(first - one) / np.linalg.norm(one)),
                      deterministic=bool((first == again).all()))
        emit(record)
        records.append(record)
    if args.per_phase:  # each phase as its own call (no barriers), on the scratch of one phased run
        phase_impl = "interpret" if args.implementation == "interpret" else "phased"
        for phase in range(0 if args.implementation == "pallas" else 1, 5):  # 0: the barriers alone
            def only(h, norm, w_gate_up, w_down, scratch):
                return fused_mlp(h, norm, w_gate_up, w_down, eps=EPS, programs=programs, implementation=phase_impl,
                                 only_phase=phase, scratch=scratch)[2:]
            def run(h, layers, scratch):
                for norm, w_gate_up, w_down in layers:
                    scratch = only(h, norm, w_gate_up, w_down, scratch)  # aliased: calls run in order
                return scratch
            run = jax.jit(run)
            scratch = jax.jit(lambda h, n, a, b: fused_mlp(h, n, a, b, eps=EPS, programs=programs,
                                                           implementation=phase_impl, only_phase=1))(h0, *layers[0])[2:]
            jax.block_until_ready(run(h0, layers, scratch))
            t0 = time.perf_counter()
            outs = [run(h0, layers, scratch) for _ in range(args.runs)]
            jax.block_until_ready(outs)
            seconds = (time.perf_counter() - t0) / (args.runs * args.layers)
            rec = {"batch": B, "impl": "phase", "phase": phase, "us": round(seconds * 1e6, 2), "programs": programs}
            emit(rec)
            print(f"B={B} phase {phase} alone: {rec['us']} us/layer", flush=True)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64], help="rows")
    ap.add_argument("--layers", type=int, default=36, help="layers chained per timed call")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--programs", type=int, default=None, help="default: the GPU's SM count")
    ap.add_argument("--grid", action="store_true", help="also time the tile grid")
    ap.add_argument("--per-phase", action="store_true", help="also time each phase alone (diagnostics)")
    checks.add_kernel_bench_flags(ap)
    args = ap.parse_args(argv)
    try:
        checks.at_least(args, ("batch", "layers", "runs", "programs"))
        checks.multiples("--batch", args.batch, 16, "the kernel's smallest matmul tile")
        checks.kernel_bench_flags(args)
    except UserError as e:
        ap.error(str(e))
    device = jax.devices()[0].device_kind
    grid = (GRID[:1] if args.small else GRID) if args.grid else []

    def emit(rec):
        rec = {"part": "fused_mlp", **rec, "device": device, "hbm_tbps": args.hbm_tbps}
        if args.out:
            from jaxhack.io import append_jsonl
            append_jsonl(args.out, rec)

    for B in args.batch:
        records = bench_shape(args, B, grid, emit)
        xla = next((r for r in records if r["impl"] == "xla"), None)
        best = min((r for r in records if r["impl"] == "fused"), key=lambda r: r["us"], default=None)
        for r in records:
            print(f"B={B} {r['impl']:5s} {str(r['config']):80s} {r['us']:8.2f} us/layer  "
                  f"{r['fraction_of_bandwidth']:.3f} of bandwidth  rel diff vs xla {r['rel_diff_vs_xla']:.2e}"
                  f"  deterministic {r['deterministic']}")
        if xla and best:
            print(f"B={B}: xla {xla['us']} us, best fused {best['us']} us {best['config']} "
                  f"({xla['us'] / best['us']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
