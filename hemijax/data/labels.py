"""One mapping between a dataset's label values and the task's, used by verify, training, predict
and evaluate alike.

A task (`tasks.py`) has label values (BraTS: 0, 1 necrotic core, 2 oedema, 4 enhancing) and regions
(WT, TC, ET). A dataset may store other values for the same classes: the nnU-Net conversion of
BraTS writes oedema 1, necrosis 2, enhancing 3 and declares them in dataset.json, either per class
(`{"edema": 1, ...}`) or as regions (`{"whole tumor": [1, 2, 3], "tumor core": [2, 3],
"enhancing tumor": [3]}`). Names are matched to the task's classes and regions (with the usual
spellings), and each dataset value is paired with the task value that belongs to exactly the same
named classes/regions. Anything that does not pair up one-to-one is refused, naming the file.

The same declarations make a task for a dataset read with `task=auto` (`task_from_declaration`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from hemijax.data.io import problem
from hemijax.data.tasks import Task, check_task

# Spellings of class and region names, compared after lower-casing and dropping everything but
# letters and digits ('Non-enhancing tumor core' -> 'nonenhancingtumorcore').
NAME_ALIASES = {
    "background": ("background", "bg", "clearlabel"),
    # tumor
    "necrotic_core": ("necroticcore", "necrotic", "necrosis", "ncr", "net", "ncrnet", "nonenhancing",
                      "nonenhancingtumor", "nonenhancingtumour", "nonenhancingtumorcore",
                      "nonenhancingtumourcore", "nonenhancingandnecrosis",
                      "necroticandnonenhancing", "necroticnonenhancing",
                      "necroticnonenhancingtumorcore", "necrotictumorcore"),
    "edema": ("edema", "oedema", "ed", "peritumoraledema", "peritumoraloedema",
              "peritumouraloedema", "peritumouraledema", "snfh"),
    "enhancing": ("enhancing", "enhancingtumor", "enhancingtumour", "et", "enhancingcore"),
    "WT": ("wt", "wholetumor", "wholetumour"),
    "TC": ("tc", "tumorcore", "tumourcore"),
    # wmh, tissue
    "lesion": ("lesion", "lesions", "wmh", "whitematterhyperintensity",
               "whitematterhyperintensities", "mslesion"),
    "csf": ("csf", "cerebrospinalfluid"),
    "gm": ("gm", "greymatter", "graymatter"),
    "wm": ("wm", "whitematter"),
}


def _normalise(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", str(name).lower())


_ALIAS_TO_NAME = {alias: name for name, aliases in NAME_ALIASES.items() for alias in aliases}


def task_label_sets(task: Task) -> dict[str, frozenset[int]]:
  """The task's named sets of label values: one per class, one per region."""
  sets = {name: frozenset({int(v)}) for name, v in zip(task.class_names, task.label_values)}
  for name, values in task.regions.items():
    sets.setdefault(name, frozenset(int(v) for v in values))
  return sets


def _task_name(declared: str, sets) -> str | None:
  key = _normalise(declared)
  for name in sets:  # the task's own spelling first ('necrotic_core', 'WT')
    if _normalise(name) == key:
      return name
  name = _ALIAS_TO_NAME.get(key)
  return name if name in sets else None


@dataclasses.dataclass(frozen=True)
class LabelMapping:
  """`file_values[i]` is the value the dataset stores for the task's class i (whose value in the
  task is `task_values[i]`). `source` names the declaration (dataset.json), or None when the
  dataset uses the task's own values."""
  task_values: tuple[int, ...]
  file_values: tuple[int, ...]
  class_names: tuple[str, ...]
  source: str | None = None

  @property
  def identity(self) -> bool:
    return self.file_values == self.task_values

  def to_task_values(self, label) -> np.ndarray:
    """A label map in the dataset's values -> the task's values (ValueError on any other value)."""
    return _lookup(np.asarray(label), self.file_values, self.task_values)

  def to_file_values(self, label) -> np.ndarray:
    """A label map in the task's values -> the dataset's values (to write predictions)."""
    return _lookup(np.asarray(label), self.task_values, self.file_values)

  def describe(self) -> str:
    if self.source is None:
      return f"label values {self.file_values} (the task's)"
    pairs = ", ".join(f"{f}={n}" for f, n in zip(self.file_values, self.class_names))
    if self.identity:
      return f"label values {pairs} ({self.source}, as the task's)"
    return f"label values {pairs} ({self.source}; task values {self.task_values})"


def _lookup(label: np.ndarray, source, target) -> np.ndarray:
  source = np.asarray(source, np.int64)
  target = np.asarray(target, np.int64)
  order = np.argsort(source)
  pos = np.clip(np.searchsorted(source[order], label), 0, len(source) - 1)
  found = source[order][pos] == label
  if not np.all(found):
    raise ValueError(f"label values {sorted(set(np.unique(label[~found]).tolist()))} are not in "
                     f"{tuple(source.tolist())}")
  return target[order][pos].astype(np.int32)


def task_mapping(task: Task) -> LabelMapping:
  """The mapping of a dataset that stores the task's own values."""
  values = tuple(int(v) for v in task.label_values)
  return LabelMapping(values, values, tuple(task.class_names))


