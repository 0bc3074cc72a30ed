"""v_hack extraction, negative controls and save/load (math: shared/DESIGN.md; docs/projection.md).

A v_hack bundle is a pytree of arrays, per module name (target Linear), stacked over layers:
  {"V":     {name: [L, k, dim] f32},  orthonormal hack-ward rows; dropped rows are zero rows
   "S":     {name: [L, k] f32},       singular values of D (0 for rows beyond min(n, dim))
   "mask":  {name: [L, k] bool},      row kept (not dropped by the thresholds, S > 0)
   "agree": {name: [L, k] f32}}       share of pairs with positive coefficient <D_i, v> (NaN: unknown)
Shapes stay static ([L, k, dim]) whatever is dropped; `n_valid(bundle)` = mask.sum(-1) per module.
Projection and cosines take either the bundle or bundle["V"].

Extraction: per pair i the per-sample NLL gradient of the hack completion minus that of the clean
one, per module: D [n, dim] (`pair_grad_diffs`); then `v_hack_from_diffs`: SVD, top-k right singular
vectors, each flipped so that most pairs have <D_i, v> > 0 (majority vote; a tie is broken by the
sign of sum_i <D_i, v>), optional axis threshold and global noise floor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.io import atomic_directory
from jaxhack.projection.modules import module_key, parse_module_key, to_module_vectors
from jaxhack.projection.pairs import Pair

Bundle = dict[str, dict[str, Any]]


# ---------------------------------------------------------------- SVD of the differences

def _top_k_right_singular(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """D [L, n, dim] float64 -> (S [L, k], V [L, k, dim]) top-k, zero-padded beyond min(n, dim).

    Uses the n x n Gram matrix when dim > 2n (cheap for wide D, e.g. LoRA modules)."""
    L, n, dim = D.shape
    m = min(n, dim, k)
    if dim > 2 * n:
        G = np.einsum("lnd,lmd->lnm", D, D)  # [L, n, n]
        lam, U = np.linalg.eigh(G)  # ascending
        lam, U = lam[:, ::-1][:, :m], U[:, :, ::-1][:, :, :m]  # [L, m], [L, n, m]
        S = np.sqrt(np.clip(lam, 0.0, None))
        V = np.einsum("lnm,lnd->lmd", U, D)  # = S * v
        V = np.where(S[..., None] > 0, V / np.where(S > 0, S, 1.0)[..., None], 0.0)
    else:
        _, S, Vt = np.linalg.svd(D, full_matrices=False)  # S [L, min], Vt [L, min, dim]
        S, V = S[:, :m], Vt[:, :m]
    S_out = np.zeros((L, k)); S_out[:, :m] = S
    V_out = np.zeros((L, k, dim)); V_out[:, :m] = V
    return S_out, V_out


def v_hack_from_diffs(diffs: dict[str, Any], k: int = 1, axis_threshold: float | None = None,
                      noise_floor_quantile: float | None = None, rel_eps: float = 1e-6
                      ) -> tuple[Bundle, dict]:
    """v_hack from per-pair gradient differences. diffs: {name: [n, L, dim]} (D_i = g_hack - g_clean).

    k: rows per module. axis_threshold a: drop row j of a module when S_j < a * S_0 of that module.
    noise_floor_quantile q: drop rows with S_j below the q-quantile of the top-k singular values of
    all (module, layer)s. Rows with S_j <= rel_eps * S_0 (numerically zero) are always dropped.
    Returns (bundle, info) with info = {"noise_floor": threshold or None, "n_pairs": n}.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if axis_threshold is not None and not 0.0 <= axis_threshold <= 1.0:
        raise ValueError(f"axis_threshold must be in [0, 1], got {axis_threshold}")
    if noise_floor_quantile is not None and not 0.0 <= noise_floor_quantile <= 1.0:
        raise ValueError(f"noise_floor_quantile must be in [0, 1], got {noise_floor_quantile}")
    V, S, mask, agree = {}, {}, {}, {}
    n_pairs = None
    for name in sorted(diffs):
        d = np.asarray(diffs[name], np.float64)  # [n, L, dim]
        if d.ndim != 3:
            raise ValueError(f"diffs[{name!r}] has shape {d.shape}; expected [n, L, dim]")
        n_pairs = d.shape[0] if n_pairs is None else n_pairs
        if d.shape[0] != n_pairs:
            raise ValueError(f"diffs[{name!r}] has {d.shape[0]} pairs, others {n_pairs}")
        D = np.moveaxis(d, 0, 1)  # [L, n, dim]
        s, v = _top_k_right_singular(D, k)  # [L, k], [L, k, dim]
        coef = np.einsum("lnd,lkd->lkn", D, v)  # [L, k, n]
        votes = np.sum(np.sign(coef), axis=-1)  # [L, k]
        flip = (votes < 0) | ((votes == 0) & (np.sum(coef, axis=-1) < 0))
        sign = np.where(flip, -1.0, 1.0)
        v, coef = v * sign[..., None], coef * sign[..., None]
        V[name], S[name] = v, s
        mask[name] = s > rel_eps * s[:, :1]
        agree[name] = np.mean(coef > 0, axis=-1)
    if n_pairs is None:
        raise ValueError("no modules in diffs")
    if axis_threshold is not None:
        for name in S:
            mask[name] &= S[name] >= axis_threshold * S[name][:, :1]
    floor = None
    if noise_floor_quantile is not None:
        floor = float(np.quantile(np.concatenate([S[n].ravel() for n in sorted(S)]), noise_floor_quantile))
        for name in S:
            mask[name] &= S[name] >= floor
    bundle = {
        "V": {n: jnp.asarray(V[n] * mask[n][..., None], jnp.float32) for n in V},
        "S": {n: jnp.asarray(S[n], jnp.float32) for n in S},
        "mask": {n: jnp.asarray(mask[n]) for n in mask},
        "agree": {n: jnp.asarray(agree[n], jnp.float32) for n in agree},
    }
    return bundle, {"noise_floor": floor, "n_pairs": int(n_pairs)}


