"""Dataset integrity check (like nnU-Net's): every problem as one `path: problem` line.

Uses the same discovery, label mapping, split choice and per-case checks as training
(`layouts.discover_cases_and_problems`, `layouts.dataset_label_mapping`, `splits.choose`,
`preprocess.check_case`), in their collecting mode, so there is one copy of the rules.
"""
from __future__ import annotations

import dataclasses

from hemijax.data import layouts, splits as splits_lib
from hemijax.data.io import DataError
from hemijax.data.preprocess import check_case, select_split
from hemijax.data.tasks import AUTO, Task, check_modalities, get_task

DEFAULT_LABEL_VALUES = get_task("tumor").label_values  # BraTS, when neither the data nor the user says


@dataclasses.dataclass
class Report:
  problems: list[str]
  layout: str | None = None
  num_cases: int = 0
  missing_images: int = 0
  unlabelled: int = 0
  label_values: tuple[int, ...] = ()
  labels: str = ""  # how label values pair with the task's, when a task was given
  split: str = ""   # which split a training run will use
  task: str = ""    # the task read from the dataset (task=auto)

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary(self) -> str:
    lines = [f"OK: {self.num_cases} case(s) in the {self.layout} layout, "
             f"{self.missing_images} missing modality file(s), {self.unlabelled} case(s) without "
             f"label, label values {self.label_values}"]
    lines += [line for line in (self.task, self.labels, self.split) if line]
    return "\n".join(lines)


def verify_dataset(root, *, layout="auto", modalities=None, label_values=None, task=None,
                   splits_file=None) -> Report:
  """Checks every case under `root`; returns a Report whose `problems` are `path: problem` lines.

  `task`: a built-in task's name, "auto" (the task the dataset declares, `layouts.dataset_task`;
  its modalities are the default `modalities`), or a `Task`. `label_values` defaults to those
  the task maps the dataset's declaration onto (nnU-Net dataset.json `labels`), else to the
  declared values, else BraTS's. `splits_file`: the split file a run would be given
  (config.data.splits_file); the report says which split a run will use.
  """
  task_line = ""
  try:
    if layout == "auto":
      layout = layouts.detect_layout(root)
    if task == AUTO:
      task = layouts.dataset_task(root, layout)
      task_line = f"task: {describe_task(task)}"
    if isinstance(task, Task):
      modalities = modalities or task.modalities
    cases, errors = layouts.discover_cases_and_problems(root, layout, modalities, collect=True)
  except DataError as e:
    return Report([str(e)], layout if layout != "auto" else None)
  problems = [str(e) for e in errors]
  labels_line = ""
  if label_values is None:
    try:
      if task is not None:
        task = task if isinstance(task, Task) else get_task(task)
        mapping = layouts.dataset_label_mapping(root, task, layout)
        label_values, labels_line = mapping.file_values, f"labels: {mapping.describe()}"
      else:
        label_values = layouts.dataset_label_values(root, layout)
    except DataError as e:
      problems.append(str(e))
      try:  # still check the files against what the dataset declares
        label_values = layouts.dataset_label_values(root, layout)
      except DataError:
        pass
    label_values = label_values or DEFAULT_LABEL_VALUES
  # Missing files are counted against the modalities asked for, else those any case has.
  wanted = (check_modalities(modalities) if modalities is not None
            else tuple(dict.fromkeys(m for c in cases for m in c.images)))
  report = Report(problems, layout, len(cases), label_values=tuple(int(v) for v in label_values),
                  labels=labels_line, task=task_line)
  for case in cases:
    _, case_errors = check_case(case, wanted, label_values, collect=True)
    problems += [str(e) for e in case_errors]
    report.missing_images += sum(m not in case.images for m in wanted)
    report.unlabelled += case.label is None
  try:
    choice = splits_lib.choose(cases, root, splits_file)
    report.split = choice.describe()
    if choice.origin != "generated":
      for name in choice.splits:
        try:
          select_split(cases, root, name, choice.splits, choice.path)
        except DataError as e:
          problems.append(str(e))
  except DataError as e:
    problems.append(str(e))
  return report


def describe_task(task: Task) -> str:
  """One line: name, modalities, classes (value=name) and regions (name=values)."""
  classes = ", ".join(f"{v}={n}" for v, n in zip(task.label_values, task.class_names))
  regions = ", ".join(f"{n}={'+'.join(map(str, vs))}" for n, vs in task.regions.items())
  return (f"{task.name}: modalities {', '.join(task.modalities)}; classes {classes}; "
          f"regions {regions}")
