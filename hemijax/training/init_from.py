"""Starting a run from another run's parameters: fine-tuning, and a method's own sources.

`config.train.init_from=WORKDIR` starts a new run from the checkpoint of the run in WORKDIR
(`config.train.init_step`: best, as evaluation picks it, latest, or a step number). It must be a run
of the same method and spatial dimensionality. Every variable (parameters and batch statistics)
is carried over when it fits; the optimiser starts fresh.

Per-modality variables are matched by modality name, using the source run's `config.modalities`:
a modality both runs have keeps its trained slice, a new one keeps this run's fresh initialisation,
one only the source has is left out. Which axes of a variable are modality axes is found without
knowing the method: the model's variables are shaped (`jax.eval_shape`) with M, M + 1 and M + 2
modality slots, and an axis that grows by one per slot is a modality axis (per-modality weights
stacked on a leading axis by `hemijax.nn.layers.per_modality`, one input channel per modality);
one that grows by C per slot and holds M blocks of C is one too (per-modality features
concatenated). A variable that does not fit (another number of classes, another width) is a
one-line error naming it, unless `config.train.init_reset` lists it (or a module above it): then
it starts fresh.

A method may declare its own sources (`hemijax.models.base.ParameterSource`, e.g. a segmentation
network taken from a run of another method): a subtree of the source's variables put at a subtree
of this run's, applied after `init_from`.

Sources are read when a run starts, never when it resumes (a resumed run restores its own
checkpoint), and what was taken from where is written to WORKDIR/init_from.json.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hemijax.models import base as base_lib
from hemijax.models import get_method
from hemijax.training import checkpoints

RECORD_FILE = "init_from.json"
OPTION = "config.train.init_from"
RESET_OPTION = "config.train.init_reset"
# Placeholder names of the extra modality slots that reveal the modality axes.
_EXTRA_SLOT = "extra_slot_{}"
# A model setting that chooses how a convolution is computed, not what its parameters mean.
_NOT_MEANING = ("conv_impl",)


class InitFromError(checkpoints.CheckpointError):
  """A source run that cannot start this run (one line, naming the option)."""


def sources(config, method) -> list[base_lib.ParameterSource]:
  """config.train.init_from (the whole tree, by modality name) and the method's own sources."""
  out = []
  workdir = _given(config.train.get("init_from", None))
  if workdir:
    out.append(base_lib.ParameterSource(
        option=OPTION, workdir=str(workdir), method=config.method, same=(),
        step=config.train.get("init_step", "best")))
  return out + list(method.parameter_sources)


def _given(workdir):
  """The workdir option's value; None for unset (`--config.train.init_from=None` arrives as the
  text "None")."""
  return None if workdir in (None, "", "None") else workdir


def check(config, method) -> None:
  """Refuses, before anything is written, a source that cannot serve: no workdir, no config.json,
  no checkpoint (or not the step asked for), another method or spatial dimensionality, a config
  that differs in a field the source must share, a malformed `init_reset`, a variable that does
  not fit (from the shapes alone: no checkpoint is read)."""
  resets = reset_names(config)
  ours = None
  axes = {}
  for source in sources(config, method):
    saved = _source_config(source, config)
    _source_step(source)
    if ours is None:
      ours = _abstract_variables(config, method)
    theirs = _abstract_variables(ml_collections.ConfigDict(saved))
    _plan(source, ours, theirs, tuple(saved["modalities"]), tuple(config.modalities),
          _axes_for(config, method, tuple(saved["modalities"]), axes), _resets_of(source, resets))


def _resets_of(source, resets):
  return resets if source.option == OPTION else ()


def _axes_for(config, method, theirs, cache: dict):
  """The modality axes (`modality_axes`) when the two runs' modalities differ, else None."""
  if theirs == tuple(config.modalities):
    return None
  if "axes" not in cache:
    cache["axes"] = modality_axes(config, method)
  return cache["axes"]


def reset_names(config) -> tuple[str, ...]:
  names = config.train.get("init_reset", ()) or ()
  if isinstance(names, str):
    names = (names,)
  if not all(isinstance(n, str) and n.strip("/") for n in names):
    raise InitFromError(f"{RESET_OPTION}={tuple(names)!r}: expected parameter or module names "
                        "(e.g. ('classifier',))")
  if names and not _given(config.train.get("init_from", None)):
    raise InitFromError(f"{RESET_OPTION}={tuple(names)!r} without {OPTION}: nothing is loaded, "
                        "so nothing can be re-initialised")
  return tuple(n.strip("/") for n in names)


def _where(source) -> str:
  return f"{source.option}={source.workdir}"


def _hint(source) -> str:
  return f" ({source.hint})" if source.hint else ""


