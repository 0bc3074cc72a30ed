"""Phase 3 training settings (`TrainConfig`, validated on construction) and the presets smoke / fast /
full (docs/phase3.md). The arms are those of the one arms table, `jaxhack.projection.arms`.

A preset is a set of overrides of the `TrainConfig` defaults; a `--config` file (a run's run.json, or
JSON / YAML fields) overrides the preset, and CLI flags given explicitly override both
(`add_config_args` makes one flag per field, `config_from_args` applies preset, file, then flags).

Seed (../shared/seed/spec2.md, "Phase 3"): "3 seeds x 3 arms x 200 steps x full preset (Qwen3-4B,
G=6, pp=43, n_problems=992, beta=1e-3, lr=7e-5)". max_new=1536 for `full` is this project's choice
(the seed does not name it); everything else not named by the seed is a default of this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from jaxhack import configfile
from jaxhack.env.hints import MODES
from jaxhack.models.qwen3 import REMAT_POLICIES
from jaxhack.parallel.mesh import parse_mesh_spec
from jaxhack.projection.arms import ARM_NAMES, ARMS  # noqa: F401  (re-exported)
from jaxhack.rl.sampler import SAMPLER_FORMS

OLD_LOGP_SOURCES = ("current", "sampler")
UPDATE_LAYOUTS = ("rows", "shared_prompt")  # learner row layouts (TrainConfig.update_layout)


PARAM_DTYPES = ("float32", "bfloat16")  # what `dtype` may cast the parameters to (models.load.load_model)


class ConfigError(ValueError):
    """An invalid TrainConfig: `errors` holds one line per broken rule, in the order they are checked;
    a line about one field starts with the field's name (the CLI writes it as the flag, `flag_name`)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid training config:\n  " + "\n  ".join(self.errors))


