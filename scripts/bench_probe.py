"""Benchmark: one Phase-2 probe step at Qwen3-4B shape, jaxhack vs a PyTorch reference, same run.

A probe step = exact per-sample gradients of the Phase-2 loss w.r.t. the SVD adapter's delta_s for G
sequences (prompt + completion), per-sample cosines with v_hack for every module, and the batch
gradient. Random bf16 weights with Qwen3-4B shapes, random orthonormal-scale SVD bases (no SVD is
run: the cost of a step does not depend on the values), random v_hack (k=1).

- jaxhack: jax.jit(vmap(grad)) (jaxhack.grads.per_sample) + jaxhack.projection.cosines, per remat policy.
- PyTorch: transformers Qwen3ForCausalLM (bf16, sdpa attention) with forward hooks adding
  ((x Vh^T) * delta_s) U^T on the same 7 target Linears, a per-sample loop of forward + backward
  (one sequence at a time), delta_s.grad copied out after each, the same cosines.

Each side runs in its own subprocess (so neither holds the other's GPU memory). Prints one JSON line
per measurement and a table; the FLOP floor is derived in docs/benchmarks.md and computed by
`flop_floor` below.

    PYTHONPATH=. python scripts/bench_probe.py --out bench_probe.jsonl        # GPU
    PYTHONPATH=. python scripts/bench_probe.py --small                        # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.bench import config_for, flop_floor, probe_inputs, probe_step  # noqa: E402,F401

def _peak_bytes_jax():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_jax(args) -> list[dict]:
    import functools

    import jax

    from jaxhack.grads import losses

    config = config_for(args.small)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    params, trainable, frozen, v_hack, batch = probe_inputs(config, G, P, C)
    out = []
    for variant in args.variants.split(","):
        remat, attention, *layers = variant.split(":")
        unroll = layers == ["unroll"]
        loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=args.chunk,
                                 attention=attention, scan_layers=not unroll)
        step = probe_step(config, v_hack, loss)

        rec = {"impl": "jaxhack", "remat": remat, "attention": attention, "layers": "unrolled" if unroll else "scan",
               "G": G, "T": T,
               "device": str(jax.devices()[0])}
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(step(trainable, frozen, params, batch))
            rec["first_call_s"] = round(time.perf_counter() - t0, 2)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                jax.block_until_ready(step(trainable, frozen, params, batch))
                times.append(time.perf_counter() - t0)
            rec.update(step_s=statistics.median(times), times=[round(t, 4) for t in times],
                       peak_bytes=_peak_bytes_jax())
        except Exception as e:  # OOM on one policy must not hide the others
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def run_torch(args) -> list[dict]:
    import torch
    import transformers

    config = config_for(args.small)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    deltas, hooks, v_hack = {}, [], {}
    gen = torch.Generator(device=device).manual_seed(0)
    for l, layer in enumerate(model.model.layers):
        for name in names:
            lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            d_out, d_in = lin.weight.shape
            r = min(d_in, d_out)
            u = (torch.randn(d_out, r, generator=gen, device=device) / max(d_out, r) ** 0.5).to(dtype)
            vh = (torch.randn(r, d_in, generator=gen, device=device) / max(d_in, r) ** 0.5).to(dtype)
            ds = torch.zeros(r, device=device, dtype=torch.float32, requires_grad=True)
            v = torch.randn(r, generator=gen, device=device)
            v_hack[(l, name)] = v / v.norm()
            deltas[(l, name)] = ds

            def hook(mod, inputs, output, u=u, vh=vh, ds=ds):
                x = inputs[0]
                return output + ((x @ vh.T) * ds.to(x.dtype)) @ u.T

            hooks.append(lin.register_forward_hook(hook))
    tokens = torch.randint(0, config.vocab_size, (G, T), device=device)
    adv = torch.rand(G, device=device) * 4
    adv = adv - adv.mean()
    keys = list(deltas)

    def step():
        per_sample = []
        for i in range(G):
            logits = model(tokens[i:i + 1]).logits[0, P - 1:T - 1].float()  # [C, V]
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[i, P:T, None])[:, 0]
            loss = -adv[i] * logp.mean() / G
            grads = torch.autograd.grad(loss, [deltas[k] for k in keys])
            per_sample.append(grads)
        cos = torch.zeros(G, device=device)
        for i, grads in enumerate(per_sample):
            for k, g in zip(keys, grads):
                cos[i] += (g @ v_hack[k]) / g.norm().clamp_min(1e-30)
        cos /= len(keys)
        batch_grad = [sum(per_sample[i][j] for i in range(G)) for j in range(len(keys))]
        return cos, batch_grad

    rec = {"impl": "pytorch", "G": G, "T": T, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    rec["first_call_s"] = round(time.perf_counter() - t0, 2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.torch_runs):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    rec.update(step_s=statistics.median(times), times=[round(t, 4) for t in times],
               peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    print(json.dumps(rec), flush=True)
    return [rec]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--variants", default="linear:causal,dots:causal,full:causal",
                    help="comma-separated REMAT:ATTENTION[:unroll] (remat none|full|dots|linear; attention "
                         "masked|causal; unroll: layers unrolled instead of lax.scan)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--torch-runs", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.small:
        args.prompt_len, args.completion_len, args.group_size = 16, 32, 2
    if args.child:
        (run_jax if args.child == "jax" else run_torch)(args)
        return 0

    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out" and not a.endswith(".jsonl")]
    for child in (("jax",) if args.skip_torch else ("jax", "torch")):
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", child], env=env,
                              capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-3000:])
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                results.append(json.loads(line))
        if proc.returncode != 0:
            results.append({"impl": child, "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"})
    config = config_for(args.small)
    floor = flop_floor(config, args.group_size, args.prompt_len, args.completion_len)
    floor_s = floor["total"] / (args.peak_tflops * 1e12)
    torch_s = next((r["step_s"] for r in results if r.get("impl") == "pytorch" and "step_s" in r), None)
    print(f"FLOP floor: {floor['total'] / 1e12:.1f} TFLOP -> {floor_s * 1e3:.1f} ms at {args.peak_tflops} TFLOP/s")
    print(f"{'impl':<10} {'variant':<20} {'step s':>8} {'compile s':>9} {'peak GiB':>9} {'vs torch':>9} {'MFU(floor)':>10}")
    for r in results:
        if "step_s" not in r:
            print(f"{r.get('impl'):<10} {r.get('remat', '')}:{r.get('attention', '')}:{r.get('layers', '')} "
                  f"error: {r.get('error', '')[:100]}")
            continue
        r["floor_tflop"] = floor["total"] / 1e12
        r["mfu_floor"] = floor_s / r["step_s"]
        r["speedup_vs_torch"] = (torch_s / r["step_s"]) if torch_s else None
        peak = (r.get("peak_bytes") or 0) / 2**30
        ratio = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "n/a"
        variant = (f"{r['remat']}:{r['attention']}" + (":unroll" if r.get("layers") == "unrolled" else "")
                   if "remat" in r else "loop")
        print(f"{r['impl']:<10} {variant:<20} {r['step_s']:>8.3f} {r.get('first_call_s', 0):>9.1f} {peak:>9.1f} {ratio:>9} "
              f"{r['mfu_floor'] * 100:>9.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps({**r, "floor": floor}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