def _source_config(source, config) -> dict:
  workdir = pathlib.Path(source.workdir)
  if not workdir.is_dir():
    raise InitFromError(f"{_where(source)}: no such run folder" + _hint(source))
  if not (workdir / "config.json").is_file():
    raise InitFromError(f"{_where(source)}: no config.json; is this a hemijax training workdir?")
  try:
    saved = checkpoints.load_config_dict(workdir)
  except checkpoints.CheckpointError as e:
    raise InitFromError(f"{_where(source)}: {e}") from None
  if saved.get("method") != source.method:
    raise InitFromError(f"{_where(source)}: a {saved.get('method')!r} run; this needs a "
                        f"{source.method!r} run")
  theirs = len(saved.get("data", {}).get("patch_size", ()))
  ours = len(config.data.patch_size)
  if theirs != ours:
    raise InitFromError(f"{_where(source)}: trained on {theirs}D patches, this run on {ours}D "
                        "(config.data.patch_size)")
  current = checkpoints.config_to_dict(config)
  for field in source.same:
    a, b = _meaning(saved.get(field)), _meaning(current.get(field))
    if a != b:
      raise InitFromError(f"{_where(source)}: that run's config.{field} differs from this run's "
                          f"({_difference(a, b)}); the source must share it")
  return saved


def _meaning(value):
  """A config section without the settings that do not change what parameters mean."""
  if isinstance(value, dict):
    return {k: v for k, v in value.items() if k not in _NOT_MEANING}
  return value


def _difference(theirs, ours) -> str:
  if isinstance(theirs, dict) and isinstance(ours, dict):
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys)
  return f"{theirs!r} there, {ours!r} here"


def _source_step(source):
  """The checkpoint step the source gives (best as evaluation picks it, latest, or a number)."""
  from hemijax.inference import predictor   # inference reads checkpoints; import where used
  option = "config.train.init_step" if source.option == OPTION else source.option
  step = predictor.checkpoint_step(source.step, option=option)
  steps = checkpoints.saved_steps(source.workdir)
  if not steps:
    raise InitFromError(f"{_where(source)}: no checkpoint in {source.workdir}/checkpoints" +
                        _hint(source))
  if isinstance(step, int) and step not in steps:
    raise InitFromError(f"{_where(source)}: no checkpoint at step {step} ({option}); "
                        f"it has {steps}")
  return step


def start_variables(config, method, variables: Mapping) -> tuple[dict, list[dict]]:
  """`variables` ({"params": ..., **model_state}, as initialised for a new run) with the sources'
  variables put in; and one record per source (what was taken from where). Host arrays."""
  from hemijax.inference import predictor
  flat = {path: np.asarray(value) for path, value in _flatten(variables).items()}
  records, axes = [], {}
  resets = reset_names(config)
  for source in sources(config, method):
    saved = _source_config(source, config)
    step = _source_step(source)
    try:
      _, _, loaded, step = predictor.load_run(source.workdir, step, return_step=True)
    except (ValueError, KeyError) as e:
      raise InitFromError(f"{_where(source)}: {e}") from None
    theirs, ours = tuple(saved["modalities"]), tuple(config.modalities)
    loaded = {path: np.asarray(value) for path, value in _flatten(loaded).items()}
    plan, record = _plan(source, flat, loaded, theirs, ours,
                         _axes_for(config, method, theirs, axes), _resets_of(source, resets))
    shared = [m for m in ours if m in theirs]
    ours_index, theirs_index = [ours.index(m) for m in shared], [theirs.index(m) for m in shared]
    for path, (origin, leaf_axes) in plan.items():
      flat[path] = _carry(loaded[origin], flat[path], leaf_axes, theirs_index, ours_index)
    record.update(step=int(step), method=saved["method"])
    records.append(record)
  return _unflatten(flat), records


def write_record(workdir, records: list[dict]) -> None:
  checkpoints.write_json_atomic(pathlib.Path(workdir) / RECORD_FILE, {"sources": records})


def read_record(workdir) -> dict | None:
  path = pathlib.Path(workdir) / RECORD_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _unflatten(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _name(path) -> str:
  """A variable's name in messages: `classifier/kernel` (parameters), `batch_stats/...`."""
  return "/".join(path[1:] if path[0] == "params" else path)


def modality_axes(config, method) -> dict[tuple[str, ...], tuple[tuple[int, int], ...] | None]:
  """Per variable (collection, *path): its modality axes as (axis, block) pairs, an axis of
  M * block entries whose block `i` belongs to modality slot `i` (block 1: a stacked modality axis
  or one input channel per modality; block C: per-modality features of C channels concatenated);
  None for a variable whose shape depends on the modalities otherwise (e.g. one entry per subset
  of modalities), which only a source with the same modalities in the same order can fill."""
  m = len(config.modalities)
  shapes = [_abstract_variables(_with_extra_slots(config, k)) for k in (1, 2)]
  shapes.insert(0, _abstract_variables(config, method))
  paths = set(shapes[0])
  if any(set(s) - paths for s in shapes[1:]):
    extra = sorted(set(shapes[1]) - paths)[0]
    raise InitFromError(
        f"{OPTION}: the modalities differ, and this model has variables per modality that are "
        f"not stacked on a modality axis (e.g. {_name(extra)}), so they cannot be matched by name; "
        "use a source trained on the same modalities")
  axes = {}
  for path in paths:
    s0, s1, s2 = (tuple(s[path].shape) for s in shapes)
    if not len(s0) == len(s1) == len(s2):
      axes[path] = None
      continue
    found, other = [], False
    for a in range(len(s0)):
      step = s1[a] - s0[a]
      if step == 0 and s2[a] == s1[a]:
        continue
      if step > 0 and s2[a] - s1[a] == step and s0[a] == m * step:
        found.append((a, step))
      else:
        other = True
    axes[path] = None if other else tuple(found)
  return axes


def _with_extra_slots(config, count: int):
  extended = ml_collections.ConfigDict(checkpoints.config_to_dict(config))
  extended.modalities = tuple(config.modalities) + tuple(
      _EXTRA_SLOT.format(i) for i in range(count))
  return extended


def _abstract_variables(config, method=None) -> dict:
  method = method or get_method(config)
  m = len(config.modalities)
  image = jax.ShapeDtypeStruct((1,) + tuple(config.data.patch_size) + (m,), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, m), jnp.bool_)
  return _flatten(jax.eval_shape(method.init, jax.random.key(0), image, mask))


