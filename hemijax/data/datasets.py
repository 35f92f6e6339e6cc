"""The dataset a config names: a user's folder, or the built-in phantom generated once and cached."""
from __future__ import annotations

import pathlib

from hemijax import atomic
from hemijax.data import layouts, preprocess
from hemijax.data.tasks import get_task


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
  return pathlib.Path(config.data.cache_dir) / "phantoms" / name


def ensure_phantom(config) -> pathlib.Path:
  """Generates the config's phantom dataset once (into a temporary folder, then renamed)."""
  root = phantom_root(config)
  if (root / "splits.json").is_file():
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
  return ensure_phantom(config)


def load_split(config, split: str | None, root=None, layout=None):
  """Preprocessed volumes of one split (None: every case)."""
  task = get_task(config.task)
  root = pathlib.Path(root) if root is not None else dataset_root(config)
  return preprocess.load_dataset(
      root, modalities=tuple(config.modalities), label_values=task.label_values,
      layout=layout or config.data.layout, split=split,
      target_spacing=config.data.target_spacing,
      cache_dir=pathlib.Path(config.data.cache_dir) / "preprocessed")


def has_splits(root) -> bool:
  return layouts.read_splits(root) is not None
