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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.bench import (_grads_to_numpy, config_for, flop_floor, hash_uniform_torch,  # noqa: E402,F401
                           gradient_agreement, leaf_offset, probe_inputs, probe_step, relative_error,
                           shared_inputs,
                           NORM_STD, WEIGHT_STD)


def _peak_bytes_jax():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_jax(args) -> list[dict]:
    import functools

    import jax

    from jaxhack.grads import losses
    from jaxhack.grads.per_sample import per_sample_grads

    import jax.numpy as jnp

    config = config_for(args.small, args.layers)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    params, trainable, frozen, v_hack, batch = probe_inputs(
        config, G, P, C, dtype=jnp.float32 if args.dtype == "fp32" else jnp.bfloat16)
    out, saved = [], None
    for variant in args.variants.split(","):
        remat, attention, *flags = variant.split(":")
        unroll, zero = "unroll" in flags, "zero" in flags
        loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=args.chunk,
                                 attention=attention, scan_layers=not unroll, delta_zero=zero)
        step = probe_step(config, v_hack, loss)

        rec = {"impl": "jaxhack", "variant": variant, "remat": remat, "attention": attention, "dtype": args.dtype,
               "layers": "unrolled" if unroll else "scan", "delta_zero": zero, "G": G, "T": T,
               "device": jax.devices()[0].device_kind}
        print(f"[bench_probe] jaxhack {variant} ...", file=sys.stderr, flush=True)
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
            grads = _grads_to_numpy(jax.jit(lambda tr, fr, p, b: per_sample_grads(loss, tr, fr, p, config, b))(
                trainable, frozen, params, batch))
            if args.save_grads:
                os.makedirs(args.save_grads, exist_ok=True)
                np.savez(os.path.join(args.save_grads, f"jaxhack_{args.dtype}_{variant.replace(':', '-')}.npz"), **grads)
            if saved is None:
                saved = grads
                if args.exchange:
                    np.savez(args.exchange, **grads)
            else:
                rec["max_rel_err_vs_first"] = relative_error(saved, grads)
        except Exception as e:  # OOM on one policy must not hide the others
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


# ------------------------------------------------------------------------------------------ PyTorch
TORCH_VARIANTS = ("loop", "batched_ckpt", "vmap")


