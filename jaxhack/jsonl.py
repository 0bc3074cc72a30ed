"""Compatibility alias: jsonl reading lives in `jaxhack.io` (kept so existing imports work)."""
from jaxhack.io import iter_jsonl  # noqa: F401
