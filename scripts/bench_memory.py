"""Peak GPU memory and step time of the jitted per-sample gradients of the Phase-2 loss.

Qwen3-4B shape (config.QWEN3_4B), random bf16 params, SVD adapter on all 7 target modules with random
near-orthonormal u / vh generated directly (no SVD is run, to save device time), G sequences of
prompt_len + completion_len tokens. Each remat policy runs in its own subprocess, so its peak memory
is its own and an out-of-memory error cannot spoil the next one. Prints one JSON object.

    PYTHONPATH=. python scripts/bench_memory.py                 # on the GPU: G=8 x (512 + 1024)
    PYTHONPATH=. python scripts/bench_memory.py --small         # CPU smoke test with a tiny config
    PYTHONPATH=. python scripts/bench_memory.py --time-svd      # + time one fp32 SVD per weight shape

The children get XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless it is set, so "fits" means fits in
95% of the card. Peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"] after the timed runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny config, G=2 x (16 + 32) tokens (CPU smoke test)")
    p.add_argument("--remat", default="full,dots", help="comma-separated remat policies (none, full, dots, linear)")
    p.add_argument("--group-size", type=int, default=None, help="G sequences (default 8; 2 with --small)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (16 with --small)")
    p.add_argument("--completion-len", type=int, default=None, help="default 1024 (32 with --small)")
    p.add_argument("--chunk", type=int, default=256, help="positions per chunk of the vocabulary log-softmax")
    p.add_argument("--attention", default="causal", choices=("masked", "causal"),
                   help="masked: scores materialised; causal: fused kernel (right-padded batches)")
    p.add_argument("--microbatch", type=int, default=None, help="samples per lax.map step (default: all, vmap)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--time-svd", action="store_true", help="also time one fp32 SVD per distinct weight shape")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.group_size = args.group_size or (2 if args.small else 8)
    args.prompt_len = args.prompt_len or (16 if args.small else 512)
    args.completion_len = args.completion_len or (32 if args.small else 1024)
    return args


def _config(small: bool):
    from jaxhack.models.config import QWEN3_4B

    return dataclasses.replace(QWEN3_4B, **SMALL) if small else QWEN3_4B


def _memory_stats() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_in_use": stats.get("bytes_in_use"),
            "bytes_limit": stats.get("bytes_limit"),
            "host_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_child(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxhack.models.random_init import random_params, random_svd_adapter
    from jaxhack.grads import losses, per_sample

    remat = args.child
    config = _config(args.small)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    out = {"remat": remat, "device": str(jax.devices()[0]), "platform": jax.default_backend()}
    key_p, key_a, key_t, key_r = jax.random.split(jax.random.PRNGKey(0), 4)
    t0 = time.perf_counter()
    params = random_params(config, key_p, jnp.bfloat16)
    trainable, frozen = random_svd_adapter(params, key_a, jnp.bfloat16)
    jax.block_until_ready((params, frozen))
    out["init_s"] = round(time.perf_counter() - t0, 2)
    out["memory_after_init"] = _memory_stats()

    tokens = jax.random.randint(key_t, (G, T), 0, config.vocab_size, jnp.int32)
    batch = {
        "tokens": tokens,
        "attention_mask": jnp.ones((G, T), bool),
        "completion_mask": jnp.broadcast_to(jnp.arange(T) >= P, (G, T)),
        "advantage": losses.centered_advantages(jax.random.uniform(key_r, (G,)) * 4, group_size=G),
    }
    loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=args.chunk,
                             attention=args.attention)
    step = jax.jit(lambda tr, fr, p, b: per_sample.per_sample_grads(loss, tr, fr, p, config, b,
                                                                    microbatch=args.microbatch))
    try:
        t0 = time.perf_counter()
        compiled = step.lower(trainable, frozen, params, batch).compile()
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        analysis = compiled.memory_analysis()
        if analysis is not None:
            out["compiled_temp_bytes"] = int(analysis.temp_size_in_bytes)
            out["compiled_argument_bytes"] = int(analysis.argument_size_in_bytes)
            out["compiled_output_bytes"] = int(analysis.output_size_in_bytes)
        t0 = time.perf_counter()
        grads = jax.block_until_ready(compiled(trainable, frozen, params, batch))
        out["warmup_s"] = round(time.perf_counter() - t0, 3)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            grads = jax.block_until_ready(compiled(trainable, frozen, params, batch))
            times.append(time.perf_counter() - t0)
        out["step_s_median"] = round(statistics.median(times), 4)
        out["step_s_all"] = [round(t, 4) for t in times]
        finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        out["grads_finite"] = finite
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - report, do not crash the sweep
        out["status"] = "oom" if _is_oom(err) else "error"
        out["error"] = f"{type(err).__name__}: {str(err)[:600]}"
    out["memory"] = _memory_stats()
    if args.time_svd:
        out["svd"] = time_svd(config, params)
    return out


def time_svd(config, params) -> dict:
    """Seconds for one fp32 layer SVD per distinct weight shape, and the implied total for all layers."""
    import jax

    from jaxhack.models import adapters

    per_shape, total = {}, 0.0
    dims = adapters.module_dims(params)
    for name, (L, d_in, d_out) in dims.items():
        label = f"{d_in}x{d_out}"
        if label not in per_shape:
            w = params["layers"][name][0]
            jax.block_until_ready(adapters._svd_one(w))  # compile
            t0 = time.perf_counter()
            jax.block_until_ready(adapters._svd_one(w))
            per_shape[label] = round(time.perf_counter() - t0, 3)
        total += L * per_shape[label]
    return {"per_layer_s": per_shape, "estimated_total_s": round(total, 1)}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return
    config = _config(args.small)
    report = {
        "config": "small" if args.small else "qwen3-4b",
        "model": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim")},
        "dtype": "bfloat16", "loss": "reinforce (Phase 2), per-sample grads = jit(vmap(grad))",
        "group_size": args.group_size, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
        "chunk": args.chunk, "microbatch": args.microbatch,
        "frozen_u_vh": "random Gaussian / sqrt(dim), generated directly (no SVD run)",
        "results": [],
    }
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    report["xla_mem_fraction"] = env["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    given = list(argv if argv is not None else sys.argv[1:])
    passthrough = [a for i, a in enumerate(given)  # drop "--remat X" / "--remat=X": one child per policy
                   if not a.startswith("--remat") and not (i > 0 and given[i - 1] == "--remat")]
    for i, remat in enumerate(m.strip() for m in args.remat.split(",")):
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--child", remat]
        if i > 0:
            cmd = [c for c in cmd if c != "--time-svd"]  # once is enough
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            tail = proc.stderr[-1500:]
            result = {"remat": remat, "status": "oom" if "RESOURCE_EXHAUSTED" in tail or "out of memory"
                      in tail.lower() else "error", "returncode": proc.returncode, "stderr_tail": tail}
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        report["results"].append(result)
        print(f"[bench_memory] remat={remat}: {result.get('status')}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
