"""Finding the cases of a dataset on disk: BraTS 2018, BraTS 2020/2021, nnU-Net raw, manifest.

Every layout is reduced to a list of `CaseFiles` (case id, modality -> file, label file). Modality
names are normalised by `hemijax.data.tasks.normalise_modality` (FLAIR -> flair, T1Gd -> t1ce,
PD -> pd, any other name lower-cased). The modalities of a dataset: nnU-Net's channel names,
a manifest's columns, and for BraTS-style folders the four BraTS suffixes plus any that a task
file (`hemijax_task.json`) declares. A missing modality file is not an error: the case simply
lacks that key in `images`. Only opening directories and small text files happens here; image
contents are checked in `preprocess.check_case`.

The task a dataset declares (`dataset_task`, for `task=auto`): modalities, label values and
names, evaluation regions, from `hemijax_task.json`, nnU-Net's dataset.json or a manifest's
header (docs/data.md, "Your own task").
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re

from hemijax.data import labels as labels_lib
from hemijax.data.case_ids import check_case_id
from hemijax.data.io import DataError, is_nifti, one_line, problem, strip_nifti_suffix
from hemijax.data.tasks import KNOWN_MODALITIES, Task, check_modalities, normalise_modality

LAYOUTS = ("brats2018", "brats", "nnunet", "manifest")
TASK_FILE = "hemijax_task.json"
TASK_FILE_KEYS = ("name", "modalities", "labels", "regions")
LABEL_SUFFIXES = ("seg", "segm", "label")
MANIFEST_NAMES = ("manifest.csv", "manifest.json")
CASE_ID_COLUMNS = ("case_id", "case", "subject_id", "subject", "id")
LABEL_COLUMNS = ("label", "seg", "segmentation")
SPLITS_FILE = "splits.json"
SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case. `images` holds only modalities whose file exists (or is listed)."""
  case_id: str
  images: dict[str, pathlib.Path]
  label: pathlib.Path | None
  origin: pathlib.Path | None = None  # case folder or manifest, for messages about the whole case

  @property
  def where(self) -> pathlib.Path | str:
    """What to name in a message about the case as a whole."""
    if self.origin is not None:
      return self.origin
    return next(iter(self.images.values()), self.case_id)

  @property
  def files(self) -> list[pathlib.Path]:
    return list(self.images.values()) + ([self.label] if self.label is not None else [])


def _modality_or_none(name) -> str | None:
  """`normalise_modality(name)`, or None if it is not a modality name."""
  try:
    return normalise_modality(name)
  except ValueError:
    return None


def _requested_modalities(modalities):
  """The modalities asked for (checked, normalised), or None: the dataset's own."""
  if modalities is None:
    return None
  try:
    return check_modalities(modalities)
  except ValueError as e:
    raise DataError(one_line(e)) from None


class _Problems:
  """Raises the first problem (training) or collects them all (verify)."""

  def __init__(self, collect: bool, labels: bool = True):
    self.collect = collect
    self.labels = labels  # False: problems with label files are not looked for (prediction)
    self.items: list[DataError] = []

  def __call__(self, error: DataError):
    if not self.collect:
      raise error
    self.items.append(error)


def _visible(path: pathlib.Path) -> bool:
  return not path.name.startswith(".")


