"""The fused decode kernel (`jaxhack.models.fused_decode`) against the split path it replaces, in isolation (GPU).

One layer's decode attention at B rows over a cache of S slots, from the q/k/v projection's output:
- `split`: what `qwen3._layer` runs without the kernel: q-norm, k-norm, RoPE, the two cache writes (XLA),
  then the Pallas attention kernel with the lockstep tiling (`decode_tiles`) and its normalisation;
- `fused`: `fused_decode_attention` at its default tiles, then a grid of block_k x warps x stages.

Rows are live over [start, slot] with start < 64 and slot uniform in [start, S): rows in lockstep at
different prompt paddings would all end at one slot, so this spread is harsher than generation's. Each
timing chains --calls layers' steps in one jitted call on donated caches (updated in place, as in the
sampler), enqueued --runs times and waited for once. Bytes = the live slots' K and V.
`fraction_of_bandwidth` = bytes / (time * --hbm-tbps). JSON lines to --out, a table on stdout.

    PYTHONPATH=. python scripts/bench_fused_decode.py --hbm-tbps 4.8 --out docs/results/bench_fused_decode_h200.jsonl
    PYTHONPATH=. python scripts/bench_fused_decode.py --small --implementation interpret  # CPU smoke
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.commands import checks  # noqa: E402
from jaxhack.io import UserError  # noqa: E402

THETA, EPS = 1e6, 1e-6
GRID = [{"block_k": bk, "num_warps": w, "num_stages": st}
        for bk, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3))]


def bench_shape(args, B: int, S: int, grid: list[dict], emit) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxhack.models import qwen3
    from jaxhack.models.decode_attention import decode_attention
    from jaxhack.models.fused_decode import fused_decode_attention, rope_tables

    Hq, Hkv, hd = (8, 2, 16) if args.small else (32, 8, 128)
    rng = np.random.default_rng(0)
    start = rng.integers(0, min(64, S // 2), B)
    slot = start + rng.integers(0, S - start)
    live_bytes = int(np.sum(slot + 1 - start)) * Hkv * hd * 2 * 2
    start, slot = jnp.asarray(start, jnp.int32), jnp.asarray(slot, jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 4 + args.calls)
    q_norm, k_norm = (1 + 0.1 * jax.random.normal(k, (hd,), jnp.bfloat16) for k in keys[:2])
    qkvs = [3 * jax.random.normal(k, (B, Hq + 2 * Hkv, hd), jnp.bfloat16) for k in keys[4:]]
    cos, sin = rope_tables(slot - start, hd, THETA, jnp.bfloat16)
    implementation = args.implementation

    def split(qkv, k_cache, v_cache):
        q, k, v = qkv[:, None, :Hq], qkv[:, None, Hq:Hq + Hkv], qkv[:, None, Hq + Hkv:]
        positions = (slot - start)[:, None]
        q = qwen3.rope(qwen3.rms_norm(q, q_norm, EPS), positions, THETA)[:, 0]
        k = qwen3.rope(qwen3.rms_norm(k, k_norm, EPS), positions, THETA)[:, 0]
        rows = jnp.arange(B)
        k_cache, v_cache = k_cache.at[rows, :, slot].set(k), v_cache.at[rows, :, slot].set(v[:, 0])
        impl = "interpret" if implementation == "interpret" else "pallas"
        return decode_attention(q, k_cache, v_cache, start, slot + 1, implementation=impl, lockstep=True), k_cache, v_cache

    def fused(config):
        return lambda qkv, k_cache, v_cache: fused_decode_attention(
            qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, start, slot, num_q_heads=Hq, eps=EPS,
            implementation=implementation, **config)

    def chained(step):  # --calls layers' steps on one pair of donated caches
        def run(qkvs, k_cache, v_cache):
            outs = []
            for qkv in qkvs:
                out, k_cache, v_cache = step(qkv, k_cache, v_cache)
                outs.append(out)
            return outs, k_cache, v_cache
        return jax.jit(run, donate_argnums=(1, 2))

    def fresh_caches():
        return (jax.random.normal(keys[2], (B, Hkv, S, hd), jnp.bfloat16),
                jax.random.normal(keys[3], (B, Hkv, S, hd), jnp.bfloat16))

    reference = np.asarray(chained(split)(qkvs[:1], *fresh_caches())[0][0], np.float32)
    base = {"batch": B, "cache_len": S, "live_bytes": live_bytes, "mean_live": live_bytes / (B * Hkv * hd * 4)}
    records = []
    for impl, config, step in [("split", None, split), ("fused", {}, fused({}))] + [
            ("fused", c, fused(c)) for c in grid]:
        record = {**base, "impl": impl, "config": config}
        try:
            run = chained(step)
            first = np.asarray(run(qkvs[:1], *fresh_caches())[0][0], np.float32)
            caches = fresh_caches()
            outs, *caches = run(qkvs, *caches)  # compile
            jax.block_until_ready(outs)
            t0 = time.perf_counter()
            for _ in range(args.runs):
                outs, *caches = run(qkvs, *caches)
            jax.block_until_ready(outs)
            seconds = (time.perf_counter() - t0) / (args.runs * args.calls)
        except Exception as e:  # a tile setting Triton refuses: recorded, the grid goes on
            emit({**record, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        record.update(us=round(seconds * 1e6, 2), fraction_of_bandwidth=round(live_bytes / (seconds * args.hbm_tbps * 1e12), 3),
                      rel_diff_vs_split=float(np.linalg.norm(first - reference) / np.linalg.norm(reference)))
        emit(record)
        records.append(record)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="rows")
    ap.add_argument("--cache-len", type=int, nargs="+", default=[1152], help="cache slots (multiples of 128)")
    ap.add_argument("--calls", type=int, default=8, help="layers' steps chained per timed call")
    ap.add_argument("--runs", type=int, default=10)
    checks.add_kernel_bench_flags(ap)
    args = ap.parse_args(argv)
    try:
        checks.at_least(args, ("batch", "cache_len", "calls", "runs"))
        checks.multiples("--cache-len", args.cache_len, 128, "the split path's smallest part")
        checks.kernel_bench_flags(args)
    except UserError as e:
        ap.error(str(e))
    import jax
    device = jax.devices()[0].device_kind
    grid = GRID[:1] if args.small else GRID  # the CPU smoke test: one tile setting

    def emit(rec):
        rec = {"part": "fused_decode", **rec, "device": device, "hbm_tbps": args.hbm_tbps}
        if args.out:
            from jaxhack.io import append_jsonl
            append_jsonl(args.out, rec)

    for B, S in itertools.product(args.batch, args.cache_len):
        records = bench_shape(args, B, S, grid, emit)
        split = next((r for r in records if r["impl"] == "split"), None)
        best = min((r for r in records if r["impl"] == "fused"), key=lambda r: r["us"], default=None)
        for r in records:
            print(f"B={B} S={S} {r['impl']:5s} {str(r['config']):55s} {r['us']:9.2f} us  "
                  f"{r['fraction_of_bandwidth']:.3f} of bandwidth  rel diff vs split {r['rel_diff_vs_split']:.2e}")
        if split and best:
            print(f"B={B} S={S}: split {split['us']} us, best fused {best['us']} us {best['config']} "
                  f"({split['us'] / best['us']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
