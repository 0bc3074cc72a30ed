"""Compatibility alias: moved to `jaxhack.grads.per_sample` (the gradients layer)."""
from jaxhack.grads.per_sample import *  # noqa: F401,F403
