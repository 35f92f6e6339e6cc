"""Checkpoints (orbax `CheckpointManager`) and the run's resolved config, saved in the workdir.

The latest `keep` checkpoints are kept, and the best by validation metric is kept apart by the
preservation policy; `best.json` names its step. The resolved config is `config.json`; resuming
with a different model config is refused.
"""
from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy

from hemijax import atomic

BEST_METRIC = "val_score"
# Config fields that define what the parameters mean; a checkpoint is unusable if they differ.
MODEL_FIELDS = ("method", "task", "modalities", "model")


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


def make_manager(workdir, keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=False,  # a save is complete (and atomic) when it returns
      preservation_policy=policy.AnyPreservationPolicy([
          policy.LatestN(n=keep),
          policy.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                       keep_checkpoints_without_metrics=False),
      ]),
  )
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options)


# Named orbax items, so that inference restores the parameters alone. Empty items (a model without
# batch statistics) are not written: orbax refuses empty trees.
ITEMS = ("params", "model_state", "optimizer")


def _items(state) -> dict:
  return {"params": state["params"], "model_state": state["model_state"],
          "optimizer": {"step": state["step"], "state": state["opt_state"]}}


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
