"""Compatibility alias: atomic writes live in `jaxhack.io` (kept so existing imports work)."""
from jaxhack.io import atomic_directory, atomic_write_bytes, atomic_write_text  # noqa: F401