def _plan(source, ours, theirs, theirs_modalities, ours_modalities, axes, resets):
  """Which of this run's variables (`ours`, flat) come from which of the source's (`theirs`,
  flat; arrays or shapes), along which modality axes: ({our path: (their path, axes)}, record).
  Raises InitFromError naming the first variable that does not fit and is not reset."""
  prefix_of = lambda path, prefix: path[1:1 + len(prefix)] == tuple(prefix)
  # Their variables under source_path, keyed by where they go in ours.
  moved = {(path[0],) + tuple(source.target_path) + path[1 + len(source.source_path):]: path
           for path in theirs if prefix_of(path, source.source_path)}
  targets = sorted(p for p in ours if prefix_of(p, source.target_path))
  if not targets:
    raise InitFromError(f"{_where(source)}: this model has no variables under "
                        f"{'/'.join(source.target_path)!r}")
  reset_parts = [tuple(name.split("/")) for name in resets]
  for name, parts in zip(resets, reset_parts):
    if not any(prefix_of(p, parts) for p in targets):
      tops = sorted({p[1] for p in targets if len(p) > 1})
      raise InitFromError(f"{RESET_OPTION}: {name!r} names no parameter of this model; its "
                          f"top-level names: {', '.join(tops)}")
  plan, fresh = {}, []
  for path in targets:
    if any(prefix_of(path, parts) for parts in reset_parts):
      fresh.append(_name(path))
      continue
    if path not in moved:
      raise InitFromError(f"{_where(source)}: {_name(path)} is not in that run's variables" +
                          _reset_hint(source, path))
    leaf_axes = () if axes is None else axes.get(path, ())
    if leaf_axes is None:
      raise InitFromError(
          f"{_where(source)}: {_name(path)} depends on the modalities and their order, which "
          f"differ (there {list(theirs_modalities)}, here {list(ours_modalities)})" +
          _reset_hint(source, path))
    want = list(np.shape(ours[path]))
    for a, block in leaf_axes:
      want[a] = len(theirs_modalities) * block
    have = tuple(np.shape(theirs[moved[path]]))
    if tuple(want) != have:
      raise InitFromError(f"{_where(source)}: {_name(path)} has shape {have} there and "
                          f"{tuple(np.shape(ours[path]))} here" + _reset_hint(source, path))
    plan[path] = (moved[path], leaf_axes)
  record = {
      "option": source.option,
      "source": str(pathlib.Path(source.workdir).absolute()),
      "from": "/".join(source.source_path), "into": "/".join(source.target_path),
      "modalities": {"carried": [m for m in ours_modalities if m in theirs_modalities],
                     "new": [m for m in ours_modalities if m not in theirs_modalities],
                     "not_used": [m for m in theirs_modalities if m not in ours_modalities]},
      "reset": list(resets), "fresh_variables": sorted(fresh), "carried_variables": len(plan),
      "source_variables_not_used": sorted(_name(p) for p in moved if p not in ours),
  }
  return plan, record


def _reset_hint(source, path) -> str:
  if source.option != OPTION:
    return ""
  return f"; re-initialise it with --{RESET_OPTION}={path[1]}"


def _carry(theirs, ours, axes, theirs_index, ours_index) -> np.ndarray:
  """`ours` (fresh) with the source's entries of the shared modalities along `axes`, the
  (axis, block) pairs of `modality_axes`; `theirs` whole when there are none."""
  theirs = theirs.astype(ours.dtype, copy=False)
  if not axes:
    return theirs.copy()
  out = ours.copy()
  if ours_index:
    blocks = dict(axes)

    def pick(index, shape):
      return np.ix_(*[
          np.concatenate([np.arange(i * blocks[a], (i + 1) * blocks[a]) for i in index])
          if a in blocks else np.arange(n) for a, n in enumerate(shape)])
    out[pick(ours_index, ours.shape)] = theirs[pick(theirs_index, theirs.shape)]
  return out
