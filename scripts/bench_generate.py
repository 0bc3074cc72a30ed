"""Generation throughput: jaxhack sampler vs transformers `generate`, plus the memory-bandwidth floor.

Qwen3-4B shapes with random bf16 weights (no checkpoint needed). Every configuration prints one JSON
line (and appends it to --out). The torch reference runs first, in a child process per batch size,
so its GPU memory is released before JAX allocates its own.

    PYTHONPATH=. python scripts/bench_generate.py --batches 64,256 --new-tokens 1024 --prompt-len 128
    PYTHONPATH=. python scripts/bench_generate.py --small          # CPU smoke test, tiny model
See docs/sampler.md.
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

from jaxhack.commands import checks, parse_list  # noqa: E402
from jaxhack.io import UserError  # noqa: E402
from jaxhack.models.config import QWEN3_4B, TINY, Qwen3Config  # noqa: E402


def model_config(small: bool) -> Qwen3Config:
    return TINY if small else QWEN3_4B


def param_count(config: Qwen3Config) -> int:
    """Parameters of the model, the (tied) embedding counted once."""
    D, F, L, hd = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim
    per_layer = D * config.q_dim + 2 * D * config.kv_dim + config.q_dim * D + 3 * D * F + 2 * D + 2 * hd
    head = 0 if config.tie_word_embeddings else D * config.vocab_size
    return config.vocab_size * D + L * per_layer + D + head


def bandwidth_floor(config: Qwen3Config, batch: int, prompt_len: int, new_tokens: int, hbm_tbps: float,
                    bytes_per_el: int = 2, kv_slots_read: float | None = None) -> dict:
    """Per decode step every weight is read once and the KV cache of all sequences is read once.
    kv_slots_read: cache slots read per step (default: the average live length prompt + new/2)."""
    weight_bytes = param_count(config) * bytes_per_el
    s_avg = prompt_len + new_tokens / 2 if kv_slots_read is None else kv_slots_read
    kv_bytes = (2 * config.num_hidden_layers * batch * s_avg * config.num_key_value_heads
                * config.head_dim * bytes_per_el)
    step_s = (weight_bytes + kv_bytes) / (hbm_tbps * 1e12)
    return {"weight_gb": weight_bytes / 1e9, "kv_read_gb_per_step": kv_bytes / 1e9,
            "floor_s_per_step": step_s, "ceiling_tokens_per_s": batch / step_s}


def roofline_floor(config: Qwen3Config, batch: int, prompt_len: int, new_tokens: int, hbm_tbps: float,
                   peak_tflops: float, bytes_per_el: int = 2) -> dict:
    """The decode step's floor when each part takes the longer of its reads and its FLOPs: the matmuls
    read every weight once and do 2 x weights x batch FLOPs (at 256 rows on an H200 the FLOPs take
    longer: 1.88 against 1.52 ms for the layers, so the bandwidth ceiling is not reachable there); the
    attention reads the live KV cache and does 4 x batch x live slots x Hq x hd FLOPs per layer.
    Norm weights are counted with the matmuls' bytes (they are 0.01% of them)."""
    bw = bandwidth_floor(config, batch, prompt_len, new_tokens, hbm_tbps, bytes_per_el)
    s_avg = prompt_len + new_tokens / 2
    weights = {"bytes": bw["weight_gb"] * 1e9, "flop": 2.0 * param_count(config) * batch}
    attention = {"bytes": bw["kv_read_gb_per_step"] * 1e9,
                 "flop": 4.0 * config.num_hidden_layers * batch * s_avg * config.num_attention_heads * config.head_dim}
    reads_flops = {name: (p["bytes"] / (hbm_tbps * 1e12), p["flop"] / (peak_tflops * 1e12))
                   for name, p in (("weights", weights), ("attention", attention))}  # seconds each
    step_s = sum(max(t) for t in reads_flops.values())
    return {"weights_s": max(reads_flops["weights"]), "attention_s": max(reads_flops["attention"]),
            "weights_compute_bound": reads_flops["weights"][1] > reads_flops["weights"][0],
            "floor_s_per_step": step_s, "ceiling_tokens_per_s": batch / step_s, "peak_tflops": peak_tflops}


