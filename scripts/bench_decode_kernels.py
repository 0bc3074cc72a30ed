"""The decode step's two bandwidth-bound kernels in isolation, against the bytes they must read (GPU).

`matmul`: every Linear of a Qwen3-4B decode step at M rows (exact form: the fused weights q/k/v,
o, gate/up, down in [K, N]; factored form: the SVD bases in [N, K]), XLA's einsum against a split-K
Pallas kernel (`skinny_matmul`, below) over a small grid of tile settings, and with --mosaic against
JAX's own TMA + wgmma Hopper matmul (`mosaic_matmul`). Each timing runs
L copies of the matmul on L distinct weights in one jitted call (L * |W| >= 512 MB, so nothing is
served from the 50-60 MB L2), reported per matmul.

`attention`: the decode attention (`jaxhack.models.decode_attention`: JAX's Pallas flash-decoding
kernel) at B rows over a cache of S slots, each row live over [start, end) with start < 64 and end
uniform in (start, S]: the model's two tilings (`decode_tiles` for rows at different steps, the refill
schedule: parts of 128 slots; and for rows in lockstep: one program per (row, KV head) from 512 such
pairs), then a grid of split / block_k / warps / stages. Bytes = the live slots' K and V. A tie here
can still differ inside the sampler (its rows' lengths are not uniform): decide with bench_generate /
bench_phase3.

`prefix`: the refill sampler's decode attention over its prompt pool (`prefix_decode_attention`: each
prompt's keys read once for its G rows, merged with each row's own generated keys) against session
13's layout (each slot a copy of its prompt ahead of its generated tokens, `decode_attention`), at
the `full` preset's state: --slots rows in GRPO groups of 6, prompts of 300-500 tokens in a pool of 64
entries of 512, generated lengths drawn as bench_phase3's realistic regime (gamma, mean 500). Bytes:
each layout's live keys and values.

`stream`: what the card's memory can be made to deliver at all, the yardstick for the fractions above:
a sum over --stream-gb of bf16 (each byte read once, fp32 accumulation) and a copy of the same array
(read + write). On an H200 these say how far below the datasheet's 4.8 TB/s any read-bound kernel
already sits before it does anything else.

Each line: `fraction_of_bandwidth` = bytes / (time * --hbm-tbps). JSON lines to --out, a table on stdout.

    PYTHONPATH=. python scripts/bench_decode_kernels.py --part matmul attention --hbm-tbps 4.8 \
        --out docs/results/bench_decode_kernels_h200.jsonl
    PYTHONPATH=. python scripts/bench_decode_kernels.py --part prefix --hbm-tbps 4.8 --out docs/results/...
    PYTHONPATH=. python scripts/bench_decode_kernels.py --part stream --hbm-tbps 4.8 --out docs/results/...
    PYTHONPATH=. python scripts/bench_decode_kernels.py --part matmul --rows 16 --small --implementation interpret  # CPU smoke
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.commands import checks  # noqa: E402
from jaxhack.io import UserError  # noqa: E402

# name: (K, N, layout) at Qwen3-4B (hidden 2560, q 4096, kv 1024, intermediate 9728)
MATMULS_4B = {
    "qkv_proj": (2560, 6144, "kn"), "o_proj": (4096, 2560, "kn"),
    "gate_up_proj": (2560, 19456, "kn"), "down_proj": (9728, 2560, "kn"),
    "qkv_vh": (2560, 4608, "nk"), "q_u": (2560, 4096, "nk"), "kv_u": (1024, 1024, "nk"),
    "o_vh": (4096, 2560, "nk"), "o_u": (2560, 2560, "nk"), "gate_up_vh": (2560, 5120, "nk"),
    "gate_u": (2560, 9728, "nk"), "down_vh": (9728, 2560, "nk"), "down_u": (2560, 2560, "nk"),
    # the exact form's decode layout since session 10 (decode_layout.decode_layers): weights and Vh^T side by side
    "qkv_w_vh": (2560, 6144 + 4608, "kn"), "o_w_vh": (4096, 2 * 2560, "kn"),
    "gate_up_w_vh": (2560, 19456 + 5120, "kn"), "down_w_vh": (9728, 2 * 2560, "kn"),
}
MATMULS_SMALL = {"kn": (256, 512, "kn"), "nk": (256, 384, "nk")}


# ---- the alternative to XLA's matmuls measured here: a split-K Pallas (Triton) kernel --------------
# y[M, N] = x[M, K] @ W for small M: W streamed in column strips of block_n, the K axis cut into
# k_splits parts so that a narrow W still gives every SM programs; the parts' fp32 partial sums are
# added by XLA. Measured against XLA's einsum in session 9 (docs/benchmarks.md); the model does not
# use it (no consistent gain).
LAYOUTS = ("kn", "nk")


def skinny_matmul_reference(x, w, layout: str = "kn"):
    """x [M,K] @ W -> [M,N] fp32 (W [K,N] for "kn", [N,K] for "nk")."""
    import jax.numpy as jnp
    spec = "mk,kn->mn" if layout == "kn" else "mk,nk->mn"
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _kernel(x_ref, w_ref, o_ref, *, layout: str, block_k: int, k_part: int):
    """One program: rows [M], output columns [block_n], K slots [split * k_part, (split+1) * k_part).
    x_ref [M, K]; w_ref [K, block_n] ("kn") or [block_n, K] ("nk"); o_ref [M, block_n] fp32."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    split = pl.program_id(1)
    M, block_n = o_ref.shape

    def body(i, acc):
        ks = pl.ds(split * k_part + i * block_k, block_k)
        xb = x_ref[:, ks]  # [M, block_k]
        if layout == "kn":
            wb = w_ref[ks, :]  # [block_k, block_n]
            return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)
        wb = w_ref[:, ks]  # [block_n, block_k]
        return acc + jax.lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_part // block_k, body, jnp.zeros((M, block_n), jnp.float32))
    o_ref[...] = acc


