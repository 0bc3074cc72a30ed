"""Export of trained policies to Hugging Face (jaxhack/models/export.py, jaxhack export, docs/export.md).

The SVD tests go through a real Phase 3 run directory (the trainer tests' tiny settings: teacher rows
give reward variance, so delta_s moves); the LoRA tests perturb B directly (a LoRA run would cost
another set of compiles). Parity: max|logits - ref| / max|ref| <= 1e-4 in fp32.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_trainer as TT  # same settings as the trainer tests: jit caches are shared
from jaxhack.cli import main
from jaxhack.models import export as E
from jaxhack.models import qwen3
from jaxhack.models.adapters import merge, weight_hash
from jaxhack.models.basis import basis_fingerprint
from jaxhack.models.load import load_model, make_adapter
from jaxhack.rl import trainer as T
from jaxhack.rl.policy import load_trained_policy

REL_TOL = 1e-4


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@partial(jax.jit, static_argnums=1)
def _logits(params, config, ids, adapters):
    mask = jnp.ones(ids.shape, bool)
    return qwen3.lm_logits(params, config, qwen3.forward(params, config, ids, mask, adapters=adapters)[0])


def jax_logits(params, config, ids, adapters=None) -> np.ndarray:
    return np.asarray(_logits(params, config, jnp.asarray(ids), adapters))


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def load_hf(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                             dtype=torch.float32).eval()


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def token_ids(seed=0, shape=(2, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 260, size=shape).astype(np.int32)


@pytest.fixture(scope="module")
def svd_run(tmp_path_factory):
    """A finished 2-step Phase 3 run (projected arm, SVD basis) with a moved delta_s."""
    root = tmp_path_factory.mktemp("export_run")
    problems = TT.write_short_problems(root / "short.jsonl")
    teacher = TT.write_teacher_pool(TT.load_problems(problems), root / "teacher")
    cfg = TT.base_config((root, problems, teacher), root / "run", steps=2, eval_every=0, ckpt_every=1)
    T.train(cfg, progress=False)
    return root, Path(cfg.run_dir)


def test_merged_svd_export_loads_in_transformers_with_the_adapted_logits(svd_run):
    root, run_dir = svd_run
    out = root / "hf"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    policy = load_trained_policy(run_dir)
    assert policy.step == 2
    assert max(float(np.abs(m["delta_s"]).max()) for m in policy.trainable.values()) > 1e-3  # really trained
    ids = token_ids()
    ref = jax_logits(policy.params, policy.config, ids, merge(policy.trainable, policy.frozen))
    base = jax_logits(policy.params, policy.config, ids)
    got = hf_logits(load_hf(out), ids)
    assert rel_err(got, ref) <= REL_TOL
    assert rel_err(base, ref) > 100 * REL_TOL  # the parity above is not the base model's
    meta = json.loads((out / E.EXPORT_META).read_text())
    assert meta["step"] == 2 and meta["arm"] == "projected" and meta["files"] == ["model.safetensors"]
    assert meta["tokenizer_files"] == []  # byte tokenizer: nothing to copy
    # an earlier checkpoint, sharded: another policy, still transformers-loadable
    out1 = root / "hf_step1"
    assert main(["export", "--run-dir", str(run_dir), "--step", "1", "--out", str(out1), "--max-shard-mb", "0.2"]) == 0
    assert (out1 / "model.safetensors.index.json").is_file()
    ref1 = jax_logits(policy.params, policy.config, ids,
                      merge(load_trained_policy(run_dir, 1).trainable, policy.frozen))
    assert rel_err(hf_logits(load_hf(out1), ids), ref1) <= REL_TOL
    assert rel_err(ref1, ref) > 10 * REL_TOL
    # bf16 export loads too (its error is the bf16 rounding, docs/export.md)
    out_bf16 = root / "hf_bf16"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out_bf16), "--dtype", "bf16"]) == 0
    assert json.loads((out_bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert rel_err(hf_logits(load_hf(out_bf16), ids), ref) < 0.05


def test_svd_adapter_only_carries_delta_s_and_the_basis_key(svd_run):
    root, run_dir = svd_run
    out = root / "adapter"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out), "--adapter-only"]) == 0
    tree, meta = E.read_svd_adapter(out)
    policy = load_trained_policy(run_dir)
    assert set(tree) == set(policy.trainable)
    for name, m in policy.trainable.items():
        np.testing.assert_array_equal(tree[name]["delta_s"], np.asarray(m["delta_s"]))
        assert meta["svd_cache_key"][name] == weight_hash(policy.params["layers"][name])
    assert meta["basis_fingerprint"] == basis_fingerprint(policy.trainable, policy.frozen)
    # re-applied on the base (rebuilt from the cache key's weights) it gives the merged model
    base_dir = root / "base"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(base_dir), "--base-only"]) == 0
    ids = token_ids(1)
    again = merge({n: {k: jnp.asarray(v) for k, v in m.items()} for n, m in tree.items()}, policy.frozen)
    np.testing.assert_allclose(jax_logits(policy.params, policy.config, ids, again),
                               jax_logits(policy.params, policy.config, ids,
                                          merge(policy.trainable, policy.frozen)), rtol=0, atol=0)
    assert rel_err(hf_logits(load_hf(base_dir), ids), jax_logits(policy.params, policy.config, ids)) <= REL_TOL
    # user errors: one line, exit 2
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 2  # exists
    assert main(["export", "--run-dir", str(run_dir), "--step", "7", "--out", str(root / "x")]) == 2
    assert main(["export", "--run-dir", str(root), "--out", str(root / "y")]) == 2  # no run.json


@pytest.fixture(scope="module")
def lora_model():
    """tiny model + a LoRA adapter whose B is perturbed to non-zero values (as training would)."""
    params, config, _, _ = load_model("tiny", seed=0)
    trainable, frozen = make_adapter("lora", params, config, ckpt="tiny", lora_rank=4, lora_alpha=8.0, lora_seed=3)
    rng = np.random.default_rng(0)
    trainable = {n: {"a": m["a"], "b": jnp.asarray(0.05 * rng.standard_normal(m["b"].shape), jnp.float32)}
                 for n, m in trainable.items()}
    return params, config, trainable, frozen


def test_merged_lora_export_matches_the_adapted_forward(lora_model, tmp_path):
    params, config, trainable, frozen = lora_model
    E.write_hf_model(tmp_path, params, config, trainable, frozen)
    ids = token_ids(2)
    ref = jax_logits(params, config, ids, merge(trainable, frozen))
    assert rel_err(hf_logits(load_hf(tmp_path), ids), ref) <= REL_TOL
    assert rel_err(jax_logits(params, config, ids), ref) > 100 * REL_TOL


def test_peft_layout_lora_loads_with_peft(lora_model, tmp_path):
    peft = pytest.importorskip("peft")
    params, config, trainable, frozen = lora_model
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    E.write_hf_model(base, params, config, None, None)
    E.write_peft_lora(adapter, trainable, frozen, base_model=str(base))
    cfg = json.loads((adapter / E.PEFT_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and set(cfg["target_modules"]) == set(trainable)
    model = peft.PeftModel.from_pretrained(load_hf(base), str(adapter)).eval()
    ids = token_ids(3)
    ref = jax_logits(params, config, ids, merge(trainable, frozen))
    assert rel_err(hf_logits(model, ids), ref) <= REL_TOL
    # the converter reads the same layout back (its PEFT reader): merged on conversion, same logits
    from jaxhack.models.convert import load_hf_params

    merged, _ = load_hf_params(base, lora_dir=adapter, progress=False)
    assert rel_err(jax_logits(jax.device_put(merged), config, ids), ref) <= REL_TOL


def test_bf16_rounding_figure_is_computed_not_assumed():
    """The docs' bf16 figure: a delta of 1% of S mostly survives bf16, one of 0.01% mostly does not."""
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((64, 64))).astype(np.float32)
    u, s, vh = np.linalg.svd(w)
    big = E.bf16_rounding(w, u, s, vh, (0.01 * s.mean() * rng.standard_normal(64)).astype(np.float32))
    small = E.bf16_rounding(w, u, s, vh, (1e-4 * s.mean() * rng.standard_normal(64)).astype(np.float32))
    assert big["delta_rel_error"] < 0.5 < 1.0 < small["delta_rel_error"]
    assert small["delta_frac_entries_lost"] > 0.5 > big["delta_frac_entries_lost"]