def random_prompts(config: Qwen3Config, batch: int, prompt_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(3, config.vocab_size, size=(batch, prompt_len), dtype=np.int64)


# ----------------------------------------------------------------------------- torch reference
def run_torch(args, batch: int) -> dict:
    import torch
    import transformers

    config = model_config(args.small)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    eos = config.eos_token_ids[0] if config.eos_token_ids else 0
    hf_cfg = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings, attention_bias=False,
        use_sliding_window=False, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype).eval()
    input_ids = torch.as_tensor(random_prompts(config, batch, args.prompt_len, args.seed), device=device)
    attention_mask = torch.ones_like(input_ids)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=eos)

    def once(cache_impl):
        kw = dict(gen_kwargs)
        if cache_impl == "static":
            kw["cache_implementation"] = "static"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        assert out.shape == (batch, args.prompt_len + args.new_tokens), out.shape
        return elapsed

    cache_impl = args.torch_cache
    try:
        once(cache_impl)  # warm-up
    except Exception as e:  # noqa: BLE001 - fall back to the default cache, and say so
        print(f"torch: cache_implementation={cache_impl} failed ({type(e).__name__}: {e}); using dynamic",
              file=sys.stderr)
        cache_impl = "dynamic"
        once(cache_impl)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [once(cache_impl) for _ in range(args.torch_repeats)]
    median = statistics.median(times)
    return {"backend": "torch", "torch_cache": cache_impl, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "times_s": times, "median_s": median,
            "tokens_per_s": batch * args.new_tokens / median,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}