def torch_setup(args):
    """transformers Qwen3ForCausalLM with the jaxhack inputs (hash_uniform_torch), and per Linear an SVD
    adapter hook. Returns (model, modules [(layer, name, Linear)], tokens, adv, device)."""
    import torch
    import transformers

    config = config_for(args.small, args.layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    bf16 = torch.bfloat16  # values rounded to bf16 first (as probe_inputs), then cast to the compute dtype
    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(dtype)
    L = config.num_hidden_layers

    def fill(param, values):
        with torch.no_grad():
            param.copy_(values)
        param.requires_grad_(False)

    def stacked(name, shape, std):
        return hash_uniform_torch(shape, leaf_offset(name), std, bf16, device).to(dtype)

    def norm(name, shape):
        return (1 + hash_uniform_torch(shape, leaf_offset(name), NORM_STD, torch.float32, device).to(bf16)).to(dtype)

    fill(model.model.embed_tokens.weight, stacked("['embed']", (config.vocab_size, config.hidden_size), WEIGHT_STD))
    fill(model.model.norm.weight, norm("['final_norm']", (config.hidden_size,)))
    if not config.tie_word_embeddings:
        fill(model.lm_head.weight, stacked("['lm_head']", (config.hidden_size, config.vocab_size), WEIGHT_STD).T)
    norms = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
             "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    for key, path in norms.items():
        dim = config.head_dim if key in ("q_norm", "k_norm") else config.hidden_size
        values = norm(f"['layers']['{key}']", (L, dim))
        for l, layer in enumerate(model.model.layers):
            fill(layer.get_submodule(path).weight, values[l])
    from jaxhack.models.config import module_shapes

    modules = []
    for name, (d_in, d_out) in module_shapes(config).items():
        w = stacked(f"['layers']['{name}']", (L, d_in, d_out), WEIGHT_STD)
        r = min(d_in, d_out)
        u = hash_uniform_torch((L, d_out, r), leaf_offset(name + ".u"), d_out ** -0.5, bf16, device).to(dtype)
        vh = hash_uniform_torch((L, r, d_in), leaf_offset(name + ".vh"), d_in ** -0.5, bf16, device).to(dtype)
        for l, layer in enumerate(model.model.layers):
            lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            fill(lin.weight, w[l].T)
            lin.register_buffer("svd_u", u[l].contiguous(), persistent=False)
            lin.register_buffer("svd_vh", vh[l].contiguous(), persistent=False)
            modules.append((l, name, lin))
        del w
    tokens, adv = shared_inputs(config, args.group_size, args.prompt_len, args.completion_len)
    return model, modules, torch.as_tensor(tokens, device=device).long(), torch.as_tensor(adv, device=device), device


def torch_variant(args, variant: str):
    """A function step() -> per-sample delta_s gradients {module: [G, L, r]} for one PyTorch variant."""
    import torch

    model, modules, tokens, adv, device = torch_setup(args)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    L = len(model.model.layers)

    def logp_loss(hidden, i0, i1):
        """Per-row losses -A_i mean_t log p / G of rows i0:i1 from their hidden states [n, T, D]."""
        logits = model.lm_head(hidden[:, P - 1:T - 1]).float()  # [n, C, V]
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[i0:i1, P:T, None])[..., 0]
        return -adv[i0:i1] * logp.mean(-1) / G  # [n]

    def stack(per_module):  # {(l, name): [G, r]} -> {name: [G, L, r]}
        names = dict.fromkeys(name for _, name, _ in modules)
        return {n: torch.stack([per_module[(l, n)] for l in range(L)], 1) for n in names}

    if variant == "loop":  # one sequence at a time, forward + backward each
        for l, name, lin in modules:
            lin.ds = torch.zeros(lin.svd_u.shape[1], device=device, requires_grad=True)
            lin.register_forward_hook(lambda m, i, o: o + ((i[0] @ m.svd_vh.T) * m.ds.to(o.dtype)) @ m.svd_u.T)
        model.eval()
        params = [lin.ds for _, _, lin in modules]

        def step():
            rows = []
            for i in range(G):
                hidden = model.model(tokens[i:i + 1]).last_hidden_state
                rows.append(torch.autograd.grad(logp_loss(hidden, i, i + 1).sum(), params))
            return stack({(l, n): torch.stack([r[j] for r in rows]) for j, (l, n, _) in enumerate(modules)})
        return step

    if variant in ("batched_ckpt", "batched"):  # one batched backward, row b's own copy ds[b] (all equal)
        for l, name, lin in modules:
            lin.ds = torch.zeros(G, lin.svd_u.shape[1], device=device, requires_grad=True)
            lin.register_forward_hook(
                lambda m, i, o: o + ((i[0] @ m.svd_vh.T) * m.ds[:, None, :].to(o.dtype)) @ m.svd_u.T)
        if variant == "batched_ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF checkpoints only in training mode (Qwen3 has no dropout)
        else:
            model.eval()
        params = [lin.ds for _, _, lin in modules]

        def step():
            hidden = model.model(tokens).last_hidden_state
            grads = torch.autograd.grad(logp_loss(hidden, 0, G).sum(), params)
            return stack({(l, n): g for (l, n, _), g in zip(modules, grads)})
        return step

    if variant == "vmap":  # torch.func: vmap(grad) over functional_call, chunk_size rows at a time
        from torch.func import functional_call, grad, vmap

        for l, name, lin in modules:
            lin.register_buffer("ds", torch.zeros(lin.svd_u.shape[1], device=device), persistent=False)
            lin.register_forward_hook(lambda m, i, o: o + ((i[0] @ m.svd_vh.T) * m.ds.to(o.dtype)) @ m.svd_u.T)
        model.eval()
        keys = {f"model.layers.{l}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
                f".{n}.ds": (l, n) for l, n, _ in modules}
        ds0 = {k: torch.zeros(dict(((l, n), lin) for l, n, lin in modules)[v].svd_u.shape[1], device=device)
               for k, v in keys.items()}

        def loss_one(ds, tok, a):
            hidden = functional_call(model.model, {k[len("model."):]: v for k, v in ds.items()},
                                     (tok[None],)).last_hidden_state
            logits = model.lm_head(hidden[:, P - 1:T - 1]).float()
            logp = torch.log_softmax(logits, -1).gather(-1, tok[None, P:T, None])[..., 0]
            return (-a * logp.mean() / G)

        per_row = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=args.vmap_chunk)

        def step():
            g = per_row(ds0, tokens, adv)
            return stack({keys[k]: v for k, v in g.items()})
        return step
    raise ValueError(f"unknown torch variant {variant!r}")


