"""One decode step in isolation (GPU): qwen3.forward with T=1 and a KV cache at Qwen3-4B shape,
jitted with the cache donated, vs the memory-bandwidth floor (weights + live cache read once).
Variants: 'update' (the real step: write the new k/v in place, attend over the cache) and
'lm_head' (plus the [B,V] logits). Separates per-step model cost from the sampler loop's overhead.

    PYTHONPATH=. python scripts/bench_decode_step.py --batch 64 --cache-len 1152
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache-len", type=int, default=1152)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_probe import config_for

    from jaxhack.models import qwen3
    from jaxhack.models.random_init import random_params

    config = config_for(args.small)
    B, S = args.batch, args.cache_len
    params = random_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    cache = qwen3.init_cache(config, B, S, jnp.bfloat16)
    cache = jax.tree.map(lambda c: c + jnp.bfloat16(0.01), cache)
    mask = jnp.ones((B, S), bool)
    token = jnp.zeros((B, 1), jnp.int32)

    def step(p, c, tok, idx, with_head):
        h, c = qwen3.forward(p, config, tok, mask, cache=c, cache_index=idx)
        out = qwen3.lm_logits(p, config, h[:, 0]) if with_head else h
        return out, c

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    floor_s = (weight_bytes + kv_bytes) / (args.hbm_tbps * 1e12)
    for with_head in (False, True):
        fn = jax.jit(step, static_argnums=(4,), donate_argnums=(1,))
        out, cache = fn(params, cache, token, S // 2, with_head)
        jax.block_until_ready(out)
        times = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            out, cache = fn(params, cache, token, S // 2 + 1 + i % 8, with_head)
            jax.block_until_ready((out, cache))
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        print(json.dumps({"variant": "lm_head" if with_head else "update", "batch": B, "cache_len": S,
                          "step_ms": round(s * 1e3, 3), "floor_ms": round(floor_s * 1e3, 3),
                          "fraction_of_floor": round(floor_s / s, 3), "device": str(jax.devices()[0])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
