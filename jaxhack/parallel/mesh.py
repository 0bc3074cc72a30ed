"""Device meshes for data-parallel Phase 3 (docs/phase3.md, "One GPU, one node of N GPUs, a cluster").

A mesh spec is a string of `axis=size` pairs, e.g. "data=8". Only the `data` axis is implemented:
rollout rows are sharded over it, the frozen base params and the trainable adapter / optimizer state
are replicated on every device (no FSDP yet: a spec naming `fsdp` is refused with a one-line error).
No spec (None / "") means no mesh: the single-device code path, unchanged.

Several hosts: `maybe_initialize_distributed` calls `jax.distributed.initialize` when the usual
environment variables are set (JAX_COORDINATOR_ADDRESS, JAX_PROCESS_COUNT, JAX_PROCESS_ID) or a
coordinator is given; the mesh then spans every process's devices. Host data (prompts, rollouts,
batches) is the same on every process (same seed, same code); `to_global` builds a global array
from it (each process supplies its own devices' shards), `to_host` brings a global array back as
numpy on every process. Files are written by process 0 only (`is_primary`).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data",)  # implemented axes; "fsdp" is recognised and refused
KNOWN_AXES = ("data", "fsdp")
DATA = "data"
ENV_COORDINATOR, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_COUNT", "JAX_PROCESS_ID"


def parse_mesh_spec(spec: str | None) -> dict[str, int] | None:
    """"data=8" -> {"data": 8}; None / "" -> None. ValueError (one line) for a bad spec."""
    if spec is None or not spec.strip():
        return None
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, size = part.strip().partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"mesh {spec!r}: expected axis=size pairs separated by commas, e.g. data=8")
        if name not in KNOWN_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; expected one of {KNOWN_AXES}")
        if name in axes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of axis {name!r} must be an integer, got {size.strip()!r}") from None
        if n < 1:
            raise ValueError(f"mesh {spec!r}: size of axis {name!r} must be >= 1, got {n}")
        axes[name] = n
    if axes.get("fsdp", 1) > 1:
        raise ValueError(f"mesh {spec!r}: the fsdp axis is not implemented yet (params and optimizer state "
                         f"are replicated); use data=N")
    axes.pop("fsdp", None)
    return axes or None


def make_mesh(spec: str | None) -> Mesh | None:
    """The Mesh of a spec over the first prod(sizes) of jax.devices() (all processes' devices); None
    for no spec. ValueError (one line) for a bad spec or more devices than there are."""
    axes = parse_mesh_spec(spec)
    if axes is None:
        return None
    n = int(np.prod(list(axes.values())))
    devices = jax.devices()
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices but only {len(devices)} are visible "
                         f"({devices[0].platform}; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"mesh {spec!r}: with {jax.process_count()} processes the mesh must use all "
                         f"{len(devices)} devices")
    return Mesh(np.asarray(devices[:n]).reshape(tuple(axes.values())), tuple(axes))


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[DATA])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def row_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis (rows) over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def round_rows(n: int, mesh: Mesh | None) -> int:
    """n rounded up to a multiple of the data axis size."""
    d = data_size(mesh)
    return -(-n // d) * d


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array of the host value x (numpy / jax; the same on every process) with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def tree_to_global(tree, sharding: NamedSharding):
    return jax.tree.map(lambda x: to_global(x, sharding), tree)


def to_host(x) -> np.ndarray:
    """numpy value of a (possibly multi-process) jax.Array, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree):
    return jax.tree.map(to_host, tree)


def is_primary() -> bool:
    """True on the process that writes files (process 0; the only process of a single-host run)."""
    return jax.process_index() == 0


def from_primary(tree):
    """Process 0's value of a host pytree on every process (as is with one process): a value computed
    on each host (e.g. an extracted v_hack) may differ in the last bits between hosts."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, tree)))


def barrier(name: str) -> None:
    """Wait for every process (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """jax.distributed.initialize from the arguments, else from JAX_COORDINATOR_ADDRESS /
    JAX_PROCESS_COUNT / JAX_PROCESS_ID; nothing (False) when neither names a coordinator. Idempotent."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if not coordinator:
        return False
    if jax.distributed.is_initialized():
        return True
    count = num_processes if num_processes is not None else os.environ.get(ENV_COUNT)
    pid = process_id if process_id is not None else os.environ.get(ENV_ID)
    if (count is None) != (pid is None):
        raise ValueError(f"multi-host: set both {ENV_COUNT} and {ENV_ID} (or neither, on a cluster JAX detects)")
    kwargs = {} if count is None else {"num_processes": int(count), "process_id": int(pid)}
    jax.distributed.initialize(coordinator_address=coordinator, **kwargs)
    return True
