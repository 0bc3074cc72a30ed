"""The sampler's per-layer decode layout: `decode_layers` (built once per sampler call) and the
projections that read it (`group_projections`, called by `qwen3._layer`). docs/sampler.md, "Weights
for decoding" and "Factored form"; docs/architecture.md.

A decode step is bound by small matmuls' start and tail, not by their bytes (docs/benchmarks.md,
sessions 9-10), so the layout gives one matmul per group of Linears that read one input.
"""
from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxhack.models.adapters import add_adapter_delta

Params = dict[str, Any]

# The Linears that read the same input, as one decode-time group each (a single module is a group of one)
FUSED_GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
                 ("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))


def factored_output(h: jax.Array, factored: dict, dtype) -> jax.Array:
    """((x Vh^T) * (S + delta)) U^T for h = x Vh^T [..., r] fp32: the scale is applied in fp32 and the
    product rounded once to the activation dtype before the U^T matmul. -> [..., d_out] in dtype."""
    g = (h * factored["factor_scale"]).astype(dtype)  # [..., r]
    return jnp.einsum("...r,or->...o", g, factored["u"].astype(dtype), preferred_element_type=jnp.float32
                      ).astype(dtype)


def is_decode_group(layer: dict, names: tuple[str, ...], fused_name: str) -> bool:
    """Whether `layer` holds `fused_name` in one of decode_layers' group layouts (else: the stacked
    training layout, one linear() per module, or a group left per module)."""
    return (fused_name + "_vh" in layer or fused_name + "_w_vh" in layer or fused_name + "_w_dw" in layer
            or (len(names) > 1 and fused_name in layer))


def dense_delta(u: jax.Array, delta: jax.Array, vh: jax.Array, dtype) -> jax.Array:
    """The SVD adapter's change of one weight, dense, in the jax layout: (U diag(delta) Vh)^T [d_in, d_out].
    u [d_out, r], delta [r] (delta_s + delta_s_hack, fp32), vh [r, d_in]. U * delta is rounded to `dtype`
    (as the learner rounds (x Vh^T) * delta), the product is accumulated in fp32 and rounded once."""
    scaled = (u.astype(jnp.float32) * delta.astype(jnp.float32)).astype(dtype)  # [d_out, r]
    return jnp.einsum("ri,or->io", vh.astype(dtype), scaled, preferred_element_type=jnp.float32).astype(dtype)


def group_projections(x, layer, ad, names: tuple[str, ...], fused_name: str, sizes: tuple[int, ...]):
    """The Linears `names` (output widths `sizes`) that all read x, from one of decode_layers' group
    layouts (`is_decode_group`): one matmul for everything x multiplies. Returns a list of [..., size].
    - `fused_name`_vh (factored form, every module factored): h = x [Vh_1; Vh_2; ..]^T, then each
      module's ((h_m * (S + delta)) U_m^T), the U products batched (`_u_products`);
    - `fused_name`_w_vh (exact form, SVD adapters): x [W_1 | W_2 | .. | Vh_a^T | Vh_b^T ..] gives every
      module's x W_m and every adapted module's h_m = x Vh_m^T, then x W_m + (h_m * delta_m) U_m^T,
      with the same roundings as `adapters.adapter_delta` (bf16 h, bf16 product);
    - `fused_name`_w_dw (dense form, SVD adapters): x [W_1 | W_2 | .. | dW_a | dW_b ..] gives every
      module's x W_m and every adapted module's x dW_m (`dense_delta`), then x W_m + x dW_m;
    - `fused_name` (plain weights or LoRA): x [W_1 | W_2 | ..], then each module's adapter delta.
    ad: name -> the module's per-layer adapter dict or None."""
    if fused_name + "_vh" in layer:
        h = jnp.einsum("...i,ri->...r", x, layer[fused_name + "_vh"].astype(x.dtype),
                       preferred_element_type=jnp.float32)  # [..., sum of the ranks]
        scales = [ad(name)["factor_scale"] for name in names]
        hs = _split_last(h, [s.shape[-1] for s in scales])
        gs = [(hi * s).astype(x.dtype) for hi, s in zip(hs, scales)]  # [..., r_m], scale in fp32
        return [checkpoint_name(y, "linear_out")
                for y in _u_products(gs, layer[fused_name + "_u"], x.dtype, jnp.float32)]
    if fused_name + "_w_vh" in layer:
        adapted = _svd_adapted(names, ad)
        deltas = [(ad(names[i])["delta_s"] + ad(names[i])["delta_s_hack"]).astype(x.dtype) for i in adapted]
        out = x @ layer[fused_name + "_w_vh"]  # [..., sum(sizes) + sum of the adapted ranks]
        parts = _split_last(out, list(sizes) + [d.shape[-1] for d in deltas])
        ys, hs = list(parts[:len(names)]), parts[len(names):]
        adds = _u_products([h * d for h, d in zip(hs, deltas)], layer[fused_name + "_u"], x.dtype, None)
        for i, add in zip(adapted, adds):
            ys[i] = ys[i] + add.astype(ys[i].dtype)
        return [y if i in adapted else add_adapter_delta(y, x, ad(name)) for i, (name, y) in enumerate(zip(names, ys))]
    if fused_name + "_w_dw" in layer:
        adapted = _svd_adapted(names, ad)
        out = x @ layer[fused_name + "_w_dw"]  # [..., sum(sizes) + the adapted modules' sizes]
        parts = _split_last(out, list(sizes) + [sizes[i] for i in adapted])
        ys = list(parts[:len(names)])
        for i, add in zip(adapted, parts[len(names):]):
            ys[i] = ys[i] + add
        return [y if i in adapted else add_adapter_delta(y, x, ad(name)) for i, (name, y) in enumerate(zip(names, ys))]
    fused = x @ layer[fused_name]  # [..., sum(sizes)]
    return [add_adapter_delta(y, x, ad(name)) for name, y in zip(names, _split_last(fused, sizes))]


def _svd_adapted(names: tuple[str, ...], ad) -> list[int]:
    """The indices of the modules in `names` with an SVD adapter (ad(name) holds delta_s)."""
    return [i for i, name in enumerate(names) if ad(name) is not None and "delta_s" in ad(name)]


def _split_last(x: jax.Array, widths) -> list[jax.Array]:
    """x [..., sum(widths)] -> [x[..., :w0], x[..., w0:w0+w1], ...]."""
    return jnp.split(x, list(itertools.accumulate(widths))[:-1], axis=-1)


def _u_products(gs: list[jax.Array], u_stacks: tuple, dtype, accumulate) -> list[jax.Array]:
    """[g_m U_m^T for each module m] with the U factors in `u_stacks`, a tuple of [m_j, d_out, r] arrays
    holding consecutive runs of modules of equal shape (`_equal_shape_runs`): one batched matmul per
    run (gate/up: one kernel reading both U instead of two). gs: [..., r_m] in dtype. accumulate:
    the matmul's preferred_element_type (None: dtype). -> list of [..., d_out_m] in dtype."""
    if sum(stack.shape[0] for stack in u_stacks) != len(gs):
        raise ValueError(f"{sum(stack.shape[0] for stack in u_stacks)} U factors for {len(gs)} adapted modules: "
                         "layers from decode_layers(params, adapters) run with the adapters they were built with")
    outs, start = [], 0
    for stack in u_stacks:
        run = gs[start:start + stack.shape[0]]
        start += stack.shape[0]
        if stack.shape[0] == 1:
            y = jnp.einsum("...r,or->...o", run[0], stack[0].astype(dtype), preferred_element_type=accumulate)
            outs.append(y.astype(dtype))
        else:
            y = jnp.einsum("m...r,mor->m...o", jnp.stack(run), stack.astype(dtype),
                           preferred_element_type=accumulate)  # [m, ..., d_out]
            outs.extend(y.astype(dtype)[j] for j in range(stack.shape[0]))
    return outs


def _equal_shape_runs(arrays: list[jax.Array]) -> tuple[jax.Array, ...]:
    """Consecutive arrays of equal shape stacked: [a, b, b'] with b, b' alike -> (a[None], stack(b, b'))."""
    runs: list[list[jax.Array]] = []
    for a in arrays:
        if runs and runs[-1][0].shape == a.shape:
            runs[-1].append(a)
        else:
            runs.append([a])
    return tuple(jnp.stack(run) for run in runs)


def factored_scales(params: Params, adapters: dict, residual: bool = False):
    """For every SVD-adapted module: S = diag(Vh W U) ([L, r] fp32), the weight's singular values when
    u / vh are its SVD factors (bf16 factors and weights multiply exactly into the fp32 accumulator).
    residual=True also returns the relative residual ||W - U diag(S) Vh||_F / ||W||_F ([L] fp32, in
    fp32 at the highest precision), which says whether they are: about 3e-3 for bf16 factors of the
    weight itself, about 1 for random bases. One layer at a time (lax.map), so only one module's
    [r, d_out] temporaries are live. The torch layout W = U diag(S) Vh is the transpose of the jax
    weight w [d_in, d_out]. Returns {name: S} or ({name: S}, {name: residual})."""
    scales, residuals = {}, {}
    for name, adapter in adapters.items():
        if "delta_s" not in adapter:
            continue

        def one(args):
            w, u, vh = args  # [in,out], [out,r], [r,in]
            vw = jnp.einsum("ri,io->ro", vh, w.astype(vh.dtype), preferred_element_type=jnp.float32)  # [r,out]
            s = jnp.einsum("ro,or->r", vw, u.astype(jnp.float32), precision="highest")  # [r]
            if not residual:
                return s
            rebuilt = jnp.einsum("ri,r,or->io", vh.astype(jnp.float32), s, u.astype(jnp.float32),
                                 precision="highest")  # [in,out]
            w32 = w.astype(jnp.float32)
            return s, jnp.linalg.norm(w32 - rebuilt) / jnp.maximum(jnp.linalg.norm(w32), 1e-30)

        out = jax.lax.map(one, (params["layers"][name], adapter["u"], adapter["vh"]))
        if residual:
            scales[name], residuals[name] = out
        else:
            scales[name] = out
    return (scales, residuals) if residual else scales


DECODE_FORMS = ("exact", "factored", "dense")  # how decode_layers lays out the SVD-adapted Linears


def decode_layers(params: Params, adapters: dict | None = None, form: str = "exact"):
    """Per-layer copies of the weights for decoding: (layers, layer_adapters), tuples of L dicts.

    Built once per sampler call, outside its decode loop: static slices of the stacked [L, ...]
    weights inside an XLA while loop were copied on every step (docs/benchmarks.md). Each group of
    Linears that reads one input (q/k/v, o, gate/up, down: `FUSED_GROUPS`) becomes one matmul per
    decode step for everything that multiplies that input, and the U factors of equal-shape modules
    are stacked for one batched matmul (k/v, gate/up), so a layer runs 9 matmul kernels in the exact
    and factored forms (18 for the exact form with one kernel per factor) and 4 in the dense form.
    `group_projections` reads these layouts:
    - no adapter, or LoRA: "qkv_proj", "gate_up_proj" = the weights concatenated along d_out (LoRA
      deltas stay per module);
    - exact form, SVD adapters: "<group>_w_vh" = [W_1 | .. | Vh_a^T | ..] (the weights, then each adapted
      module's Vh transposed), "<group>_u" = the U stacks; the per-module adapter keeps delta_s and
      delta_s_hack. Exact: the same products, rounded as in training (`adapters.adapter_delta`);
    - factored (the sampler's "factored" form, docs/sampler.md): every SVD-adapted module is computed
      as ((x Vh^T) * (S + delta_s + delta_s_hack)) U^T from its factors, with S = `factored_scales`, and
      its weight is not copied: 2 matmuls reading |U| + |Vh| instead of 3 reading |W| + |U| + |Vh|
      (Qwen3-4B: 9.8 instead of 17.1 GB per decode step). Equal to the exact form when u / vh are the
      weight's SVD, up to the rounding of the factors to their dtype (bf16: a relative ~3e-3 change of
      every weight, the size of bf16 quantisation itself). A group whose modules are all factored
      holds "<group>_vh" (the Vh factors concatenated along r) and "<group>_u"; the module keeps
      {"factor_scale"}. In a group with some modules not adapted, each factored module keeps its
      own {"u", "vh", "factor_scale"} (one linear() each). LoRA modules stay exact;
    - dense (the sampler's "dense" form): each SVD-adapted module's change dW = (U diag(delta) Vh)^T
      (`dense_delta`, delta = delta_s + delta_s_hack) is built once, and "<group>_w_dw" = [W_1 | .. |
      dW_a | ..]: one matmul reads |W| + |dW| (Qwen3-4B: 14.5 instead of 17.0 GB of Linears per decode step) and the
      U / Vh factors are not copied (the module keeps delta_s, delta_s_hack). x W + x dW is the exact
      form's x W + ((x Vh^T) delta) U^T with the adapter's product associated the other way: the
      same function, rounded differently (bf16 dW instead of bf16 h and h * delta; docs/sampler.md)."""
    if form not in DECODE_FORMS:
        raise ValueError(f"decode_layers: form must be one of {DECODE_FORMS}, got {form!r}")
    stacked = params["layers"]
    L = stacked["q_proj"].shape[0]
    scales = factored_scales(params, adapters) if form == "factored" and adapters is not None else {}
    svd = {name for name, a in (adapters or {}).items() if "delta_s" in a}
    layers, layer_adapters = [], []
    for index in range(L):
        layer = {name: w[index] for name, w in stacked.items()}
        la = None if adapters is None else jax.tree.map(lambda x, i=index: x[i], adapters)
        for name in scales:
            a = la[name]
            del layer[name]
            la[name] = {"u": a["u"], "vh": a["vh"], "factor_scale": scales[name][index] + a["delta_s"] + a["delta_s_hack"]}
        for fused_name, names in FUSED_GROUPS:
            if all(name in scales for name in names):  # factored group
                layer[fused_name + "_vh"] = jnp.concatenate([la[name].pop("vh") for name in names], axis=0)
                layer[fused_name + "_u"] = _equal_shape_runs([la[name].pop("u") for name in names])
            elif not all(name in layer for name in names):  # mixed factored / exact: one linear() each
                continue
            elif any(name in svd for name in names) and form == "dense":  # W and the dense changes
                adapted = [name for name in names if name in svd]
                changes = [dense_delta(la[name].pop("u"), la[name]["delta_s"] + la[name]["delta_s_hack"],
                                       la[name].pop("vh"), layer[name].dtype) for name in adapted]
                layer[fused_name + "_w_dw"] = jnp.concatenate([layer.pop(name) for name in names] + changes, axis=-1)
            elif any(name in svd for name in names):  # exact form with SVD adapters
                adapted = [name for name in names if name in svd]
                layer[fused_name + "_w_vh"] = jnp.concatenate(
                    [layer.pop(name) for name in names] + [la[name].pop("vh").T for name in adapted], axis=-1)
                layer[fused_name + "_u"] = _equal_shape_runs([la[name].pop("u") for name in adapted])
            elif len(names) > 1:
                layer[fused_name] = jnp.concatenate([layer.pop(name) for name in names], axis=-1)
        layers.append(layer)
        layer_adapters.append(la)
    return tuple(layers), None if adapters is None else tuple(layer_adapters)


def is_laid_out(params: Params) -> bool:
    """Whether params["layers"] is already `decode_layers`' per-layer tuple (else the stacked dict)."""
    return isinstance(params["layers"], (tuple, list))


def stacked_from_decode(layers: tuple, layer_adapters: tuple | None, out_widths: tuple) -> tuple[dict, dict]:
    """The inverse of `decode_layers` for the arrays its layout holds exactly: (the stacked layer arrays
    {name: [L, ...]}, the SVD bases {module: {"u": [L, d_out, r], "vh": [L, r, d_in]}}). Splits,
    transposes and stacks only, so every rebuilt array equals the original bit for bit. Not rebuilt:
    the weight of a factored module (its layout holds U and Vh only) and any adapter leaf but u / vh.
    out_widths: ((name, d_out), ...) of every stacked layer array (static: splits the fused groups).
    The sampler's lent weights (`rl.lend`): the caller's stacked copies are freed while it samples."""
    widths = dict(out_widths)
    per_layer = [_layer_arrays(layer, None if layer_adapters is None else layer_adapters[i], widths)
                 for i, layer in enumerate(layers)]
    stacked = {name: jnp.stack([ws[name] for ws, _ in per_layer]) for name in per_layer[0][0]}
    bases = {name: {key: jnp.stack([b[name][key] for _, b in per_layer]) for key in ("u", "vh")}
             for name in per_layer[0][1]}
    return stacked, bases


def _layer_arrays(layer: dict, la: dict | None, widths: dict) -> tuple[dict, dict]:
    """One layer of `stacked_from_decode`: ({name: weight or norm}, {module: {"u", "vh"}})."""
    ad = (lambda name: None) if la is None else la.get  # noqa: E731
    ws, bases = {}, {}
    for fused_name, names in FUSED_GROUPS:
        if fused_name + "_vh" in layer:  # factored group: U and Vh only
            ranks = [ad(name)["factor_scale"].shape[-1] for name in names]
            vhs = jnp.split(layer[fused_name + "_vh"], list(itertools.accumulate(ranks))[:-1], axis=0)
            for name, u, vh in zip(names, _unstack_runs(layer[fused_name + "_u"]), vhs):
                bases[name] = {"u": u, "vh": vh}
        elif fused_name + "_w_vh" in layer:  # exact form: [W_1 | .. | Vh_a^T | ..] and the U stacks
            adapted = [names[i] for i in _svd_adapted(names, ad)]
            parts = _split_last(layer[fused_name + "_w_vh"],
                                [widths[name] for name in names] + [ad(name)["delta_s"].shape[-1] for name in adapted])
            ws.update(zip(names, parts[:len(names)]))
            for name, vh_t, u in zip(adapted, parts[len(names):], _unstack_runs(layer[fused_name + "_u"])):
                bases[name] = {"u": u, "vh": vh_t.T}
        elif fused_name + "_w_dw" in layer:  # dense form: [W_1 | .. | dW_a | ..]; the bases are not held
            widths_dw = [widths[name] for name in names] + [widths[names[i]] for i in _svd_adapted(names, ad)]
            ws.update(zip(names, _split_last(layer[fused_name + "_w_dw"], widths_dw)))
        elif len(names) > 1 and fused_name in layer:  # plain weights concatenated
            ws.update(zip(names, _split_last(layer[fused_name], [widths[name] for name in names])))
        for name in names:  # a factored module of a mixed group keeps its own factors
            if ad(name) is not None and "factor_scale" in ad(name) and "u" in ad(name):
                bases[name] = {"u": ad(name)["u"], "vh": ad(name)["vh"]}
    for name in widths:  # one Linear each, and the norms
        if name in layer and name not in ws:
            ws[name] = layer[name]
    return ws, bases


def _unstack_runs(stacks: tuple) -> list[jax.Array]:
    """The inverse of `_equal_shape_runs`: (a[None], stack(b, b')) -> [a, b, b']."""
    return [stack[j] for stack in stacks for j in range(stack.shape[0])]
