"""Benchmark: one Phase-2 probe step at Qwen3-4B shape, jaxhack vs a PyTorch reference, same run.

A probe step = exact per-sample gradients of the Phase-2 loss w.r.t. the SVD adapter's delta_s for G
sequences (prompt + completion), per-sample cosines with v_hack for every module, and the batch
gradient. Random bf16 weights with Qwen3-4B shapes, random orthonormal-scale SVD bases (no SVD is
run: the cost of a step does not depend on the values), random v_hack (k=1).

- jaxhack: jax.jit(vmap(grad)) (jaxhack.rl.per_sample) + jaxhack.projection.cosines, per remat policy.
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
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.models.config import QWEN3_4B  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def config_for(small: bool):
    return dataclasses.replace(QWEN3_4B, **SMALL) if small else QWEN3_4B


HASH_MUL = 0x045D9F3B


def _hash_bits(idx, xp):
    """A 32-bit integer hash of int32 indices (wrapping int32 arithmetic, the same in jax and torch)."""
    x = idx * HASH_MUL
    x = x ^ (x >> 16)
    x = x * HASH_MUL
    x = x ^ (x >> 16)
    x = x * HASH_MUL
    return x ^ (x >> 16)


def hash_uniform_jax(shape, offset: int, scale: float, dtype):
    """Deterministic uniform(-scale*sqrt3, scale*sqrt3) (std = scale) values of element offset + i, i the
    flat index in `shape`: bit-identical to `hash_uniform_torch`, so both sides get the same inputs
    without moving 18 GB between processes."""
    import jax.numpy as jnp

    n = int(np.prod(shape))
    idx = jnp.arange(n, dtype=jnp.int32) + jnp.int32(offset % (1 << 31))
    u = (_hash_bits(idx, jnp) & 0xFFFFFF).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24)) - jnp.float32(0.5)
    return (u * jnp.float32(scale * 12 ** 0.5)).astype(dtype).reshape(shape)


def hash_uniform_torch(shape, offset: int, scale: float, dtype, device):
    import torch

    n = int(np.prod(shape))
    idx = torch.arange(n, dtype=torch.int32, device=device) + (offset % (1 << 31))
    u = (_hash_bits(idx, torch) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24)) - 0.5
    return (u * torch.tensor(scale * 12 ** 0.5, dtype=torch.float32)).to(dtype).reshape(shape)


def leaf_offset(name: str) -> int:
    """A distinct element offset per parameter (name hash), so leaves do not share values."""
    import zlib

    return (zlib.crc32(name.encode()) & 0x3FFF) << 17


def flop_floor(config, G: int, P: int, C: int, delta_zero: bool = False) -> dict:
    """Fewest FLOPs an exact per-sample delta_s gradient step needs (derivation: docs/benchmarks.md).

    Per token (all T = P + C positions; every position feeds the completion through attention):
      forward   x W (2 P_lin), h = x Vh^T (2 P_vh), (h * s) U^T (2 P_u)
      backward  dy W^T (2 P_lin), dy U (2 P_u), ((dy U) * s) Vh (2 P_vh); ds = sum_t h * (dy U) is
                elementwise.
    Folding U diag(s) Vh into a merged weight would skip the adapter matmuls, but in bf16 it rounds
    small delta_s away (8-bit mantissa), so it is not an exact implementation and not the floor.
    Attention: causal QK^T and PV forward 2 T^2 Hq hd per layer (half the square), backward twice
    that. LM head: forward + input gradient at completion positions only (4 D V per token).
    delta_zero (probes at delta_s = 0): the adapter's forward term (h * s) U^T and its activation
    gradient ((dy U) * s) Vh are exactly zero, so only x Vh^T and dy U remain: 4 p_lin + 2 p_vh + 2 p_u.
    """
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    qd, kvd = config.q_dim, config.kv_dim
    dims = [(D, qd), (D, kvd), (D, kvd), (qd, D), (D, F), (D, F), (F, D)]  # (in, out)
    p_lin = L * sum(i * o for i, o in dims)
    p_vh = L * sum(i * min(i, o) for i, o in dims)
    p_u = L * sum(min(i, o) * o for i, o in dims)
    T = P + C
    linear = G * T * (4 * p_lin + 2 * p_vh + 2 * p_u) if delta_zero else G * T * 4 * (p_lin + p_vh + p_u)
    attention = G * L * 3 * (2 * T * T * config.num_attention_heads * config.head_dim)
    lm_head = G * C * 4 * D * config.vocab_size
    total = linear + attention + lm_head
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": total,
            "p_lin": p_lin, "p_vh": p_vh, "p_u": p_u}


def _peak_bytes_jax():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def shared_inputs(config, G: int, P: int, C: int, seed: int = 0):
    """tokens [G,T] int and advantages [G] f32 (numpy), the same for jaxhack and PyTorch."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (G, P + C)).astype(np.int32)
    adv = (rng.random(G) * 4).astype(np.float32)
    return tokens, adv - adv.mean()


WEIGHT_STD, NORM_STD = 0.02, 0.1