def _subdirs(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _check_root(root) -> pathlib.Path:
  root = pathlib.Path(root)
  if not root.exists():
    raise problem(root, "no such file or folder")
  if root.is_dir() and not any(_visible(p) for p in root.iterdir()):
    raise problem(root, "empty folder")
  return root


def _named_manifest(root: pathlib.Path) -> pathlib.Path | None:
  """root itself (a .csv/.json file) or root/manifest.{csv,json}: a manifest by its name."""
  if root.is_file():
    return root if root.suffix.lower() in (".csv", ".json") else None
  for name in MANIFEST_NAMES:
    if (root / name).is_file():
      return root / name
  return None


def _lone_csv(root: pathlib.Path) -> pathlib.Path | None:
  csvs = sorted(p for p in root.glob("*.csv") if _visible(p))
  return csvs[0] if len(csvs) == 1 else None


def _find_manifest(root: pathlib.Path) -> pathlib.Path | None:
  """A named manifest, else root's only CSV if it has a case_id column (BraTS folders hold CSVs
  like name_mapping.csv that are not manifests)."""
  named = _named_manifest(root)
  if named is not None or root.is_file():
    return named
  lone = _lone_csv(root)
  return lone if lone is not None and _has_case_id_column(lone) else None


def _csv_header(path: pathlib.Path) -> list[str]:
  try:
    with open(path, newline="") as f:
      return next(csv.reader(f), [])
  except (OSError, UnicodeDecodeError, csv.Error):
    return []


def _has_case_id_column(path: pathlib.Path) -> bool:
  return any(h.strip().lower() in CASE_ID_COLUMNS for h in _csv_header(path))


def _manifest_files_exist(path: pathlib.Path) -> bool:
  """Whether `path` reads as a manifest (case id + modality columns, nothing else) whose first
  row names files that exist: a side table such as clinical.csv with an ID column does not."""
  try:
    rows = _read_manifest_rows(path)
    _, _, modality_cols = _manifest_columns(path, list(rows[0]) if rows else [])
  except DataError:
    return False
  cells = [_cell(rows[0].get(c)) for c in modality_cols]
  named = [c for c in cells if c]
  return bool(named) and all((path.parent / c).is_file() for c in named)


def _looks_like_brats_case(folder: pathlib.Path, names) -> bool:
  for f in folder.iterdir():
    if is_nifti(f.name):
      suffix = strip_nifti_suffix(f.name).rsplit("_", 1)[-1]
      if _modality_or_none(suffix) in names or suffix.lower() in LABEL_SUFFIXES:
        return True
  return False


def detect_layout(root) -> str:
  """Guesses the layout of `root` (a folder, or a manifest file); DataError naming it if unsure."""
  root = _check_root(root)
  if root.is_file():
    if _find_manifest(root):
      return "manifest"
    raise problem(root, "not a folder or a manifest (.csv/.json)")
  has_images = (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir()
  if (root / "dataset.json").is_file() and has_images:
    return "nnunet"
  if (root / "HGG").is_dir() or (root / "LGG").is_dir():
    return "brats2018"
  if _named_manifest(root):
    return "manifest"
  # A lone CSV is a manifest only if it reads as one and lists files that exist; BraTS case
  # folders beside a side table (clinical.csv with an ID column) are a BraTS dataset.
  lone = _lone_csv(root)
  if lone is not None and _manifest_files_exist(lone):
    return "manifest"
  names = set(KNOWN_MODALITIES) | set(_task_file_modalities(root) or ())
  if any(_looks_like_brats_case(d, names) for d in _subdirs(root)):
    return "brats"
  if lone is not None and _has_case_id_column(lone):
    return "manifest"  # let discovery name what is wrong with it
  raise problem(root, f"cannot detect the dataset layout (none of {', '.join(LAYOUTS)}); "
                      "check the folder or pass --layout")


# ----------------------------------------------------------------------------------------------
# BraTS 2018 (HGG/, LGG/) and BraTS 2020/2021 (<case>/<case>_<modality>.nii.gz)


def _brats_case(folder: pathlib.Path, wanted, known, report) -> CaseFiles | None:
  """`wanted`: the modalities to take; `known`: further names of the dataset, skipped quietly
  (any other suffix is reported: a typo, or a modality the task file should declare)."""
  case_id = folder.name
  images: dict[str, pathlib.Path] = {}
  label = None
  for f in sorted(folder.iterdir()):
    if not is_nifti(f.name) or not _visible(f):
      continue
    stem = strip_nifti_suffix(f.name)
    suffix = stem[len(case_id) + 1:] if stem.startswith(case_id + "_") else stem.rsplit("_", 1)[-1]
    if suffix.lower() in LABEL_SUFFIXES:
      if label is not None:
        if report.labels:
          report(problem(f, f"second label file for case {case_id} (also {label.name})"))
        continue
      label = f
      continue
    modality = _modality_or_none(suffix)
    if modality not in wanted:
      if modality not in known:
        report(problem(f, f"unknown modality {suffix!r} in the file name; known: "
                          f"{', '.join(dict.fromkeys((*wanted, *known)))} (and 'seg' for the "
                          f"label; declare other modalities in {TASK_FILE})"))
      continue
    if modality in images:
      report(problem(f, f"second {modality} file for case {case_id} (also {images[modality].name})"))
      continue
    images[modality] = f
  return _finish_case(CaseFiles(case_id, _ordered(images, wanted), label, folder), wanted, report)


def _ordered(images, wanted):
  return {m: images[m] for m in wanted if m in images}


def _finish_case(case: CaseFiles, wanted, report) -> CaseFiles | None:
  if not case.images:
    report(problem(case.where, f"case {case.case_id} has no image file for any of the modalities "
                               f"{', '.join(wanted)}"))
    return None
  return case


def _brats_modalities(root: pathlib.Path) -> tuple[str, ...]:
  """A BraTS-style dataset's modalities: its task file's, else the four BraTS ones."""
  return _task_file_modalities(root) or KNOWN_MODALITIES


def _discover_brats(root: pathlib.Path, wanted, report) -> list[CaseFiles]:
  known = set(KNOWN_MODALITIES) | set(_brats_modalities(root))
  wanted = wanted or _brats_modalities(root)
  return [c for c in (_brats_case(d, wanted, known, report) for d in _subdirs(root))
          if c is not None]


def _discover_brats2018(root: pathlib.Path, wanted, report) -> list[CaseFiles]:
  grades = [root / g for g in ("HGG", "LGG") if (root / g).is_dir()]
  if not grades:
    raise problem(root, "BraTS 2018 layout needs an HGG/ or LGG/ folder")
  known = set(KNOWN_MODALITIES) | set(_brats_modalities(root))
  wanted = wanted or _brats_modalities(root)
  cases = []
  for grade in grades:
    cases += [c for c in (_brats_case(d, wanted, known, report) for d in _subdirs(grade))
              if c is not None]
  return cases


# ----------------------------------------------------------------------------------------------
# nnU-Net raw: dataset.json + imagesTr/<case>_XXXX.nii.gz + labelsTr/<case>.nii.gz


def _read_json_object(path: pathlib.Path, missing="not found (an nnU-Net dataset needs one)",
                      expected="expected a JSON object") -> dict:
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise problem(path, missing) from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise problem(path, f"cannot read JSON ({e})") from None
  if not isinstance(meta, dict):
    raise problem(path, expected)
  return meta


def read_dataset_json(root) -> dict:
  """Reads and checks an nnU-Net `dataset.json` -> {"channels": {index: modality} (in index
  order), "labels": {name: (values...)} or None, "file_ending": str, "name": str or None};
  DataError naming dataset.json."""
  path = pathlib.Path(root) / "dataset.json"
  meta = _read_json_object(path)
  names = meta.get("channel_names", meta.get("modality"))  # v2, v1
  if not isinstance(names, dict) or not names:
    raise problem(path, "needs a 'channel_names' (or 'modality') object like {\"0\": \"FLAIR\"}")
  channels: dict[int, str] = {}
  for key, name in names.items():
    try:
      index = int(key)
    except ValueError:
      raise problem(path, f"channel key {key!r} is not an integer") from None
    if index in channels:
      raise problem(path, f"channel {index} is declared twice")
    try:
      modality = normalise_modality(name, option=f"channel {key}")
    except ValueError as e:
      raise problem(path, str(e)) from None
    if modality in channels.values():
      raise problem(path, f"channel {key}: {name!r} maps to {modality}, which another channel has")
    channels[index] = modality
  labels = meta.get("labels")
  name = meta.get("name")
  return {"channels": dict(sorted(channels.items())),
          "labels": None if labels is None else labels_lib.parse_declaration(labels, path),
          "file_ending": str(meta.get("file_ending", ".nii.gz")),
          "name": str(name) if isinstance(name, str) and name.strip() else None}


def _discover_nnunet(root: pathlib.Path, wanted, report, include_test=False) -> list[CaseFiles]:
  meta = read_dataset_json(root)
  wanted = wanted or tuple(meta["channels"].values())
  ending = meta["file_ending"]
  subsets = [("imagesTr", "labelsTr")] + ([("imagesTs", "labelsTs")] if include_test else [])
  found: dict[str, dict] = {}
  for images_dir, labels_dir in subsets:
    folder = root / images_dir
    if not folder.is_dir():
      if images_dir == "imagesTr":
        raise problem(folder, "not found (an nnU-Net dataset needs imagesTr/)")
      continue
    for f in sorted(folder.iterdir()):
      if not _visible(f) or not f.name.endswith(ending):
        continue
      match = re.fullmatch(r"(.+)_(\d{4})", f.name[:-len(ending)])
      if match is None:
        report(problem(f, f"not named <case>_XXXX{ending} (XXXX = channel index)"))
        continue
      case_id, index = match.group(1), int(match.group(2))
      if index not in meta["channels"]:
        report(problem(f, f"channel {index:04d} is not declared in {root / 'dataset.json'}"))
        continue
      entry = found.setdefault(case_id, {"images": {}, "labels_dir": root / labels_dir})
      if entry["labels_dir"] != root / labels_dir:
        report(problem(f, f"case {case_id} is in both imagesTr/ and imagesTs/"))
        continue
      modality = meta["channels"][index]
      if modality in wanted:
        entry["images"][modality] = f
  cases = []
  for case_id, entry in found.items():
    label = entry["labels_dir"] / f"{case_id}{ending}"
    case = CaseFiles(case_id, _ordered(entry["images"], wanted), label if label.is_file() else None,
                     None)
    if not case.images:
      report(problem(root / "imagesTr", f"case {case_id} has no image file for any of the "
                                        f"modalities {', '.join(wanted)}"))
      continue
    cases.append(case)
  return cases


# ----------------------------------------------------------------------------------------------
# Manifest: CSV or JSON, one row per case: case_id, one column per modality, label.


def _read_manifest_rows(path: pathlib.Path) -> list[dict]:
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise problem(path, f"cannot read manifest ({e})") from None
  if path.suffix.lower() == ".json":
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise problem(path, f"cannot read JSON ({e})") from None
    if isinstance(rows, dict):
      rows = rows.get("cases")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
      raise problem(path, "expected a list of objects (or {\"cases\": [...]}), one per case")
    return rows
  try:
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
  except csv.Error as e:
    raise problem(path, f"cannot read CSV ({e})") from None
  if reader.fieldnames is None:
    raise problem(path, "empty manifest")
  for row in rows:
    if None in row:
      raise problem(path, f"row {reader.line_num}: more cells than header columns")
  return rows


def _manifest_columns(path, columns) -> tuple[str, str | None, dict[str, str]]:
  """Sorts header names into (case id column, label column, {column: modality})."""
  case_col = label_col = None
  modality_cols: dict[str, str] = {}
  for col in columns:
    key = str(col).strip().lower()
    if key in CASE_ID_COLUMNS and case_col is None:
      case_col = col
    elif key in LABEL_COLUMNS and label_col is None:
      label_col = col
    else:
      modality = _modality_or_none(key)
      if modality is None:
        raise problem(path, f"column {col!r}: not a modality name (letters, digits, '-' or '_'), "
                            f"'case_id' or 'label'")
      if modality in modality_cols.values():
        raise problem(path, f"column {col!r} maps to {modality}, which another column has")
      modality_cols[col] = modality
  if case_col is None:
    raise problem(path, "needs a 'case_id' column")
  if not modality_cols:
    raise problem(path, "has no modality column (one column per modality, named after it)")
  return case_col, label_col, modality_cols


def _cell(value) -> str:
  return "" if value is None else str(value).strip()


def _discover_manifest(root: pathlib.Path, wanted, report) -> list[CaseFiles]:
  path = _find_manifest(root)
  if path is None:
    raise problem(root, f"no manifest found ({' or '.join(MANIFEST_NAMES)})")
  rows = _read_manifest_rows(path)
  if not rows:
    raise problem(path, "manifest lists no case")
  columns = list(dict.fromkeys(k for row in rows for k in row))
  case_col, label_col, modality_cols = _manifest_columns(path, columns)
  wanted = wanted or tuple(modality_cols.values())
  base = path.parent
  cases = []
  for number, row in enumerate(rows, 1):
    case_id = _cell(row.get(case_col))
    if not case_id:
      report(problem(path, f"row {number}: empty case_id"))
      continue
    images: dict[str, pathlib.Path] = {}
    label = None
    for col, modality in modality_cols.items():
      cell = _cell(row.get(col))
      if not cell or modality not in wanted:
        continue  # an empty cell is a missing modality
      file = base / cell
      if not file.is_file():
        report(problem(file, f"listed in {path} as {modality} of case {case_id}, but not found"))
        continue
      images[modality] = file
    cell = _cell(row.get(label_col)) if label_col else ""
    if cell:
      label = base / cell
      if not label.is_file():
        if report.labels:
          report(problem(label, f"listed in {path} as the label of case {case_id}, but not found"))
        label = None
    case = CaseFiles(case_id, _ordered(images, wanted), label, path)
    if not case.images:
      report(problem(path, f"case {case_id} has no image for any of the modalities "
                           f"{', '.join(wanted)}"))
      continue
    cases.append(case)
  return cases


# ----------------------------------------------------------------------------------------------


def discover_cases_and_problems(root, layout="auto", modalities=None, *, include_test=False,
                                collect=False, labels=True):
  """`discover_cases` that, with `collect=True`, returns (cases, problems) instead of raising at the
  first problem inside a case (used by `verify`); `labels=False` skips checking label files
  (prediction never reads them). Problems with the dataset as a whole (empty
  folder, unreadable manifest or dataset.json, unknown layout) always raise."""
  root = _check_root(root)
  wanted = _requested_modalities(modalities)
  if layout == "auto":
    layout = detect_layout(root)
  if layout not in LAYOUTS:
    raise DataError(f"--layout: unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
  if root.is_file() and layout != "manifest":
    raise problem(root, f"the {layout} layout needs a folder")
  report = _Problems(collect, labels)
  if layout == "brats":
    cases = _discover_brats(root, wanted, report)
  elif layout == "brats2018":
    cases = _discover_brats2018(root, wanted, report)
  elif layout == "nnunet":
    cases = _discover_nnunet(root, wanted, report, include_test)
  else:
    cases = _discover_manifest(root, wanted, report)
  seen: dict[str, CaseFiles] = {}
  unique = []
  for case in cases:
    try:
      check_case_id(case.case_id)  # ids become output file names
    except DataError as e:
      report(problem(case.where, str(e)))
      continue
    if case.case_id in seen:
      other = seen[case.case_id].where
      report(problem(case.where, f"case id {case.case_id} appears twice (also {other})"))
      continue
    seen[case.case_id] = case
    unique.append(case)
  if not unique and not report.items:
    raise problem(root, f"no case found in the {layout} layout")
  return sorted(unique, key=lambda c: c.case_id), report.items


def discover_cases(root, layout="auto", modalities=None, *, include_test=False) -> list[CaseFiles]:
  """Lists the cases under `root`, sorted by case id.

  `modalities` restricts (and orders) the modalities looked for (default: every one the layout
  names: nnU-Net's channels, a manifest's columns, for BraTS folders the task file's modalities,
  else the four BraTS ones). Raises `DataError` naming the folder/file on an empty folder, an
  unknown modality name, a case without any of the modalities, or an undetectable layout. nnU-Net
  test cases (imagesTs/) are included only with `include_test`.
  """
  cases, _ = discover_cases_and_problems(root, layout, modalities, include_test=include_test)
  return cases


def _dataset_folder(root) -> pathlib.Path:
  root = pathlib.Path(root)
  return root.parent if root.is_file() else root  # a manifest: its folder


def dataset_json_path(root) -> pathlib.Path:
  return _dataset_folder(root) / "dataset.json"


def task_file_path(root) -> pathlib.Path:
  """Where a dataset's task file lies: `hemijax_task.json` in its folder (beside a manifest)."""
  return _dataset_folder(root) / TASK_FILE


def read_task_file(root) -> dict | None:
  """The dataset's task file, checked, or None if it has none:
  {"name": str, "modalities": (names...), "labels": {name: (values...)},
  "regions": {name: (values...)}}, each key only where the file gives it. `labels` takes
  dataset.json's forms (`labels.parse_declaration`); DataError naming the file otherwise."""
  path = task_file_path(root)
  if not path.is_file():
    return None
  meta = _read_json_object(path, expected='expected an object like {"modalities": ["t2", "pd"], '
                                          '"labels": {"background": 0, "lesion": 1}}')
  unknown = [k for k in meta if k not in TASK_FILE_KEYS]
  if unknown:
    raise problem(path, f"unknown key(s) {unknown}; a task file holds {', '.join(TASK_FILE_KEYS)}")
  out = {}
  if "name" in meta:
    if not isinstance(meta["name"], str) or not meta["name"].strip():
      raise problem(path, "'name' must be a non-empty string")
    out["name"] = meta["name"].strip()
  if "modalities" in meta:
    names = meta["modalities"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise problem(path, "'modalities' must be a list of names like [\"t2\", \"pd\"]")
    try:
      out["modalities"] = check_modalities(names, option="modalities")
    except ValueError as e:
      raise problem(path, str(e)) from None
  if "labels" in meta:
    out["labels"] = labels_lib.parse_declaration(meta["labels"], path)
  if "regions" in meta:
    regions = meta["regions"]
    if not isinstance(regions, dict) or not regions or not all(
        isinstance(v, list) for v in regions.values()):
      raise problem(path, "'regions' must be an object like {\"lesion\": [1]} (name: values)")
    out["regions"] = labels_lib.parse_declaration(regions, path)
  return out


def _task_file_modalities(root) -> tuple[str, ...] | None:
  return (read_task_file(root) or {}).get("modalities")


def _layout_modalities(root, layout) -> tuple[str, ...]:
  """The modalities the layout itself names: nnU-Net's channels (index order), a manifest's
  modality columns (header order), the BraTS suffixes (and the task file's) for folders."""
  if layout == "nnunet":
    return tuple(read_dataset_json(root)["channels"].values())
  if layout == "manifest":
    path = _find_manifest(pathlib.Path(root))
    if path is None:
      raise problem(root, f"no manifest found ({' or '.join(MANIFEST_NAMES)})")
    rows = _read_manifest_rows(path)
    columns = list(dict.fromkeys(k for row in rows for k in row)) or _csv_header(path)
    return tuple(_manifest_columns(path, columns)[2].values())
  return _brats_modalities(_dataset_folder(root))


def dataset_labels(root, layout="auto") -> dict[str, tuple[int, ...]] | None:
  """The labels the dataset declares ({name: values}), or None: the `labels` of its task file,
  else of its dataset.json (nnU-Net's, or one placed beside any other layout, e.g. for BraTS
  2023's ET = 3)."""
  root = pathlib.Path(root)
  task_file = read_task_file(root)
  if task_file and "labels" in task_file:
    return task_file["labels"]
  if layout == "auto":
    layout = detect_layout(root)
  if layout == "nnunet":
    return read_dataset_json(root)["labels"]
  path = dataset_json_path(root)
  if not path.is_file():
    return None
  labels = _read_json_object(path).get("labels")
  return None if labels is None else labels_lib.parse_declaration(labels, path)


def _labels_source(root) -> pathlib.Path:
  """The file whose `labels` `dataset_labels` reads (for messages)."""
  task_file = read_task_file(root)
  return task_file_path(root) if task_file and "labels" in task_file else dataset_json_path(root)


def dataset_task(root, layout="auto") -> Task:
  """The task a dataset declares (`task=auto`; docs/data.md, "Your own task").

  - modalities: the task file's `modalities` (each one a channel/column of an nnU-Net dataset or a
    manifest), else nnU-Net's channel names or the manifest's modality columns, in their order; a
    BraTS-style folder needs the task file to name them;
  - labels: the task file's `labels`, else dataset.json's (`dataset_labels`);
  - regions: the task file's `regions`, else from the labels (`labels.task_from_declaration`);
  - name: the task file's, else dataset.json's `name`, else the folder's name.
  Raises `DataError` naming the file to add or fix.
  """
  root = _check_root(root)
  if layout == "auto":
    layout = detect_layout(root)
  task_file = read_task_file(root) or {}
  path = task_file_path(root)
  own = None if layout in ("brats", "brats2018") else _layout_modalities(root, layout)
  modalities = task_file.get("modalities")
  if modalities is None:
    if own is None:
      raise problem(path, f"not found; a {layout}-layout dataset read with task=auto needs one "
                          'naming its modalities, e.g. {"modalities": ["t2", "pd"], "labels": '
                          '{"background": 0, "lesion": 1}}')
    modalities = own
  elif own is not None:
    where = "channel names of dataset.json" if layout == "nnunet" else "manifest's columns"
    missing = [m for m in modalities if m not in own]
    if missing:
      raise problem(path, f"modalities {missing} are not among the {where} {list(own)}")
  declared = dataset_labels(root, layout)
  if declared is None:
    where = dataset_json_path(root) if layout == "nnunet" else path
    raise problem(where, 'no labels declared for task=auto: add "labels" (e.g. {"background": 0, '
                         f'"lesion": 1}}) to {TASK_FILE} or dataset.json')
  name = (task_file.get("name") or
          (read_dataset_json(root)["name"] if layout == "nnunet" else None) or
          _dataset_folder(root).name)
  return labels_lib.task_from_declaration(name, modalities, declared, task_file.get("regions"),
                                          _labels_source(root))


def dataset_label_values(root, layout="auto") -> tuple[int, ...] | None:
  """Every label value the dataset declares (see `dataset_labels`), or None."""
  declared = dataset_labels(root, layout)
  return None if declared is None else labels_lib.declared_values(declared)


def dataset_label_mapping(root, task, layout="auto") -> labels_lib.LabelMapping:
  """How the dataset's label values pair with `task`'s (`labels.mapping_from_declaration`): the one
  mapping verify, training, predict and evaluate use to read labels and write predictions."""
  declared = dataset_labels(root, layout)
  return labels_lib.mapping_from_declaration(task, declared, _labels_source(root))


def splits_path(root) -> pathlib.Path:
  root = pathlib.Path(root)
  return (root.parent if root.is_file() else root) / SPLITS_FILE


def read_splits(root) -> dict[str, list[str]] | None:
  """Reads `root/splits.json` ({"train": [...], "val": [...], "test": [...]}), or None if absent."""
  path = splits_path(root)
  if not path.is_file():
    return None
  return read_split_file(path)[0]


def read_split_file(path) -> tuple[dict[str, list[str]], dict]:
  """Reads a split file -> (splits, about). `about` is the optional "about" object a generated
  split carries ({"dataset": folder it was made for, "how": ...}); {} if none."""
  path = pathlib.Path(path)
  splits = _read_json_object(
      path, missing="split file not found",
      expected='expected an object like {"train": [...], "val": [...], "test": [...]}')
  about = splits.pop("about", {})
  if not isinstance(about, dict):
    raise problem(path, "'about' must be an object")
  out = {}
  for name, ids in splits.items():
    if name not in SPLIT_NAMES:
      raise problem(path, f"unknown split {name!r}; expected {', '.join(SPLIT_NAMES)}")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
      raise problem(path, f"split {name!r} must be a list of case ids (strings)")
    out[name] = list(ids)
  seen: dict[str, str] = {}
  for name, ids in out.items():
    for case_id in ids:
      if case_id in seen:
        where = (f"twice in {name!r}" if seen[case_id] == name
                 else f"in both {seen[case_id]!r} and {name!r}")
        raise problem(path, f"case {case_id} is listed {where}")
      seen[case_id] = name
  return out, about
