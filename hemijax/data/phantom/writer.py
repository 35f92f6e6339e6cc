"""Writes a phantom dataset: NIfTI files in one of the layouts, missing modality files,
train/val/test splits, and DIR/phantom.json (which also lets a later run clean up this one's files).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys

import nibabel as nib
import numpy as np

from hemijax import atomic
from hemijax.data.phantom.acquisition import EXTRA_MODALITIES, MODALITIES, get_protocol
from hemijax.data.phantom.anatomy import _check_spacing
from hemijax.data.phantom.subject import TISSUE_TASKS, generate_subject
from hemijax.data.tasks import check_modalities, get_task

VERSION = 1
LAYOUTS = ("brats", "brats2018", "nnunet", "manifest")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
# nnU-Net style channel names; readers map them to lower case.
CHANNEL_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2", "pd": "PD"}
# A manifest has a column for each BraTS modality (empty where the task has none), then one for
# each extra acquisition the dataset has (`acquisition.EXTRA_MODALITIES`).
MANIFEST_MODALITIES = ("flair", "t1", "t1ce", "t2")


def nifti_bytes(data, affine, compress=True):
  """NIfTI-1 file contents; gzip with mtime 0 and no file name, so same data -> same bytes."""
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  raw = img.to_bytes()
  return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def split_cases(case_ids, seed):
  """Random 60/20/20 split (at least one case per split when there are 3 or more)."""
  n = len(case_ids)
  order = np.random.default_rng([seed, 7]).permutation(n)
  if n >= 3:
    n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * n)))
    n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * n)))
  else:
    n_val, n_test = 0, n - 1
  parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
  return {k: sorted(case_ids[i] for i in parts[k]) for k in ("train", "val", "test")}


def _missing(rng, modalities, rate):
  """Each modality absent with probability `rate`, but never all of them."""
  absent = rng.uniform(size=len(modalities)) < rate
  if absent.all():
    absent[rng.integers(len(modalities))] = False
  return [m for m, a in zip(modalities, absent) if a]


def _layout_paths(layout, case, modalities, grade="HGG"):
  """Relative paths {modality or 'label': path} of one case."""
  if layout == "brats":
    paths = {m: f"{case}/{case}_{m}.nii.gz" for m in modalities}
    paths["label"] = f"{case}/{case}_seg.nii.gz"
  elif layout == "brats2018":
    paths = {m: f"{grade}/{case}/{case}_{m}.nii" for m in modalities}
    paths["label"] = f"{grade}/{case}/{case}_seg.nii"
  elif layout == "nnunet":
    paths = {m: f"imagesTr/{case}_{i:04d}.nii.gz" for i, m in enumerate(modalities)}
    paths["label"] = f"labelsTr/{case}.nii.gz"
  else:
    paths = {m: f"cases/{case}_{m}.nii.gz" for m in modalities}
    paths["label"] = f"cases/{case}_seg.nii.gz"
  return paths


def _json_bytes(obj):
  return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _clear_previous(out):
  """Removes what an earlier phantom run wrote in `out` (listed in its phantom.json), nothing else."""
  if not os.path.isdir(out):
    if os.path.exists(out):
      raise ValueError(f"out (--out): {out} exists and is not a directory")
    return
  record = os.path.join(out, "phantom.json")
  if not os.path.isfile(record):
    if os.listdir(out):
      raise ValueError(f"out (--out): {out} is not empty and holds no phantom.json; "
                       "choose a new or empty directory")
    return
  try:
    with open(record) as f:
      files = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"out (--out): cannot read the file list of {record}: {e}") from None
  root = os.path.realpath(out)
  for rel in files:
    path = os.path.realpath(os.path.join(out, rel))
    if os.path.commonpath([root, path]) != root:
      raise ValueError(f"out (--out): {record} lists a file outside {out}: {rel}")
    if os.path.isfile(path):
      os.remove(path)
  # Drop the folders those files emptied, deepest first; never `out` itself.
  folders = {os.path.dirname(os.path.join(out, rel)) for rel in files}
  for folder in sorted(folders, key=lambda d: -d.count(os.sep)):
    while os.path.isdir(folder) and os.path.realpath(folder) != root and not os.listdir(folder):
      os.rmdir(folder)
      folder = os.path.dirname(folder)


def write_dataset(out, task, n_subjects, seed, spacing=2.0, layout="brats", missing_rate=0.0,
                  protocol="default", modalities=None, *, test_protocol=None, lesions=False,
                  skull_strip=True, verbose=False):
  """Writes a phantom dataset; returns the record also saved as DIR/phantom.json.

  Files: the layout's images and labels, DIR/splits.json ({"train","val","test"} -> case ids),
  DIR/phantom.json (options, per-case protocol, acquisition, missing modalities, file list), and
  DIR/dataset.json (nnunet) or DIR/manifest.csv (manifest). Subject i's images depend only on
  (seed, i, its protocol, spacing), not on n_subjects, the layout or the missing rate.
  `test_protocol` acquires the test split with another protocol (unseen in training).
  """
  task_obj = get_task(task)
  spacing = _check_spacing(spacing)
  if layout not in LAYOUTS:
    raise ValueError(f"layout (--layout): unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
  if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
    raise ValueError(f"n_subjects (--n-subjects) must be a positive integer, got {n_subjects!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
  if not (0.0 <= float(missing_rate) <= 1.0):
    raise ValueError(f"missing_rate (--missing-rate) must be in [0, 1], got {missing_rate}")
  get_protocol(protocol)
  if test_protocol is not None:
    get_protocol(test_protocol)
  if modalities is None:
    modalities = task_obj.modalities
  else:
    allowed = tuple(task_obj.modalities) + tuple(m for m in EXTRA_MODALITIES
                                                 if m not in task_obj.modalities)
    modalities = check_modalities(modalities, allowed=MODALITIES,
                                  option="modalities (--modalities)")
    extra = [m for m in modalities if m not in allowed]
    if extra:
      raise ValueError(f"modalities (--modalities): {extra} not among task {task_obj.name!r}'s "
                       f"modalities {list(task_obj.modalities)} or the extra acquisitions "
                       f"{list(EXTRA_MODALITIES)}")
    modalities = tuple(m for m in allowed if m in modalities)   # task order, then the extras
  if lesions and task_obj.name not in TISSUE_TASKS:
    raise ValueError(f"lesions (--lesions) applies to the tissue tasks {list(TISSUE_TASKS)} only")

  out = os.fspath(out)
  _clear_previous(out)
  os.makedirs(out, exist_ok=True)
  case_ids = [f"Phantom_{task_obj.name}_{i:03d}" for i in range(n_subjects)]
  splits = split_cases(case_ids, seed)
  split_of = {c: s for s, cs in splits.items() for c in cs}
  record = dict(generator="hemijax.data.phantom", version=VERSION, task=task_obj.name, seed=int(seed),
                n_subjects=int(n_subjects), spacing=spacing, layout=layout,
                missing_rate=float(missing_rate), protocol=protocol, test_protocol=test_protocol,
                modalities=list(modalities), lesions=bool(lesions), skull_strip=bool(skull_strip),
                complete=False, cases={}, files=[])
  # Cases are planned first so that an interrupted run can still be cleaned up by the next one.
  plans = []
  for i, case in enumerate(case_ids):
    missing = _missing(np.random.default_rng([seed, i, 1]), modalities, float(missing_rate))
    present = [m for m in modalities if m not in missing]
    case_protocol = test_protocol if (test_protocol and split_of[case] == "test") else protocol
    plans.append((i, case, present, missing, case_protocol))
    # brats2018 folders are by grade; the grade is only known after generation (see below).
    for grade in (("HGG", "LGG") if layout == "brats2018" and task_obj.name == "tumor" else ("HGG",)):
      paths = _layout_paths(layout, case, modalities, grade)
      record["files"] += [paths[m] for m in present] + [paths["label"]]
  extra_files = ["splits.json", {"nnunet": "dataset.json", "manifest": "manifest.csv"}.get(layout)]
  record["files"] = sorted(set(record["files"]) | {f for f in extra_files if f})
  atomic.write_bytes(os.path.join(out, "phantom.json"), _json_bytes(record))

  manifest_columns = MANIFEST_MODALITIES + tuple(m for m in modalities
                                                 if m not in MANIFEST_MODALITIES)
  manifest_rows = []
  written = []
  for i, case, present, missing, case_protocol in plans:
    subject = generate_subject(task_obj.name, np.random.default_rng([seed, i]), spacing, case_protocol,
                               present, lesions=lesions, skull_strip=skull_strip)
    grade = "HGG"
    if layout == "brats2018" and task_obj.name == "tumor" and not (subject["label"] == 4).any():
      grade = "LGG"   # no enhancing part: the usual low-grade appearance
    paths = _layout_paths(layout, case, modalities, grade)
    gz = layout != "brats2018"
    for m in present:
      atomic.write_bytes(os.path.join(out, paths[m]), nifti_bytes(subject["images"][m], subject["affine"], gz))
    atomic.write_bytes(os.path.join(out, paths["label"]), nifti_bytes(subject["label"], subject["affine"], gz))
    written += [paths[m] for m in present] + [paths["label"]]
    record["cases"][case] = dict(split=split_of[case], protocol=case_protocol, missing=missing,
                                 **subject["meta"])
    manifest_rows.append([case] + [paths[m] if m in present else "" for m in manifest_columns]
                         + [paths["label"]])
    if verbose:
      print(f"{case}: {split_of[case]}, {case_protocol}, missing {missing or 'none'}", file=sys.stderr)

  atomic.write_bytes(os.path.join(out, "splits.json"), _json_bytes(splits))
  if layout == "nnunet":
    labels = dict(zip(task_obj.class_names, task_obj.label_values))
    dataset = {"channel_names": {str(i): CHANNEL_NAMES[m] for i, m in enumerate(modalities)},
               "labels": labels, "numTraining": int(n_subjects), "file_ending": ".nii.gz",
               "name": f"Phantom_{task_obj.name}"}
    atomic.write_bytes(os.path.join(out, "dataset.json"), _json_bytes(dataset))
    written.append("dataset.json")
  elif layout == "manifest":
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", *manifest_columns, "label"])
    w.writerows(manifest_rows)
    atomic.write_bytes(os.path.join(out, "manifest.csv"), buf.getvalue().encode())
    written.append("manifest.csv")
  record["files"] = sorted(written + ["splits.json"])
  record["complete"] = True
  atomic.write_bytes(os.path.join(out, "phantom.json"), _json_bytes(record))
  return record
