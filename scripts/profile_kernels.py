"""Where GPU time goes: profile a probe step or a decode step at Qwen3-4B shape, per kernel.

Runs the step a few times under the profiler (`jaxhack.profiling`: device time of every kernel, by
kernel name and by a coarse category: gemm, attention, copy/transpose, reduction/elementwise fusion).
Prints the top kernels, each with the HLO instruction that launched it when the trace records one, and
writes the full table as JSON. For `generate` also the time per decode step by role (`profiling.decode_roles`:
layer matmuls with the rate they stream the weights at, decode attention, small per-layer kernels, LM
head, per-step kernels, prefill and the rest).

    PYTHONPATH=. python scripts/profile_kernels.py probe --variant dots:causal --out prof_probe.json
    PYTHONPATH=. python scripts/profile_kernels.py decode --batch 64 --cache-len 1152
    # the Phase 3 sampler (full-rank SVD adapter, temperature 1); one 12288-token micro-batch of the update
    PYTHONPATH=. python scripts/profile_kernels.py generate --adapter svd --batch 96 --prompt-len 384
    PYTHONPATH=. python scripts/profile_kernels.py update --batch 12 --prompt-len 400 --completion-len 624
    PYTHONPATH=. python scripts/profile_kernels.py update --batch 24 --group-size 6 --update-layout shared_prompt
    # as one of bench_phase3.py's realistic micro-batches: 3 groups, completions drawn with max_new 1536
    PYTHONPATH=. python scripts/profile_kernels.py update --batch 18 --group-size 6 --update-layout shared_prompt \
        --lengths realistic --completion-len 1536
    PYTHONPATH=. python scripts/profile_kernels.py probe --small     # CPU smoke test (no GPU planes)
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_probe(args):
    """(fn, inputs) of one probe step: per-sample delta_s grads + cosines (as bench_probe)."""
    from jaxhack.bench import config_for, probe_inputs, probe_step
    from jaxhack.grads import losses

    config = config_for(args.small)
    G, P, C = (2, 16, 32) if args.small else (args.group_size, args.prompt_len, args.completion_len)
    params, trainable, frozen, v_hack, batch = probe_inputs(config, G, P, C)
    remat, attention = args.variant.split(":")
    loss = functools.partial(losses.reinforce_loss, group_size=G, remat=remat, chunk=512, attention=attention)
    step = probe_step(config, v_hack, loss)
    return (lambda: step(trainable, frozen, params, batch)), {"variant": args.variant, "G": G, "T": P + C}


def build_decode(args):
    """(fn, inputs) of one decode step with the KV cache donated (as bench_decode_step)."""
    import jax
    import jax.numpy as jnp

    from jaxhack.bench import config_for
    from jaxhack.models import qwen3
    from jaxhack.models.random_init import random_params

    config = config_for(args.small)
    B, S = (4, 64) if args.small else (args.batch, args.cache_len)
    params = random_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    state = {"cache": jax.tree.map(lambda c: c + jnp.bfloat16(0.01), qwen3.init_cache(config, B, S, jnp.bfloat16)),
             "i": 0}
    mask = jnp.ones((B, S), bool)
    token = jnp.zeros((B, 1), jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(p, c, idx):
        h, c = qwen3.forward(p, config, token, mask, cache=c, cache_index=idx, attention=args.attention)
        return qwen3.lm_logits(p, config, h[:, 0]), c

    def run():
        logits, state["cache"] = step(params, state["cache"], S // 2 + state["i"] % 8)
        state["i"] += 1
        return logits, state["cache"]

    return run, {"batch": B, "cache_len": S, "attention": args.attention}


def build_generate(args):
    """(fn, inputs) of one greedy sampler.generate call (EOS disabled: every row runs to the end)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxhack.bench import config_for
    from jaxhack.models.random_init import random_params
    from jaxhack.rl import sampler

    config = config_for(args.small)
    B, P, N = (4, 16, 8) if args.small else (args.batch, args.prompt_len, args.new_tokens)
    dtype = jnp.float32 if args.small else jnp.bfloat16
    params = random_params(config, jax.random.PRNGKey(0), dtype)
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (B, P)).tolist()
    adapters = None
    if args.adapter == "svd":  # as the Phase 3 sampler: full-rank SVD adapter, sampling at temperature 1
        from jaxhack.models.adapters import merge
        from jaxhack.models.random_init import random_svd_adapter
        trainable, frozen = random_svd_adapter(params, jax.random.PRNGKey(1), dtype)
        adapters = merge(trainable, frozen)

    def run():
        return sampler.generate(params, config, prompts, max_new_tokens=N, temperature=1.0 if adapters else 0.0,
                                key=jax.random.PRNGKey(0), eos_token_ids=[], adapters=adapters).tokens

    return run, {"batch": B, "prompt_len": P, "new_tokens": N, "adapter": args.adapter}


