"""Segmentation tasks: which modalities, which label values, which evaluation regions.

A task is a built-in preset (`TASKS`: tumor, wmh, tissue) or is read from a dataset (`task=auto`:
`hemijax.data.layouts.dataset_task`, recorded in the run's config as `config.task_spec`);
`task_from_config` gives the task of a config either way.

Modality names: any name, normalised once here (`normalise_modality`): the usual spellings of the
BraTS modalities map onto their lower-case file suffixes (FLAIR/T2-FLAIR -> flair, T1Gd/T1c/T1-Gd ->
t1ce, T2w -> t2, ...), and any other name is kept lower-cased ("PD" -> "pd", "DWI" -> "dwi",
"CT" -> "ct"). Names become parts of file names and subset keys ("t2+pd"), so they are simple
tokens: letters, digits, '-' and '_'.

Label values are the task's (BraTS's for `tumor`); a dataset that stores other values for the same
classes declares them in dataset.json and `hemijax.data.labels` pairs them with these. A model's
class id is the index into `label_values`; class 0 is the background, value 0.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

# The modalities of BraTS (and of the built-in phantom); any other name is accepted too.
KNOWN_MODALITIES = ("flair", "t1", "t1ce", "t2")
AUTO = "auto"  # config.task: read the task from the dataset when a run starts

# Spellings seen in BraTS releases, nnU-Net/MSD dataset.json files and manifests, compared after
# lower-casing and dropping '-', '_', ' ' (so 'T1-Gd', 't1_ce' and 'T2 FLAIR' all match).
MODALITY_ALIASES = {
    "flair": "flair", "t2flair": "flair", "t2f": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1", "t1native": "t1",
    "t1ce": "t1ce", "t1gd": "t1ce", "t1c": "t1ce", "t1wce": "t1ce", "t1post": "t1ce",
    "t1contrast": "t1ce",
    "t2": "t2", "t2w": "t2",
    "pd": "pd", "pdw": "pd", "protondensity": "pd",
}
# A name that is not an alias is kept lower-cased; it must be a simple token (file names, subset
# keys joined by '+', CSV columns).
_MODALITY_TOKEN = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
MAX_NAME_LENGTH = 32
# Words the layouts read as a label file or a manifest's case-id column, never as a modality.
RESERVED_NAMES = ("seg", "segm", "segmentation", "label", "case_id", "case", "subject_id",
                  "subject", "id")


def normalise_modality(name, option: str = "modality") -> str:
  """The one spelling of a modality name: an alias's BraTS name, else the name lower-cased.

  Raises ValueError naming `option` if the name is not a simple token (letters, digits, '-', '_')
  or is one the layouts reserve for labels and case ids.
  """
  text = str(name).strip()
  alias = MODALITY_ALIASES.get(re.sub(r"[\s_\-]", "", text.lower()))
  if alias is not None:
    return alias
  lower = text.lower()
  if not _MODALITY_TOKEN.fullmatch(lower) or len(lower) > MAX_NAME_LENGTH:
    raise ValueError(f"{option}: {text!r} is not a modality name; use letters, digits, '-' or '_' "
                     f"(at most {MAX_NAME_LENGTH}; it becomes part of file names)")
  if lower in RESERVED_NAMES:
    raise ValueError(f"{option}: {text!r} cannot be a modality name (it names the label or the "
                     "case id in dataset layouts)")
  return lower


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

  def to_dict(self) -> dict:
    """Plain data (JSON, a config field). Regions are [name, values] pairs: their order is the
    tables' column order, which a ConfigDict (it sorts keys) would lose."""
    return {"name": self.name, "modalities": list(self.modalities),
            "label_values": [int(v) for v in self.label_values],
            "class_names": list(self.class_names),
            "regions": [[name, [int(v) for v in values]] for name, values in self.regions.items()]}

  @classmethod
  def from_dict(cls, data, where: str = "task") -> Task:
    """A task from plain data (`to_dict`'s, or regions as a {name: values} mapping); ValueError
    naming `where` if anything does not fit (see `check_task`)."""
    if hasattr(data, "to_dict"):  # a ConfigDict
      data = data.to_dict()
    if not isinstance(data, Mapping):
      raise ValueError(f"{where}: expected an object with name, modalities, label_values, "
                       f"class_names and regions, got {type(data).__name__}")
    missing = [k for k in ("name", "modalities", "label_values", "class_names", "regions")
               if k not in data]
    if missing:
      raise ValueError(f"{where}: missing {', '.join(missing)}")
    regions = data["regions"]
    if isinstance(regions, Mapping):
      regions = list(regions.items())
    try:
      pairs = [(name, values) for name, values in regions]
    except (TypeError, ValueError):
      raise ValueError(f"{where}: regions must map names to lists of label values") from None
    task = cls(name=str(data["name"]),
               modalities=check_modalities(data["modalities"] or (), option=f"{where}: modalities"),
               label_values=_int_tuple(data["label_values"], f"{where}: label_values"),
               class_names=tuple(str(n) for n in (data["class_names"] or ())),
               regions={str(name): _int_tuple(values, f"{where}: region {name!r}")
                        for name, values in pairs})
    check_task(task, where)
    return task


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
    # The label space of Dorent et al. 2019: six tissue classes, CSF outside the ventricles is
    # background. The phantom draws the deep structures from the MNI152 tissue maps and position
    # (hemijax.data.phantom.anatomy.structures: a coarse mapping, not an atlas).
    "tissue6": Task(
        name="tissue6",
        modalities=("t1", "flair"),
        label_values=(0, 1, 2, 3, 4, 5, 6, 7),
        class_names=("background", "wm", "gm", "basal_ganglia", "ventricles", "cerebellum",
                     "brainstem", "lesion"),
        regions={"wm": (1,), "gm": (2,), "basal_ganglia": (3,), "ventricles": (4,),
                 "cerebellum": (5,), "brainstem": (6,), "lesion": (7,)},
    ),
}


