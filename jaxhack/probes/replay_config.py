"""The probes' run config: every input of a Phase 2 (or Phase 1) run recorded in its run.json, so that
`jaxhack phase2 --config RUN/run.json --out NEW` (phase1 alike) reruns it exactly (docs/analysis.md, "Run configs").
The file reading, the run.json kinds and the type checks are `jaxhack.configfile`'s (shared with
`jaxhack train --config`).

run.json keys written from here (`run_config`):

    config        every input, one flat object with the flags' names: replay_dirs (a list), v_hack,
                  ckpt, tokenizer, allow_partial, then every ReplaySettings field (arm, loss_mode,
                  steps, per_pool, lr, seed, gate, overshoot, max_completion_tokens, max_prompt_tokens,
                  pad_multiple, remat, chunk, attention) with the model-sized defaults filled in; paths
                  as given.
    config_paths  the path fields of `config` resolved absolute when the run started: replay_dirs,
                  v_hack, ckpt (a checkpoint's directory; the embedded "tiny" / "random-4b" as is),
                  tokenizer (null / "byte" as is).
    input_digests sha256 of the replay pool directories' and the v_hack's files (`content_digest`): a
                  rerun from this run.json warns when one changed since (it cannot reproduce the run).

A config file is such a run.json or a flat JSON / YAML mapping of `config` fields (any subset; the
rest take the command's defaults). Reading a run.json, each path is the given one when it still
resolves to the recorded absolute path, else the recorded absolute path, else the given one (e.g.
relative to a new working directory); none existing is an error naming the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path

from jaxhack import configfile
from jaxhack.checkpoint import checkpoint_dir
from jaxhack.models.load import EMBEDDED
from jaxhack.models.qwen3 import REMAT_POLICIES
from jaxhack.probes.phase2 import ARMS, LOSS_MODES, ReplaySettings
from jaxhack.projection.optax_projection import GATES

# the inputs beside ReplaySettings: name -> type (the run.json "config" object's first fields)
INPUT_FIELDS = {"replay_dirs": list[str], "v_hack": str, "ckpt": str, "tokenizer": typing.Optional[str],
                "allow_partial": bool}
PATH_FIELDS = ("replay_dirs", "v_hack", "ckpt", "tokenizer")
SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(ReplaySettings))
CHOICES = {"arm": tuple(sorted(ARMS)), "loss_mode": LOSS_MODES, "gate": GATES, "remat": tuple(REMAT_POLICIES),
           "attention": ("causal", "masked")}


def config_fields() -> dict:
    """name -> type of every field of a Phase 2 config."""
    return {**INPUT_FIELDS, **typing.get_type_hints(ReplaySettings)}


def _resolve(field: str, value):
    """The absolute form of one path value (None / "byte" / an embedded model name as they are)."""
    if value is None or (field == "tokenizer" and value == "byte") or (field == "ckpt" and value in EMBEDDED):
        return value
    if field == "ckpt":
        return str(checkpoint_dir(value).resolve())
    return str(Path(value).resolve())


def resolved_paths(values: dict) -> dict:
    """The run.json "config_paths" object of the inputs `values`."""
    return {f: ([_resolve(f, d) for d in values[f]] if f == "replay_dirs" else _resolve(f, values[f]))
            for f in PATH_FIELDS if f in values}


def content_digest(path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative path and bytes, in path order;
    names starting with "." skipped: temporary files)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" if f != root else b"")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def input_digests(values: dict) -> dict:
    """The run.json "input_digests" object: the pools' and the v_hack's content digests."""
    return {"replay_dirs": [content_digest(d) for d in values["replay_dirs"]],
            "v_hack": content_digest(values["v_hack"])}


def run_config(inputs: dict, settings: ReplaySettings) -> dict:
    """The run.json keys "config" (inputs + every ReplaySettings field), "config_paths" and
    "input_digests"."""
    config = {**{f: inputs.get(f) for f in INPUT_FIELDS}, **dataclasses.asdict(settings)}
    config["replay_dirs"] = [str(d) for d in config["replay_dirs"]]
    config["v_hack"] = str(config["v_hack"])
    return {"config": config, "config_paths": resolved_paths(config), "input_digests": input_digests(config)}


def _exists(field: str, value) -> bool:
    if field == "ckpt":
        return value in EMBEDDED or checkpoint_dir(value).is_dir()
    if field == "tokenizer":
        return value == "byte" or Path(value).is_dir()
    return Path(value).is_dir() if field == "replay_dirs" else Path(value).exists()


def _pick(path, field: str, given, recorded):
    """The path to use for one recorded input (see the module docstring); ValueError if none exists."""
    if given is None:
        return None
    if recorded is not None and _exists(field, given) and _resolve(field, given) == recorded:
        return given
    if recorded is not None and _exists(field, recorded):
        return recorded
    if _exists(field, given):
        return given
    what = {"replay_dirs": "replay pool directory", "v_hack": "v_hack", "ckpt": "checkpoint",
            "tokenizer": "tokenizer directory"}[field]
    also = f" (recorded as {recorded})" if recorded not in (None, given) else ""
    raise ValueError(f"--config {path}: {field}: {what} {given}{also} no longer exists")


def read_phase2_config(path, overridden: set[str] = frozenset(), command: str = "phase2"
                       ) -> tuple[dict, list[str]]:
    """(the config fields in `path`, warnings): `path` is a run.json of `command` (phase2, or phase1:
    the same fields, one pool) or a flat JSON / YAML mapping; the path fields are checked to exist
    (those in `overridden`, replaced by flags, are not), and a run.json's pools and v_hack are compared
    with its "input_digests" (a warning for each one that changed). ValueError (one line naming the
    file, and the line or field): see `jaxhack.configfile`."""
    data = configfile.read_mapping(path)
    fields, is_run = configfile.config_object(path, data, command)
    fields = dict(fields)
    if isinstance(fields.get("replay_dirs"), str):  # a hand-written "A,B" as on the command line
        fields["replay_dirs"] = [d for d in fields["replay_dirs"].split(",") if d]
    values = configfile.checked_fields(path, fields, config_fields(), f"{configfile.PHASE_NAMES[command]} config")
    for field, allowed in CHOICES.items():
        if field in values and values[field] not in allowed:
            raise ValueError(f"--config {path}: field {field!r}: expected one of {list(allowed)}, "
                             f"got {values[field]!r}")
    recorded = _mapping(data.get("config_paths")) if is_run else {}
    for field in PATH_FIELDS:
        if field not in values or field in overridden:
            continue
        if field == "replay_dirs":
            values[field] = [_pick(path, field, d, r) for d, r in zip(values[field], _items(recorded, field, values))]
        else:
            values[field] = _pick(path, field, values[field], recorded.get(field))
    digests = _mapping(data.get("input_digests")) if is_run else {}
    warnings = []
    for field in ("replay_dirs", "v_hack"):
        if field in values and field not in overridden and digests.get(field) is not None:
            pairs = (zip(values[field], _items(digests, field, values)) if field == "replay_dirs"
                     else [(values[field], digests[field])])
            warnings += [f"warning: --config {path}: {field} {p} changed since the run (content digest "
                         f"differs): the rerun will not reproduce it"
                         for p, d in pairs if d is not None and content_digest(p) != d]
    return values, warnings


def _mapping(x) -> dict:
    return x if isinstance(x, dict) else {}


def _items(recorded: dict, field: str, values: dict) -> list:
    """The recorded list of `field` if it has one entry per value, else Nones."""
    rec = recorded.get(field)
    return rec if isinstance(rec, list) and len(rec) == len(values[field]) else [None] * len(values[field])
