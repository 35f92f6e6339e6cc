"""The dataset a config names: a user's folder, or the built-in phantom generated once and cached.

Where things live, resolved once when a training run starts (`prepare_run`) and recorded in the
workdir's config.json, so evaluate and predict find them the same way from any directory:
- the cache (`cache_root`): config.data.cache_dir, else $HEMIJAX_CACHE, else
  $XDG_CACHE_HOME/hemijax (default ~/.cache/hemijax), always made absolute;
- the split (`hemijax.data.splits`): config.data.splits_file, the dataset's splits.json, or a
  seeded one written to WORKDIR/splits.json;
- the voxel spacing the model trains at (config.data.target_spacing; when unset, the median
  spacing of the training cases), to which predict and evaluate resample every input;
- the label values (`label_mapping`): the dataset's dataset.json `labels`, paired with the task's;
- the task itself for `config.task=auto` (`resolve_task`): modalities, classes and regions the
  dataset declares, recorded as `config.task_spec` and `config.modalities`.
"""
from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
from nibabel import orientations

from hemijax import atomic
from hemijax.data import io, layouts, preprocess, splits as splits_lib
from hemijax.data.labels import LabelMapping
from hemijax.data.tasks import AUTO, TASKS, Task, task_from_config

CACHE_ENV = "HEMIJAX_CACHE"
# Training spacings within this ratio of each other count as isotropic (one target_spacing).
ISOTROPIC_RATIO = 1.01


def default_cache_root() -> pathlib.Path:
  """$HEMIJAX_CACHE, else $XDG_CACHE_HOME/hemijax, else ~/.cache/hemijax (absolute)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser().absolute()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return (pathlib.Path(base).expanduser() / "hemijax").absolute()


def cache_root(config=None) -> pathlib.Path:
  """The absolute cache folder: config.data.cache_dir if set (relative to the current directory),
  else `default_cache_root()`."""
  value = config.data.get("cache_dir", None) if config is not None else None
  if value:
    return pathlib.Path(value).expanduser().absolute()
  return default_cache_root()


def phantom_options(config) -> dict:
  """Keyword arguments of `phantom.write_dataset` that the config's data section sets."""
  d = config.data
  modalities = d.get("phantom_modalities", None)
  return dict(task=config.task, n_subjects=d.phantom_subjects, seed=d.phantom_seed,
              spacing=d.phantom_spacing, layout="brats", missing_rate=d.phantom_missing_rate,
              protocol=d.get("phantom_protocol", "default"),
              test_protocol=d.get("phantom_test_protocol", None),
              lesions=bool(d.get("phantom_lesions", False)),
              modalities=tuple(modalities) if modalities else None)


def phantom_root(config) -> pathlib.Path:
  """The cache folder of the config's phantom; its name encodes every generation option."""
  o = phantom_options(config)
  name = (f"{o['task']}_n{o['n_subjects']}_seed{o['seed']}_sp{o['spacing']:g}"
          f"_miss{o['missing_rate']:g}")
  if o["protocol"] != "default":
    name += f"_{o['protocol']}"
  if o["test_protocol"]:
    name += f"_test-{o['test_protocol']}"
  if o["lesions"]:
    name += "_lesions"
  if o["modalities"]:
    name += "_" + "-".join(o["modalities"])
  return cache_root(config) / "phantoms" / name


def ensure_phantom(config) -> pathlib.Path:
  """Generates the config's phantom dataset once (into a temporary folder, then renamed)."""
  root = phantom_root(config)
  if (root / "splits.json").is_file():
    preprocess.touch_used(root)
    return root
  from hemijax.data import phantom  # heavy (templates); only when generating

  return atomic.write_directory(root, lambda tmp: phantom.write_dataset(
      tmp, **phantom_options(config)))


def dataset_root(config) -> pathlib.Path:
  if config.data.root:
    root = pathlib.Path(config.data.root)
    if not root.is_dir():
      raise ValueError(f"config.data.root: {root} is not a folder")
    return root
  if config.task == AUTO:
    raise ValueError("config.task=auto reads the task from config.data.root, which is not set; "
                     f"give your dataset's folder, or a built-in task ({', '.join(TASKS)}) for "
                     "the phantom")
  return ensure_phantom(config)


def resolve_task(config) -> Task:
  """The config's task; for `task=auto` read from the dataset (`layouts.dataset_task`) the first
  time and recorded in `config` (`task_spec`, and `modalities`, the model's slots in the task's
  order), so the model, the saved config.json, evaluate and predict all use it. A config that
  already records its task (a saved run's) is kept as it is. Called before the model is built.
  """
  if config.task != AUTO or config.get("task_spec", None):
    return task_from_config(config)
  root = dataset_root(config)
  task = layouts.dataset_task(root, _layout(config, None))
  with config.unlocked():  # a config file without the field gains it
    config.task_spec = task.to_dict()
    config.modalities = tuple(task.modalities)
  logging.info("task=auto: %s", task)
  return task_from_config(config)


