"""Tests for convert.py (HF -> params, errors, LoRA merge), checkpoint.py (orbax) and tokenizer.py."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxhack.checkpoint import load_checkpoint, restore_pytree, save_checkpoint, save_pytree
from jaxhack.models.config import TINY
from jaxhack.models.convert import load_hf_params, param_shapes
from jaxhack.tokenizer import ByteTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from test_qwen3_parity import ...`


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """True fp32 matmuls in JAX: on GPU the default precision for fp32 dots is TF32-like (~1e-3 error)."""
    with jax.default_matmul_precision("highest"):
        yield


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_bit_equal(a, b):
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, f"{path}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{path}: shape {x.shape} != {y.shape}"
        if x.dtype == ml_dtypes.bfloat16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        assert np.array_equal(x, y), f"{path}: values differ"


# ------------------------------------------------------------------------------------ conversion


def test_layout_and_transposes(tiny_hf_dir):
    params, config = load_hf_params(tiny_hf_dir, progress=False)
    assert config == TINY
    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    assert shapes == param_shapes(config)
    raw = load_file(str(tiny_hf_dir / "model.safetensors"))
    np.testing.assert_array_equal(params["layers"]["o_proj"][1], raw["model.layers.1.self_attn.o_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["gate_proj"][0], raw["model.layers.0.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["q_norm"][1], raw["model.layers.1.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(params["lm_head"], raw["lm_head.weight"].T)
    # the norms were randomised away from 1 (so norm bugs show in the parity tests)
    assert np.abs(params["layers"]["k_norm"] - 1).max() > 0.1
    assert np.abs(params["final_norm"] - 1).max() > 0.1


def test_sharded_equals_single_file(tiny_hf_dir, tiny_hf_dir_sharded):
    shards = sorted(tiny_hf_dir_sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (tiny_hf_dir_sharded / "model.safetensors.index.json").is_file()
    a, _ = load_hf_params(tiny_hf_dir, progress=False)
    b, _ = load_hf_params(tiny_hf_dir_sharded, progress=False)
    assert_trees_bit_equal(a, b)


def test_tied_has_no_lm_head_and_ignores_stored_copy(tiny_hf_dir_tied, tmp_path):
    params, config = load_hf_params(tiny_hf_dir_tied, progress=False)
    assert config.tie_word_embeddings and "lm_head" not in params
    # a stored lm_head.weight equal to the embedding is accepted; a different one is ignored with a warning
    d = copy_dir(tiny_hf_dir_tied, tmp_path / "tied")
    t = load_file(str(d / "model.safetensors"))
    save_file({**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()}, str(d / "model.safetensors"))
    p2, _ = load_hf_params(d, progress=False)
    assert_trees_bit_equal(params, p2)
    with warnings.catch_warnings():  # equal in the file: no warning even when the target dtype rounds
        warnings.simplefilter("error")
        load_hf_params(d, dtype="bfloat16", progress=False)
    save_file({**t, "lm_head.weight": t["model.embed_tokens.weight"] * 2}, str(d / "model.safetensors"))
    with pytest.warns(UserWarning, match="lm_head.weight differs"):
        p3, _ = load_hf_params(d, progress=False)
    assert_trees_bit_equal(params, p3)


def test_generation_config_eos_ids_are_added(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    _, config = load_hf_params(d, progress=False)
    assert config.eos_token_ids == (2, 1)


def test_bad_dtype_and_missing_dir(tiny_hf_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_hf_params(tiny_hf_dir, dtype="int8")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_hf_params(tmp_path / "empty")


# ------------------------------------------------------------------------------------ bad inputs


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(d: Path, edit) -> None:
    """Apply `edit(dict of numpy tensors)` to d/model.safetensors."""
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


def test_missing_tensor(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*\(128, 64\)"):
        load_hf_params(d, progress=False)


def test_missing_untied_lm_head(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    rewrite(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings=false"):
        load_hf_params(d, progress=False)


def test_wrong_shape(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                         r"has shape \(64, 64\), expected \(32, 64\)"):
        load_hf_params(d, progress=False)


def test_wrong_dtype(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    rewrite(d, lambda t: t.update({"model.norm.weight": np.ones((64,), np.int32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32"):
        load_hf_params(d, progress=False)


def test_unexpected_tensor(tiny_hf_dir, tmp_path):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    rewrite(d, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"1 unexpected tensor.*model\.layers\.2\.self_attn\.q_proj\.weight"):
        load_hf_params(d, progress=False)


@pytest.mark.parametrize("keep_bytes", [-100, 20, 0])
def test_truncated_file(tiny_hf_dir, tmp_path, keep_bytes):
    d = copy_dir(tiny_hf_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep_bytes] if keep_bytes else b"")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \(corrupt or truncated"):
        load_hf_params(d, progress=False)


def test_sharded_missing_shard_and_bad_index(tiny_hf_dir_sharded, tmp_path):
    d = copy_dir(tiny_hf_dir_sharded, tmp_path / "m")
    shard = sorted(d.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: safetensors file not found.*index.json"):
        load_hf_params(d, progress=False)
    d2 = copy_dir(tiny_hf_dir_sharded, tmp_path / "m2")
    index = json.loads((d2 / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    index["weight_map"]["model.embed_tokens.weight"] = second if index["weight_map"]["model.embed_tokens.weight"] == first else first
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'model.embed_tokens.weight' is mapped to"):
        load_hf_params(d2, progress=False)


# ------------------------------------------------------------------------------------ LoRA


LORA_MODULES = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def write_lora(d: Path, r: int, alpha: float, rslora: bool, seed: int = 0, drop: str | None = None) -> dict:
    """A PEFT-style LoRA adapter for both layers of TINY; returns {hf weight name: (A, B)}."""
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (64, 64), "v_proj": (32, 64), "down_proj": (64, 128)}  # torch [out, in]
    tensors, pairs = {}, {}
    for i in range(TINY.num_hidden_layers):
        for mod, (out_dim, in_dim) in shapes.items():
            prefix = f"base_model.model.model.layers.{i}.{LORA_MODULES[mod]}.{mod}"
            a = rng.normal(0, 0.1, (r, in_dim)).astype(np.float32)
            b = rng.normal(0, 0.1, (out_dim, r)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            pairs[f"model.layers.{i}.{LORA_MODULES[mod]}.{mod}.weight"] = (a, b)
    if drop:
        tensors.pop(drop)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": list(shapes), "lora_dropout": 0.0, "bias": "none"}))
    return pairs


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_matches_torch_manual_merge(tiny_hf_dir, tmp_path, rslora):
    from test_qwen3_parity import jax_logits, padded_batch, rel_err, torch_logits, torch_model

    r, alpha = 4, 8.0
    pairs = write_lora(tmp_path / "lora", r, alpha, rslora)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    model = torch_model(tiny_hf_dir)
    sd = model.state_dict()
    with torch.no_grad():  # PEFT merge: W += scale * B @ A
        for name, (a, b) in pairs.items():
            sd[name] += scale * (torch.from_numpy(b) @ torch.from_numpy(a))
    model.load_state_dict(sd)

    params, config = load_hf_params(tiny_hf_dir, lora_dir=tmp_path / "lora", progress=False)
    base, _ = load_hf_params(tiny_hf_dir, progress=False)
    np.testing.assert_allclose(params["layers"]["v_proj"][1], sd["model.layers.1.self_attn.v_proj.weight"].numpy().T,
                               rtol=0, atol=1e-6)
    assert np.abs(params["layers"]["down_proj"] - base["layers"]["down_proj"]).max() > 1e-3  # merged
    np.testing.assert_array_equal(params["layers"]["k_proj"], base["layers"]["k_proj"])  # untouched
    ids, mask = padded_batch(seed=1)
    err = rel_err(jax_logits(jax.device_put(params), config, ids, mask)[mask], torch_logits(model, ids, mask)[mask])
    assert err < 1e-4


def test_lora_errors(tiny_hf_dir, tmp_path):
    write_lora(tmp_path / "a", 4, 8.0, False, drop="base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    with pytest.raises(ValueError, match="layer 1 down_proj has lora_A but no lora_B"):
        load_hf_params(tiny_hf_dir, lora_dir=tmp_path / "a", progress=False)
    write_lora(tmp_path / "b", 4, 8.0, False)  # config says r=8 but the tensors have rank 4
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: LoRA tensor '.*lora_A\.weight' has shape \(4, "):
        load_hf_params(tiny_hf_dir, lora_dir=tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_hf_params(tiny_hf_dir, lora_dir=tmp_path / "nowhere", progress=False)


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_bit_exact(tiny_hf_dir, tmp_path, dtype):
    params, config = load_hf_params(tiny_hf_dir, dtype=dtype, progress=False)
    params = jax.device_put(params)
    meta = {"source": "tiny", "step": 3}
    path = save_checkpoint("tiny", params, config, metadata=meta, root=tmp_path)
    assert path == (tmp_path / "tiny").absolute()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 64  # human readable
    p2, c2, m2 = load_checkpoint("tiny", root=tmp_path)
    assert c2 == config and m2 == meta
    assert isinstance(p2["embed"], jax.Array) and p2["embed"].dtype == jnp.dtype(dtype)
    assert_trees_bit_equal(params, p2)
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint("tiny", params, config, root=tmp_path)
    save_checkpoint("tiny", params, config, metadata={"v": 2}, root=tmp_path, force=True)
    assert load_checkpoint(path)[2] == {"v": 2}
    assert not list(tmp_path.glob(".tiny.tmp-*"))  # no temporary directories left behind


def test_checkpoint_errors(tiny_params, tmp_path):
    params, config = tiny_params
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint("x", params, config, metadata={"bad": object()}, root=tmp_path)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_checkpoint("nope", root=tmp_path)
    path = save_checkpoint("y", params, config, root=tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="params do not match config.json"):
        load_checkpoint(path)


def test_save_restore_pytree_generic(tmp_path):
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones((3,), jnp.bfloat16) * 1.5}
    opt = optax.adamw(1e-3)
    state = opt.init(params)
    state = jax.tree.map(lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, state)
    save_pytree(tmp_path / "opt", state)
    restored = restore_pytree(tmp_path / "opt", target=opt.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # namedtuples come back
    assert_trees_bit_equal(state, restored)
    raw = restore_pytree(tmp_path / "opt", as_jax=False)  # without a target: plain containers
    assert isinstance(raw[0]["mu"]["b"], np.ndarray) and raw[0]["mu"]["b"].dtype == ml_dtypes.bfloat16
    with pytest.raises(FileExistsError):
        save_pytree(tmp_path / "opt", state)


def test_convert_script(tiny_hf_dir_tied, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "convert.py"), "--hf-dir", str(tiny_hf_dir_tied),
                          "--name", "t", "--out-root", str(tmp_path), "--dtype", "bfloat16", "--no-progress"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "parameters=106,880" in out.stdout and "peak RSS" in out.stdout
    params, config, meta = load_checkpoint(tmp_path / "t")
    assert params["embed"].dtype == jnp.bfloat16 and config.tie_word_embeddings and meta["dtype"] == "bfloat16"
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "convert.py"), "--hf-dir", str(tmp_path / "none"),
                          "--name", "u", "--out-root", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr  # user error: one line, exit 2


# ------------------------------------------------------------------------------------ tokenizer


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "<|im_start|>user\nHéllo, 世界!<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == 3 and ids.count(2) == 1 and ids[-1] == 1
    assert all(0 <= i < TINY.vocab_size for i in ids) and tok.vocab_size <= TINY.vocab_size
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.decode(ids) == text
    assert tok.decode([0, 0] + ids + [0]) == text  # pad is dropped
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHéllo, 世界!\n"
    assert tok.decode([300]) == "\ufffd"
    assert tok.eos_token_ids == TINY.eos_token_ids and tok.pad_token_id == TINY.pad_token_id


def test_hf_tokenizer_wrapper(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["def f(x): return x + 1", "hello world, hello tests"] * 10,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    text = "<|im_start|>hello world<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == (2, 0) and tok.pad_token_id == 0
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
