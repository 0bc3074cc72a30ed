"""One decode step in isolation (GPU): qwen3.forward with T=1 and a KV cache at Qwen3-4B shape,
jitted with the cache donated, vs the memory-bandwidth floor (weights + the whole cache read once;
the 'decode' attention reads only the live slots, so at --live-len below the cache length it can beat
that floor). Variants: 'masked' (stacked weights, einsum over every cache slot) and 'decode' (the
sampler's step: decode_layers' fused per-layer weights, Pallas kernel over each row's live slots),
each with the [B,V] logits. Separates the per-step model
cost from the sampler loop's overhead.

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
    ap.add_argument("--live-len", type=int, default=None, help="slots already written (default: half the cache)")
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    from jaxhack.commands import fail
    from jaxhack.io import UserError
    from jaxhack.models.fused_decode import requested
    try:
        requested()  # JAXHACK_DECODE_KERNEL: one line, not a traceback from inside the traced step
    except UserError as e:
        return fail(e)

    import jax
    import jax.numpy as jnp

    from jaxhack.bench import config_for

    from jaxhack.models import decode_layout, qwen3
    from jaxhack.models.random_init import random_params

    config = config_for(args.small)
    B, S = args.batch, args.cache_len
    params = random_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    cache = qwen3.init_cache(config, B, S, jnp.bfloat16)
    cache = jax.tree.map(lambda c: c + jnp.bfloat16(0.01), cache)
    mask = jnp.ones((B, S), bool)
    token = jnp.zeros((B, 1), jnp.int32)

    live = S // 2 if args.live_len is None else args.live_len

    def step(p, c, tok, idx, attention):
        h, c = qwen3.forward(p, config, tok, mask, cache=c, cache_index=idx, attention=attention)
        return qwen3.lm_logits(p, config, h[:, 0]), c

    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    floor_s = (weight_bytes + kv_bytes) / (args.hbm_tbps * 1e12)
    decode_params = {**params, "layers": decode_layout.decode_layers(params)[0]}
    for attention in ("masked", "decode"):
        p = decode_params if attention == "decode" else params
        fn = jax.jit(step, static_argnums=(4,), donate_argnums=(1,))
        out, cache = fn(p, cache, token, live, attention)
        jax.block_until_ready(out)
        times = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            out, cache = fn(p, cache, token, live + 1 + i % 8, attention)
            jax.block_until_ready((out, cache))
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        print(json.dumps({"attention": attention, "batch": B, "cache_len": S, "live_len": live,
                          "step_ms": round(s * 1e3, 3), "floor_ms": round(floor_s * 1e3, 3),
                          "fraction_of_floor": round(floor_s / s, 3), "device": str(jax.devices()[0])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