def _layout(config, layout):
  return layout or config.data.get("layout", "auto")


def label_mapping(config, root=None, layout=None) -> LabelMapping:
  """How the dataset's label values pair with the config's task (`layouts.dataset_label_mapping`)."""
  root = pathlib.Path(root) if root is not None else dataset_root(config)
  return layouts.dataset_label_mapping(root, task_from_config(config), _layout(config, layout))


def split_choice(config, root=None, layout=None) -> splits_lib.SplitChoice:
  """The split `load_split` uses for the dataset at `root` (`hemijax.data.splits.choose`)."""
  root = pathlib.Path(root) if root is not None else dataset_root(config)
  cases = layouts.discover_cases(root, _layout(config, layout), tuple(config.modalities))
  return splits_lib.choose(cases, root, config.data.get("splits_file", None))


def load_split(config, split: str | None, root=None, layout=None):
  """Preprocessed volumes of one split (None: every case)."""
  root = pathlib.Path(root) if root is not None else dataset_root(config)
  layout = _layout(config, layout)
  choice = split_choice(config, root, layout) if split is not None else None
  return preprocess.load_dataset(
      root, modalities=tuple(config.modalities),
      label_values=label_mapping(config, root, layout).file_values, layout=layout, split=split,
      splits=choice.splits if choice else None,
      splits_where=(choice.path or root) if choice else None,
      target_spacing=config.data.target_spacing,
      cache_dir=cache_root(config) / "preprocessed")


def canonical_spacing(affine) -> tuple[float, float, float]:
  """Voxel size along the RAS+ axes the preprocessing reorients to."""
  ornt = orientations.io_orientation(affine)
  spacing = preprocess.spacing_of(affine)
  out = [0.0, 0.0, 0.0]
  for (axis, _), s in zip(ornt, spacing):
    out[int(axis)] = s
  return tuple(out)


def median_spacing(cases) -> tuple[float, float, float]:
  """Per-axis median voxel size (mm, RAS+ axes) of the cases' first images (headers only)."""
  spacings = [canonical_spacing(io.read_header(next(iter(c.images.values())))[1]) for c in cases]
  return tuple(float(v) for v in np.median(np.asarray(spacings), axis=0))


def _record(config, key: str, value) -> None:
  with config.unlocked():  # a config file without the field (older ones) gains it
    config.data[key] = value


def prepare_run(config, workdir) -> None:
  """Resolves, when a training run starts, what evaluate and predict must later find the same way,
  and records it in `config` (saved as WORKDIR/config.json by the caller):

  - `data.cache_dir`: the absolute cache folder (`cache_root`);
  - `data.splits_file`: for a dataset without splits.json, WORKDIR/splits.json, written here
    (seeded, stratified; `hemijax.data.splits`) or reused from an earlier start of this run; an
    explicit `data.splits_file` is made absolute;
  - `data.target_spacing`: if unset, the median voxel size of the training cases when it is
    isotropic, so a model trained at 2 mm resamples a 1 mm input to 2 mm (and back);
  - `task_spec`, `modalities`: for `task=auto`, the task the dataset declares (`resolve_task`).

  Raises `DataError`/`ValueError` with one line on a dataset that cannot be trained on.
  """
  resolve_task(config)
  _record(config, "cache_dir", str(cache_root(config)))
  root = dataset_root(config)
  layout = _layout(config, None)
  cases = layouts.discover_cases(root, layout, tuple(config.modalities))
  given = config.data.get("splits_file", None)
  choice = splits_lib.for_run(cases, root, workdir, given)
  if choice.origin != "dataset":
    _record(config, "splits_file", str(pathlib.Path(choice.path).absolute()))
  label_mapping(config, root, layout)  # refuse a dataset.json that does not fit the task now
  if config.data.get("target_spacing", None) is None:
    train_ids = set(choice.splits.get("train", []))
    train = [c for c in cases if c.case_id in train_ids]
    if train:
      spacing = median_spacing(train)
      if max(spacing) <= ISOTROPIC_RATIO * min(spacing):
        _record(config, "target_spacing", round(float(np.median(spacing)), 4))
      else:
        logging.warning("training cases have anisotropic median spacing %s mm; inputs of another "
                        "spacing are not resampled unless config.data.target_spacing is set",
                        tuple(round(s, 3) for s in spacing))
