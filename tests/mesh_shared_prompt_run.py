"""Subprocess of tests/test_mesh_shared_prompt.py: the shared-prompt learner on a mesh of 4 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/mesh_shared_prompt_run.py OUT.json

The trainer's reference pass and jitted update (rl/learner) on test_shared_prompt's grouped batch
(3 groups of 3 rows + 2 padding rows, tiny fp32 model): rows layout on one device, shared-prompt
layout on mesh data=4 (whole groups per device, empty groups fill the fourth), rows layout on the
mesh. Writes each one's reference log-probs, new adapter leaves and metrics as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from jaxhack.models.adapters import init_svd_adapter  # noqa: E402
from jaxhack.parallel import mesh as meshlib  # noqa: E402
from jaxhack.projection.arms import ARMS  # noqa: E402
from jaxhack.projection.v_hack import random_v_hack  # noqa: E402
from jaxhack.rl import learner  # noqa: E402
from jaxhack.rl.config import make_config  # noqa: E402
from helpers import random_params  # noqa: E402
from test_shared_prompt import CONFIG, G, grouped_batch  # noqa: E402


def main(out: Path) -> None:
    assert len(jax.devices()) >= 4, jax.devices()
    params = random_params(CONFIG, seed=3)
    trainable, frozen = init_svd_adapter(params, CONFIG, progress=False)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    batch = grouped_batch(pad_rows=2)
    n = len(batch["tokens"])
    rng = np.random.default_rng(2)
    batch.update(advantage=rng.standard_normal(n).astype(np.float32),
                 old_logp=np.zeros(batch["tokens"].shape, np.float32), use_current=np.ones(n, bool))
    v_hack = random_v_hack({name: a["delta_s"].shape for name, a in trainable.items()}, seed=0, k=1)
    results = {"completion_mask": np.asarray(batch["completion_mask"]).tolist(),
               "old": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(trainable)]}
    for name, layout, spec in (("rows_one", "rows", None), ("shared_mesh", "shared_prompt", "data=4"),
                               ("rows_mesh", "rows", "data=4")):
        cfg = make_config("smoke", group_size=G, prompts_per_step=3, microbatch=3, microbatch_tokens=48,
                          length_multiple=8, update_layout=layout, mesh=spec)
        mesh = meshlib.make_mesh(spec)
        # fresh buffers from host copies: the mesh update donates its trainable and optimizer state
        put = (lambda t: t) if mesh is None else (
            lambda t: jax.device_put(jax.tree.map(np.asarray, t), meshlib.replicated(mesh)))
        ref = learner.reference_logp(params, CONFIG, batch, cfg, mesh=mesh)
        optimizer, update = learner.cached_update_fn(cfg, v_hack, ARMS[cfg.arm].projection, CONFIG, mesh=mesh)
        new, _, metrics = update(put(trainable), put(optimizer.init(trainable)), put(frozen), put(params),
                                 dict(batch, ref_logp=ref))
        results[name] = {"ref": np.asarray(ref).tolist(),
                         "new": [np.asarray(meshlib.to_host(x)).ravel().tolist() for x in jax.tree.leaves(new)],
                         "loss": float(metrics["loss"]), "n_tokens": float(metrics["n_tokens"])}
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