def probe_inputs(config, G: int, P: int, C: int, dtype=None):
    """Probe inputs (deterministic, shared with the PyTorch side through `hash_uniform_*`): bf16 params
    (uniform, std 0.02; norms 1 +- 0.1), random-basis SVD adapter (u, vh uniform with unit expected column
    / row norms), random v_hack (k=1) and a batch of G sequences of P prompt + C completion tokens with
    centered advantages. Returns (params, trainable, frozen, v_hack, batch)."""
    import jax
    import jax.numpy as jnp

    from jaxhack.models import qwen3
    from jaxhack.projection.v_hack import random_v_hack

    dtype = dtype or jnp.bfloat16
    shapes = jax.eval_shape(lambda: qwen3.init_params(config, jax.random.PRNGKey(0), dtype=dtype))

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return 1 + hash_uniform_jax(s.shape, leaf_offset(name), NORM_STD, jnp.float32).astype(dtype)
        return hash_uniform_jax(s.shape, leaf_offset(name), WEIGHT_STD, dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    trainable, frozen = {}, {}
    for name, (d_in, d_out) in qwen3.module_shapes(config).items():
        L, r = config.num_hidden_layers, min(d_in, d_out)
        frozen[name] = {"u": hash_uniform_jax((L, d_out, r), leaf_offset(name + ".u"), d_out ** -0.5, dtype),
                        "vh": hash_uniform_jax((L, r, d_in), leaf_offset(name + ".vh"), d_in ** -0.5, dtype)}
        trainable[name] = {"delta_s": jnp.zeros((L, r), jnp.float32), "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    v_hack = random_v_hack({n: (m["delta_s"].shape[0], m["delta_s"].shape[1]) for n, m in trainable.items()},
                           seed=0, k=1)
    tokens, adv = shared_inputs(config, G, P, C)
    T = P + C
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones((G, T), bool),
             "completion_mask": jnp.broadcast_to(jnp.arange(T) >= P, (G, T)), "advantage": jnp.asarray(adv)}
    return params, trainable, frozen, v_hack, batch


def probe_step(config, v_hack, loss):
    """jit(step)(trainable, frozen, params, batch) -> (per-sample cosines, batch gradient)."""
    import jax

    from jaxhack.projection.cosines import per_sample_cosines
    from jaxhack.rl.per_sample import per_sample_grads

    @jax.jit
    def step(tr, fr, p, b):
        g_i = per_sample_grads(loss, tr, fr, p, config, b)
        return per_sample_cosines(v_hack, g_i), jax.tree.map(lambda x: x.sum(0), g_i)

    return step


def _grads_to_numpy(g_i) -> dict:
    """{module: [G, L, r] float32} from a per-sample gradient tree (delta_s leaves)."""
    return {name: np.asarray(m["delta_s"], np.float32) for name, m in g_i.items()}


def relative_error(ours: dict, theirs: dict) -> float:
    """max over (sample, module) of |theirs - ours| / |ours| over that module's [L, r] gradient."""
    worst = 0.0
    for name, a in ours.items():
        b = np.asarray(theirs[name], np.float64).reshape(a.shape[0], -1)
        a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
        err = np.linalg.norm(b - a, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
        worst = max(worst, float(err.max()))
    return worst


def run_jax(args) -> list[dict]:
    import functools

    import jax

    from jaxhack.rl import losses
    from jaxhack.rl.per_sample import per_sample_grads

    config = config_for(args.small)
    G, P, C = args.group_size, args.prompt_len, args.completion_len
    T = P + C
    params, trainable, frozen, v_hack, batch = probe_inputs(config, G, P, C)
    out, saved = [], None
    for variant in args.variants.split(","):
        remat, attention, *flags = variant.split(":")
        unroll, zero = "unroll" in flags, "zero" in flags
        loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=args.chunk,
                                 attention=attention, scan_layers=not unroll, delta_zero=zero)
        step = probe_step(config, v_hack, loss)

        rec = {"impl": "jaxhack", "variant": variant, "remat": remat, "attention": attention,
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

    config = config_for(args.small)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
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
        return hash_uniform_torch(shape, leaf_offset(name), std, dtype, device)

    def norm(name, shape):
        return 1 + hash_uniform_torch(shape, leaf_offset(name), NORM_STD, torch.float32, device).to(dtype)

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
    from jaxhack.models.qwen3 import module_shapes

    modules = []
    for name, (d_in, d_out) in module_shapes(config).items():
        w = stacked(f"['layers']['{name}']", (L, d_in, d_out), WEIGHT_STD)
        r = min(d_in, d_out)
        u = hash_uniform_torch((L, d_out, r), leaf_offset(name + ".u"), d_out ** -0.5, dtype, device)
        vh = hash_uniform_torch((L, r, d_in), leaf_offset(name + ".vh"), d_in ** -0.5, dtype, device)
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
    rec = {"impl": "pytorch", "variant": ("compile:" if compiled else "") + variant, "G": G, "T": T,
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
    if args.exchange and os.path.exists(args.exchange):
        ours = dict(np.load(args.exchange))
        rec["max_rel_err"] = relative_error(ours, {k: v.float().cpu().numpy() for k, v in grads.items()})
    print(json.dumps(rec), flush=True)
    return [rec]


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
    ap.add_argument("--out", default=None, help="write the JSON lines here (default docs/results/bench_probe.jsonl; "
                                                "--small: not written unless given)")
    args = ap.parse_args(argv)
    if args.small:
        args.prompt_len, args.completion_len, args.group_size = 16, 32, 2
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
    config = config_for(args.small)
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
