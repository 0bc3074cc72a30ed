"""The gradients layer (below projection/, probes/ and rl/): padded batches (`batch`), per-sample
losses including the one GRPO loss the trainer optimises (`losses`), and exact per-sample
gradients (`per_sample`). Imports only jaxhack.models."""