def fake_lora_run(run_dir: Path, trainable) -> Path:
    """A run directory as the trainer leaves it (run.json + one checkpoint) for a LoRA arm whose B
    was trained (here: perturbed); the basis A is the one lora_model seeded (lora_seed 3)."""
    from jaxhack.io import atomic_write_text
    from jaxhack.rl.checkpoints import save_train_state
    from jaxhack.rl.config import make_config

    cfg = make_config("smoke", arm="lora_projected", lora_rank=4, lora_alpha=8.0, run_dir=str(run_dir))
    run_dir.mkdir(parents=True)
    atomic_write_text(run_dir / "run.json", json.dumps({"config": cfg.to_dict(), "lora_seed": 3}))
    save_train_state(run_dir, 1, {"trainable": trainable, "cursor": np.int32(2), "step": np.int32(1)})
    return run_dir


def test_lora_run_exports_peft_adapter_via_the_cli(lora_model, tmp_path):
    peft = pytest.importorskip("peft")
    params, config, trainable, frozen = lora_model
    run_dir = fake_lora_run(tmp_path / "run", trainable)
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "peft"), "--adapter-only"]) == 0
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "base"), "--base-only"]) == 0
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    ids = token_ids(4)
    ref = jax_logits(params, config, ids, merge(trainable, frozen))
    model = peft.PeftModel.from_pretrained(load_hf(tmp_path / "base"), str(tmp_path / "peft")).eval()
    assert rel_err(hf_logits(model, ids), ref) <= REL_TOL
    assert rel_err(hf_logits(load_hf(tmp_path / "merged"), ids), ref) <= REL_TOL
    # a checkpoint whose A is not the run's seeded basis is refused (one line, exit 2)
    other = {n: dict(m, a=m["a"] + 1.0) for n, m in trainable.items()}
    bad = fake_lora_run(tmp_path / "bad", other)
    assert main(["export", "--run-dir", str(bad), "--out", str(tmp_path / "x")]) == 2
