"""Segmentation tasks: which modalities, which label values, which evaluation regions.

Modality names are the lower-case BraTS file suffixes everywhere (configs, CLIs, the Python API).
Label values are the task's (BraTS's for `tumor`); a dataset that stores other values for the same
classes declares them in dataset.json and `hemijax.data.labels` pairs them with these. A model's
class id is the index into `label_values`.
"""
from __future__ import annotations

import dataclasses

KNOWN_MODALITIES = ("flair", "t1", "t1ce", "t2")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  modalities: tuple[str, ...]
  label_values: tuple[int, ...]
  class_names: tuple[str, ...]
  regions: dict[str, tuple[int, ...]]  # region name -> label values (as in files) it unites

  @property
  def num_classes(self) -> int:
    return len(self.label_values)


TASKS = {
    "tumor": Task(
        name="tumor",
        modalities=("flair", "t1", "t1ce", "t2"),
        label_values=(0, 1, 2, 4),
        class_names=("background", "necrotic_core", "edema", "enhancing"),
        regions={"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    ),
    "wmh": Task(
        name="wmh",
        modalities=("t1", "t2", "flair"),
        label_values=(0, 1),
        class_names=("background", "lesion"),
        regions={"lesion": (1,)},
    ),
    "tissue": Task(
        name="tissue",
        modalities=("t1", "flair"),
        label_values=(0, 1, 2, 3, 4),
        class_names=("background", "csf", "gm", "wm", "lesion"),
        regions={"csf": (1,), "gm": (2,), "wm": (3,), "lesion": (4,)},
    ),
}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
  return TASKS[name]


def check_modalities(names, allowed=KNOWN_MODALITIES, option="modalities"):
  """Raises ValueError naming the option if a modality name is unknown or the set is empty."""
  names = tuple(names)
  if not names:
    raise ValueError(f"{option}: the modality set is empty")
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise ValueError(f"{option}: unknown modality name(s) {unknown}; known: {list(allowed)}")
  if len(set(names)) != len(names):
    raise ValueError(f"{option}: duplicate modality names in {list(names)}")
  return names
