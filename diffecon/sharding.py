"""Data-parallel mesh helpers: one mesh axis ``data``; batches split on it, state replicated.

The same code drives one device, all local devices, or (after ``jax.distributed.initialize()``)
every device of several hosts. Nothing here names a device kind.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "batch_sharding", "data_mesh", "replicated", "shard_batch"]

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis over ``data``; all other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree, mesh: Mesh):
    """Place every leaf of ``tree`` with its leading axis split over ``data``.

    Raises:
      ValueError: if a leaf's leading axis is not divisible by the number of devices.
    """
    n = mesh.shape[DATA_AXIS]

    def put(x):
        if np.ndim(x) == 0 or np.shape(x)[0] % n:
            raise ValueError(
                f"batch leading axis {np.shape(x)[:1]} must be divisible by the {n} devices of "
                "the data mesh"
            )
        return jax.device_put(x, batch_sharding(mesh))

    return jax.tree.map(put, tree)