def build_update(args):
    """(fn, inputs) of one micro-batch of the Phase 3 update: value_and_grad of the trainer's Dr.GRPO loss
    (`grads.losses.grpo_batch_loss`, causal attention) over `--batch` rows of `--prompt-len` +
    `--completion-len` tokens with the full-rank SVD adapter, remat `--remat` (rl/learner.make_update_fn
    runs this once per micro-batch). `--lengths realistic`: as bench_phase3.py's realistic regime, each
    group's prompt drawn from prompt-len +- min(100, prompt-len / 4) and each completion from
    `phase3_floor.completion_lengths` with max_new = completion-len (mean ~500 at 1536); rows right-padded
    to the longest, cut to a multiple of 128 as the learner's micro-batches are."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxhack.bench import config_for
    from jaxhack.grads.batch import make_batch
    from jaxhack.grads.losses import grpo_batch_loss
    from jaxhack.models.random_init import random_params, random_svd_adapter

    config = config_for(args.small)
    R, P, C = (2, 8, 8) if args.small else (args.batch, args.prompt_len, args.completion_len)
    dtype = jnp.float32 if args.small else jnp.bfloat16
    params = random_params(config, jax.random.PRNGKey(0), dtype)
    trainable, frozen = random_svd_adapter(params, jax.random.PRNGKey(1), dtype)
    rng = np.random.default_rng(0)
    G = (min(args.group_size, R) if args.small else args.group_size) if args.update_layout == "shared_prompt" else R
    prompt_lens, comp_lens = np.full(R // G, P), np.full(R, C)
    if args.lengths == "realistic":
        from jaxhack.phase3_floor import completion_lengths

        half = min(100, P // 4)
        prompt_lens = rng.integers(P - half, P + half + 1, R // G)
        comp_lens = completion_lengths("realistic", R, C)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in prompt_lens]
    T = int(prompt_lens.max() + comp_lens.max())
    T = T if args.lengths == "equal" else -(-T // 128) * 128
    batch = make_batch([prompts[i // G] for i in range(R)],  # rows i*G .. i*G+G-1 share a prompt, as GRPO's
                       [rng.integers(3, config.vocab_size, int(c)).tolist() for c in comp_lens], pad_id=0,
                       padding="right", length=T)
    batch.update(advantage=rng.standard_normal(R).astype(np.float32), old_logp=np.zeros((R, T), np.float32),
                 use_current=np.ones(R, bool), ref_logp=np.zeros((R, T), np.float32))
    positions = R * T
    if args.update_layout == "shared_prompt":  # the groups' packed buffers (grads.shared_prompt)
        from jaxhack.grads.shared_prompt import group_layout

        layout = group_layout(batch["tokens"], batch["attention_mask"], np.repeat(prompt_lens, G), G)
        batch.update(layout)
        positions = layout["packed_tokens"].size
    batch = jax.tree.map(jnp.asarray, batch)
    loss = functools.partial(grpo_batch_loss, group_size=G, max_new=C, prompts_per_step=R // G, attention="causal",
                             remat=args.remat, chunk=256)
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(3,))
    return (lambda: grad_fn(trainable, frozen, params, config, batch)), {
        "rows": R, "tokens": int(np.repeat(prompt_lens, G).sum() + comp_lens.sum()), "row_positions": R * T,
        "completion_tokens": int(comp_lens.sum()), "lengths": args.lengths, "remat": args.remat,
        "update_layout": args.update_layout, "group_size": G, "linear_positions": positions}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("probe", "decode", "generate", "update"))
    ap.add_argument("--variant", default="dots:causal", help="probe REMAT:ATTENTION")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache-len", type=int, default=1152)
    ap.add_argument("--new-tokens", type=int, default=256, help="generate: tokens per call")
    ap.add_argument("--attention", default="decode", help="decode: masked | decode")
    ap.add_argument("--adapter", choices=("none", "svd"), default="none",
                    help="generate: sample through a full-rank SVD adapter at temperature 1 (the Phase 3 sampler)")
    ap.add_argument("--remat", default="linear", choices=("none", "full", "dots", "linear"),
                    help="update: remat policy (the full preset: linear)")
    ap.add_argument("--lengths", choices=("equal", "realistic"), default="equal",
                    help="update: every row prompt-len + completion-len tokens, or drawn as bench_phase3.py's "
                         "realistic regime (completion-len is then max_new)")
    ap.add_argument("--update-layout", choices=("rows", "shared_prompt"), default="rows",
                    help="update: per-row sequences, or each group's prompt once (--group-size rows per group)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None, help="write the full table as JSON here")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from jaxhack.commands import checks
    from jaxhack.io import UserError
    from jaxhack.models.fused_decode import requested

    try:
        checks.at_least(args, ("group_size", "prompt_len", "completion_len", "batch", "cache_len", "new_tokens",
                               "steps", "top"))
        requested()  # JAXHACK_DECODE_KERNEL
    except UserError as e:
        ap.error(str(e))
    if args.what == "update" and args.update_layout == "shared_prompt" and not args.small and args.batch % args.group_size:
        ap.error(f"--batch {args.batch} is not a whole number of groups of --group-size {args.group_size}")

    import jax

    from jaxhack.profiling import profile

    run, meta = {"probe": build_probe, "decode": build_decode, "generate": build_generate,
                 "update": build_update}[args.what](args)
    jax.block_until_ready(run())  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(run())
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    summary = profile(run, args.steps)
    summary.update(what=args.what, wall_ms_per_step_unprofiled=wall_ms, device=str(jax.devices()[0]), **meta)
    print(f"{args.what} {meta}: {wall_ms:.1f} ms/step unprofiled; kernels sum to "
          f"{summary['total_ms_per_step']:.1f} ms/step on {summary['planes']}")
    for line, ms in summary["line_ms_per_step"].items():
        print(f"  line {line[:70]:<70} {ms:9.2f} ms")
    for cat, ms in summary["by_category_ms"].items():
        print(f"  {cat:<28} {ms:9.2f} ms")
    for r in summary["kernels"][:args.top]:
        print(f"{r['ms_per_step']:9.3f} ms {r['calls_per_step']:7.1f}x  [{r['category']}] {r['kernel'][:90]}")
        if r["hlo"]:
            print(f"{'':22}{r['hlo'][:220]}")
    if args.what == "generate":  # what a decode step spends, by role (docs/benchmarks.md "Session 17")
        from jaxhack.bench import config_for
        from jaxhack.rl.memory import linear_params
        from jaxhack.profiling import decode_roles

        config = config_for(args.small)
        steps = meta["new_tokens"]
        # the bf16 weights the layer matmuls read per step (with the SVD adapter they read its bases too)
        layer_bytes = 2 * linear_params(config)["p_lin"] if args.adapter == "none" else None
        summary["roles"] = decode_roles(summary, steps, config.num_hidden_layers, layer_bytes)
        print(f"per decode step ({steps} steps per call; wall {1e3 * wall_ms / steps:.0f} us unprofiled):")
        for role, r in summary["roles"].items():
            rate = f"  {r['tbps']:.2f} TB/s" if "tbps" in r else ""
            print(f"  {role:<26} {r['us_per_decode_step']:9.1f} us  {r['launches_per_decode_step']:6.1f} launches{rate}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
