"""How far the factored and dense samplers' policies are from the policy being trained, at Qwen3-4B
shape in bf16.

`sampler.generate(form="factored")` computes every SVD-adapted Linear as ((x Vh^T)(S + delta)) U^T
from the bf16 factors instead of x W + ((x Vh^T) delta) U^T. With the weights' own SVD the two are
the same function up to the rounding of the factors to bf16. `form="dense"` computes x W + x dW with
dW = bf16((U diag(delta) Vh)^T): the same function for any bases, up to the rounding of the adapter's
change. This script measures what each rounding does to the sampled tokens' log-probabilities, against
the mismatch the exact sampler already has (its KV-cache decode against the learner's full-sequence
forward):

- a random Qwen3-4B-shaped model whose every target Linear is W = bf16(Vh^T diag(S) U^T) for random
  orthonormal fp32 U, Vh (one QR per module, permuted and sign-flipped per layer) and S of a plausible
  spectrum, with the adapter's u / vh = bf16(U),
  bf16(Vh): the situation of a real checkpoint (bf16 weights, bf16 SVD factors). delta_s ~ N(0, 0.01^2),
  about what 200 Adam steps at lr 7e-5 can reach (|delta| <= steps x lr = 0.014);
- the three forms sample the same prompts with the same key at temperature 1;
- each form's own log-probs of its tokens are compared with the learner's (`qwen3.forward` over the
  whole sequence with `adapters`, `token_logprobs`): mean |gap|, and the mean of sampler - learner
  log-prob, which estimates KL(sampler || learner) per token.

    PYTHONPATH=. python scripts/check_sampler_form.py --out docs/results/sampler_form_fidelity.jsonl
    PYTHONPATH=. python scripts/check_sampler_form.py --small    # CPU, tiny model, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxhack.commands import checks, fail  # noqa: E402
from jaxhack.io import UserError  # noqa: E402
from jaxhack.models.fused_decode import requested  # noqa: E402


def svd_consistent_model(config, key, dtype):
    """(params, trainable, frozen): random weights built from random orthonormal factors (see above)."""
    import jax
    import jax.numpy as jnp

    from jaxhack.models.adapters import module_dims
    from jaxhack.models.random_init import random_orthonormal, random_params

    params = random_params(config, key, dtype)

    @jax.jit
    def weight(u, s, vh):  # fp32 factors [out,r], [r], [r,in] -> w [in,out] in dtype
        return jnp.einsum("ri,r,or->io", vh, s, u, precision="highest").astype(dtype)

    trainable, frozen = {}, {}
    for m, (name, (L, d_in, d_out)) in enumerate(module_dims(params).items()):
        r = min(d_in, d_out)
        # a decaying spectrum with the weight's rms at 0.02 (random_params' scale): sum S^2 = 0.02^2 d_in d_out
        shape = np.linspace(2.0, 0.2, r)
        s = jnp.asarray(shape * 0.02 * np.sqrt(d_in * d_out / np.sum(shape ** 2)), jnp.float32)
        # one QR per module and side; each layer permutes and sign-flips the factor pairs, which keeps
        # U and Vh orthonormal and S's pairing (a QR per layer and module took minutes at 4B)
        ku, kv = jax.random.split(jax.random.fold_in(key, m))
        u0 = random_orthonormal(ku, d_out, r, jnp.float32)  # [out,r]
        vh0 = random_orthonormal(kv, d_in, r, jnp.float32).T  # [r,in]
        ws, us, vhs = [], [], []
        for layer in range(L):
            kp, ks = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 500 + m), layer))
            perm = jax.random.permutation(kp, r)
            sign = jnp.where(jax.random.bernoulli(ks, 0.5, (r,)), 1.0, -1.0)
            u = u0[:, perm] * sign  # [out,r]: column k of u pairs with row k of vh and S_k
            vh = vh0[perm] * sign[:, None]  # [r,in]
            ws.append(weight(u, s, vh))
            us.append(u.astype(dtype))
            vhs.append(vh.astype(dtype))
        params["layers"][name] = jnp.stack(ws)
        frozen[name] = {"u": jnp.stack(us), "vh": jnp.stack(vhs)}
        kd = jax.random.fold_in(jax.random.fold_in(key, 1000 + m), 0)
        trainable[name] = {"delta_s": 0.01 * jax.random.normal(kd, (L, r), jnp.float32),
                           "delta_s_hack": jnp.zeros((L, r), jnp.float32)}
    return params, trainable, frozen


def learner_logprobs(params, config, adapters, prompts, result):
    """The learner's log-prob of each sampled completion token: [N, max_new] (0 past the length)."""
    import jax

    from jaxhack.grads.batch import make_batch
    from jaxhack.grads.losses import batched_logprobs

    comps = [result.tokens[i, :n].tolist() for i, n in enumerate(result.lengths)]
    batch = make_batch(prompts, comps, pad_id=0, padding="right", pad_multiple=64)
    attention = "causal" if jax.default_backend() == "gpu" else "masked"  # right-padded rows
    lp = np.asarray(batched_logprobs(params, config, adapters, batch["tokens"], batch["attention_mask"],
                                     attention=attention, microbatch=16))  # [N, T]: entry t = log p(token t)
    out = np.zeros(result.tokens.shape, np.float32)
    for i, n in enumerate(result.lengths):
        p = len(prompts[i])
        out[i, :n] = lp[i, p:p + n]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--small", action="store_true", help="tiny model on CPU (fp32: the forms agree to ~1e-6)")
    ap.add_argument("--layers", type=int, default=None,
                    help="Qwen3-4B's widths at this depth (bf16; e.g. 2 on a CPU: the rounding of 2 of 36 layers)")
    ap.add_argument("--out", default=None, help="append the JSON line here")
    args = ap.parse_args(argv)
    try:
        checks.at_least(args, ("rows", "prompt_len", "new_tokens", "layers"))
        requested()  # JAXHACK_DECODE_KERNEL
    except UserError as e:
        return fail(e)

    import jax
    import jax.numpy as jnp

    from jaxhack.bench import config_for
    from jaxhack.models.adapters import merge
    from jaxhack.rl import sampler

    if args.small:
        args.rows, args.prompt_len, args.new_tokens = 4, 8, 8
    config = dataclasses.replace(config_for(args.small, args.layers), eos_token_ids=())
    dtype = jnp.float32 if args.small else jnp.bfloat16
    t0 = time.perf_counter()
    params, trainable, frozen = svd_consistent_model(config, jax.random.PRNGKey(0), dtype)
    adapters = merge(trainable, frozen)
    build_s = time.perf_counter() - t0
    from jaxhack.models import decode_layout
    _, residuals = jax.jit(lambda p, a: decode_layout.factored_scales(p, a, residual=True))(params, adapters)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (args.rows, args.prompt_len)).tolist()
    results, record = {}, {"device": jax.devices()[0].device_kind, "rows": args.rows, "prompt_len": args.prompt_len,
                           "new_tokens": args.new_tokens, "layers": config.num_hidden_layers, "dtype": str(jnp.dtype(dtype)), "build_s": build_s,
                           "delta_s_std": 0.01, "temperature": 1.0,
                           "factor_residual_max": max(float(jnp.max(r)) for r in residuals.values())}
    for form in ("exact", "factored", "dense"):
        res = sampler.generate(params, config, prompts, max_new_tokens=args.new_tokens, key=jax.random.PRNGKey(7),
                               adapters=adapters, temperature=1.0, eos_token_ids=[], form=form)
        learner = learner_logprobs(params, config, adapters, prompts, res)
        mask = res.completion_mask
        gap = (res.logprobs - learner)[mask]
        results[form] = res
        record[form] = {"mean_abs_logp_gap": float(np.mean(np.abs(gap))), "max_abs_logp_gap": float(np.max(np.abs(gap))),
                        "kl_estimate_per_token": float(np.mean(gap)),
                        "mean_learner_logp": float(np.mean(learner[mask]))}
    for form in ("factored", "dense"):  # the tokens against the exact sampler's (same key)
        same = results["exact"].tokens == results[form].tokens
        first = np.where(same.all(axis=1), args.new_tokens, np.argmin(same, axis=1))
        record[form].update(identical_rows_to_exact=int(same.all(axis=1).sum()),
                            tokens_before_first_divergence_median=float(np.median(first)))
    print(json.dumps(record))
    if args.out:
        from jaxhack.io import append_jsonl
        append_jsonl(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
