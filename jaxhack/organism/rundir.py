"""The organism experiment's output directory: which settings it holds (OUT/experiment.json), and the
rule for running into it again.

The same settings resume (the build, pools and finished Phase 3 runs are reused, a killed run continues
from its checkpoint). Other seeds or arms only add runs, and other `jobs` / `grade_workers` change no
result, so those may differ. Any other difference would silently replace results (the trainer cannot
resume a run of another config), so it is refused unless `force`, which first removes every result of
the old experiment: pools, v_hack, Phase 1/2/3 and the reports. The organism builds (OUT/organism/<hash>,
keyed by their settings) and the compilation cache stay.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from jaxhack.io import UserError

MANIFEST = "experiment.json"
FREE_FIELDS = ("jobs", "grade_workers", "seeds", "arms")   # differences that lose no result
KEPT = ("organism", "jax_cache", MANIFEST)                 # what `force` leaves in place


class ExperimentDirError(UserError):
    """OUT holds an organism experiment with other settings (one line: the fields that differ); the CLI
    prints it as its `error:` line, exit 2 (jaxhack.commands.guarded)."""


def _settings_dict(settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples as lists, as stored


def settings_diff(old: dict, new: dict) -> dict:
    """{field: (old, new)} of the settings that differ outside FREE_FIELDS; the build's fields as
    build.FIELD."""
    diff = {}
    for key in sorted(set(old) | set(new)):
        if key in FREE_FIELDS or old.get(key) == new.get(key):
            continue
        if key == "build" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            diff.update({f"build.{k}": v for k, v in settings_diff(old[key], new[key]).items()})
        else:
            diff[key] = (old.get(key), new.get(key))
    return diff


def claim_experiment_dir(out: Path, settings, force: bool = False) -> None:
    """Record `settings` in OUT/experiment.json, after checking that OUT holds no experiment of other
    settings (ExperimentDirError), or, with `force`, removing that experiment's results."""
    out = Path(out)
    path = out / MANIFEST
    new = _settings_dict(settings)
    if path.is_file():
        try:
            old = json.loads(path.read_text())["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ExperimentDirError(f"{path}: not an organism experiment record ({err}); use another --out "
                                     "or pass --force to replace it") from None
        diff = settings_diff(old, new)
        if diff and not force:
            said = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise ExperimentDirError(
                f"{out} holds an organism experiment with other settings ({said}{more}); rerun with its "
                f"settings to resume it, use another --out, or pass --force to replace its results")
        if diff:
            for entry in out.iterdir():
                if entry.name in KEPT:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": new}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