def flag_name(field: str) -> str:
    """The CLI flag of a TrainConfig field: group_size -> --group-size."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # ---- model / data
    preset: str = "smoke"
    ckpt: str = "tiny"                 # "tiny" | "random-4b" | checkpoint NAME or DIR
    tokenizer: str | None = None       # override: "byte" or a local HF tokenizer dir
    dtype: str | None = None           # cast params (e.g. "bfloat16"); None keeps the stored dtype
    problems: str = "bundled"          # problems jsonl or "bundled"
    n_problems: int | None = None      # cap on training problems (after the held-out split)
    eval_problems: str | None = None   # separate eval problems jsonl; None: hold out n_eval problems
    n_eval: int = 3                    # held-out problems (when eval_problems is None)
    split_seed: int = 1234             # fixed across seeds/arms: the same train/eval split everywhere
    mode: str = "run_tests"            # loophole mode of the grader
    hint: bool = True                  # put the mode's hint in the prompt
    # ---- arm / v_hack
    arm: str = "vanilla"
    v_hack: str | None = None          # precomputed v_hack dir/.safetensors, or "random" (benchmark)
    k: int = 1                         # v_hack rows per module
    gate: str = "one_sided"
    overshoot: float = 1.0
    placement: str = "gradient"        # "gradient": clip -> projection -> adamw; "update": clip -> adamw -> projection
    vhack_pairs: int | None = 64       # max template pairs for extraction at start
    vhack_batch: int = 4               # pairs per per-sample-gradient chunk
    vhack_max_len: int | None = None   # cut pair sequences to this many tokens
    control_seed: int = 0              # seed of the random_v / shuffled controls
    vhack_axis_threshold: float | None = None        # extraction: drop rows with S_j < a * S_0 (v_hack.py)
    vhack_noise_floor_quantile: float | None = None  # extraction: global noise floor (blog: 0.25)
    vhack_refresh_every: int | None = None  # re-extract v_hack every N steps from the run's own rollouts
    vhack_refresh_min_overlap: float = 0.5  # refresh guard: keep the old v_hack when the basis overlap is lower
    lora_rank: int = 8
    lora_alpha: float = 16.0
    svd_random_bases: bool = False     # BENCHMARK ONLY: random orthonormal u/vh instead of the SVD
    # ---- RL
    seed: int = 0
    steps: int = 4
    group_size: int = 4                # G rollouts per prompt
    prompts_per_step: int = 2          # pp
    max_new: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 1e-3                 # K3 KL weight
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    old_logp: str = "current"          # "current": stop_gradient(logp) (ratio == 1); "sampler"
    mix_teacher: str | None = None     # teacher pool dir, or "templates" (env template hacks, no pool)
    mix_per_group: int = 0             # K of the G rollouts replaced by teacher completions
    format_reward: float = 0.5
    pass_reward: float = 3.0
    # ---- optimizer
    lr: float = 1e-3
    warmup_steps: int = 1
    min_lr_ratio: float = 0.0          # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # ---- compute
    microbatch: int | None = None      # rows per gradient / reference micro-batch (None: whole batch)
    length_multiple: int = 512         # micro-batches: rows sorted by length, each cut to its longest row
                                       # rounded up to this (grads.microbatch); fewer compiled shapes
    microbatch_tokens: int | None = None  # token budget of a micro-batch: at T positions at most this // T
                                          # rows (and at most `microbatch`); None: `microbatch` rows always
    sample_rows: int | None = None     # rows the sampler decodes together (refill slots when fewer than the rows; None: all)
    prefill_chunk: int = 256           # prompt tokens per sampler prefill forward
    sampler_form: str = "exact"        # "exact": sample through x W + the adapter, as trained; "factored":
                                       # SVD-adapted Linears from their factors (fewer bytes per decode step,
                                       # bf16-rounding-level logit changes); "dense": x W + x dW, the adapter's
                                       # change as a dense weight (rl/sampler.generate, docs/sampler.md)
    lend_weights: bool = True          # the sampler frees the stacked weights while it samples from its decode
                                       # layout and rebuilds them bit for bit (one copy: ~17 GB more KV cache
                                       # at Qwen3-4B; rl/lend.py); changes no value
    update_layout: str = "rows"        # the reference pass and the update: "rows" ([prompt; completion] per
                                       # row) or "shared_prompt" (a group's prompt once; grads/shared_prompt.py)
    remat: str = "none"
    logp_chunk: int = 256
    prompt_multiple: int = 64
    sandbox_wall_s: float = 10.0
    grade_workers: int | None = None
    mesh: str | None = None            # device mesh, e.g. "data=8" (jaxhack.parallel.mesh); None: one device
    # ---- eval / checkpoints / output
    eval_every: int = 2                # 0: never
    eval_samples: int = 1              # completions per held-out problem
    eval_temperature: float = 0.0      # 0: greedy
    eval_max_new: int | None = None    # None: max_new
    ckpt_every: int = 2
    keep_ckpts: int = 2
    save_rollouts: bool = True
    run_dir: str = "out/phase3/run"

    def __post_init__(self):
        """Validation: an invalid TrainConfig cannot exist (ValueError naming every bad field)."""
        errors = []
        if self.arm not in ARM_NAMES:
            errors.append(f"arm {self.arm!r}: expected one of {ARM_NAMES}")
        if self.mode not in MODES:
            errors.append(f"mode {self.mode!r}: expected one of {MODES}")
        if self.old_logp not in OLD_LOGP_SOURCES:
            errors.append(f"old_logp {self.old_logp!r}: expected one of {OLD_LOGP_SOURCES}")
        if self.placement not in ("gradient", "update"):
            errors.append(f"placement {self.placement!r}: expected gradient or update")
        for name in ("steps", "prompts_per_step", "max_new", "k", "keep_ckpts",
                     "eval_samples", "vhack_batch", "lora_rank"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:  # before the mix rule, which a too-small group also breaks
            errors.append(f"group_size must be >= 2, got {self.group_size}: GRPO advantages are centred within a "
                          f"group, so one rollout per prompt always has advantage 0")
        if not 0 <= self.mix_per_group < self.group_size:
            errors.append(f"mix_per_group must be in [0, group_size), got {self.mix_per_group} "
                          f"(group_size {self.group_size}): at least one rollout must be sampled")
        if self.mix_per_group > 0 and not self.mix_teacher:
            errors.append("mix_per_group > 0 needs mix_teacher (a teacher pool dir, or \"templates\")")
        if self.lr < 0 or self.beta < 0 or self.warmup_steps < 0:
            errors.append("lr, beta and warmup_steps must be >= 0")
        if self.ckpt_every < 0 or self.eval_every < 0:
            errors.append("ckpt_every and eval_every must be >= 0")
        if self.vhack_refresh_every is not None and self.vhack_refresh_every < 0:
            errors.append(f"vhack_refresh_every must be >= 0, got {self.vhack_refresh_every}")
        if self.microbatch is not None and self.microbatch < 1:
            errors.append(f"microbatch must be >= 1, got {self.microbatch}")
        if self.microbatch_tokens is not None and (self.microbatch_tokens < 1 or self.microbatch is None):
            errors.append(f"microbatch_tokens must be >= 1 and needs microbatch, got {self.microbatch_tokens} "
                          f"(microbatch {self.microbatch})")
        if self.remat not in REMAT_POLICIES:
            errors.append(f"remat {self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.sample_rows is not None and self.sample_rows < 1:
            errors.append(f"sample_rows must be >= 1, got {self.sample_rows}")
        if self.length_multiple < 1:
            errors.append(f"length_multiple must be >= 1, got {self.length_multiple}")
        if self.sampler_form not in SAMPLER_FORMS:
            errors.append(f"sampler_form {self.sampler_form!r}: expected one of {SAMPLER_FORMS}")
        if self.update_layout not in UPDATE_LAYOUTS:
            errors.append(f"update_layout {self.update_layout!r}: expected one of {UPDATE_LAYOUTS}")
        if self.prefill_chunk < 1:
            errors.append(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.dtype is not None and self.dtype not in PARAM_DTYPES:
            errors.append(f"dtype {self.dtype!r}: expected one of {PARAM_DTYPES}")
        try:
            parse_mesh_spec(self.mesh)
        except ValueError as err:
            errors.append(str(err))
        if errors:
            raise ConfigError(errors)

    def check(self) -> "TrainConfig":
        """Kept for callers of the old API: validation runs in __post_init__."""
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that may differ between a run and its resumption (they do not change the trajectory).
# sample_rows and prefill_chunk: how many rows decode at once and the prefill's chunk; every row draws
# with its own key (tests/test_sampler.py: row groups, refill and prefill chunks give the same tokens).
RESUME_FREE_FIELDS = ("run_dir", "grade_workers", "eval_every", "save_rollouts", "keep_ckpts",
                      "ckpt_every", "sandbox_wall_s", "mesh", "update_layout", "lend_weights", "sample_rows",
                      "prefill_chunk")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, seconds: config.TINY random model, bundled problems.
    # One template-hack teacher row per group (no pool on disk) gives the groups different rewards,
    # so the random tiny model's smoke steps have non-zero advantages; max_new fits the ~200-byte hacks.
    "smoke": dict(ckpt="tiny", problems="bundled", group_size=4, prompts_per_step=2, steps=4,
                  max_new=256, mix_teacher="templates", mix_per_group=1, lr=1e-3, warmup_steps=0, eval_every=2, ckpt_every=2, n_eval=3,
                  vhack_pairs=8),
    # The organism experiment's Phase 3 (jaxhack/organism/experiment.py `phase3_config` fills the organism's
    # checkpoint, problems, v_hack and its size's GRPO settings): the policy's own rollouts only, hinted
    # run_tests prompts, held-out eval sampled at temperature 1, one checkpoint kept.
    "organism": dict(mode="run_tests", hint=True, eval_samples=2, eval_temperature=1.0, keep_ckpts=1,
                     save_rollouts=True, prompt_multiple=16),
    # One GPU, minutes: Qwen3-4B, 20 steps. sampler_form "dense": its sampler (48 rows together, 512 new
    # tokens, realistic lengths) 2.88 -> 2.23 s in one call, peak 36.1 -> 32.8 GB (H200, session 17).
    "fast": dict(ckpt="qwen3-4b", group_size=6, prompts_per_step=8, steps=20, max_new=512,
                 lr=7e-5, beta=1e-3, warmup_steps=2, eval_every=10, ckpt_every=10, n_eval=4,
                 microbatch=8, remat="full", vhack_pairs=64, sandbox_wall_s=10.0, sampler_form="dense"),
    # The seed's Phase 3 run (spec2.md): ~7 h per run on one 96 GB GPU. sample_rows=152: the 258 rollouts
    # decode through 152 refill slots (continuous batching, rl/refill.py), which fits an 80 GB H100 because
    # the sampler holds one copy of the weights (lend_weights, rl/lend.py): realistic step 39.6 s (96 slots,
    # two copies) -> 37.5 s, peak 68.3 GB both (H200 capped at 80 GB, session 12; docs/benchmarks.md);
    # 34.4 s, 64.9 GB with one prefill per refill's distinct prompt (session 13); 34.3 s, 61.7 GB with the
    # prompt pool (slots of 1536 positions, 34.4 GB, and 64 prompts of 512, 4.8 GB; session 14); 33.3 s with
    # the shared-prompt attention's gathers differentiated as gathers (update 13.3 -> 11.9 s, session 15). The reference pass and update: micro-batches of 12288 tokens (24 rows of 512 ... 6 of
    # 2048), remat "linear" (no matmul recomputed): update 26.9 -> 20.6 s, learner
    # peak 62.9 GB (session 7); lengths cut to multiples of 128 (not 512): 15% fewer padded tokens at the
    # realistic lengths, at most 16 compiled shapes per program (session 8). --sampler-form factored: 33.7 s
    # per realistic step, not the default: it samples from the bf16 factors (docs/sampler.md). With
    # lend_weights False (two copies) make_config falls back to FULL_SAMPLE_ROWS_TWO_COPIES slots.
    # update_layout "shared_prompt" (each group's prompt once in the learner; the same values up to the
    # float summation order): reference pass + update 21.4 -> 15.6 s realistic, 43.4 -> 39.3 s worst case
    # (session 11). On a mesh each device takes whole groups, and sample_rows slots. sampler_form "dense"
    # (x W + x dW, the adapter's change built once per sampler call): realistic sampler 18.7 -> 15.4 s in one
    # call, step 29.6 s, peak 65.7 GB (dW's 7.3 GB on top of one copy of the weights); its log-probs are as
    # close to the learner's as the exact form's (mean |gap| 0.0183 against 0.0178, KL estimate per token
    # 1.8e-4 against 1.1e-4, 36 layers, bf16; session 16, docs/sampler.md "Dense form").
    "full": dict(ckpt="qwen3-4b", group_size=6, prompts_per_step=43, n_problems=992, beta=1e-3,
                 lr=7e-5, steps=200, max_new=1536, warmup_steps=10, eval_every=20, ckpt_every=10,
                 n_eval=64, microbatch=32, microbatch_tokens=12288, length_multiple=128, remat="linear", vhack_pairs=128,
                 sandbox_wall_s=10.0, sample_rows=152, update_layout="shared_prompt", sampler_form="dense"),
}


FULL_SAMPLE_ROWS_TWO_COPIES = 96  # the `full` preset's slots when the sampler keeps both copies (lend_weights False)


def make_config(preset: str = "smoke", **overrides) -> TrainConfig:
    """TrainConfig defaults <- PRESETS[preset] <- overrides (None values are ignored). The `full` preset
    with lend_weights False and no sample_rows given samples through FULL_SAMPLE_ROWS_TWO_COPIES slots."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown training config field(s) {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**PRESETS[preset], **given}
    if preset == "full" and values.get("lend_weights") is False and "sample_rows" not in given:
        # the preset's 152 slots fit an 80 GB card only with one copy of the weights; with two, 96 do
        values["sample_rows"] = FULL_SAMPLE_ROWS_TWO_COPIES
    return TrainConfig(preset=preset, **values)


