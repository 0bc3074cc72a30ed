"""jaxhack: measure and suppress the reward-hacking direction in the GRPO gradient of Qwen3."""
__version__ = "0.1.0"