def skinny_matmul(x, w, layout: str = "kn", *, block_n: int = 64, block_k: int = 128, k_splits: int = 4,
                  num_warps: int = 4, num_stages: int = 3, implementation: str = "pallas"):
    """x [M,K] (M a power of two >= 16) @ W -> [M,N] fp32. W [K,N] ("kn") or [N,K] ("nk"); N a
    multiple of block_n; K a multiple of k_splits * block_k. implementation: "pallas" (GPU),
    "interpret" (the same kernel by Pallas' interpreter; any backend, for tests) or "xla"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    if implementation == "xla":
        return skinny_matmul_reference(x, w, layout)
    if implementation not in ("pallas", "interpret"):
        raise ValueError(f"implementation={implementation!r}; expected 'pallas', 'interpret' or 'xla'")
    import chex
    import jax
    import jax.numpy as jnp

    chex.assert_rank([x, w], 2)
    M, K = x.shape
    N = w.shape[1] if layout == "kn" else w.shape[0]
    if (w.shape[0] if layout == "kn" else w.shape[1]) != K:
        raise ValueError(f"x is [M, {K}] but W is {w.shape} with layout {layout!r}")
    if M & (M - 1) or M < 16:
        raise ValueError(f"{M} rows: the kernel needs a power of two >= 16 (pad the rows)")
    if N % block_n or K % (k_splits * block_k):
        raise ValueError(f"W {w.shape}: N must be a multiple of block_n={block_n} and K of "
                         f"k_splits*block_k={k_splits * block_k}")
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    k_part = K // k_splits
    w_block = (K, block_n) if layout == "kn" else (block_n, K)
    w_index = (lambda n, s: (0, n)) if layout == "kn" else (lambda n, s: (n, 0))
    partial = pl.pallas_call(
        functools.partial(_kernel, layout=layout, block_k=block_k, k_part=k_part),
        grid=(N // block_n, k_splits),
        in_specs=[pl.BlockSpec((M, K), lambda n, s: (0, 0)), pl.BlockSpec(w_block, w_index)],
        out_specs=pl.BlockSpec((None, M, block_n), lambda n, s: (s, 0, n)),
        out_shape=jax.ShapeDtypeStruct((k_splits, M, N), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=implementation == "interpret",
        name="skinny_matmul",
    )(x, w.astype(x.dtype))  # [k_splits, M, N]
    return partial.sum(axis=0)


def _time(fn, *args, runs: int) -> float:
    """Seconds per call of fn(*args): `runs` calls enqueued back to back and waited for once, so the
    GPU never idles on the host's dispatch between them (throughput, not dispatch latency)."""
    import jax
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(runs)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / runs


