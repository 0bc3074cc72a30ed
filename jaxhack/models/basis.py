"""Which adapter basis a v_hack lives in, and the check that it fits a model's adapter before any work.

A v_hack is per-module directions in the coordinates of one adapter basis: for SVD-delta the
singular vectors (U, Vh) of each weight, for LoRA the A matrices from one seed. A recomputed SVD
(another backend or precision) can rotate the basis (fp32 vs fp64 singular vectors of a random
2560x2560 matrix differ by up to 1e-2; near-degenerate singular values make them arbitrary), so the
extraction records `basis_fingerprint` (a hash per module of the exact factors) and every later use
checks it (`check_v_hack_fits`).
"""
from __future__ import annotations

import hashlib

import numpy as np

FINGERPRINT_KEY = "basis_fingerprint"


class BasisMismatch(ValueError):
    """A v_hack does not fit this model's adapter (shape, adapter kind or basis factors)."""


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


SAMPLES_PER_VECTOR = 64  # entries of every singular vector that go into the fingerprint


def basis_fingerprint(trainable: dict, frozen: dict) -> dict[str, str]:
    """{module name: hash of its basis}: SVD -> about SAMPLES_PER_VECTOR exact entries of every
    singular vector (u [L,out,r] at every (out/64)-th row, vh [L,r,in] at every (in/64)-th column:
    any rotation, sign flip or precision change of a vector changes them; sliced on the device so a
    Qwen3-4B basis moves ~10 MB per module to the host, not the whole factors); LoRA -> the initial
    A [L,rank,in] and the scale (B starts at zero)."""
    out = {}
    for name in sorted(trainable):
        if "delta_s" in trainable[name]:
            u, vh = frozen[name]["u"], frozen[name]["vh"]
            step_out = max(1, u.shape[1] // SAMPLES_PER_VECTOR)
            step_in = max(1, vh.shape[2] // SAMPLES_PER_VECTOR)
            out[name] = "svd:" + _digest(u[:, ::step_out, :], vh[:, :, ::step_in])
        else:
            out[name] = "lora:" + _digest(trainable[name]["a"], frozen[name]["scale"])
    return out


def module_vector_dims(trainable: dict) -> dict[str, tuple[int, int]]:
    """{name: (L, dim)} of the per-module vectors (SVD: r; LoRA: rank*in + out*rank), the shape a
    v_hack's V[name] must have after its k axis."""
    dims = {}
    for name, m in trainable.items():
        if "delta_s" in m:
            L, r = m["delta_s"].shape
            dims[name] = (int(L), int(r))
        else:
            a, b = m["a"], m["b"]  # [L, rank, in], [L, out, rank]
            dims[name] = (int(a.shape[0]), int(np.prod(a.shape[1:]) + np.prod(b.shape[1:])))
    return dims


def expected_dims(params: dict, kind: str, lora_rank: int, targets) -> dict[str, tuple[int, int]]:
    """{name: (L, dim)} a v_hack must have for this model's weights, from their shapes alone (no SVD):
    SVD dim = min(in, out); LoRA dim = rank*in + out*rank."""
    dims = {}
    for name in targets:
        L, d_in, d_out = (int(x) for x in params["layers"][name].shape)  # [L, in, out]
        dims[name] = (L, min(d_in, d_out) if kind == "svd" else lora_rank * (d_in + d_out))
    return dims


def check_v_hack_shape(v_hack: dict, meta: dict, dims: dict[str, tuple[int, int]], kind: str, where) -> None:
    """BasisMismatch unless the v_hack is of adapter `kind` with V[name] shaped [L, k, dim] per `dims`."""
    if meta.get("adapter") and meta["adapter"] != kind:
        raise BasisMismatch(f"{where} is a {meta['adapter']}-basis v_hack; this run uses the {kind} basis")
    vs = v_hack.get("V", {})
    missing = sorted(set(dims) - set(vs))
    if missing or set(vs) - set(dims):
        raise BasisMismatch(f"{where}: v_hack modules {sorted(vs)} do not match the model's adapter "
                            f"modules {sorted(dims)}")
    for name, (L, dim) in sorted(dims.items()):
        shape = tuple(int(x) for x in vs[name].shape)  # [L, k, dim]
        if shape[0] != L or shape[-1] != dim:
            raise BasisMismatch(f"{where}: v_hack from another model shape: module {name} has "
                                f"{shape[0]} layers x dim {shape[-1]}, this model's {kind} adapter has "
                                f"{L} layers x dim {dim} (extract a v_hack with this --ckpt)")


def check_v_hack_fits(v_hack: dict, meta: dict, trainable: dict, frozen: dict, where) -> None:
    """BasisMismatch (one line naming `where`) unless the v_hack's modules and shapes match the
    adapter and, when the v_hack records a basis fingerprint, the factors are the same ones."""
    kind = "svd" if all("delta_s" in m for m in trainable.values()) else "lora"
    check_v_hack_shape(v_hack, meta, module_vector_dims(trainable), kind, where)
    recorded = meta.get(FINGERPRINT_KEY)
    if recorded:
        now = basis_fingerprint(trainable, frozen)
        differ = sorted(n for n in now if recorded.get(n) != now[n])
        if differ:
            raise BasisMismatch(f"{where}: v_hack was extracted in other basis factors than this "
                                f"model's ({len(differ)} modules differ, e.g. {differ[0]}: another SVD "
                                f"cache, backend or precision, or another LoRA seed/rank); extract it "
                                f"again with this model and basis")
