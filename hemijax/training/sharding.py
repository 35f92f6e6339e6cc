"""Data parallelism with `jax.make_mesh` and `NamedSharding`: batch sharded, state replicated.

Several processes (hosts, or processes on one host) join one run through `jax.distributed`:
`initialize_distributed` must run before anything touches a JAX backend. Each process then feeds
the rows of the global batch its own devices hold (`BatchShares`); XLA all-reduces the gradients
(NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hemijax.training import TrainingError

DATA_AXIS = "data"
# jax.distributed's own deadline comes this much after ours, so ours (one line) is what fires.
_JAX_DEADLINE_GRACE_S = 30


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300) -> None:
  """Joins a multi-process run, or does nothing for a one-process run (or if already joined).

  Each setting comes from its argument, else from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; under SLURM (srun) or Open MPI (mpirun) with more than one task, jax.distributed
  reads the missing ones from the launcher. Bad settings raise a one-line ValueError; a
  coordinator that cannot be reached, or processes that do not all join within `timeout_s`, end
  the process with one line on stderr (jax would abort with a C++ stack trace instead).
  """
  if jax.distributed.is_initialized():
    return
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _setting(num_processes, "num_processes", "JAX_NUM_PROCESSES")
  process_id = _setting(process_id, "process_id", "JAX_PROCESS_ID")
  launcher = _launcher_size() > 1
  if address is None and num_processes is None and process_id is None and not launcher:
    return
  if not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f"--initialization_timeout: must be a positive number of seconds, "
                     f"got {timeout_s!r}")
  if not launcher:
    missing = [name for name, value in (("--coordinator_address", address),
                                        ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if value is None]
    if missing:
      raise ValueError(f"multi-process training needs {', '.join(missing)} as well (or "
                       "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes: must be at least 1, got {num_processes}")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} does not fit --num_processes={num_processes} "
                     f"(process ids are 0..{num_processes - 1})")
  if num_processes == 1 and not launcher:
    return  # one process: nothing to join
  host, port = _parse_address(address) if address is not None else (None, None)
  deadline = time.monotonic() + timeout_s
  if host is not None and process_id == 0:
    _check_port_free(port, address)
  elif host is not None and process_id is not None:
    _wait_for_coordinator(host, port, address, process_id, num_processes, timeout_s, deadline)
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # All-reduce between processes on CPUs (GPUs use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  who = f"process {process_id}" if process_id is not None else "this process"
  watchdog = _exit_after(
      max(deadline - time.monotonic(), 1.0),
      f"not all {num_processes or 'the'} processes joined the coordinator at {address or '(auto)'} "
      f"within {timeout_s} s ({who}); start every process with the same --coordinator_address "
      "and --num_processes and a distinct --process_id")
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_s + _JAX_DEADLINE_GRACE_S)
  finally:
    watchdog.cancel()


def _setting(value, name, variable):
  if value is not None:
    return int(value)
  text = os.environ.get(variable)
  if text in (None, ""):
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{variable}={text!r}: --{name} must be an integer") from None


def _launcher_size() -> int:
  """Tasks started by a launcher that jax.distributed reads by itself: srun (a job step, not the
  batch script around it) or Open MPI's mpirun."""
  variable = "SLURM_NTASKS" if os.environ.get("SLURM_STEP_NODELIST") else "OMPI_COMM_WORLD_SIZE"
  text = os.environ.get(variable, "")
  return int(text) if text.isdigit() else 1


def _parse_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={address!r}: expected HOST:PORT, e.g. 10.0.0.1:12345")
  return host.strip("[]"), int(port)


def _check_port_free(port: int, address: str) -> None:
  """Process 0 hosts the coordinator on `port` (all interfaces); refuse a port already taken."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator's own socket
    try:
      probe.bind(("", port))
    except OSError as e:
      raise TrainingError(f"--coordinator_address={address}: process 0 cannot listen on port "
                          f"{port} ({e.strerror}); choose a free port") from None


def _wait_for_coordinator(host, port, address, process_id, num_processes, timeout_s, deadline):
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError:
      if time.monotonic() >= deadline:
        raise TrainingError(
            f"process {process_id} of {num_processes}: cannot reach the coordinator at {address} "
            f"within {timeout_s} s; is process 0 running there, and the port open?") from None
      time.sleep(0.5)


def _exit_after(seconds: float, message: str) -> threading.Timer:
  def fire():
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # jax.distributed is blocked in C++; no Python exception can reach the caller
  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  timer.start()
  return timer


def is_lead() -> bool:
  """Whether this process writes the run's files (logs, plots, config, best.json): process 0."""
  return jax.process_index() == 0


def from_lead(value: bool) -> bool:
  """Process 0's `value` on every process (so that all processes take the same branch)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def wait_for_all(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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


@dataclasses.dataclass(frozen=True)
class BatchShares:
  """How the global batch is drawn, and which of its rows this process feeds.

  The global batch is `count` shares of `batch_size // count` rows; share s is sampled on its own
  (keyed by seed, step and s), so any set of processes draws the same global batch: each samples
  the shares that cover its rows [`first_row`, `stop_row`) and feeds those rows. One share (the
  one-process default) is the batch keyed by (seed, step) alone.
  """
  count: int
  batch_size: int
  first_row: int
  stop_row: int

  @property
  def share_size(self) -> int:
    return self.batch_size // self.count

  @property
  def indices(self) -> tuple[int, ...]:
    """The shares to sample on this process, in order."""
    size = self.share_size
    return tuple(range(self.first_row // size, -(-self.stop_row // size)))

  def own_rows(self, batch, whole: bool = False):
    """This process's rows of `batch`: the concatenation of the shares `indices`, or with `whole`
    a batch drawn whole (a method's own batch maker; its leading size may differ from
    batch_size, it is then split in the same proportion)."""
    if self.first_row == 0 and self.stop_row == self.batch_size and (whole or self.count == 1):
      return batch
    offset = 0 if whole else self.indices[0] * self.share_size
    total = self.batch_size if whole else len(self.indices) * self.share_size

    def cut(array):
      array = np.asarray(array)
      n = array.shape[0]
      start, stop = (self.first_row - offset) * n, (self.stop_row - offset) * n
      if start % total or stop % total:
        raise ValueError(f"a batch of {n} rows cannot be split as rows {self.first_row}.."
                         f"{self.stop_row} of {self.batch_size}")
      return array[start // total:stop // total]
    return jax.tree.map(cut, batch)


def batch_shares(batch_size: int, mesh, count: int | None = None) -> BatchShares:
  """This process's `BatchShares`; `count` None: one share per process."""
  check_batch_size(batch_size, mesh)
  count = jax.process_count() if count is None else int(count)
  if count < 1 or batch_size % count:
    raise ValueError(f"config.data.batch_shares={count} must be positive and divide "
                     f"config.data.batch_size={batch_size}")
  rows = sorted({index[0].indices(batch_size)[:2]
                 for index in batch_sharded(mesh).addressable_devices_indices_map(
                     (batch_size,)).values()})
  first, stop = rows[0][0], rows[-1][1]
  if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
    raise ValueError(f"process {jax.process_index()}'s devices hold rows {rows} of the batch, "
                     "not one block; use the same number of devices on every process")
  return BatchShares(count=count, batch_size=batch_size, first_row=first, stop_row=stop)


def put_batch(batch: dict, mesh) -> dict:
  """Places a host batch (this process's rows) as a global array sharded over the batch axis."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                      batch)
