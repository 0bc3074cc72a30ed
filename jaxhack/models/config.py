"""Qwen3 model configuration, read from a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# The adapted Linear modules of every layer, in this order (the one list; w: [L, d_in, d_out]).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hkv
    head_dim: int  # hd
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Qwen3Config":
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing} for a Qwen3 config")
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"{source}: field 'model_type' is {model_type!r}, expected 'qwen3'")
        if d.get("attention_bias", False):
            raise ValueError(f"{source}: field 'attention_bias' is true; Qwen3 without biases expected")
        for field in ("rope_scaling", "rope_parameters"):  # transformers v4 / v5 names
            rope = d.get(field) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"{source}: field '{field}' {rope!r} is not supported "
                                 "(only default RoPE)")
        n_heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),))
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // n_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


# Qwen3-4B (from its published config.json); used for full-size shape tests with random weights.
QWEN3_4B = Qwen3Config(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=40960,
    eos_token_ids=(151645,), bos_token_id=151643, pad_token_id=None,
)

# The embedded default: a tiny Qwen3 that builds in seconds on a CPU.
TINY = Qwen3Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
    rope_theta=10_000.0, tie_word_embeddings=False, max_position_embeddings=2048,
    eos_token_ids=(2,), bos_token_id=1, pad_token_id=0,
)


# ----------------------------------------------------------------------------------------------
# the parameter layout (the one place that lists it; qwen3.init_params, convert and checkpoint use it)

def module_shapes(config: Qwen3Config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every target Linear (our [in, out] layout; a torch weight is [out, in])."""
    D, F = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (D, config.q_dim), "k_proj": (D, config.kv_dim), "v_proj": (D, config.kv_dim),
        "o_proj": (config.q_dim, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D),
    }


def param_shapes(config: Qwen3Config) -> dict[str, Any]:
    """The shape of every leaf of the params pytree, as a pytree of tuples."""
    L, D, V, hd = config.num_hidden_layers, config.hidden_size, config.vocab_size, config.head_dim
    layers = {name: (L, d_in, d_out) for name, (d_in, d_out) in module_shapes(config).items()}
    layers.update(input_norm=(L, D), post_attn_norm=(L, D), q_norm=(L, hd), k_norm=(L, hd))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def check_params(params: dict, config: Qwen3Config) -> None:
    """Raise if `params` does not have exactly the layout and shapes that `config` implies."""
    expected = param_shapes(config)
    if set(params) != set(expected) or set(params["layers"]) != set(expected["layers"]):
        raise ValueError(f"params keys {sorted(params)} / layers {sorted(params.get('layers', {}))} do not "
                         f"match the layout for this config: {sorted(expected)} / {sorted(expected['layers'])}")
    for path, shape in leaf_paths(expected):
        leaf = params
        for k in path:
            leaf = leaf[k]
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"params[{'/'.join(path)}]: expected shape {tuple(shape)}, got {tuple(leaf.shape)}")


def leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple[tuple[str, ...], Any]]:
    """[(key path, leaf)] of a nested dict, depth first."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out.extend(leaf_paths(v, prefix + (k,)))
        else:
            out.append((prefix + (k,), v))
    return out
