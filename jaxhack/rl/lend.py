"""Lent weights: the sampler decodes from one copy of the base weights and adapter bases, not two.

The sampler decodes from `decode_layout.decode_layers`' per-layer layout (Qwen3-4B, exact form: 17.0
GB); the learner needs the stacked [L, ...] arrays (17.8 GB with the SVD bases). Holding both while
sampling leaves that much less for the KV cache (docs/sampler.md, "Lent weights"). With lend=True,
`decode_weights`:
1. builds the layout (one jitted program) and waits for it;
2. deletes the caller's arrays that the layout holds exactly (`decode_layout.stacked_from_decode`: every
   array of params["layers"] in the exact and dense forms, all but the factored modules' weights in the
   factored form, and the SVD bases adapters[module]["u" / "vh"] in the exact and factored forms; the
   dense form holds W and U diag(delta) Vh, not the bases, which stay), so their memory is free while sampling;
3. after sampling, or on an error, rebuilds them bit for bit (splits, transposes, stacks) and puts them
   back into the caller's dicts: params["layers"][name] and adapters[module][key].

The caller's dicts are valid again when the block ends; any other reference to the old arrays is not
(deleted). The trainer passes `merge(trainable, frozen)`, a new dict per module, so it copies the
rebuilt bases back into `frozen` (`lent_merge`, `put_back_bases`).
"""
from __future__ import annotations

import contextlib
import functools

import jax

from jaxhack.models import decode_layout
from jaxhack.models.adapters import merge

decode_layers_jit = jax.jit(decode_layout.decode_layers, static_argnames=("form",))
_stacked_jit = jax.jit(decode_layout.stacked_from_decode, static_argnames=("out_widths",))


@contextlib.contextmanager
def decode_weights(params: dict, adapters: dict | None, *, form: str, lend: bool):
    """Yields (params with the per-layer "layers", per-layer adapters) for the sampler's programs; form:
    `decode_layout.DECODE_FORMS`.
    params already laid out (`decode_layout.is_laid_out`) are yielded as they are. lend: see the module
    docstring (the caller's stacked arrays are deleted inside the block and rebuilt at its end)."""
    if decode_layout.is_laid_out(params):
        yield params, adapters
        return
    layers, layer_adapters = decode_layers_jit(params, adapters, form=form)
    if not lend:
        yield {**params, "layers": layers}, layer_adapters
        return
    widths = tuple((name, int(w.shape[-1])) for name, w in params["layers"].items())
    rebuild = functools.partial(decode_layout.stacked_from_decode, out_widths=widths)
    lent_layers, lent_bases = jax.eval_shape(rebuild, layers, layer_adapters)  # what the layout holds exactly
    jax.block_until_ready((layers, layer_adapters))  # the layout is built: the stacked copies can go
    for array in [params["layers"][name] for name in lent_layers] + [
            adapters[name][key] for name, bases in lent_bases.items() for key in bases]:
        if isinstance(array, jax.Array) and not array.is_deleted():
            array.delete()
    try:
        yield {**params, "layers": layers}, layer_adapters
    finally:
        stacked, bases = _stacked_jit(layers, layer_adapters, out_widths=widths)
        params["layers"].update(stacked)
        for name, module_bases in bases.items():
            adapters[name].update(module_bases)


def put_back_bases(frozen: dict, merged: dict) -> None:
    """Copy each frozen leaf of `merged` (a `merge(trainable, frozen)` the sampler borrowed from, whose
    bases it rebuilt) back into `frozen`, in place."""
    for name, module in frozen.items():
        for key in module:
            module[key] = merged[name][key]


@contextlib.contextmanager
def lent_merge(trainable: dict, frozen: dict):
    """merge(trainable, frozen) for a sampler that may borrow the bases (`generate(lend_weights=True)`);
    the rebuilt bases are put back into `frozen` when the block ends, also on an error."""
    merged = merge(trainable, frozen)
    try:
        yield merged
    finally:
        put_back_bases(frozen, merged)
