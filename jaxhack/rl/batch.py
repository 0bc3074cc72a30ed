"""Compatibility alias: moved to `jaxhack.grads.batch` (the gradients layer)."""
from jaxhack.grads.batch import *  # noqa: F401,F403