# ----------------------------------------------------------------------------- jaxhack sampler
def run_jax(args, batch: int, params) -> dict:
    import jax

    from jaxhack.models import fused_decode
    from jaxhack.rl import sampler

    config = model_config(args.small)
    prompts = random_prompts(config, batch, args.prompt_len, args.seed).tolist()

    def once(i):
        t0 = time.perf_counter()
        res = sampler.generate(params, config, prompts, max_new_tokens=args.new_tokens, temperature=0.0,
                               key=jax.random.PRNGKey(i), eos_token_ids=[])  # numpy out: blocks
        elapsed = time.perf_counter() - t0
        assert res.tokens.shape == (batch, args.new_tokens) and (res.lengths == args.new_tokens).all()
        return elapsed

    compile_and_run = once(0)
    times = [once(i + 1) for i in range(args.repeats)]
    median = statistics.median(times)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    p_bucket = sampler.prompt_bucket(args.prompt_len)
    return {"backend": "jaxhack", "dtype": str(params["embed"].dtype), "device": dev.device_kind,
            "decode_kernel": fused_decode.requested(),  # JAXHACK_DECODE_KERNEL (models/fused_decode.py)
            "first_call_s": compile_and_run, "times_s": times, "median_s": median,
            "tokens_per_s": batch * args.new_tokens / median,
            "peak_mem_gb": peak / 1e9 if peak is not None else None,
            "batch_bucket": sampler.batch_bucket(batch), "prompt_bucket": p_bucket,
            # decode attention reads each row's live slots only: on average P_bucket + new/2
            "floor_impl": bandwidth_floor(config, sampler.batch_bucket(batch), p_bucket,
                                          args.new_tokens, args.hbm_tbps,
                                          bytes_per_el=params["embed"].dtype.itemsize)}


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; small: 2,4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 1024 (small: 16)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (small: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed jax runs after one warm-up/compile run")
    ap.add_argument("--torch-repeats", type=int, default=1, help="timed torch runs after one warm-up run")
    ap.add_argument("--torch-cache", choices=["static", "dynamic"], default="static")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny model, small sizes, CPU-friendly smoke test")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="device memory bandwidth (H100 SXM: 3.35)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak for the roofline floor (H100 / H200 SXM: 989)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--torch-only-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = args.batches if args.batches is not None else ("2,4" if args.small else "64,256")
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.small else 1024)
    args.prompt_len = args.prompt_len if args.prompt_len is not None else (16 if args.small else 128)
    try:
        batches = parse_list("--batches", args.batches, int)
        for b in batches:
            checks.positive("--batches", b)
        checks.at_least(args, ("new_tokens", "prompt_len", "repeats", "torch_repeats"))
        checks.above_zero("--peak-tflops", args.peak_tflops)
        checks.above_zero("--hbm-tbps", args.hbm_tbps)
        from jaxhack.models import fused_decode
        fused_decode.requested()  # a bad JAXHACK_DECODE_KERNEL stops here, not as one error line per batch
    except UserError as e:
        ap.error(str(e))
    config = model_config(args.small)

    if args.torch_only_batch is not None:  # child process: one torch measurement, JSON on stdout
        print("TORCH_RESULT " + json.dumps(run_torch(args, args.torch_only_batch)), flush=True)
        return

    common = {"model": "tiny" if args.small else "qwen3-4b", "params_m": param_count(config) / 1e6,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "hbm_tbps": args.hbm_tbps}
    torch_results = {}
    if not args.skip_torch:
        for batch in batches:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--torch-only-batch", str(batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TORCH_RESULT ")]
            if proc.returncode != 0 or not lines:
                torch_results[batch] = {"backend": "torch", "error": proc.stderr.strip()[-2000:]}
            else:
                torch_results[batch] = json.loads(lines[-1][len("TORCH_RESULT "):])

    # JAX preallocates 75% of the card by default: 60 GB on an 80 GB H100, less than batch 256 x 1152
    # cache slots needs (~44 GB of KV cache + 8 GB weights + 8 GB per-layer decode copies). The torch
    # children have exited by now, so JAX may take the whole card.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax
    import jax.numpy as jnp

    from jaxhack.models import qwen3

    dtype = jnp.float32 if args.small and jax.default_backend() == "cpu" else jnp.bfloat16
    params = jax.jit(qwen3.init_params, static_argnums=(0, 2))(config, jax.random.PRNGKey(args.seed), dtype)
    for batch in batches:
        floor = bandwidth_floor(config, batch, args.prompt_len, args.new_tokens, args.hbm_tbps,
                                bytes_per_el=jnp.dtype(dtype).itemsize)
        roofline = roofline_floor(config, batch, args.prompt_len, args.new_tokens, args.hbm_tbps, args.peak_tflops,
                                  bytes_per_el=jnp.dtype(dtype).itemsize)
        print(f"jaxhack: batch {batch} x {args.new_tokens} new tokens ...", file=sys.stderr, flush=True)
        try:
            record = {**common, "batch": batch, "floor": floor, "roofline": roofline, **run_jax(args, batch, params)}
            record["fraction_of_ceiling"] = record["tokens_per_s"] / floor["ceiling_tokens_per_s"]
            record["fraction_of_roofline"] = record["tokens_per_s"] / roofline["ceiling_tokens_per_s"]
        except Exception as e:  # noqa: BLE001 - an OOM at one batch size must not hide the others
            record = {**common, "backend": "jaxhack", "batch": batch, "floor": floor,
                      "error": f"{type(e).__name__}: {str(e)[:500]}"}
        emit(record, args.out)
        if batch in torch_results:
            t = {**common, "batch": batch, "floor": floor, **torch_results[batch]}
            if "tokens_per_s" in t:
                t["fraction_of_ceiling"] = t["tokens_per_s"] / floor["ceiling_tokens_per_s"]
                t["jax_speedup"] = record["tokens_per_s"] / t["tokens_per_s"]
            emit(t, args.out)


if __name__ == "__main__":
    main()
