"""Data parallelism with `jax.make_mesh` and `NamedSharding`: batch sharded, state replicated."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when the coordinator is configured in the environment.

  Set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster
  that jax.distributed auto-detects, e.g. SLURM) before `train.py`.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and jax.process_count() == 1:
    jax.distributed.initialize()


def make_mesh() -> jax.sharding.Mesh:
  # Auto axes: XLA propagates the batch sharding through the models (no per-op annotations).
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"config.data.batch_size={batch_size} must be divisible by the {n} devices")


def put_batch(batch: dict, mesh) -> dict:
  """Places a host batch (this process's share) as a global array sharded over the batch axis."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
