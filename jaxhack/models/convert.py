"""Hugging Face Qwen3 checkpoint directory -> params pytree (layout: docs/architecture.md).

Input: a local directory with `config.json` and either one `model.safetensors` or sharded
`model-0000x-of-0000y.safetensors` files listed in `model.safetensors.index.json`.
Optionally a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) is
merged into the weights: W' = W + scale * B @ A in fp32, scale = lora_alpha / r (rsLoRA: / sqrt(r)).

Torch Linear weights `[out, in]` are transposed to `[in, out]`; per-layer tensors are stacked on a
leading layer axis, one layer at a time, cast to the target dtype as they are read (peak host memory
is about the size of the converted params plus one tensor). The result holds numpy arrays on the
host (bf16 as `ml_dtypes.bfloat16`); `jax.device_put(params)` moves it to the accelerator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import chex
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from jaxhack.models.config import (TARGET_MODULES, Qwen3Config, check_params, leaf_paths,  # noqa: F401
                                    module_shapes, param_shapes)

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"

# our layer key -> HF tensor name suffix after "model.layers.{i}."
LAYER_TENSORS = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
# tensors that HF checkpoints may carry and that we recompute instead (old rotary caches)
_IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------------------------
# safetensors reading


class SafetensorsDir:
    """Read-only view of the tensors of one or more safetensors files, with clear errors.

    `files`: the safetensors files to open. `index`: optional {tensor name: file name} map (from
    model.safetensors.index.json) that must agree with what the files contain.
    """

    def __init__(self, files: list[Path], index: dict[str, str] | None = None, index_path: Path | None = None):
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        self.location: dict[str, Path] = {}  # tensor name -> file
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: safetensors file not found"
                                        + (f" (listed in {index_path})" if index_path else ""))
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="np"))
                names = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                self.close()
                raise ValueError(f"{f}: not a readable safetensors file (corrupt or truncated?): {e}") from None
            self._handles[f] = h
            for name in names:
                if name in self.location:
                    self.close()
                    raise ValueError(f"{f}: tensor {name!r} also appears in {self.location[name]}")
                self.location[name] = f
        if index is not None:
            for name, fname in index.items():
                got = self.location.get(name)
                if got is None or got.name != fname:
                    self.close()
                    raise ValueError(f"{index_path}: tensor {name!r} is mapped to {fname}, but "
                                     + ("no file has it" if got is None else f"it is in {got.name}"))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...], what: str = "tensor") -> np.ndarray:
        """Read tensor `name` (torch layout), checking it exists, is floating point, has `shape`."""
        f = self.location.get(name)
        if f is None:
            files = sorted({p.name for p in self.location.values()})
            raise ValueError(f"missing {what} {name!r}: not found in {', '.join(files) or 'any file'} "
                             f"(expected shape {tuple(shape)})")
        sl = self._handles[f].get_slice(name)
        got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
        if got_shape != tuple(shape):
            raise ValueError(f"{f}: {what} {name!r} has shape {got_shape}, expected {tuple(shape)}")
        if got_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{f}: {what} {name!r} has dtype {got_dtype}, expected one of {_FLOAT_DTYPES}")
        try:
            x = self._handles[f].get_tensor(name)
        except (SafetensorError, TypeError, ValueError) as e:
            if got_dtype != "BF16":
                raise ValueError(f"{f}: cannot read {what} {name!r}: {e}") from None
            x = _read_bf16_via_torch(f, name)  # older safetensors: numpy has no bfloat16
        return x


def _read_bf16_via_torch(f: Path, name: str) -> np.ndarray:
    import torch

    with safe_open(str(f), framework="pt") as h:
        t = h.get_tensor(name)
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def open_hf_weights(hf_dir: Path) -> SafetensorsDir:
    """The model weights of an HF directory: sharded (index json) or a single model.safetensors."""
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        except (KeyError, TypeError):
            raise ValueError(f"{index_path}: no 'weight_map' object") from None
        files = [hf_dir / fname for fname in sorted(set(weight_map.values()))]
        return SafetensorsDir(files, index=weight_map, index_path=index_path)
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return SafetensorsDir([single])
    present = sorted(p.name for p in hf_dir.iterdir()) if hf_dir.is_dir() else []
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                            f"(directory has: {present[:20]}); only safetensors checkpoints are supported")


def expected_hf_names(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape for every tensor the conversion needs."""
    D, V, hd = config.hidden_size, config.vocab_size, config.head_dim
    shapes = module_shapes(config)
    norms = {"input_norm": (D,), "post_attn_norm": (D,), "q_norm": (hd,), "k_norm": (hd,)}
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.num_hidden_layers):
        for ours, suffix in LAYER_TENSORS.items():
            names[f"model.layers.{i}.{suffix}"] = shapes[ours][::-1] if ours in shapes else norms[ours]
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (V, D)
    return names