def _int_tuple(values, where) -> tuple[int, ...]:
  if isinstance(values, (int, str)) or not hasattr(values, "__iter__"):
    values = [values]
  out = []
  for v in values:
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{where}: {v!r} is not an integer label value")
    out.append(int(v))
  return tuple(out)


def check_task(task: Task, where: str = "task") -> None:
  """ValueError naming `where` unless: a name; modality names in their one spelling
  (`check_modalities`); distinct label values >= 0, the first 0 (the background, class 0), at
  least one other; one distinct class name per value; at least one region, each a non-empty set
  of the task's non-background values."""
  if not task.name.strip():
    raise ValueError(f"{where}: the task needs a name")
  modalities = check_modalities(task.modalities, option=f"{where}: modalities")
  if modalities != tuple(task.modalities):
    raise ValueError(f"{where}: modalities {list(task.modalities)} are spelled "
                     f"{list(modalities)} here")
  values = task.label_values
  if len(values) < 2 or values[0] != 0:
    raise ValueError(f"{where}: label_values {list(values)} must start with the background 0 and "
                     "hold at least one other class")
  if len(set(values)) != len(values) or min(values) < 0:
    raise ValueError(f"{where}: label_values {list(values)} must be distinct values >= 0")
  names = task.class_names
  if len(names) != len(values) or len(set(names)) != len(names) or not all(n.strip() for n in names):
    raise ValueError(f"{where}: class_names {list(names)} must name each of the label_values "
                     f"{list(values)} once")
  if not task.regions:
    raise ValueError(f"{where}: no evaluation region; name at least one (e.g. lesion: [1])")
  for name, region in task.regions.items():
    bad = [v for v in region if v not in values or v == 0]
    if not name.strip() or not region or bad:
      raise ValueError(f"{where}: region {name!r} must unite some of the non-background label "
                       f"values {list(values[1:])}, got {list(region)}")


def get_task(name: str) -> Task:
  """A built-in task by name (`task_from_config` also knows the ones read from data)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}, or {AUTO!r} to read "
                     "the task from the dataset")
  return TASKS[name]


def task_from_config(config) -> Task:
  """The config's task: the built-in one `config.task` names, or, for `task=auto`, the one read
  from the dataset and recorded in `config.task_spec` when the run started
  (`hemijax.data.datasets.resolve_task`). ValueError naming the field otherwise."""
  name = config.task
  if name != AUTO:
    try:
      return get_task(name)
    except ValueError as e:
      raise ValueError(f"config.task: {e}") from None
  spec = config.get("task_spec", None)
  if not spec:
    raise ValueError("config.task=auto: the task has not been read from the dataset yet "
                     "(hemijax.data.datasets.resolve_task(config) reads it from config.data.root)")
  return Task.from_dict(spec, where="config.task_spec")


def check_modalities(names, allowed=None, option="modalities") -> tuple[str, ...]:
  """The names normalised (`normalise_modality`), in their order; ValueError naming the option if
  the set is empty, a name is not a modality name, two names are one modality, or (with
  `allowed`) a name is not among `allowed`."""
  if isinstance(names, str):
    names = (names,)
  given = tuple(names)
  if not given:
    raise ValueError(f"{option}: the modality set is empty")
  out = tuple(normalise_modality(n, option) for n in given)
  if len(set(out)) != len(out):
    raise ValueError(f"{option}: duplicate modality names in {list(given)}")
  if allowed is not None:
    unknown = [n for n in out if n not in allowed]
    if unknown:
      raise ValueError(f"{option}: unknown modality name(s) {unknown}; known: {list(allowed)}")
  return out
