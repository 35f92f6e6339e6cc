"""Dataset integrity check (like nnU-Net's): every problem as one `path: problem` line.

Uses the same discovery and per-case checks as training (`layouts.discover_cases_and_problems`,
`preprocess.check_case`), in their collecting mode, so there is one copy of the rules.
"""
from __future__ import annotations

import dataclasses

from hemijax.data import layouts
from hemijax.data.io import DataError
from hemijax.data.preprocess import check_case, select_split
from hemijax.data.tasks import KNOWN_MODALITIES, get_task

DEFAULT_LABEL_VALUES = get_task("tumor").label_values  # BraTS, when neither the data nor the user says


@dataclasses.dataclass
class Report:
  problems: list[str]
  layout: str | None = None
  num_cases: int = 0
  missing_images: int = 0
  unlabelled: int = 0
  label_values: tuple[int, ...] = ()

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary(self) -> str:
    return (f"OK: {self.num_cases} case(s) in the {self.layout} layout, "
            f"{self.missing_images} missing modality file(s), {self.unlabelled} case(s) without "
            f"label, label values {self.label_values}")


def verify_dataset(root, *, layout="auto", modalities=None, label_values=None) -> Report:
  """Checks every case under `root`; returns a Report whose `problems` are `path: problem` lines.

  `label_values` defaults to the dataset's own declaration (nnU-Net dataset.json), else BraTS's.
  """
  try:
    if layout == "auto":
      layout = layouts.detect_layout(root)
    cases, errors = layouts.discover_cases_and_problems(root, layout, modalities, collect=True)
    if label_values is None:
      label_values = layouts.dataset_label_values(root, layout) or DEFAULT_LABEL_VALUES
  except DataError as e:
    return Report([str(e)], layout if layout != "auto" else None)
  # Missing files are counted against the modalities asked for, else those any case has.
  seen = {m for c in cases for m in c.images}
  wanted = (tuple(modalities) if modalities is not None
            else tuple(m for m in KNOWN_MODALITIES if m in seen))
  problems = [str(e) for e in errors]
  report = Report(problems, layout, len(cases), label_values=tuple(int(v) for v in label_values))
  for case in cases:
    _, case_errors = check_case(case, wanted, label_values, collect=True)
    problems += [str(e) for e in case_errors]
    report.missing_images += sum(m not in case.images for m in wanted)
    report.unlabelled += case.label is None
  try:
    splits = layouts.read_splits(root)
    for name in splits or {}:
      try:
        select_split(cases, root, name)
      except DataError as e:
        problems.append(str(e))
  except DataError as e:
    problems.append(str(e))
  return report