def n_valid(bundle: Bundle) -> dict[str, jax.Array]:
    """{name: [L] int32} number of kept rows per module."""
    return {n: jnp.sum(m, axis=-1).astype(jnp.int32) for n, m in bundle["mask"].items()}


# ---------------------------------------------------------------- gradients of pairs

def _tokenize_pairs(pairs: Sequence[Pair], tokenizer, max_len: int | None,
                    max_prompt_tokens: int | None = None):
    """-> list of (prompt_ids, hack_ids, clean_ids); prompts keep their last max_prompt_tokens
    tokens (the end holds the hint and the assistant turn), completions are cut to fit max_len."""
    out = []
    for i, p in enumerate(pairs):
        prompt = list(tokenizer.encode(p.prompt))
        if max_prompt_tokens is not None:
            prompt = prompt[-max_prompt_tokens:]
        sides = []
        for side in (p.hack, p.clean):
            comp = list(tokenizer.encode(side))
            if max_len is not None:
                if len(prompt) >= max_len:
                    raise ValueError(f"pair #{i} (problem {p.problem_id}): prompt has {len(prompt)} "
                                     f"tokens, max_len is {max_len}")
                comp = comp[: max_len - len(prompt)]
            if not comp:
                raise ValueError(f"pair #{i} (problem {p.problem_id}): empty completion after tokenization")
            sides.append(comp)
        out.append((prompt, *sides))
    return out


def at_zero_svd_delta(trainable: dict) -> bool:
    """True when `trainable` is an SVD adapter tree whose delta_s + delta_s_hack is exactly 0 in every
    module (host check, outside jit): then the exact delta_s = 0 fast path applies."""
    for module in trainable.values():
        if "delta_s" not in module:
            return False
        total = np.asarray(module["delta_s"]) + np.asarray(module.get("delta_s_hack", 0.0))
        if np.any(total != 0):
            return False
    return True