def mapping_from_declaration(task: Task, declared: dict | None, where) -> LabelMapping:
  """Pairs a dataset's declared labels ({name: (values...)}, e.g. from dataset.json) with the task's.

  None (nothing declared): the task's own values. Raises `DataError` naming `where` if a name is
  not one of the task's classes/regions, or the declaration does not pin every task class to
  exactly one dataset value (and back).
  """
  if declared is None:
    return task_mapping(task)
  sets = task_label_sets(task)
  pairs = []  # (dataset values, task values) of each declared name
  for name, values in declared.items():
    task_name = _task_name(name, sets)
    if task_name is None:
      raise problem(where, f"label {name!r} has no counterpart in the {task.name} task (classes "
                           f"{', '.join(task.class_names)}; regions {', '.join(task.regions)})")
    pairs.append((frozenset(int(v) for v in values), sets[task_name]))
  dataset_values = sorted({v for ds, _ in pairs for v in ds} | {0})

  def signature(value, side):
    return frozenset(i for i, pair in enumerate(pairs) if value in pair[side])

  by_signature: dict[frozenset, list[int]] = {}
  for v in dataset_values:
    by_signature.setdefault(signature(v, 0), []).append(v)
  file_values, used = [], set()
  for t, class_name in zip(task.label_values, task.class_names):
    candidates = by_signature.get(signature(int(t), 1), [])
    if len(candidates) != 1 or candidates[0] in used:
      what = ("no value" if not candidates else f"value {candidates[0]} (also another class's)"
              if len(candidates) == 1 else f"values {candidates}")
      raise problem(where, f"labels: {what} for the {task.name} task's class {class_name!r} "
                           f"(value {t}); the declared names do not tell its value apart")
    file_values.append(candidates[0])
    used.add(candidates[0])
  unused = [v for v in dataset_values if v not in used]
  if unused:
    raise problem(where, f"labels: value(s) {unused} match no class of the {task.name} task")
  return LabelMapping(tuple(int(v) for v in task.label_values), tuple(file_values),
                      tuple(task.class_names), str(where))


def parse_declaration(labels, where) -> dict[str, tuple[int, ...]]:
  """dataset.json's `labels` -> {name: (values...)}.

  nnU-Net v2 writes `{"name": value}` or `{"name": [values]}` (a region); v1 writes
  `{"value": "name"}`. DataError naming `where` for anything else.
  """
  if not isinstance(labels, dict) or not labels:
    raise problem(where, "'labels' must be a non-empty object like {\"background\": 0, ...}")
  out: dict[str, tuple[int, ...]] = {}
  for key, value in labels.items():
    if isinstance(value, str) and _is_int(key):  # v1: {"1": "edema"}
      name, items = value, [key]
    else:
      name, items = key, (value if isinstance(value, (list, tuple)) else [value])
    values = []
    for v in items:
      if not _is_int(v):
        raise problem(where, f"label {key!r}: {v!r} is not an integer label value")
      values.append(int(v))
    if not values:
      raise problem(where, f"label {key!r}: no value")
    if name in out:
      raise problem(where, f"label {name!r} is declared twice")
    out[name] = tuple(values)
  return out


def _is_int(v) -> bool:
  if isinstance(v, bool):
    return False
  return isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v) is not None)


def declared_values(declared: dict) -> tuple[int, ...]:
  """Every value a declaration allows in a label file (background 0 included)."""
  return tuple(sorted({v for values in declared.values() for v in values} | {0}))



def task_from_declaration(name: str, modalities, declared: dict, regions: dict | None,
                          where) -> Task:
  """The task a dataset declares: `declared` labels ({name: (values...)}, `parse_declaration`'s)
  and optional `regions` ({name: (values...)}, e.g. a task file's).

  Classes are every declared value (and the background 0), in value order; a value's class name
  is the name declared with that value alone (nnU-Net's `"edema": 2`), else `background` for 0 and
  `label_<value>`. Evaluation regions: the `regions` given; else, when some label unites several
  values (an nnU-Net v2 region label such as `"whole tumor": [1, 2, 3]`), every non-background
  label, as nnU-Net's region-based training reads them; else each non-background class on its
  own. DataError naming `where` for a declaration that makes no task.
  """
  values = sorted({v for vs in declared.values() for v in vs} | {0})
  if values[0] < 0:
    raise problem(where, f"labels: label values must be >= 0, got {values[0]}")
  class_names = {0: "background"}
  single = {}
  for label, vs in declared.items():
    if len(set(vs)) == 1:
      value = vs[0]
      if value in single:
        raise problem(where, f"labels {single[value]!r} and {label!r} both name the value {value}")
      single[value] = label
      class_names[value] = label
  names = tuple(class_names.get(v, f"label_{v}") for v in values)
  if regions is None:
    if any(len(set(vs)) > 1 for vs in declared.values()):
      regions = {label: vs for label, vs in declared.items() if tuple(set(vs)) != (0,)}
    else:
      regions = {label: vs for label, vs in declared.items() if vs[0] != 0}
  for label, vs in regions.items():
    if 0 in vs:
      raise problem(where, f"region {label!r}: holds the background value 0")
    unknown = [v for v in vs if v not in values]
    if unknown:
      raise problem(where, f"region {label!r}: value(s) {unknown} are not among the labels "
                           f"{values}")
  task = Task(name=str(name), modalities=tuple(modalities), label_values=tuple(values),
              class_names=names,
              regions={str(k): tuple(sorted(set(int(v) for v in vs))) for k, vs in regions.items()})
  try:
    check_task(task, "labels")
  except ValueError as e:
    raise problem(where, str(e)) from None
  return task