def run_torch(args) -> list[dict]:
    import torch
    import transformers

    variant, compiled = args.torch_variant, False
    if variant.startswith("compile:"):
        variant, compiled = variant.split(":", 1)[1], True
    G, T = args.group_size, args.prompt_len + args.completion_len
    cuda = torch.cuda.is_available()
    rec = {"impl": "pytorch", "variant": ("compile:" if compiled else "") + variant, "G": G, "T": T, "dtype": args.dtype,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__}
    print(f"[bench_probe] pytorch {rec['variant']} ...", file=sys.stderr, flush=True)
    step = torch_variant(args, variant)
    if compiled:
        step = torch.compile(step)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    grads = step()
    sync()
    rec["first_call_s"] = round(time.perf_counter() - t0, 2)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.torch_runs):
        t0 = time.perf_counter()
        grads = step()
        sync()
        times.append(time.perf_counter() - t0)
    rec.update(step_s=statistics.median(times), times=[round(t, 4) for t in times],
               peak_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    if args.save_grads:
        os.makedirs(args.save_grads, exist_ok=True)
        np.savez(os.path.join(args.save_grads, f"pytorch_{args.dtype}_{rec['variant'].replace(':', '-')}.npz"),
                 **{k: v.float().cpu().numpy() for k, v in grads.items()})
    if args.exchange and os.path.exists(args.exchange):
        ours = dict(np.load(args.exchange))
        theirs = {k: v.float().cpu().numpy() for k, v in grads.items()}
        rec["max_rel_err"] = relative_error(ours, theirs)
        rec["agreement"] = gradient_agreement(ours, theirs)
    print(json.dumps(rec), flush=True)
    return [rec]


def compare_saved(folder: str, out: str | None) -> int:
    """Pairwise gradient agreement of every saved gradient set in `folder` (one JSON line per pair)."""
    import itertools

    sets = {p.stem: dict(np.load(p)) for p in sorted(Path(folder).glob("*.npz"))}
    if len(sets) < 2:
        print(f"error: --compare {folder}: expected at least two saved gradient sets (*.npz from --save-grads), "
              f"found {len(sets)}", file=sys.stderr)
        return 2
    lines = []
    for a, b in itertools.combinations(sets, 2):
        agr = gradient_agreement(sets[a], sets[b])
        cos = agr["cos_worst_sample_per_module"]
        lines.append({"kind": "gradient_agreement", "ours": a, "theirs": b,
                      "max_rel_err": max(agr["rel_err_per_module"].values()),
                      "min_cos_worst_sample": min(cos.values()), "agreement": agr})
        print(f"{a:<40} vs {b:<40} max rel err {lines[-1]['max_rel_err']:.4f}  "
              f"min cos {lines[-1]['min_cos_worst_sample']:.4f}")
    if out:
        with open(out, "a") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--variants", default="linear:causal:zero,linear:causal",
                    help="comma-separated REMAT:ATTENTION[:unroll][:zero] (remat none|full|dots|linear; attention "
                         "masked|causal; unroll: layers unrolled instead of lax.scan; zero: the exact delta_s = 0 "
                         "path). The first variant's gradients are the reference the others are checked against")
    ap.add_argument("--torch-variants", default="loop,batched_ckpt,vmap",
                    help=f"comma-separated subset of {TORCH_VARIANTS} (also 'batched': no checkpointing)")
    ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also run torch.compile of the fastest PyTorch variant (under --compile-timeout)")
    ap.add_argument("--compile-timeout", type=float, default=180.0, help="seconds for the torch.compile child")
    ap.add_argument("--torch-timeout", type=float, default=300.0, help="seconds for each other PyTorch child")
    ap.add_argument("--vmap-chunk", type=int, default=2, help="rows per torch.func.vmap chunk")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--torch-runs", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--torch-variant", default="loop", help=argparse.SUPPRESS)
    ap.add_argument("--exchange", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype of both sides (weights are bf16-rounded values either way)")
    ap.add_argument("--layers", type=int, default=None, help="override the depth (diagnostics; default: the model's)")
    ap.add_argument("--save-grads", default=None,
                    help="also save each side's per-sample gradients as DIR/<impl>_<dtype>_<variant>.npz")
    ap.add_argument("--compare", default=None, metavar="DIR",
                    help="only compare every pair of gradients saved in DIR (gradient_agreement) and exit")
    ap.add_argument("--out", default=None, help="write the JSON lines here (default docs/results/bench_probe.jsonl; "
                                                "--small: not written unless given)")
    args = ap.parse_args(argv)
    from jaxhack.commands import checks, fail
    from jaxhack.io import UserError
    try:
        checks.at_least(args, ("group_size", "prompt_len", "completion_len", "vmap_chunk", "chunk", "runs", "torch_runs",
                               "layers"))
        checks.above_zero("--compile-timeout", args.compile_timeout)
        checks.above_zero("--torch-timeout", args.torch_timeout)
        checks.above_zero("--peak-tflops", args.peak_tflops)
    except UserError as e:
        return fail(e)
    if args.small:
        args.prompt_len, args.completion_len, args.group_size = 16, 32, 2
    if args.compare:
        return compare_saved(args.compare, args.out)
    if args.child:
        (run_jax if args.child == "jax" else run_torch)(args)
        return 0

    import tempfile

    out = args.out or (None if args.small else str(Path(__file__).resolve().parents[1] / "docs/results/bench_probe.jsonl"))
    argv = list(argv if argv is not None else sys.argv[1:])
    if "--out" in argv:
        k = argv.index("--out")
        del argv[k:k + 2]
    exchange = os.path.join(tempfile.mkdtemp(prefix="bench_probe_"), "jax_grads.npz")
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
    results = []

    def child(kind, extra, timeout):
        cmd = [sys.executable, __file__, *argv, "--child", kind, "--exchange", exchange, *extra]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            got = [json.loads(ln) for ln in (e.stdout or b"").decode(errors="replace").splitlines() if ln.startswith("{")]
            return got or [{"impl": "jaxhack" if kind == "jax" else "pytorch", "variant": extra[-1] if extra else "", "error": f"timeout after {timeout:.0f} s"}]
        sys.stderr.write(proc.stderr[-3000:])
        got = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0:
            got.append({"impl": "jaxhack" if kind == "jax" else "pytorch", "variant": extra[-1] if extra else "",
                        "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"})
        return got

    results += child("jax", [], None)
    if not args.skip_torch:
        for variant in args.torch_variants.split(","):
            results += child("torch", ["--torch-variant", variant], args.torch_timeout)
        done = [r for r in results if r.get("impl") == "pytorch" and "step_s" in r]
        if args.torch_compile and done:
            best = min(done, key=lambda r: r["step_s"])["variant"]
            results += child("torch", ["--torch-variant", f"compile:{best}"], args.compile_timeout)
    config = config_for(args.small, args.layers)
    floors = {zero: flop_floor(config, args.group_size, args.prompt_len, args.completion_len, zero)
              for zero in (False, True)}
    floor_s = {zero: f["total"] / (args.peak_tflops * 1e12) for zero, f in floors.items()}
    torch_best = min((r["step_s"] for r in results if r.get("impl") == "pytorch" and "step_s" in r), default=None)
    print(f"FLOP floor: general {floors[False]['total'] / 1e12:.1f} TFLOP -> {floor_s[False] * 1e3:.1f} ms; "
          f"delta_s = 0 {floors[True]['total'] / 1e12:.1f} TFLOP -> {floor_s[True] * 1e3:.1f} ms at "
          f"{args.peak_tflops} TFLOP/s")
    print(f"{'impl':<10} {'variant':<26} {'step s':>8} {'first s':>8} {'peak GiB':>9} {'vs best torch':>13} "
          f"{'MFU gen':>8} {'MFU d0':>8} {'rel err':>8}")
    for r in results:
        if "step_s" not in r:
            print(f"{r.get('impl'):<10} {r.get('variant', ''):<26} error: {r.get('error', '')[:100]}")
            continue
        r["floor_tflop"] = floors[False]["total"] / 1e12
        r["floor_tflop_delta_zero"] = floors[True]["total"] / 1e12
        r["mfu_floor"] = floor_s[False] / r["step_s"]
        r["mfu_floor_delta_zero"] = floor_s[True] / r["step_s"]
        r["speedup_vs_best_torch"] = (torch_best / r["step_s"]) if torch_best else None
        peak = (r.get("peak_bytes") or 0) / 2**30
        ratio = f"{r['speedup_vs_best_torch']:.2f}x" if r["speedup_vs_best_torch"] else "n/a"
        err = r.get("max_rel_err", r.get("max_rel_err_vs_first"))
        print(f"{r['impl']:<10} {r.get('variant', ''):<26} {r['step_s']:>8.3f} {r.get('first_call_s', 0):>8.1f} "
              f"{peak:>9.1f} {ratio:>13} {r['mfu_floor'] * 100:>7.1f}% {r['mfu_floor_delta_zero'] * 100:>7.1f}% "
              f"{'' if err is None else f'{err:.4f}':>8}")
    if out:
        with open(out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "floor": floors[False], "floor_delta_zero": floors[True]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