def pair_grad_diffs(pairs: Sequence[Pair], tokenizer, trainable, frozen, params, config, *,
                    loss_i: Callable | None = None, batch_size: int = 8, max_len: int | None = None,
                    max_prompt_tokens: int | None = None,
                    leaf: str = "delta_s", pad_to: int = 16, microbatch: int | None = None,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Per-pair differences of per-sample loss gradients, per module: {name: [n, L, dim]} (host f32).

    Each chunk holds `batch_size` pairs (2 * batch_size sequences: hacks then cleans) and runs one
    jax.vmap(jax.grad(loss_i)) call (jaxhack.grads.per_sample.per_sample_grads); the last chunk is
    filled with copies of its last pair (dropped afterwards), and every chunk is padded to one length
    T (max pair length, rounded up to `pad_to`), so it compiles once. loss_i defaults to the NLL loss
    of jaxhack.grads.losses (mean over completion tokens of -log p). microbatch: passed to
    per_sample_grads (samples per lax.map step, to bound activation memory on big models).
    Completions are encoded as is (no EOS appended); the prompt is never truncated.
    """
    from jaxhack.grads.batch import make_batch
    from jaxhack.grads.per_sample import per_sample_grads

    if loss_i is None:
        import functools

        from jaxhack.grads.losses import nll_loss
        # the exact delta_s = 0 fast path (models.adapters.zero_delta_tap) when the gradients are taken
        # at the base model in the SVD basis, as extraction always is; the general path otherwise
        loss_i = functools.partial(nll_loss, delta_zero=at_zero_svd_delta(trainable))
    if not pairs:
        raise ValueError("no pairs")
    toks = _tokenize_pairs(pairs, tokenizer, max_len, max_prompt_tokens)
    T = max(len(p) + max(len(h), len(c)) for p, h, c in toks)
    T = -(-T // pad_to) * pad_to
    if max_len is not None:
        T = min(T, max_len)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    n, b = len(toks), max(1, min(batch_size, len(toks)))
    chunks = range(0, n, b)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="v_hack grads", unit="chunk")
    out: dict[str, list[np.ndarray]] = {}
    for start in chunks:
        chunk = toks[start: start + b]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (b - n_real)
        prompts = [p for p, _, _ in chunk] * 2
        completions = [h for _, h, _ in chunk] + [c for _, _, c in chunk]  # hacks, then cleans
        batch = jax.tree.map(jnp.asarray, make_batch(prompts, completions, pad_id=pad_id, length=T))
        grads = per_sample_grads(loss_i, trainable, frozen, params, config, batch, microbatch=microbatch)
        vecs = to_module_vectors(grads, leaf)  # {name: [2b, L, dim]}
        for name, g in vecs.items():
            g = np.asarray(g, np.float32)
            out.setdefault(name, []).append(g[:n_real] - g[b: b + n_real])
    return {name: np.concatenate(parts, axis=0) for name, parts in out.items()}


def extract_v_hack(pairs: Sequence[Pair], tokenizer, trainable, frozen, params, config, *, k: int = 1,
                   batch_size: int = 8, axis_threshold: float | None = None,
                   noise_floor_quantile: float | None = None, loss_i: Callable | None = None,
                   max_len: int | None = None, max_prompt_tokens: int | None = None,
                   leaf: str = "delta_s", pad_to: int = 16,
                   microbatch: int | None = None, progress: bool = True) -> tuple[Bundle, dict]:
    """Per-sample NLL gradients of every pair -> D per module -> `v_hack_from_diffs`.

    trainable/frozen: the adapter trees at which gradients are taken (zero SVD deltas / B = 0 LoRA
    at init). Returns (bundle, info); info has n_pairs, noise_floor, k, kind, thresholds.
    """
    from jaxhack.projection.modules import adapter_kind

    diffs = pair_grad_diffs(pairs, tokenizer, trainable, frozen, params, config, loss_i=loss_i,
                            batch_size=batch_size, max_len=max_len,
                            max_prompt_tokens=max_prompt_tokens, leaf=leaf, pad_to=pad_to,
                            microbatch=microbatch, progress=progress)
    bundle, info = v_hack_from_diffs(diffs, k=k, axis_threshold=axis_threshold,
                                     noise_floor_quantile=noise_floor_quantile)
    info.update(k=k, kind=adapter_kind(trainable), axis_threshold=axis_threshold,
                noise_floor_quantile=noise_floor_quantile, leaf=leaf, control="none")
    return bundle, info


# ---------------------------------------------------------------- controls

def random_v_hack(like: Bundle | dict[str, tuple[int, int]], seed: int, k: int | None = None) -> Bundle:
    """Negative control: random orthonormal rows per module (QR of a Gaussian), matched in shape.

    like: a bundle (same [L, k, dim]; its mask is copied, so dropped rows stay dropped) or
    {name: (L, dim)} with k given. S is 1 for kept rows, agree is NaN (no pairs involved)."""
    if "V" in like:
        shapes = {n: v.shape for n, v in like["V"].items()}
        masks = {n: np.asarray(m) for n, m in like["mask"].items()}
    else:
        if k is None:
            raise ValueError("k is required when `like` is a {name: (L, dim)} dict")
        shapes = {n: (L, k, dim) for n, (L, dim) in like.items()}
        masks = {n: np.ones(s[:2], bool) for n, s in shapes.items()}
    V, S, mask, agree = {}, {}, {}, {}
    for i, name in enumerate(sorted(shapes)):
        L, kk, dim = shapes[name]
        if kk > dim:
            raise ValueError(f"module {name}: k={kk} > dim={dim}")
        rng = np.random.default_rng([seed, i])  # one stream per (seed, module index in sorted order)
        q, _ = np.linalg.qr(rng.standard_normal((L, dim, kk)))  # [L, dim, kk] orthonormal columns
        m = masks[name]
        V[name] = jnp.asarray(np.swapaxes(q, 1, 2) * m[..., None], jnp.float32)
        S[name] = jnp.asarray(m, jnp.float32)
        mask[name] = jnp.asarray(m)
        agree[name] = jnp.full((L, kk), jnp.nan, jnp.float32)
    return {"V": V, "S": S, "mask": mask, "agree": agree}


# ---------------------------------------------------------------- save / load

TREE_DIR, META_FILE, SAFETENSORS_FILE = "tree", "meta.json", "v_hack.safetensors"


def check_bundle(bundle: Bundle):
    """Shapes agree across V / S / mask / agree; raises ValueError otherwise."""
    for key in ("V", "S", "mask", "agree"):
        if key not in bundle:
            raise ValueError(f"v_hack bundle lacks {key!r} (has {sorted(bundle)})")
    for name, v in bundle["V"].items():
        if v.ndim != 3:
            raise ValueError(f"V[{name!r}] has shape {v.shape}; expected [L, k, dim]")
        for key in ("S", "mask", "agree"):
            if name not in bundle[key] or tuple(bundle[key][name].shape) != tuple(v.shape[:2]):
                raise ValueError(f"{key}[{name!r}] missing or not shaped {tuple(v.shape[:2])}")


def save_v_hack(path: str | Path, bundle: Bundle, meta: dict | None = None, force: bool = False) -> Path:
    """Directory `path`: tree/ (orbax, via jaxhack.checkpoint.save_pytree), meta.json, and
    v_hack.safetensors (`export_safetensors`). Written to a temporary sibling and renamed."""
    from jaxhack.checkpoint import save_pytree

    check_bundle(bundle)
    out = Path(path).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass force=True to overwrite)")
    meta_text = json.dumps(meta or {}, indent=2, sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        save_pytree(tmp / TREE_DIR, _host(bundle))
        (tmp / META_FILE).write_text(meta_text + "\n")
        export_safetensors(tmp / SAFETENSORS_FILE, bundle, meta)
    return out


def load_v_hack(path: str | Path) -> tuple[Bundle, dict]:
    """(bundle, meta) from a `save_v_hack` directory (orbax tree), or from a .safetensors file."""
    from jaxhack.checkpoint import restore_pytree

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: v_hack directory not found")
    tree = restore_pytree(path / TREE_DIR)
    bundle = {key: {n: jnp.asarray(a) for n, a in tree[key].items()} for key in ("V", "S", "mask", "agree")}
    bundle["mask"] = {n: m.astype(bool) for n, m in bundle["mask"].items()}
    check_bundle(bundle)
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return bundle, meta


def _host(bundle: Bundle) -> dict:
    return {key: {n: np.asarray(a) for n, a in sub.items()} for key, sub in bundle.items()}


def export_safetensors(path: str | Path, bundle: Bundle, meta: dict | None = None) -> Path:
    """One tensor per (module, layer): V/layers.<l>.<name> [k, dim] f32, S/... [k] f32,
    mask/... [k] uint8, agree/... [k] f32; header metadata {"jaxhack_v_hack": json(meta)}."""
    from safetensors.numpy import save_file

    check_bundle(bundle)
    tensors = {}
    for key, dtype in (("V", np.float32), ("S", np.float32), ("mask", np.uint8), ("agree", np.float32)):
        for name, a in bundle[key].items():
            a = np.asarray(a).astype(dtype)
            for layer in range(a.shape[0]):
                tensors[f"{key}/{module_key(name, layer)}"] = np.ascontiguousarray(a[layer])
    path = Path(path)
    save_file(tensors, str(path), metadata={"jaxhack_v_hack": json.dumps(meta or {}, sort_keys=True)})
    return path


def load_safetensors(path: str | Path) -> tuple[Bundle, dict]:
    """Inverse of `export_safetensors` (layers are re-stacked; every layer 0..L-1 must be present)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    parts: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get("jaxhack_v_hack", "{}"))
        for key in f.keys():
            kind, _, mkey = key.partition("/")
            name, layer = parse_module_key(mkey)
            parts.setdefault(kind, {}).setdefault(name, {})[layer] = f.get_tensor(key)
    bundle: Bundle = {}
    for kind in ("V", "S", "mask", "agree"):
        if kind not in parts:
            raise ValueError(f"{path}: no {kind}/ tensors")
        bundle[kind] = {}
        for name, layers in parts[kind].items():
            if sorted(layers) != list(range(len(layers))):
                raise ValueError(f"{path}: {kind}/{name} has layers {sorted(layers)}, expected 0..{len(layers)-1}")
            bundle[kind][name] = jnp.asarray(np.stack([layers[l] for l in range(len(layers))]))
    bundle["mask"] = {n: m.astype(bool) for n, m in bundle["mask"].items()}
    check_bundle(bundle)
    return bundle, meta