# ---------------------------------------------------------------- CLI

def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _ExplicitNone:
    """`--flag none` on the CLI: set the field to None (a plain None means "not given")."""

    def __repr__(self):
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _optional(kind):
    def parse(text: str):
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--config, --preset plus one flag per TrainConfig field (--group-size, --lr, ...); all default to
    None (= the config file's value, else the preset's). Booleans: bare flag = true, or an explicit
    true/false. Optional fields take "none" to clear the preset's value (e.g. --microbatch none)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run's run.json (its config) or a JSON / YAML file of these fields: the run's "
                             "settings, over the preset; flags given explicitly override the file")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="(default: the --config file's preset, else smoke)")
    hints = typing.get_type_hints(TrainConfig)  # resolves the string annotations
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset" or f.name in skip:
            continue
        kind = configfile.base_type(hints[f.name])
        flag = flag_name(f.name)
        default = f.default
        help_text = f"(default: preset value, else {default!r})"
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                                help=help_text + "; the bare flag means true")
        else:  # only Optional fields take "none" (= None); e.g. --remat none is the string "none"
            nullable = type(None) in typing.get_args(hints[f.name])
            parser.add_argument(flag, type=_optional(kind) if nullable else kind, default=None, help=help_text)


def read_config_file(path, fields: set[str] | None = None) -> dict[str, Any]:
    """TrainConfig values from a file (`jaxhack.configfile`, the one reader): a Phase 3 run.json (its
    "config" object) or a flat JSON / YAML mapping of field names; a Phase 1 / 2 run.json is refused,
    naming its command. Fields outside `fields` (e.g. arm / seed / run_dir for the sweep, which sets
    them) are dropped. ValueError naming the file and field for unknown fields or wrong value types."""
    data = configfile.read_mapping(path)
    data, _ = configfile.config_object(path, data, "train")
    values = configfile.checked_fields(path, data, typing.get_type_hints(TrainConfig), "TrainConfig")
    return {n: v for n, v in values.items() if fields is None or n in fields or n == "preset"}


def config_from_args(args: argparse.Namespace, **extra) -> TrainConfig:
    """TrainConfig defaults <- preset <- the --config file <- flags given explicitly (<- extra)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    given.update({n: v for n, v in extra.items() if v is not None})
    from_file = {}
    if getattr(args, "config", None):
        from_file = read_config_file(args.config, {n for n in names if hasattr(args, n)} | set(extra))
    preset = getattr(args, "preset", None) or from_file.pop("preset", None) or "smoke"
    from_file.pop("preset", None)
    values = {**from_file, **given}
    cleared = [n for n, v in values.items() if v is None or v is EXPLICIT_NONE]
    cfg = make_config(preset, **{n: v for n, v in values.items() if n not in cleared})
    return dataclasses.replace(cfg, **{n: None for n in cleared}) if cleared else cfg
