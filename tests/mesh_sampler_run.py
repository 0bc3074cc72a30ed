"""Subprocess of tests/test_mesh_sampler.py: the refill sampler on a mesh of 4 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/mesh_sampler_run.py OUT.json

Samples 11 prompts (rows stopping at an EOS and at their caps) with 2 refill slots per device on
mesh data=4, on one device, and with row groups on the mesh; writes the three results (tokens,
lengths, finished, log-probs, decode steps) and the factored form's tokens on the mesh as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from jaxhack.models import qwen3  # noqa: E402
from jaxhack.parallel import mesh as meshlib  # noqa: E402
from jaxhack.rl import sampler  # noqa: E402
from test_sampler import CONFIG, true_svd_adapters  # noqa: E402


def main(out: Path) -> None:
    assert len(jax.devices()) >= 4, jax.devices()
    params = qwen3.init_params(CONFIG, jax.random.PRNGKey(0), jax.numpy.float32)
    params["lm_head"] = params["lm_head"] * 40.0
    adapters = true_svd_adapters(params, jax.random.PRNGKey(5))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n).tolist() for n in rng.integers(1, 70, 11)]
    caps = rng.integers(1, 25, 11).tolist()
    kw = dict(max_new_tokens=24, temperature=1.0, key=jax.random.PRNGKey(3), max_lengths=caps, max_rows=2,
              refill_rows=1, prefill_chunk=32, eos_token_ids=[7])
    from jaxhack.rl import refill
    placed = []  # (device of the weights, default device of new arrays) per device part
    inner = refill.generate_slots

    def recording(params, *args, **kwargs):
        placed.append((str(next(iter(params["embed"].devices()))), str(next(iter(jax.numpy.zeros(1).devices())))))
        return inner(params, *args, **kwargs)

    refill.generate_slots = recording
    mesh = meshlib.make_mesh("data=4")
    p4, a4 = meshlib.tree_to_global((params, adapters), meshlib.replicated(mesh))
    results = {
        "one": sampler.generate(params, CONFIG, prompts, adapters=adapters, **kw),
        "mesh_refill": sampler.generate(p4, CONFIG, prompts, adapters=a4, mesh=mesh, **kw),  # auto: 11 > 2 x 4
        "mesh_groups": sampler.generate(p4, CONFIG, prompts, adapters=a4, mesh=mesh, schedule="groups", **kw),
        "mesh_refill_factored": sampler.generate(p4, CONFIG, prompts, adapters=a4, mesh=mesh, form="factored", **kw),
    }
    out.write_text(json.dumps({name: {"tokens": r.tokens.tolist(), "lengths": r.lengths.tolist(),
                                      "finished": r.finished.tolist(), "logprobs": r.logprobs.tolist(),
                                      "decode_steps": int(r.decode_steps)} for name, r in results.items()}
                              | {"caps": caps, "placed": sorted(placed),
                                 "devices": [str(d) for d in mesh.devices.flat]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
