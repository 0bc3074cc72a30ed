"""Run configs as files (`--config FILE`): the one reader behind every command that takes one
(train / sweep: `rl.config.read_config_file`; phase1 / phase2: `probes.replay_config.read_phase2_config`).

A config file is a run's run.json (its "config" object) or a flat JSON / YAML (.yaml / .yml, through
PyYAML) mapping of the command's fields. A run.json says which command wrote it (`run_json_command`):
Phase 1 / Phase 2 runs carry "phase": 1 / 2, a Phase 3 run a "config" object and no "phase". Giving
a command another command's run.json is an error that names the command it belongs to. Every error
is a ValueError of one line naming the file (and the line, or the field)."""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

# run.json "phase" -> the command that reruns it, and how the messages call it
COMMAND_OF_PHASE = {1: "phase1", 2: "phase2", 3: "train"}
PHASE_NAMES = {"phase1": "Phase 1", "phase2": "Phase 2", "train": "Phase 3", "sweep": "Phase 3"}


def read_mapping(path, flag: str = "--config") -> dict:
    """The JSON / YAML object in `path` (YAML for a .yaml / .yml suffix, JSON otherwise).
    ValueError: no such file, a parse error (with its line), or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{flag} {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"{flag} {path}: {where}invalid YAML ({' '.join(str(problem).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def run_json_command(data: dict) -> str | None:
    """The command whose run.json `data` is ("phase1", "phase2", "train"), or None for a flat
    mapping of fields (not a run.json)."""
    phase = data.get("phase")
    if isinstance(phase, int) and not isinstance(phase, bool) and phase in COMMAND_OF_PHASE:
        return COMMAND_OF_PHASE[phase]
    if isinstance(data.get("config"), dict) and "phase" not in data:
        return "train"
    return None


def config_object(path, data: dict, command: str, flag: str = "--config") -> tuple[dict, bool]:
    """(the fields of `command` in `data`, whether `data` is a run.json): a run.json of `command` gives
    its "config" object, a flat mapping itself. ValueError for a run.json of another command (naming
    the command it belongs to) or one without a "config" object."""
    owner = run_json_command(data)
    if owner is None:
        return data, False
    mine = PHASE_NAMES[command]
    if PHASE_NAMES[owner] != mine:
        rerun = f"rerun it with `jaxhack {owner} --config {path}`"
        raise ValueError(f"{flag} {path}: a {PHASE_NAMES[owner]} run.json (written by `jaxhack {owner}`), "
                         f"not a {mine} one: {rerun}")
    if not isinstance(data.get("config"), dict):
        raise ValueError(f"{flag} {path}: a {mine} run.json without a \"config\" object (written by the "
                         f"demo, the organism or an older jaxhack): it cannot be rerun from its run.json")
    return data["config"], True


def base_type(tp) -> Any:
    """int / float / str / bool / list from a (possibly Optional) resolved annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if len(args) == 1 and type(None) in typing.get_args(tp) else tp
    return typing.get_origin(tp) or tp


def is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _fits(value, tp) -> bool:
    kind = base_type(tp)
    if value is None:
        return is_optional(tp)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        (item,) = typing.get_args(typing.get_args(tp)[0] if is_optional(tp) else tp) or (str,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return isinstance(value, kind)


def type_name(tp) -> str:
    kind = base_type(tp)
    if kind is list:
        inner = typing.get_args(typing.get_args(tp)[0] if is_optional(tp) else tp)
        name = f"a list of {inner[0].__name__}" if inner else "a list"
    else:
        name = kind.__name__
    return name + (" or null" if is_optional(tp) else "")


def checked_fields(path, values: dict, hints: dict, what: str, flag: str = "--config") -> dict:
    """`values` checked against the field types `hints` (name -> resolved annotation): ValueError naming
    the first unknown field(s) or the field of a wrong type; ints of float fields become floats."""
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{flag} {path}: unknown field(s) {unknown} (expected {what} fields)")
    out = {}
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise ValueError(f"{flag} {path}: field {name!r}: expected {type_name(hints[name])}, got {value!r}")
        out[name] = float(value) if base_type(hints[name]) is float and value is not None else value
    return out
