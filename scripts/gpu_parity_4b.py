"""Full-size conversion and bf16 parity check (GPU): random-init Qwen3-4B in transformers, save as
sharded safetensors, convert with jaxhack, compare logits on a padded batch.

Errors are reported against a float32 PyTorch reference: jaxhack bf16 vs fp32 and, for scale,
PyTorch's own bf16 vs fp32 (relative error = ||a - b|| / ||b|| over real-token logits), plus the
share of positions whose argmax agrees. Also conversion seconds and peak host memory.

    PYTHONPATH=. python scripts/gpu_parity_4b.py --work /tmp/q4b --out parity.json
    PYTHONPATH=. python scripts/gpu_parity_4b.py --small --work /tmp/qsmall      # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # torch shares the card

    import numpy as np
    import torch
    import transformers

    from jaxhack.models.config import QWEN3_4B

    c = QWEN3_4B
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
              rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings)
    if args.small:
        kw.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    hf_config = transformers.Qwen3Config(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(torch.float32).eval()
        with torch.no_grad():  # norms away from 1 so norm bugs would show
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
    work = Path(args.work)
    model.to(torch.bfloat16).save_pretrained(work, safe_serialization=True, max_shard_size="2GB")
    result["save_s"] = round(time.perf_counter() - t0, 1)

    # batch: one full row, one left-padded, one right-padded
    B, T = 3, 256 if not args.small else 24
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, kw["vocab_size"], (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, : T // 3] = 0
    mask[2, 2 * T // 3:] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)

    del model  # references are loaded back from the saved files, as a user would (a module cast with
    # .to(bf16) and back would also round its RoPE inv_freq buffer, spoiling the fp32 reference)

    def torch_logits(dtype):
        ref_model = transformers.Qwen3ForCausalLM.from_pretrained(work, dtype=dtype,
                                                                  attn_implementation="eager").to(device).eval()
        with torch.no_grad():
            out = ref_model(ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
        out = out.float().cpu().numpy()
        del ref_model
        if device == "cuda":
            torch.cuda.empty_cache()
        return out

    ref32 = torch_logits(torch.float32)
    ref16 = torch_logits(torch.bfloat16)

    import jax
    import jax.numpy as jnp

    from jaxhack.models import qwen3
    from jaxhack.models.convert import load_hf_params

    t0 = time.perf_counter()
    params, config = load_hf_params(work, dtype="bfloat16", progress=False)
    params = jax.device_put(params)
    jax.block_until_ready(params)
    result["convert_s"] = round(time.perf_counter() - t0, 1)
    result["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    @jax.jit
    def logits_fn(p, i, m):
        h, _ = qwen3.forward(p, config, i, m)
        return qwen3.lm_logits(p, config, h)

    jx = np.asarray(logits_fn(params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy().astype(bool))))
    real = mask.numpy().astype(bool)

    def rel(a, b):
        return float(np.linalg.norm(a[real] - b[real]) / np.linalg.norm(b[real]))

    result.update(
        rel_err_jax_bf16_vs_torch_fp32=rel(jx, ref32),
        rel_err_torch_bf16_vs_torch_fp32=rel(ref16, ref32),
        rel_err_jax_bf16_vs_torch_bf16=rel(jx, ref16),
        max_abs_jax_bf16_vs_torch_bf16=float(np.abs(jx[real] - ref16[real]).max()),
        argmax_agree_jax_vs_fp32=float((jx.argmax(-1) == ref32.argmax(-1))[real].mean()),
        argmax_agree_torch_bf16_vs_fp32=float((ref16.argmax(-1) == ref32.argmax(-1))[real].mean()),
        jax_gpu_peak_bytes=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
    )
    # The same converted weights upcast to fp32, matmuls at full fp32 precision: an implementation
    # check at full size free of bf16 rounding order (GPU fp32 matmuls default to TF32-like).
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    del params
    with jax.default_matmul_precision("highest"):
        jx32 = np.asarray(logits_fn(params32, jnp.asarray(ids.numpy()),
                                    jnp.asarray(mask.numpy().astype(bool))))
    result.update(rel_err_jax_fp32_vs_torch_fp32=rel(jx32, ref32),
                  argmax_agree_jax_fp32_vs_fp32=float((jx32.argmax(-1) == ref32.argmax(-1))[real].mean()))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
