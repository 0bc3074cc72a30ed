"""Compatibility alias: moved to `jaxhack.grads.losses` (the gradients layer)."""
from jaxhack.grads.losses import *  # noqa: F401,F403
