"""Data parallelism over one mesh axis: the mesh, its shardings and global batches.

Parameters and optimiser state are replicated; batches are split along their first axis over
the 1-D ``'data'`` axis of all devices (of all processes). Each process feeds only its own
slice of the global batch (``global_batch``); the jitted step sees one global ``jax.Array``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  # Auto axis types: shardings are given explicitly at jit boundaries, not carried in types.
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimiser state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over ``'data'``; the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str) -> int:
  """Returns the per-process batch; raises naming ``key`` when the split is uneven."""
  n = mesh.devices.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f'{key}={global_batch} must be a positive multiple of the device count ({n})')
  return global_batch // jax.process_count()


def eval_batch_size(global_batch: int, mesh: Mesh, key: str = 'config.data.eval_batch_size') -> int:
  """The global eval batch: ``global_batch`` rounded up to a multiple of the device count.

  Eval batches are padded and masked (pipeline.create_eval_iterator), so a larger batch costs
  only padding, while a batch smaller than the device count could not be split at all.
  """
  n = mesh.devices.size
  if global_batch <= 0:
    raise ValueError(f'{key}={global_batch} must be positive')
  rounded = -(-global_batch // n) * n
  if rounded != global_batch:
    logging.info(
      '%s=%d rounded up to %d, a multiple of the %d devices', key, global_batch, rounded, n
    )
  return rounded


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global ``jax.Array``s sharded along the batch axis.

  Non-numeric entries (image names) stay on the host and are dropped here.

  Args:
    local: this process's slice of the batch, e.g. ``{'low': f32[b, H, W, 3], ...}``.
    mesh: the ``'data'`` mesh; the global batch is ``b * jax.process_count()``.

  Returns:
    The numeric entries as global arrays with ``batch_sharding(mesh)``.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.dtype.kind in 'biuf':
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (host or device arrays) on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
