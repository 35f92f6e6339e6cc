"""Train/val/test splits: which file a run uses, and a seeded one for datasets that have none.

A split file is `{"train": [ids], "val": [ids], "test": [ids]}`. A run uses, in this order:
1. the file `config.data.splits_file` names (a generated one applies only to the dataset it was
   made for, see below);
2. the dataset's own `splits.json` (beside the cases, as the phantom writes it);
3. otherwise a split made here: deterministic (seed `SPLIT_SEED`, independent of `config.seed`,
   so every method and seed trained on a dataset gets the same test cases), 60/20/20 %,
   stratified by the set of modalities a case has. Training writes it to WORKDIR/splits.json and
   records that path in config.json, so a rerun and evaluate reuse it. It carries
   `"about": {"dataset": <folder>, "how": ...}`.

Only labelled cases are split (training and validation need labels); unlabelled ones are in none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from hemijax import atomic
from hemijax.data import layouts
from hemijax.data.io import DataError, problem

SPLIT_SEED = 0
# Cases are dealt out in this cycle: 60/20/20 %, and one case each for n = 3.
CYCLE = ("train", "val", "test", "train", "train")
RUN_SPLITS_FILE = "splits.json"
HOW = (f"seeded (seed {SPLIT_SEED}), 60/20/20 %, stratified by the modalities present; "
       "labelled cases only")


@dataclasses.dataclass(frozen=True)
class SplitChoice:
  """The split a run uses. `path` is None for one made now and not written yet."""
  splits: dict[str, list[str]]
  path: pathlib.Path | None
  origin: str  # "config" (data.splits_file), "dataset" (its splits.json) or "generated"

  def counts(self) -> str:
    return ", ".join(f"{name} {len(self.splits.get(name, []))}" for name in layouts.SPLIT_NAMES)

  def describe(self) -> str:
    if self.origin == "generated":
      where = f"written to {self.path}" if self.path is not None else "written to WORKDIR/splits.json by train.py"
      return f"split: none in the dataset; a {HOW} ({self.counts()}), {where}"
    what = "config.data.splits_file" if self.origin == "config" else "the dataset's own"
    return f"split: {self.path} ({what}; {self.counts()})"


def _order_key(case_id: str) -> str:
  return hashlib.sha256(f"{SPLIT_SEED}:{case_id}".encode()).hexdigest()


def make_splits(cases) -> dict[str, list[str]]:
  """A deterministic split of the labelled `cases` (`layouts.CaseFiles`).

  Cases are grouped by the modalities they have, each group ordered by a seeded hash of the case
  id (so adding a case does not reorder the others), and the groups, one after the other, are
  dealt out along `CYCLE`: every group is spread over train/val/test in proportion.
  """
  groups: dict[tuple[str, ...], list[str]] = {}
  for case in cases:
    if case.label is not None:
      groups.setdefault(tuple(sorted(case.images)), []).append(case.case_id)
  ordered = [i for key in sorted(groups) for i in sorted(groups[key], key=_order_key)]
  out = {name: [] for name in layouts.SPLIT_NAMES}
  for position, case_id in enumerate(ordered):
    out[CYCLE[position % len(CYCLE)]].append(case_id)
  return out


def write_splits(path, splits, dataset) -> pathlib.Path:
  """Writes a generated split (atomically) with the dataset folder it belongs to."""
  path = pathlib.Path(path)
  body = dict(splits, about={"dataset": str(pathlib.Path(dataset).absolute()), "how": HOW})
  atomic.write_text(path, json.dumps(body, indent=1) + "\n")
  return path


def _same_folder(a, b) -> bool:
  try:
    return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()
  except OSError:
    return False


def applies_to(about: dict, root) -> bool:
  """Whether a split file with this "about" serves the dataset at `root` (files without one
  serve any dataset: the user chose them)."""
  dataset = about.get("dataset")
  return dataset is None or _same_folder(dataset, root)


def choose(cases, root, splits_file=None) -> SplitChoice:
  """The split for the dataset at `root` (see the module docstring for the order)."""
  if splits_file:
    path = pathlib.Path(splits_file)
    splits, about = layouts.read_split_file(path)
    if applies_to(about, root):
      return SplitChoice(splits, path, "config")
  own = layouts.splits_path(root)
  if own.is_file():
    return SplitChoice(layouts.read_split_file(own)[0], own, "dataset")
  return SplitChoice(make_splits(cases), None, "generated")


def for_run(cases, root, workdir, splits_file=None) -> SplitChoice:
  """`choose` at the start of a training run: a generated split is written to WORKDIR/splits.json,
  or the one written there by an earlier start of this run is reused."""
  choice = choose(cases, root, splits_file)
  if choice.origin != "generated":
    return choice
  path = pathlib.Path(workdir) / RUN_SPLITS_FILE
  if path.is_file():
    splits, about = layouts.read_split_file(path)
    if not applies_to(about, root):
      raise problem(path, f"made for the dataset {about.get('dataset')}, not {root}; use another "
                          "--workdir (or pass --config.data.splits_file)")
    return SplitChoice(splits, path.absolute(), "generated")
  if not any(choice.splits.values()):
    raise DataError(f"{root}: no case has a label file, so there is nothing to train on")
  return SplitChoice(choice.splits, write_splits(path, choice.splits, root).absolute(), "generated")
