"""Where a probe step's time goes (GPU): times the pieces of scripts/bench_probe.py's jaxhack step
at the same shapes, one jitted function each, median of --runs after a warm-up:

  fwd_base      forward + log-probs, no adapter
  fwd_svd       forward + log-probs with the SVD adapter
  grad_batch    gradient of the summed Phase-2 loss w.r.t. delta_s (one backward for the batch)
  grad_per      per-sample gradients (vmap of grad), the probe's core
Each with the chosen remat / attention. Prints JSON lines and achieved TFLOP/s for the forwards.

    PYTHONPATH=. python scripts/bench_probe_parts.py --variant dots:causal
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="dots:causal")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxhack.bench import config_for

    from jaxhack.models.adapters import merge
    from jaxhack.models.random_init import random_params, random_svd_adapter
    from jaxhack.grads import losses
    from jaxhack.grads.per_sample import batch_grad, per_sample_grads

    if args.small:
        args.group_size, args.prompt_len, args.completion_len = 2, 16, 32
    remat, attention = args.variant.split(":")
    config = config_for(args.small)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    kp, ka, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    params = random_params(config, kp, jnp.bfloat16)
    trainable, frozen = random_svd_adapter(params, ka, jnp.bfloat16)
    batch = {"tokens": jax.random.randint(kt, (G, T), 0, config.vocab_size, jnp.int32),
             "attention_mask": jnp.ones((G, T), bool),
             "completion_mask": jnp.broadcast_to(jnp.arange(T) >= P, (G, T)),
             "advantage": jnp.linspace(-1.0, 1.0, G)}
    loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=args.chunk,
                             attention=attention)
    lp = functools.partial(losses.sequence_logprobs, config=config, remat=remat, chunk=args.chunk,
                           attention=attention)
    parts = {
        "fwd_base": jax.jit(lambda tr, fr, p, b: lp(p, adapters=None, tokens=b["tokens"],
                                                      attention_mask=b["attention_mask"])),
        "fwd_svd": jax.jit(lambda tr, fr, p, b: lp(p, adapters=merge(tr, fr), tokens=b["tokens"],
                                                     attention_mask=b["attention_mask"])),
        "grad_batch": jax.jit(lambda tr, fr, p, b: batch_grad(loss, tr, fr, p, config, b)),
        "grad_per": jax.jit(lambda tr, fr, p, b: per_sample_grads(loss, tr, fr, p, config, b)),
    }
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dims = [(D, config.q_dim), (D, config.kv_dim), (D, config.kv_dim), (config.q_dim, D), (D, F), (D, F), (F, D)]
    p_lin = L * sum(i * o for i, o in dims)
    p_ad = L * sum(i * min(i, o) + min(i, o) * o for i, o in dims)
    flops = {"fwd_base": 2 * G * T * (p_lin + D * config.vocab_size),
             "fwd_svd": 2 * G * T * (p_lin + p_ad + D * config.vocab_size)}
    for name, fn in parts.items():
        rec = {"part": name, "variant": args.variant, "device": str(jax.devices()[0])}
        try:
            jax.block_until_ready(fn(trainable, frozen, params, batch))
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(trainable, frozen, params, batch))
                times.append(time.perf_counter() - t0)
            rec["s"] = round(statistics.median(times), 4)
            if name in flops:
                rec["tflops_achieved"] = round(flops[name] / rec["s"] / 1e12, 1)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
