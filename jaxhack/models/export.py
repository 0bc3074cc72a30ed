"""A trained adapter back to Hugging Face: merged Qwen3 directories, adapter-only files, PEFT LoRA
(docs/export.md).

Merged weights (torch layout W [out, in], computed in fp32 and cast once to the export dtype):
  SVD:  W' = W + U diag(delta_s + delta_s_hack) Vh   (= U diag(S + delta) Vh for the exact SVD W = U diag(S) Vh;
        the additive form keeps W bit-exact where delta = 0 and needs no SVD recomputation)
  LoRA: W' = W + scale * B A,   scale = alpha / rank
This is exactly the function `qwen3.forward(adapters=...)` computes (y = x W^T + adapter term).

The HF tensor names come from `convert.LAYER_TENSORS` / `convert.expected_hf_names` (the one owner of
the name mapping; `hf_state_dict` is its inverse) and the HF config from `tiny.hf_config_kwargs`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import chex
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxhack.models.adapters import SVD_CACHE_VERSION, adapter_kind, weight_hash
from jaxhack.models.basis import basis_fingerprint
from jaxhack.models.config import TARGET_MODULES, Qwen3Config
from jaxhack.models.convert import INDEX_FILE, LAYER_TENSORS, SINGLE_FILE, expected_hf_names
from jaxhack.tokenizer import HF_TOKENIZER_FILES

EXPORT_DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
ADAPTER_FILE, ADAPTER_META = "adapter.safetensors", "adapter.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPORT_META = "jaxhack_export.json"
_PEFT_PARENT = {name: LAYER_TENSORS[name].split(".")[0] for name in TARGET_MODULES}  # self_attn | mlp


def merged_layer_weights(params: dict, trainable: dict | None, frozen: dict | None) -> dict[str, np.ndarray]:
    """{module: fp32 W' [L, out, in] (torch layout)} for every target Linear: the base weight plus
    the adapter's delta (modules without an adapter unchanged). trainable/frozen None: the base.
    The factors are those the trained forward used (a bf16 model's SVD adapter holds bf16 U, Vh).
    Host memory: the fp32 target weights (Qwen3-4B: ~14 GB) plus the export's copy."""
    out = {}
    for name in TARGET_MODULES:
        w = np.asarray(params["layers"][name], np.float32).transpose(0, 2, 1)  # [L, out, in]
        if trainable is not None and name in trainable:
            m = {**frozen[name], **trainable[name]}
            if "delta_s" in m:
                s = np.asarray(m["delta_s"], np.float32) + np.asarray(m["delta_s_hack"], np.float32)  # [L, r]
                u, vh = np.asarray(m["u"], np.float32), np.asarray(m["vh"], np.float32)  # [L,out,r], [L,r,in]
                w = w + np.matmul(u * s[:, None, :], vh)  # batched BLAS matmul over L
            else:
                a, b = np.asarray(m["a"], np.float32), np.asarray(m["b"], np.float32)  # [L,rank,in], [L,out,rank]
                scale = np.asarray(m["scale"], np.float32)  # [L]
                w = w + scale[:, None, None] * np.matmul(b, a)
        L, d_in, d_out = params["layers"][name].shape
        chex.assert_shape(w, (L, d_out, d_in))
        out[name] = w
    return out


def hf_state_dict(params: dict, config: Qwen3Config, layer_weights: dict[str, np.ndarray],
                  dtype: str = "fp32") -> dict[str, np.ndarray]:
    """{HF tensor name: array in the export dtype, torch layout}: the inverse of convert.load_hf_params.
    layer_weights: {module: [L, out, in]} (e.g. merged_layer_weights). Checked against
    convert.expected_hf_names: every name and shape the converter reads, nothing else."""
    np_dtype = EXPORT_DTYPES[dtype]
    cast = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(np_dtype))  # noqa: E731
    tensors = {"model.embed_tokens.weight": cast(params["embed"]),  # [V, D]
               "model.norm.weight": cast(params["final_norm"])}  # [D]
    for i in range(config.num_hidden_layers):
        for ours, suffix in LAYER_TENSORS.items():
            src = layer_weights[ours][i] if ours in layer_weights else params["layers"][ours][i]
            tensors[f"model.layers.{i}.{suffix}"] = cast(src)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = cast(np.asarray(params["lm_head"]).T)  # [V, D]
    expected = expected_hf_names(config)
    chex.assert_equal(set(tensors), set(expected))
    for name, shape in expected.items():
        chex.assert_shape(tensors[name], shape)
    return tensors


def write_safetensors_shards(out: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """model.safetensors when everything fits in one shard, else model-0000i-of-0000N.safetensors +
    model.safetensors.index.json (HF's layout). Returns the file names written."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({t: fname for t in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [INDEX_FILE]


def hf_config_dict(config: Qwen3Config, dtype: str) -> dict:
    """config.json of the exported model (transformers' Qwen3Config from tiny.hf_config_kwargs)."""
    import transformers

    from jaxhack.models.tiny import hf_config_kwargs

    cfg = transformers.Qwen3Config(**hf_config_kwargs(config))
    cfg.architectures = ["Qwen3ForCausalLM"]
    d = cfg.to_dict()
    d["torch_dtype"] = d["dtype"] = TORCH_DTYPE_NAMES[dtype]
    return d


def generation_config_dict(config: Qwen3Config) -> dict:
    eos = list(config.eos_token_ids)
    d = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.bos_token_id is not None:
        d["bos_token_id"] = config.bos_token_id
    if config.pad_token_id is not None:
        d["pad_token_id"] = config.pad_token_id
    return d


def copy_tokenizer_files(src: Path | None, out: Path) -> list[str]:
    """The HF tokenizer files found in src (none for the byte tokenizer): copied to out."""
    copied = []
    if src is not None and Path(src).is_dir():
        for fname in HF_TOKENIZER_FILES:
            if (Path(src) / fname).is_file():
                shutil.copy2(Path(src) / fname, out / fname)
                copied.append(fname)
    return copied


def write_hf_model(out: Path, params: dict, config: Qwen3Config, trainable: dict | None, frozen: dict | None,
                   dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Path | None = None,
                   generation_config: Path | None = None, provenance: dict | None = None) -> dict:
    """Write an HF Qwen3 directory into `out` (must exist, empty): config.json, generation_config.json
    (copied from `generation_config` when given, else from the model's eos / bos / pad ids), safetensors
    (sharded above max_shard_bytes), tokenizer files from tokenizer_dir, and jaxhack_export.json
    (provenance + what was merged). Returns that provenance dict."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    weights = merged_layer_weights(params, trainable, frozen)
    files = write_safetensors_shards(out, hf_state_dict(params, config, weights, dtype), max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2, sort_keys=True) + "\n")
    if generation_config is not None and Path(generation_config).is_file():
        shutil.copy2(generation_config, out / "generation_config.json")
    else:
        (out / "generation_config.json").write_text(json.dumps(generation_config_dict(config), indent=2) + "\n")
    kind = adapter_kind(trainable) if trainable else None
    meta = {**(provenance or {}), "dtype": dtype, "files": files,
            "tokenizer_files": copy_tokenizer_files(tokenizer_dir, out),
            "merged": {None: "nothing (base weights)",
                       "svd": "W + U diag(delta_s + delta_s_hack) Vh, fp32, cast once",
                       "lora": "W + scale * B A, fp32, cast once"}[kind]}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return meta


# ----------------------------------------------------------------------------------------------
# adapter only

def write_svd_adapter(out: Path, params: dict, trainable: dict, frozen: dict, provenance: dict | None = None) -> dict:
    """adapter.safetensors ({module}.delta_s, {module}.delta_s_hack: [L, r] fp32) + adapter.json: the
    SVD cache key of every module (weight_hash of its stacked weight: the cache entry under
    <ckpt>/svd_cache/ whose factors U, Vh the deltas apply to) and the basis fingerprint
    (models.basis) to check a recomputed basis against."""
    tensors = {}
    for name, m in sorted(trainable.items()):
        tensors[f"{name}.delta_s"] = np.ascontiguousarray(np.asarray(m["delta_s"], np.float32))
        tensors[f"{name}.delta_s_hack"] = np.ascontiguousarray(np.asarray(m["delta_s_hack"], np.float32))
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "jaxhack-svd-delta"})
    meta = {**(provenance or {}), "adapter": "svd", "targets": sorted(trainable),
            "formula": "W' = W + U diag(delta_s + delta_s_hack) Vh, W = U diag(S) Vh (torch layout [out, in])",
            "svd_cache_version": SVD_CACHE_VERSION,
            "svd_cache_key": {name: weight_hash(params["layers"][name]) for name in sorted(trainable)},
            "basis_fingerprint": basis_fingerprint(trainable, frozen),
            "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return meta


def peft_tensors(trainable: dict) -> dict[str, np.ndarray]:
    """PEFT's key names: base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight,
    A [rank, in], B [out, rank] fp32 (the names convert.load_lora_adapter reads)."""
    out = {}
    for name, m in sorted(trainable.items()):
        a, b = np.asarray(m["a"], np.float32), np.asarray(m["b"], np.float32)  # [L,rank,in], [L,out,rank]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{_PEFT_PARENT[name]}.{name}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i])
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i])
    return out


def write_peft_lora(out: Path, trainable: dict, frozen: dict, base_model: str,
                    provenance: dict | None = None) -> dict:
    """adapter_config.json + adapter_model.safetensors in PEFT's layout (LoRA arm)."""
    ranks = {int(np.asarray(m["a"]).shape[1]) for m in trainable.values()}
    scales = {float(s) for m in frozen.values() for s in np.asarray(m["scale"]).reshape(-1)}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"PEFT needs one rank and one scale for all modules, got ranks {ranks}, scales {scales}")
    rank, scale = ranks.pop(), scales.pop()
    save_file(peft_tensors(trainable), str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted(trainable), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model}
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {**(provenance or {}), "adapter": "lora", "layout": "peft", "r": rank, "lora_alpha": scale * rank,
            "scale": scale, "targets": sorted(trainable)}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return meta


def read_svd_adapter(path: Path) -> tuple[dict[str, dict[str, Any]], dict]:
    """({module: {"delta_s", "delta_s_hack"}}, adapter.json) of a write_svd_adapter directory."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(path) / ADAPTER_FILE))
    tree: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module, field = key.split(".", 1)
        tree.setdefault(module, {})[field] = value
    return tree, json.loads((Path(path) / ADAPTER_META).read_text())


def bf16_rounding(w: np.ndarray, u: np.ndarray, s: np.ndarray, vh: np.ndarray, delta: np.ndarray) -> dict:
    """What a bf16 export keeps of a trained delta: W' = W + U diag(delta) Vh merged in fp32, cast
    once to bf16; compare the delta that survives, bf16(W') - bf16(W), with the fp32 delta.
    w [out, in]; u [out, r]; s, delta [r]; vh [r, in]. Returns relative errors (Frobenius)."""
    dw = (u * delta) @ vh  # [out, in] fp32
    merged = (w + dw).astype(ml_dtypes.bfloat16).astype(np.float32)
    base = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    kept = merged - base
    norm = float(np.linalg.norm(dw))
    return {"delta_rel_to_S": float(np.linalg.norm(delta) / np.linalg.norm(s)),
            "delta_rel_error": float(np.linalg.norm(kept - dw) / norm) if norm else 0.0,
            "delta_frac_entries_lost": float(np.mean((kept == 0) & (dw != 0))),
            "weight_rel_error_bf16": float(np.linalg.norm(merged - (w + dw)) / np.linalg.norm(w + dw))}
