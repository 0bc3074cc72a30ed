"""Phase 3 run set-up rules that need no model: config validation on construction, the LoRA seed
rule with a v_hack file, and the typed Rollout's row checks (jaxhack/rl/config.py, run.py, rollout.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxhack.env.problems import load_problems
from jaxhack.projection.v_hack import random_v_hack, save_v_hack
from jaxhack.rl.config import ConfigError, TrainConfig, make_config
from jaxhack.rl.rollout import Rollout
from jaxhack.rl.run import lora_seed_for


def test_invalid_train_config_cannot_exist():
    with pytest.raises(ValueError, match="arm 'nope'"):
        TrainConfig(arm="nope")
    cfg = make_config("smoke", arm="projected")
    with pytest.raises(ValueError, match="mix_per_group"):
        dataclasses.replace(cfg, mix_per_group=cfg.group_size)  # replace re-validates
    with pytest.raises(ValueError, match="steps must be >= 1"):
        make_config("smoke", steps=0)


def test_group_size_rule_comes_before_the_mix_rule():
    """G = 1 breaks the mix rule too (smoke mixes 1 teacher row per group); the root cause, the
    group size, is reported first, and alone when nothing is mixed."""
    with pytest.raises(ConfigError) as err:
        make_config("smoke", group_size=1)
    errors = err.value.errors
    assert errors[0].startswith("group_size must be >= 2, got 1") and errors[1].startswith("mix_per_group must be")
    with pytest.raises(ConfigError) as err:
        make_config("smoke", group_size=1, mix_per_group=0)
    assert len(err.value.errors) == 1 and "group_size must be >= 2" in str(err.value)
    assert make_config("smoke", group_size=2).group_size == 2


def test_an_unknown_param_dtype_is_a_config_error():
    """--dtype -1 reached jnp.dtype in load_model as a TypeError traceback."""
    with pytest.raises(ConfigError, match=r"dtype '-1': expected one of \('float32', 'bfloat16'\)"):
        make_config("smoke", dtype="-1")
    assert make_config("smoke", dtype="bfloat16").dtype == "bfloat16"


def _save(tmp_path, bundle, meta):
    save_v_hack(tmp_path / "vh", bundle, meta=meta, force=True)
    return str(tmp_path / "vh")


def test_lora_seed_rule(tmp_path):
    path = _save(tmp_path, random_v_hack({"q_proj": (2, 8)}, seed=0, k=1),
                 {"adapter": "lora", "lora_seed": 5, "lora_rank": 8})
    cfg = make_config("smoke", arm="lora_projected", seed=2, v_hack=path)
    assert lora_seed_for(cfg, "lora") == 5  # the file's basis, whatever the run's seed
    assert lora_seed_for(dataclasses.replace(cfg, v_hack=None), "lora") == 2  # extracted: the run's seed
    with pytest.raises(ValueError, match="lora_rank=8 but --lora-rank is 4"):
        lora_seed_for(dataclasses.replace(cfg, lora_rank=4), "lora")
    with pytest.raises(ValueError, match="lora-basis v_hack; arm projected uses svd"):
        lora_seed_for(dataclasses.replace(cfg, arm="projected"), "svd")


def test_rollout_rows_must_align():
    row = dict(problems=("p", "q"), prompt_ids=([1], [2]), completion_ids=([3], [4]), completions=("a", "b"),
               sources=("policy", "teacher"), sampler_logp=(np.zeros(1), None), finished=(True, True),
               grades=("g", "h"))
    assert len(Rollout(**row)) == 2 and Rollout(**row).policy_rows == [0]
    with pytest.raises(ValueError, match="completions has 1 rows, expected 2"):
        Rollout(**{**row, "completions": ("a",)})
    with pytest.raises(ValueError, match="unknown"):
        Rollout(**{**row, "sources": ("policy", "human")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        Rollout(**row).grades = ()


def test_phase3_extraction_gets_the_noise_floor_options(monkeypatch):
    """TrainConfig's vhack_axis_threshold / vhack_noise_floor_quantile reach extract_v_hack (issue 13;
    before, the Phase 3 extraction passed only k)."""
    from jaxhack.env.problems import load_problems
    from jaxhack.rl import run as R
    seen = {}

    def fake_extract(pairs, *args, **kw):
        seen.update(kw)
        return {}, {}
    monkeypatch.setattr(R, "extract_v_hack", fake_extract)
    cfg = make_config("smoke", vhack_axis_threshold=0.3, vhack_noise_floor_quantile=0.25, vhack_pairs=2)
    R.make_v_hack(cfg, "none", load_problems("bundled")[:2], None, None, None, None, None)
    assert seen["axis_threshold"] == 0.3 and seen["noise_floor_quantile"] == 0.25


def test_no_progress_silences_the_svd_and_v_hack_bars(tmp_path, monkeypatch, capfd):
    """`--no-progress` (train(progress=False)) reaches the SVD and v_hack extraction bars."""
    from jaxhack.rl import run as R
    seen = {}

    def fake_extract(pairs, *args, **kw):
        seen.update(kw)
        return {}, {}
    monkeypatch.setattr(R, "extract_v_hack", fake_extract)
    cfg = make_config("smoke", vhack_pairs=2)
    R.make_v_hack(cfg, "none", load_problems("bundled")[:2], None, None, None, None, None, progress=False)
    assert seen["progress"] is False
    cfg = make_config("smoke", arm="projected", v_hack="random", run_dir=str(tmp_path / "r"))
    R.setup_run(cfg, progress=True)
    assert "svd" in capfd.readouterr().err  # the bar this test is about exists
    R.setup_run(dataclasses.replace(cfg, run_dir=str(tmp_path / "r2")), progress=False)
    assert "svd" not in capfd.readouterr().err


def test_none_on_the_cli_clears_only_optional_fields():
    """`--microbatch none` clears the preset's value; `--remat none` is the remat policy "none" (was None:
    KeyError later)."""
    import argparse

    from jaxhack.rl.config import add_config_args, config_from_args
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args(["--preset", "fast", "--remat", "none", "--microbatch", "none"]))
    assert cfg.remat == "none" and cfg.microbatch is None
    assert config_from_args(parser.parse_args(["--preset", "fast"])).remat == "full"
    # the GPU presets sample in the dense form (measured faster at both shapes), the CPU ones as trained
    forms = {preset: config_from_args(parser.parse_args(["--preset", preset])).sampler_form
             for preset in ("smoke", "fast", "full")}
    assert forms == {"smoke": "exact", "fast": "dense", "full": "dense"}
    assert config_from_args(parser.parse_args(["--preset", "fast", "--sampler-form", "exact"])).sampler_form == "exact"


def test_factored_sampler_check_refuses_foreign_bases_and_records_the_residual():
    """sampler_form "factored" samples through U, S, Vh: the run starts only when the adapter's bases
    are the weights' SVD (residual recorded in run.json), refuses foreign bases in one line unless they
    are the benchmark's --svd-random-bases, and leaves LoRA arms exact; a bad form is a config error."""
    import jax
    import jax.numpy as jnp

    from jaxhack.io import UserError
    from jaxhack.models import qwen3
    from jaxhack.models.adapters import init_svd_adapter
    from jaxhack.models.config import TINY
    from jaxhack.models.random_init import random_svd_adapter
    from jaxhack.rl.run import FACTOR_RESIDUAL_LIMIT, factored_sampler_check

    params = qwen3.init_params(TINY, jax.random.PRNGKey(0), jnp.float32)
    cfg = make_config("smoke", sampler_form="factored")
    trainable, frozen = init_svd_adapter(params, TINY, progress=False)
    info = factored_sampler_check(cfg, "svd", params, frozen, trainable)
    assert info["form"] == "factored" and info["factor_residual_max"] < 1e-4
    trainable, frozen = random_svd_adapter(params, jax.random.PRNGKey(1), jnp.float32)
    with pytest.raises(UserError, match=r"not the SVD of the weights .*> 0.02.*--sampler-form exact"):
        factored_sampler_check(cfg, "svd", params, frozen, trainable)
    bench = dataclasses.replace(cfg, svd_random_bases=True)
    assert factored_sampler_check(bench, "svd", params, frozen, trainable)["factor_residual_max"] > FACTOR_RESIDUAL_LIMIT
    assert factored_sampler_check(cfg, "lora", params, None, None)["form"] == "exact"
    assert factored_sampler_check(make_config("smoke"), "svd", params, None, None) == {"form": "exact"}
    with pytest.raises(ConfigError, match="sampler_form 'fused': expected one of"):
        make_config("smoke", sampler_form="fused")


def test_resume_check_reads_a_field_the_run_predates_as_its_default(tmp_path):
    """A run.json written before a config field existed resumes when the new config keeps that field's
    default (sampler_form), and is refused when it changes it."""
    from jaxhack.rl.run import check_resume_config

    new = make_config("smoke").to_dict()
    old = {k: v for k, v in new.items() if k != "sampler_form"}
    check_resume_config(old, new, tmp_path / "run.json")
    with pytest.raises(ValueError, match="sampler_form: None -> 'factored'|sampler_form: 'exact' -> 'factored'") as e:
        check_resume_config(old, {**new, "sampler_form": "factored"}, tmp_path / "run.json")
    assert str(e.value).endswith(f"(to continue the run as it was started, add --config {tmp_path / 'run.json'})")
