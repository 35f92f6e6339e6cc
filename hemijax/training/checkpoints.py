"""Checkpoints (orbax `CheckpointManager`) and the run's resolved config, saved in the workdir.

The latest `keep` checkpoints are kept, and so is the step `best.json` names (the best by
validation metric), across restarts too. The resolved config is `config.json`; resuming with a
different model config is refused. `train.lock` keeps a second run out of a workdir in use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy

from hemijax import atomic

BEST_METRIC = "val_score"
# Config fields that define what the parameters mean; a checkpoint is unusable if they differ.
MODEL_FIELDS = ("method", "task", "task_spec", "modalities", "model")  # task_spec: task=auto


class CheckpointError(ValueError):
  """A workdir whose checkpoint cannot serve the requested config."""


def write_json_atomic(path, obj) -> None:
  atomic.write_json(path, obj, default=_json_default)


def _json_default(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  if hasattr(value, "to_dict"):
    return value.to_dict()
  raise TypeError(f"not JSON-serialisable: {type(value)}")


def config_to_dict(config) -> dict:
  """A JSON-normalised copy (tuples become lists), so saved and live configs compare equal."""
  return json.loads(json.dumps(config.to_dict(), default=_json_default))


def save_config(workdir, config) -> None:
  write_json_atomic(pathlib.Path(workdir) / "config.json", config_to_dict(config))


def load_config_dict(workdir) -> dict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: no config.json; is this a hemijax training workdir?")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: unreadable config ({e})") from None


def check_compatible(saved: dict, config, workdir) -> None:
  """Refuses to resume (or load) when the model-defining config fields differ."""
  current = config_to_dict(config)
  diffs = [f for f in MODEL_FIELDS if saved.get(f) != current.get(f)]
  if diffs:
    detail = "; ".join(f"{f}: saved {saved.get(f)!r} vs now {current.get(f)!r}" for f in diffs)
    raise CheckpointError(
        f"{workdir}: checkpoint was trained with another model config ({detail}); "
        "use a new --workdir or the saved config")


@dataclasses.dataclass
class KeepBest(policy.PreservationPolicy):
  """Preserves the step that `workdir/best.json` names. (orbax's BestN ranks the metrics saved
  with each step, which it does not write without `best_fn` and cannot rank after a restart, so
  resuming deleted the best checkpoint.) Read at each save: the loop records a new best after
  saving its step, so the previous best stays until then."""
  workdir: pathlib.Path

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    best = best_step(self.workdir)
    return [info.step == best for info in checkpoints]


def make_manager(workdir, keep: int = 2) -> ocp.CheckpointManager:
  workdir = pathlib.Path(workdir).absolute()
  options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=False,  # a save is complete (and atomic) when it returns
      preservation_policy=policy.AnyPreservationPolicy([policy.LatestN(n=keep),
                                                        KeepBest(workdir)]),
  )
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def saved_steps(workdir) -> list[int]:
  """Steps of the finished checkpoints in `workdir` (orbax renames a step's folder into place
  when its save completes), without opening a manager (which would create the folder)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir, hold: bool = True):
  """Holds an exclusive lock on WORKDIR/train.lock while a run trains there (`atomic.exclusive_lock`). A
  second run refuses with one line. With `hold` False (the other processes of a multi-process
  run), takes nothing."""
  if not hold:
    yield
    return
  path = pathlib.Path(workdir) / LOCK_FILE
  with atomic.exclusive_lock(path) as held:
    if not held:
      raise WorkdirBusy(f"{workdir}: another run is training in this workdir ({atomic.lock_holder(path)} "
                        f"holds {path}); wait for it to end or use another --workdir")
    yield


class WorkdirBusy(CheckpointError):
  """Another run holds the workdir's lock."""


# Named orbax items, so that inference restores the parameters alone. Empty items (a model without
# batch statistics) are not written: orbax refuses empty trees.
ITEMS = ("params", "model_state", "optimizer")


def _items(state) -> dict:
  return {"params": state["params"], "model_state": state["model_state"],
          "optimizer": {"step": state["step"], "state": state["opt_state"]}}


def _abstract(tree):
  """Shapes, dtypes and shardings to restore into. Leaves without a sharding (inference's
  `eval_shape`) go to one local device: a checkpoint written by several processes records theirs,
  which orbax would otherwise refuse on fewer devices ("topology mismatch")."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(leaf):
    struct = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(struct, "sharding", None) is None:
      struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=device)
    return struct
  return jax.tree.map(one, tree)


def save(manager, step: int, state, metrics: dict | None = None) -> None:
  items = {k: v for k, v in _items(state).items() if jax.tree.leaves(v)}
  manager.save(step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v)
                                                for k, v in items.items()}),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def _restore_items(manager, step: int, abstract_items: dict) -> dict:
  folder = pathlib.Path(manager.directory) / str(step)
  if (folder / "state").is_dir() and not (folder / "params").is_dir():
    raise CheckpointError(f"{folder}: written by an older hemijax (one 'state' item); retrain "
                          "it with this version or use the version that wrote it")
  wanted = {k: v for k, v in abstract_items.items() if jax.tree.leaves(v)}
  restored = manager.restore(step, args=ocp.args.Composite(
      **{k: ocp.args.StandardRestore(_abstract(v)) for k, v in wanted.items()}))
  return {k: restored[k] if k in wanted else v for k, v in abstract_items.items()}


def restore(manager, step: int, abstract_state) -> dict:
  """The whole train state at `step`, in the structure/shardings of `abstract_state` (resuming)."""
  items = _restore_items(manager, step, _items(abstract_state))
  return {"step": items["optimizer"]["step"], "params": items["params"],
          "model_state": items["model_state"], "opt_state": items["optimizer"]["state"]}


def restore_variables(manager, step: int, abstract_variables: dict) -> dict:
  """Parameters and model state only (`{"params": ..., **model_state}`), for inference."""
  abstract_variables = dict(abstract_variables)
  params = abstract_variables.pop("params")
  items = _restore_items(manager, step, {"params": params, "model_state": abstract_variables})
  return {"params": items["params"], **items["model_state"]}


def best_step(workdir) -> int | None:
  path = pathlib.Path(workdir) / "best.json"
  return json.loads(path.read_text())["step"] if path.is_file() else None


def record_best(workdir, step: int, score: float) -> None:
  write_json_atomic(pathlib.Path(workdir) / "best.json", {"step": step, BEST_METRIC: score})
