"""Data parallelism over every local device, and over hosts.

With one device nothing changes. With several (GPUs of one machine, or all
devices of all processes after `jax.distributed.initialize`), the training
step runs on a 1-D mesh named "data": each batch is split along its first
axis, the parameters, optimizer and batch-norm state and the image set are
replicated. The step itself is the same program: batch norm's statistics are
means over the vmapped batch axis, which XLA computes across the shards, so
they are the statistics of the global batch and a multi-device run follows
the one-device trajectory (up to floating-point reduction order).

Every process draws the same global batch (a pure function of seed and step,
and cheap) and hands its devices their rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import EiclError, first_line

AXIS = "data"


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None, auto: bool = False) -> None:
    """Join a multi-host run before JAX touches a device. `auto` lets JAX read
    the cluster from the environment (SLURM, Open MPI, Cloud TPU)."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise EiclError("multi-host training needs --coordinator HOST:PORT, --num-processes N "
                        "and --process-id I together (or --distributed to read them from "
                        "the cluster environment)")
    if all(given):
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EiclError(f"--coordinator {coordinator!r} must be HOST:PORT, the address of "
                            "process 0 and a free port on it (e.g. node001:12345)")
        if num_processes < 1:
            raise EiclError(f"--num-processes {num_processes} must be at least 1")
        if not 0 <= process_id < num_processes:
            raise EiclError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
        _join(f"at {coordinator}", coordinator_address=coordinator,
              num_processes=num_processes, process_id=process_id)
    elif auto:
        _join("from the cluster environment (--distributed; outside SLURM, Open MPI or a "
              "TPU pod give --coordinator, --num-processes and --process-id)")


def _join(where: str, **kwargs: Any) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # JaxRuntimeError is a RuntimeError
        raise EiclError(f"could not join the multi-host run {where}: {first_line(e)}") from None


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Only process 0 writes run files; every process computes."""
    return jax.process_index() == 0


@dataclass(frozen=True)
class Placement:
    """Where the training step's arrays live: one device, or a data mesh."""

    mesh: Mesh | None

    @staticmethod
    def for_batch(batch_size: int, devices: list | None = None) -> "Placement":
        devices = list(devices if devices is not None else jax.devices())
        if len(devices) == 1:
            return Placement(None)
        if batch_size % len(devices):
            raise EiclError(f"train.batch_size = {batch_size} must be divisible by the "
                            f"{len(devices)} devices it is split over")
        return Placement(Mesh(np.asarray(devices), (AXIS,)))

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of `tree` on all devices (as is with one device)."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree_util.tree_map(
            lambda x: _put(x, sharding) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)

    def batch(self, arrays: dict[str, np.ndarray], *,
              steps_first: bool = False) -> dict[str, jax.Array]:
        """The global batch's host arrays -> device arrays split along the
        batch axis: axis 0, or axis 1 when `steps_first` (several steps'
        batches stacked on a leading axis, for FlatStep.steps)."""
        if self.mesh is None:
            return {k: jax.device_put(np.asarray(v)) for k, v in arrays.items()}
        spec = PartitionSpec(None, AXIS) if steps_first else PartitionSpec(AXIS)
        sharding = NamedSharding(self.mesh, spec)
        return {k: _put(np.asarray(v), sharding) for k, v in arrays.items()}


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Typed PRNG keys have no NumPy form: place their bits, then rewrap.
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    # Each process holds the whole (identical) global array and passes its rows.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