def load_hf_config(hf_dir: str | Path) -> Qwen3Config:
    """Qwen3Config from config.json; eos ids also taken from generation_config.json if present
    (HF generate stops on those, e.g. Qwen3 instruct models list both <|im_end|> and <|endoftext|>)."""
    hf_dir = Path(hf_dir)
    config = Qwen3Config.from_json(hf_dir / "config.json")
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen}: line {e.lineno}: invalid JSON ({e.msg})") from None
        extra = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        ids = list(config.eos_token_ids) + [e for e in extra if e not in config.eos_token_ids]
        config = dataclasses.replace(config, eos_token_ids=tuple(ids))
    return config


# ----------------------------------------------------------------------------------------------
# LoRA


@dataclasses.dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in torch layout: pairs[(layer, module)] = (A [r, in], B [out, r]) fp32."""
    scale: float
    rank: int
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


_LORA_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def load_lora_adapter(lora_dir: str | Path, config: Qwen3Config) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory and check every tensor against `config`."""
    lora_dir = Path(lora_dir)
    cfg_path, st_path = lora_dir / ADAPTER_CONFIG, lora_dir / ADAPTER_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: LoRA adapter config not found")
    if not st_path.is_file():
        raise FileNotFoundError(f"{st_path}: LoRA adapter weights not found (only safetensors supported)")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    for field in ("r", "lora_alpha"):
        if field not in acfg:
            raise ValueError(f"{cfg_path}: missing field {field!r}")
    if acfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {acfg['peft_type']!r}, expected 'LORA'")
    for field in ("use_dora", "fan_in_fan_out"):
        if acfg.get(field):
            raise ValueError(f"{cfg_path}: {field}=true is not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if acfg.get(field):
            raise ValueError(f"{cfg_path}: per-module {field} is not supported")
    if acfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: modules_to_save={acfg['modules_to_save']} is not supported")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r

    shapes = module_shapes(config)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with SafetensorsDir([st_path]) as st:
        for name in sorted(st.location):
            m = _LORA_RE.match(name)
            if m is None or m.group(3) not in TARGET_MODULES or int(m.group(1)) >= config.num_hidden_layers:
                raise ValueError(f"{st_path}: unexpected tensor {name!r} (expected "
                                 "base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight "
                                 f"with i < {config.num_hidden_layers} and module in {TARGET_MODULES})")
            layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
            d_in, d_out = shapes[module]
            shape = (r, d_in) if ab == "A" else (d_out, r)
            pairs.setdefault((layer, module), {})[ab] = st.get(name, shape, "LoRA tensor").astype(np.float32)
    out = {}
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"{st_path}: layer {layer} {module} has lora_{set(ab).pop()} but no lora_{missing}")
        out[(layer, module)] = (ab["A"], ab["B"])
    if not out:
        raise ValueError(f"{st_path}: no LoRA tensors found")
    return LoraAdapter(scale=scale, rank=r, pairs=out)


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """Torch layout: W [out,in] + scale * B [out,r] @ A [r,in], computed in fp32. Returns fp32."""
    chex.assert_equal(w.shape, (b.shape[0], a.shape[1]))
    return w.astype(np.float32) + np.float32(scale) * (b.astype(np.float32) @ a.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# conversion


def load_hf_params(hf_dir: str | Path, dtype: str = "float32", lora_dir: str | Path | None = None,
                   progress: bool = True) -> tuple[dict, Qwen3Config]:
    """Convert an HF Qwen3 directory (+ optional PEFT LoRA, merged) to (params, config).

    params: numpy arrays in `dtype` ("float32" | "bfloat16"), layout of docs/architecture.md.
    Raises ValueError / FileNotFoundError naming the file and tensor on any missing, unexpected,
    mis-shaped or unreadable tensor.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = DTYPES[dtype]
    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    lora = load_lora_adapter(lora_dir, config) if lora_dir is not None else None
    L, D, V, hd = config.num_hidden_layers, config.hidden_size, config.vocab_size, config.head_dim
    shapes = module_shapes(config)

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(np_dtype, copy=False))

    with open_hf_weights(hf_dir) as st:
        # fail fast (before reading gigabytes) on tensors that a Qwen3 of this config does not have
        allowed = set(expected_hf_names(config)) | {"lm_head.weight"}
        unexpected = sorted(n for n in st.location if n not in allowed and not _IGNORED_RE.match(n))
        if unexpected:
            where = {n: st.location[n].name for n in unexpected[:10]}
            raise ValueError(f"{hf_dir}: {len(unexpected)} unexpected tensor(s) not used by a "
                             f"{L}-layer Qwen3: {where}{' ...' if len(unexpected) > 10 else ''}")
        if not config.tie_word_embeddings and "lm_head.weight" not in st:
            raise ValueError(f"{hf_dir}: missing tensor 'lm_head.weight' (config.json has "
                             "tie_word_embeddings=false, so an untied output head is required)")
        missing = sorted(n for n in expected_hf_names(config) if n not in st)
        if missing:
            raise ValueError(f"{hf_dir}: {len(missing)} missing tensor(s): {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}; e.g. missing tensor {missing[0]!r} "
                             f"(expected shape {expected_hf_names(config)[missing[0]]})")
        embed = st.get("model.embed_tokens.weight", (V, D))  # [V,D] in the file's dtype
        if config.tie_word_embeddings and "lm_head.weight" in st:
            # transformers ties lm_head to the embedding and ignores the stored copy
            if not np.array_equal(st.get("lm_head.weight", (V, D)), embed):
                warnings.warn(f"{hf_dir}: lm_head.weight differs from model.embed_tokens.weight but "
                              "tie_word_embeddings is true; using the embedding (as transformers does)")
        params: dict[str, Any] = {"embed": cast(embed)}  # [V,D]
        del embed
        layers = {name: np.empty((L, d_in, d_out), np_dtype) for name, (d_in, d_out) in shapes.items()}
        layers.update(input_norm=np.empty((L, D), np_dtype), post_attn_norm=np.empty((L, D), np_dtype),
                      q_norm=np.empty((L, hd), np_dtype), k_norm=np.empty((L, hd), np_dtype))
        for i in tqdm(range(L), desc="convert layers", unit="layer", disable=not progress):
            for ours, suffix in LAYER_TENSORS.items():
                name = f"model.layers.{i}.{suffix}"
                if ours in shapes:
                    d_in, d_out = shapes[ours]
                    w = st.get(name, (d_out, d_in))  # torch [out, in]
                    if lora is not None and (i, ours) in lora.pairs:
                        w = merge_lora(w, *lora.pairs[(i, ours)], lora.scale)
                    layers[ours][i] = w.T.astype(np_dtype)  # [in, out]
                else:
                    layers[ours][i] = st.get(name, layers[ours].shape[1:]).astype(np_dtype)
        params["layers"] = layers
        params["final_norm"] = cast(st.get("model.norm.weight", (D,)))  # [D]
        if not config.tie_word_embeddings:
            params["lm_head"] = cast(st.get("lm_head.weight", (V, D)).T)  # [D, V]
    check_params(params, config)
    return params, config


def count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for _, x in leaf_paths(params)))
