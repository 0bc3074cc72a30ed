"""Compatibility alias: moved to `jaxhack.rl.config`."""
from jaxhack.rl.config import *  # noqa: F401,F403
from jaxhack.rl.config import _base_type  # noqa: F401