def measure(many, full_args, one_args, calls: int, ref, record: dict, bytes_read: int, args, emit):
    """Time many(*full_args) (`calls` kernel calls in one jitted program) and check many(*one_args)[0]
    against ref. Emits and returns the record (us per call, rel_err, fraction_of_bandwidth), or emits
    an error record and returns None when the kernel does not compile or run (a tile setting Triton
    refuses): the search goes on."""
    import jax.numpy as jnp
    try:
        got = many(*one_args)[0].astype(jnp.float32)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        s = _time(many, *full_args, runs=args.runs) / calls
    except Exception as e:
        emit({**record, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        return None
    record = {**record, "us": round(s * 1e6, 2), "rel_err": err,
              "fraction_of_bandwidth": round(bytes_read / (s * args.hbm_tbps * 1e12), 3)}
    emit(record)
    return record


# tile_n x tile_k x pipeline depth for `mosaic_matmul` at M = 64 (tile_m); these fit the H200's shared memory
MOSAIC_TILES = [{"tile_n": tn, "tile_k": tk, "max_concurrent_steps": steps}
                for tn, tk, steps in ((64, 64, 4), (64, 64, 8), (64, 128, 4), (128, 64, 4))]


def mosaic_matmul(x, w, *, tile_n: int, tile_k: int, max_concurrent_steps: int):
    """x [M, K] @ w [K, N] by JAX's persistent, warp-specialised Hopper matmul (TMA loads, wgmma;
    `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`), two consumer warpgroups along N, no split-K.
    M must be a multiple of 64 (its tile_m here). Hopper GPUs only."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hopper

    config = hopper.TuningConfig(tile_m=64, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=max_concurrent_steps,
                                 epi_tile_n=64, epi_tile_m=64, wg_dimension=hopper.MatmulDimension.N)
    return hopper.matmul(x, w, None, config)


def matmul_tiles(K: int, N: int, min_programs: int):
    """Stage 1 of the tile search: block_n x block_k x k_splits where the shapes divide and the
    grid has at least min_programs programs (fewer leave SMs idle)."""
    for block_n, block_k, k_splits in itertools.product((32, 64, 128), (64, 128), (1, 2, 4, 8)):
        if N % block_n or K % (k_splits * block_k) or (N // block_n) * k_splits < min_programs:
            continue
        yield {"block_n": block_n, "block_k": block_k, "k_splits": k_splits, "num_warps": 4, "num_stages": 3}


def refinements(config: dict):
    """Stage 2: the best tile with other warps / pipeline stages."""
    for num_warps, num_stages in ((4, 4), (8, 3), (8, 4), (4, 2)):
        yield {**config, "num_warps": num_warps, "num_stages": num_stages}


def bench_matmul(args, emit):
    import jax
    import jax.numpy as jnp

    shapes = MATMULS_SMALL if args.small else MATMULS_4B
    names = args.matmuls or list(shapes)
    rng = jax.random.PRNGKey(0)
    for name in names:
        K, N, layout = shapes[name]
        w_bytes = K * N * 2
        L = max(1, min(128, math.ceil(args.l2_defeat_mb * 1e6 / w_bytes)))
        keys = jax.random.split(rng, L)
        wshape = (K, N) if layout == "kn" else (N, K)
        ws = [jax.random.normal(k, wshape, jnp.bfloat16) * 0.02 for k in keys]
        for M in args.rows:
            xs = [jax.random.normal(k, (M, K), jnp.bfloat16) for k in jax.random.split(keys[0], L)]
            ref = skinny_matmul_reference(xs[0], ws[0], layout)
            base = {"part": "matmul", "matmul": name, "M": M, "K": K, "N": N, "layout": layout,
                    "weights_bytes": w_bytes, "copies": L}

            def run(fn, impl, config):
                many = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])
                return measure(many, (xs, ws), (xs[:1], ws[:1]), L, ref, {**base, "impl": impl, "config": config},
                               w_bytes, args, emit)

            xla = run(lambda x, w: skinny_matmul_reference(x, w, layout), "xla", None)
            if args.mosaic and layout == "kn":  # JAX's TMA + wgmma Hopper matmul (Pallas on Mosaic GPU)
                for config in MOSAIC_TILES[:args.mosaic_settings]:
                    run(lambda x, w, c=config: mosaic_matmul(x, w, **c), "mosaic_hopper_matmul", config)
            best = None
            t_end = time.perf_counter() + args.budget_per_shape_s
            min_programs = 1 if args.small else 128
            for stage in (1, 2):
                configs = matmul_tiles(K, N, min_programs) if stage == 1 else refinements(best["config"]) if best else ()
                for config in configs:
                    if time.perf_counter() > t_end:
                        break
                    rec = run(lambda x, w, c=config: skinny_matmul(x, w, layout, implementation=args.implementation, **c),
                              "pallas", config)
                    if rec and (best is None or rec["us"] < best["us"]):
                        best = rec
            summary = {"part": "matmul_best", "matmul": name, "M": M, "xla_us": xla and xla["us"],
                       "xla_fraction": xla and xla["fraction_of_bandwidth"],
                       "pallas_us": best and best["us"], "pallas_fraction": best and best["fraction_of_bandwidth"],
                       "pallas_config": best and best["config"]}
            emit(summary)
            print(f"{name:>14} M={M:<4} xla {summary['xla_us']} us ({summary['xla_fraction']})  "
                  f"pallas {summary['pallas_us']} us ({summary['pallas_fraction']}) {summary['pallas_config']}",
                  flush=True)


def attention_tiles(S: int):
    """Stage 1: split x block_k at 4 warps, 2 stages (JAX's defaults)."""
    for split, block_k in itertools.product((128, 256, 512, S), (32, 64, 128)):
        if S % split == 0 and split % block_k == 0:
            yield {"split": split, "block_k": block_k, "num_warps": 4, "num_stages": 2}


def attention_refinements(config: dict):
    for num_warps, num_stages in ((2, 2), (8, 2), (4, 1), (4, 3), (8, 3)):
        yield {**config, "num_warps": num_warps, "num_stages": num_stages}


def bench_attention(args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxhack.models import decode_attention as da

    Hq, Hkv, hd = (8, 2, 16) if args.small else (32, 8, 128)
    for B, S in itertools.product(args.batch, args.cache_len):
        rng = np.random.default_rng(0)
        start = rng.integers(0, 64, B)
        end = np.minimum(S, start + 1 + rng.integers(0, S - start))
        start, end = jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32)
        live_bytes = int(np.sum(np.asarray(end - start))) * Hkv * hd * 2 * 2
        k = jax.random.normal(jax.random.PRNGKey(1), (B, Hkv, S, hd), jnp.bfloat16)
        v = jax.random.normal(jax.random.PRNGKey(2), (B, Hkv, S, hd), jnp.bfloat16)
        qs = [jax.random.normal(jax.random.PRNGKey(3 + i), (B, Hq, hd), jnp.bfloat16) for i in range(args.attention_calls)]
        ref = da.decode_attention_reference(qs[0], k, v, start, end).astype(jnp.float32)
        base = {"part": "attention", "batch": B, "cache_len": S, "live_bytes": live_bytes,
                "mean_live": float(np.mean(np.asarray(end - start)))}

        def run(fn, impl, config):
            many = jax.jit(lambda qs, k, v: [fn(q, k, v) for q in qs])
            return measure(many, (qs, k, v), (qs[:1], k, v), len(qs), ref, {**base, "impl": impl, "config": config},
                           live_bytes, args, emit)

        def attend(tiles):
            return lambda q, k, v: da.decode_attention(q, k, v, start, end, implementation=args.implementation,
                                                       tiles=tiles)

        # the model's two tilings (decode_tiles: rows at different steps, rows in lockstep), then the grid
        model = {}
        for lockstep, name in ((False, "refill"), (True, "lockstep")):
            tiles = da.decode_tiles(S, B * Hkv, lockstep)
            model[name] = run(attend(tiles), f"model_{name}", tiles)
        best = None
        t_end = time.perf_counter() + args.budget_per_shape_s
        for stage in (1, 2):
            configs = attention_tiles(S) if stage == 1 else attention_refinements(best["config"]) if best else ()
            for c in configs:
                if time.perf_counter() > t_end:
                    break
                rec = run(attend(c), "pallas", c)
                if rec and (best is None or rec["us"] < best["us"]):
                    best = rec
        summary = {"part": "attention_best", "batch": B, "cache_len": S,
                   **{f"{name}_{key}": rec and rec[field] for name, rec in model.items()
                      for key, field in (("us", "us"), ("fraction", "fraction_of_bandwidth"))},
                   "best_us": best and best["us"], "best_fraction": best and best["fraction_of_bandwidth"],
                   "best_config": best and best["config"]}
        emit(summary)
        print(f"attention B={B} S={S}: model tiles, rows at different steps {summary['refill_us']} us "
              f"({summary['refill_fraction']}), in lockstep {summary['lockstep_us']} us ({summary['lockstep_fraction']}); "
              f"best {summary['best_us']} us ({summary['best_fraction']}) {summary['best_config']}", flush=True)


def bench_prefix(args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxhack.models import decode_attention as da

    small = args.small
    Hq, Hkv, hd = (8, 2, 16) if small else (32, 8, 128)
    B, G = (12, 3) if small else (args.slots, 6)
    Pp, Sg, NP = (128, 128, 8) if small else (512, 1536, 64)
    rng = np.random.default_rng(0)
    n_prompts = -(-B // G)
    prompt = (np.arange(B) // G).astype(np.int32)  # slots hold whole groups' rows
    member = (np.arange(B) % G).astype(np.int32)
    Gm = 1 << (G - 1).bit_length()
    members = np.full((NP, Gm), B - 1, np.int32)
    members[prompt, member] = np.arange(B)
    plen = rng.integers(Pp * 300 // 512, Pp * 500 // 512 + 1, NP).astype(np.int32)
    pstart = (Pp - plen).astype(np.int32)
    gen = np.clip(np.rint(rng.gamma(4.0, 125.0 * Sg / 1536, B)), 1, Sg - 1).astype(np.int32)  # live own slots
    read = np.arange(NP) < n_prompts
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    k, v = (jax.random.normal(key, (B, Hkv, Sg, hd), jnp.bfloat16) for key in keys[:2])
    pk, pv = (jax.random.normal(key, (NP, Hkv, Pp, hd), jnp.bfloat16) for key in keys[2:4])
    qs = [jax.random.normal(jax.random.fold_in(keys[4], i), (B, Hq, hd), jnp.bfloat16)
          for i in range(args.attention_calls)]
    prefix = {"k": pk, "v": pv, "start": jnp.asarray(pstart), "end": jnp.asarray(np.where(read, Pp, pstart)),
              "members": jnp.asarray(members), "prompt": jnp.asarray(prompt), "member": jnp.asarray(member)}
    start, end = jnp.zeros((B,), jnp.int32), jnp.asarray(gen)
    # session 13's layout: each slot its prompt's copy at 0..Pp-1, then its generated tokens
    k_rows, v_rows = jnp.concatenate([pk[prompt], k], axis=2), jnp.concatenate([pv[prompt], v], axis=2)
    s_rows, e_rows = jnp.asarray(pstart[prompt]), jnp.asarray(Pp + gen)
    ref = da.decode_attention_reference(qs[0].astype(jnp.float32), k_rows.astype(jnp.float32),
                                        v_rows.astype(jnp.float32), s_rows, e_rows)
    per_token = Hkv * hd * 2 * 2  # K and V, bf16, one layer
    bytes_rows = int(np.sum(plen[prompt] + gen)) * per_token
    bytes_pool = int(np.sum(plen[:n_prompts]) + np.sum(gen)) * per_token
    base = {"part": "prefix", "slots": B, "group": G, "prompts": n_prompts, "pool": NP, "prompt_positions": Pp,
            "slot_positions": Sg, "mean_prompt": float(plen[:n_prompts].mean()), "mean_generated": float(gen.mean())}
    impl = args.implementation
    rows = jax.jit(lambda qs, k, v: [da.decode_attention(q, k, v, s_rows, e_rows, implementation=impl) for q in qs])
    pool = jax.jit(lambda qs, k, v, p: [da.prefix_decode_attention(q, k, v, start, end, p, impl) for q in qs])
    calls = len(qs)
    a = measure(rows, (qs, k_rows, v_rows), (qs[:1], k_rows, v_rows), calls, ref,
                {**base, "impl": "per_row_prompt_copies", "live_bytes": bytes_rows}, bytes_rows, args, emit)
    b = measure(pool, (qs, k, v, prefix), (qs[:1], k, v, prefix), calls, ref,
                {**base, "impl": "prompt_pool", "live_bytes": bytes_pool}, bytes_pool, args, emit)
    if a and b:
        print(f"prefix B={B} G={G}: per-row prompt copies {a['us']} us ({bytes_rows / 1e6:.0f} MB, "
              f"{a['fraction_of_bandwidth']}), prompt pool {b['us']} us ({bytes_pool / 1e6:.0f} MB, "
              f"{b['fraction_of_bandwidth']}); rel_err {b['rel_err']:.1e}", flush=True)


def bench_stream(args, emit):
    """Read-only (a sum) and read + write (a copy) streams over one array of --stream-gb: the bandwidth
    a trivially simple kernel reaches on this card, against --hbm-tbps."""
    import jax
    import jax.numpy as jnp

    n = 1 << 20 if args.small else int(args.stream_gb * 1e9) // 2
    x = jnp.ones((n // 1024, 1024), jnp.bfloat16)  # the values do not change the bytes moved
    nbytes = x.size * x.dtype.itemsize
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0) + jnp.bfloat16(0.0))  # a new array: one read, one write
    for kind, fn, moved in (("read", read, nbytes), ("copy", copy, 2 * nbytes)):
        s = _time(fn, x, runs=args.runs)
        rec = {"part": "stream", "kind": kind, "gb": round(nbytes / 1e9, 3), "bytes_moved": moved,
               "us": float(f"{s * 1e6:.5g}"), "tbps": float(f"{moved / s / 1e12:.4g}"),
               "fraction_of_bandwidth": float(f"{moved / (s * args.hbm_tbps * 1e12):.4g}")}
        print(f"stream {kind:<5} {rec['gb']} GB: {rec['tbps']:.2f} TB/s = {rec['fraction_of_bandwidth']:.0%} of "
              f"{args.hbm_tbps} TB/s")
        emit(rec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=("matmul", "attention", "prefix", "stream"), default=["matmul", "attention"])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128], help="matmul rows M (powers of two >= 16)")
    ap.add_argument("--matmuls", nargs="+", default=None, help=f"subset of {list(MATMULS_4B)}")
    ap.add_argument("--mosaic", action="store_true",
                    help="matmul: also JAX's Mosaic GPU Hopper matmul (TMA + wgmma; Hopper only, rows multiple of 64)")
    ap.add_argument("--mosaic-settings", type=int, default=len(MOSAIC_TILES),
                    help=f"--mosaic: the first N of its {len(MOSAIC_TILES)} tile settings (each compiles for ~30 s)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="attention rows")
    ap.add_argument("--cache-len", type=int, nargs="+", default=[1152, 2048], help="attention cache slots")
    ap.add_argument("--attention-calls", type=int, default=8)
    ap.add_argument("--slots", type=int, default=152, help="prefix: the refill sampler's decode slots")
    ap.add_argument("--stream-gb", type=float, default=4.0, help="stream: GB of the array read (>= 1: far larger than the L2 cache)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--budget-per-shape-s", type=float, default=12.0, help="stop a shape's tile search after this")
    ap.add_argument("--l2-defeat-mb", type=float, default=2048.0)
    checks.add_kernel_bench_flags(ap)
    args = ap.parse_args(argv)
    try:
        checks.at_least(args, ("rows", "batch", "cache_len", "attention_calls", "runs", "slots", "stream_gb",
                               "mosaic_settings"))
    except UserError as e:
        ap.error(str(e))
    shapes = MATMULS_SMALL if args.small else MATMULS_4B
    bad = [m for m in args.matmuls or [] if m not in shapes]
    if bad:
        ap.error(f"--matmuls {bad}: expected some of {list(shapes)}")
    bad_rows = [m for m in args.rows if m & (m - 1) or m < 16]
    if bad_rows:
        ap.error(f"--rows {bad_rows}: expected powers of two >= 16")
    if args.mosaic and (args.small or args.implementation != "pallas" or any(m % 64 for m in args.rows)):
        ap.error("--mosaic runs on a Hopper GPU only (no --small / interpret) at --rows multiples of 64")
    try:
        checks.multiples("--cache-len", args.cache_len, 128, "the decode kernel's smallest part")
        checks.kernel_bench_flags(args)
    except UserError as e:
        ap.error(str(e))

    import jax
    device = jax.devices()[0].device_kind
    print(f"device: {device}", file=sys.stderr)

    def emit(rec):
        rec = {**rec, "device": device, "hbm_tbps": args.hbm_tbps}
        if args.out:
            from jaxhack.io import append_jsonl
            append_jsonl(args.out, rec)

    if "matmul" in args.part:
        bench_matmul(args, emit)
    if "attention" in args.part:
        bench_attention(args, emit)
    if "prefix" in args.part:
        bench_prefix(args, emit)
    if "stream" in args.part:
        bench_stream(args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
