"""Dataset layouts (BraTS 2018/2020, nnU-Net, manifest), splits, and the `verify` CLI."""
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from hemijax.data import layouts
from hemijax.data.__main__ import main as cli
from hemijax.data.io import DataError
from hemijax.data.layouts import CaseFiles, detect_layout, discover_cases, read_splits
from hemijax.data.tasks import normalise_modality

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (10, 9, 8)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
MODS = ("flair", "t1", "t1ce", "t2")


def _image(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, np.float32)
  data[2:8, 2:7, 1:7] = rng.uniform(50, 150, (6, 5, 6))
  return data


def _label(shape=SHAPE):
  label = np.zeros(shape, np.uint8)
  label[3:6, 3:6, 2:5] = 2
  label[4, 4, 3] = 4
  label[3, 3, 2] = 1
  return label


def _save(path, array, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def _brats_case(folder, case_id, mods=MODS, ext=".nii.gz", label=True):
  for i, m in enumerate(mods):
    _save(folder / case_id / f"{case_id}_{m}{ext}", _image(i))
  if label:
    _save(folder / case_id / f"{case_id}_seg{ext}", _label())
  return folder / case_id


def _brats(tmp_path, n=3, missing=()):
  """`missing`: (case index, modality) pairs whose file is left out."""
  root = tmp_path / "brats"
  for i in range(n):
    mods = [m for m in MODS if (i, m) not in missing]
    _brats_case(root, f"BraTS20_{i:03d}", mods)
  return root


def _nnunet(tmp_path, channels=("FLAIR", "T1", "T1Gd", "T2"), missing=(), n=2):
  root = tmp_path / "Dataset001_BraTS"
  meta = {"channel_names": {str(i): c for i, c in enumerate(channels)},
          "labels": {"background": 0, "necrotic": 1, "edema": 2, "enhancing": 4},
          "numTraining": n, "file_ending": ".nii.gz"}
  root.mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps(meta))
  for i in range(n):
    for c in range(len(channels)):
      if (i, c) not in missing:
        _save(root / "imagesTr" / f"case{i}_{c:04d}.nii.gz", _image(c))
    _save(root / "labelsTr" / f"case{i}.nii.gz", _label())
  return root


def _manifest_files(tmp_path, n=2):
  data = tmp_path / "files"
  rows = []
  for i in range(n):
    row = {"case_id": f"s{i}"}
    for m in MODS:
      row[m] = str(_save(data / f"s{i}_{m}.nii.gz", _image()).relative_to(tmp_path))
    row["label"] = str(_save(data / f"s{i}_lab.nii.gz", _label()).relative_to(tmp_path))
    rows.append(row)
  return rows


def _write_csv(path, rows, columns=None):
  columns = columns or list(rows[0])
  lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


# ----------------------------------------------------------------------------------------------
# Layouts


def test_brats_layout_with_missing_modality(tmp_path):
  root = _brats(tmp_path, missing={(1, "t1ce"), (2, "flair")})
  assert detect_layout(root) == "brats"
  cases = discover_cases(root)
  assert [c.case_id for c in cases] == ["BraTS20_000", "BraTS20_001", "BraTS20_002"]
  assert list(cases[0].images) == list(MODS)
  assert list(cases[1].images) == ["flair", "t1", "t2"]
  assert list(cases[2].images) == ["t1", "t1ce", "t2"]
  assert cases[0].label.name == "BraTS20_000_seg.nii.gz"
  # Restricting the modalities keeps their order and drops the others.
  sub = discover_cases(root, modalities=("t2", "flair"))
  assert list(sub[0].images) == ["t2", "flair"] and list(sub[2].images) == ["t2"]


def test_brats2018_layout(tmp_path):
  root = tmp_path / "MICCAI_BraTS_2018"
  _brats_case(root / "HGG", "Brats18_CBICA_AAB_1", ext=".nii")
  _brats_case(root / "LGG", "Brats18_2013_0_1", mods=("flair", "t2"), ext=".nii", label=False)
  (root / "survival_data.csv").write_text("BraTS18ID,Age\n")
  assert detect_layout(root) == "brats2018"
  cases = discover_cases(root)
  assert [c.case_id for c in cases] == ["Brats18_2013_0_1", "Brats18_CBICA_AAB_1"]
  assert list(cases[0].images) == ["flair", "t2"] and cases[0].label is None
  assert cases[1].images["t1ce"].suffix == ".nii"


def test_nnunet_layout_maps_channel_names(tmp_path):
  root = _nnunet(tmp_path, missing={(1, 2)})
  assert detect_layout(root) == "nnunet"
  cases = discover_cases(root)
  assert [c.case_id for c in cases] == ["case0", "case1"]
  assert cases[0].images["t1ce"].name == "case0_0002.nii.gz"
  assert list(cases[1].images) == ["flair", "t1", "t2"]
  assert cases[1].label.name == "case1.nii.gz"
  assert layouts.dataset_label_values(root) == (0, 1, 2, 4)


@pytest.mark.parametrize("name,expected", [("FLAIR", "flair"), ("T1", "t1"), ("T1Gd", "t1ce"),
                                           ("t1ce", "t1ce"), ("T1c", "t1ce"), ("T2", "t2"),
                                           ("T2w", "t2"), ("t2-flair", "flair"), ("DWI", "dwi")])
def test_layouts_normalise_modality_names_as_tasks_do(name, expected):
  assert normalise_modality(name) == expected


def test_nnunet_channel_names_outside_brats_are_modalities(tmp_path):
  root = _nnunet(tmp_path, channels=("FLAIR", "DWI"))
  cases = discover_cases(root)
  assert list(cases[0].images) == ["flair", "dwi"]
  assert cases[0].images["dwi"].name == "case0_0001.nii.gz"


def test_nnunet_channel_name_that_is_not_a_name(tmp_path):
  root = _nnunet(tmp_path, channels=("FLAIR", "T2*"))
  with pytest.raises(DataError, match="'T2\\*' is not a modality name") as e:
    discover_cases(root)
  assert str(root / "dataset.json") in str(e.value) and "\n" not in str(e.value)


def test_nnunet_v1_dataset_json(tmp_path):
  root = _nnunet(tmp_path, channels=("T1", "FLAIR"))
  meta = {"modality": {"0": "T1", "1": "FLAIR"}, "labels": {"0": "background", "1": "lesion"}}
  (root / "dataset.json").write_text(json.dumps(meta))
  cases = discover_cases(root, "nnunet")
  assert list(cases[0].images) == ["t1", "flair"]  # the channels' order
  assert list(discover_cases(root, "nnunet", ("flair", "t1"))[0].images) == ["flair", "t1"]
  assert layouts.dataset_label_values(root) == (0, 1)


def test_manifest_csv_relative_paths_and_empty_cells(tmp_path):
  rows = _manifest_files(tmp_path)
  rows[1]["t1"] = ""  # missing modality
  path = _write_csv(tmp_path / "manifest.csv", rows)
  assert detect_layout(tmp_path) == "manifest"
  for root in (tmp_path, path):
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["s0", "s1"]
    assert list(cases[1].images) == ["flair", "t1ce", "t2"]
    assert cases[0].images["t1"] == tmp_path / "files" / "s0_t1.nii.gz"
    assert cases[0].label == tmp_path / "files" / "s0_lab.nii.gz"


def test_detection_ignores_brats_side_csv_but_finds_a_lone_manifest(tmp_path):
  root = _brats(tmp_path, n=1)
  (root / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\nHGG,BraTS20_000\n")
  assert detect_layout(root) == "brats"
  other = tmp_path / "m"
  other.mkdir()
  _write_csv(other / "cases.csv", _manifest_files(other))
  assert detect_layout(other) == "manifest"
  assert len(discover_cases(other)) == 2


def test_manifest_json_with_upper_case_columns(tmp_path):
  rows = _manifest_files(tmp_path)
  rows = [{"case_id": r["case_id"], "FLAIR": r["flair"], "T1Gd": r["t1ce"], "T1": None,
           "label": r["label"]} for r in rows]
  (tmp_path / "manifest.json").write_text(json.dumps({"cases": rows}))
  cases = discover_cases(tmp_path / "manifest.json")
  assert list(cases[0].images) == ["flair", "t1ce"]


def test_manifest_columns_outside_brats_are_modalities(tmp_path):
  rows = _manifest_files(tmp_path)
  for r in rows:
    r["PD"] = r["t1"]
  _write_csv(tmp_path / "manifest.csv", rows)
  cases = discover_cases(tmp_path)
  assert list(cases[0].images) == ["flair", "t1", "t1ce", "t2", "pd"]
  assert list(discover_cases(tmp_path, modalities=("pd", "t2"))[0].images) == ["pd", "t2"]


def test_manifest_column_that_is_not_a_modality_name(tmp_path):
  rows = _manifest_files(tmp_path)
  for r in rows:
    r["age (years)"] = "54"
  path = _write_csv(tmp_path / "manifest.csv", rows)
  with pytest.raises(DataError, match="'age \\(years\\)'") as e:
    discover_cases(tmp_path)
  assert str(path) in str(e.value)


def test_manifest_listed_file_missing(tmp_path):
  rows = _manifest_files(tmp_path)
  rows[0]["t2"] = "files/nope.nii.gz"
  _write_csv(tmp_path / "manifest.csv", rows)
  with pytest.raises(DataError, match="not found") as e:
    discover_cases(tmp_path)
  assert str(tmp_path / "files" / "nope.nii.gz") in str(e.value)


def test_empty_folder(tmp_path):
  (tmp_path / "empty").mkdir()
  for fn in (detect_layout, discover_cases):
    with pytest.raises(DataError, match="empty folder") as e:
      fn(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_undetectable_layout_and_unknown_layout_option(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match="cannot detect") as e:
    discover_cases(tmp_path)
  assert str(tmp_path) in str(e.value)
  root = _brats(tmp_path, n=1)
  with pytest.raises(DataError, match="--layout"):
    discover_cases(root, layout="bids")


def test_case_without_any_modality(tmp_path):
  root = _brats(tmp_path, n=2)
  folder = _brats_case(root, "BraTS20_009", mods=())  # only the label
  with pytest.raises(DataError, match="no image file") as e:
    discover_cases(root)
  assert str(folder) in str(e.value)
  # Also when the case has images, just none of those asked for.
  with pytest.raises(DataError, match="no image file"):
    discover_cases(_brats(tmp_path / "b", n=1, missing={(0, "t1")}), modalities=("t1",))


def test_unknown_modality_in_file_name(tmp_path):
  root = _brats(tmp_path, n=1)
  bad = _save(root / "BraTS20_000" / "BraTS20_000_dwi.nii.gz", _image())
  with pytest.raises(DataError, match="unknown modality 'dwi'") as e:
    discover_cases(root)
  assert str(bad) in str(e.value)


def test_unknown_modality_option(tmp_path):
  root = _brats(tmp_path, n=1)
  with pytest.raises(DataError, match="modalities.*'T2 star'"):
    discover_cases(root, modalities=("t1", "T2 star"))
  with pytest.raises(DataError, match="duplicate"):
    discover_cases(root, modalities=("t1ce", "T1Gd"))
  # A name the dataset lacks is looked for like any other: no case has it.
  with pytest.raises(DataError, match="no image file for any of the modalities pd"):
    discover_cases(root, modalities=("pd",))


def test_brats_suffixes_the_task_file_declares(tmp_path):
  root = _brats(tmp_path, n=2)
  for i in range(2):
    _save(root / f"BraTS20_{i:03d}" / f"BraTS20_{i:03d}_pd.nii.gz", _image())
  with pytest.raises(DataError, match="unknown modality 'pd'.*hemijax_task.json"):
    discover_cases(root)
  (root / "hemijax_task.json").write_text(json.dumps({"modalities": ["T2", "PD"]}))
  cases = discover_cases(root)
  assert list(cases[0].images) == ["t2", "pd"]  # the task file's, in its order
  assert list(discover_cases(root, modalities=("flair", "pd"))[1].images) == ["flair", "pd"]


def test_read_splits(tmp_path):
  root = _brats(tmp_path, n=3)
  assert read_splits(root) is None
  (root / "splits.json").write_text(json.dumps({"train": ["BraTS20_000", "BraTS20_001"],
                                                "val": ["BraTS20_002"], "test": []}))
  assert read_splits(root)["val"] == ["BraTS20_002"]
  (root / "splits.json").write_text(json.dumps({"train": ["a"], "holdout": ["b"]}))
  with pytest.raises(DataError, match="holdout") as e:
    read_splits(root)
  assert str(root / "splits.json") in str(e.value)
  (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["a"]}))
  with pytest.raises(DataError, match="in both"):
    read_splits(root)
  (root / "splits.json").write_text("{not json")
  with pytest.raises(DataError, match="cannot read JSON"):
    read_splits(root)


def test_case_files_is_frozen():
  case = CaseFiles("a", {"t1": pathlib.Path("a_t1.nii")}, None)
  with pytest.raises(AttributeError):
    case.case_id = "b"


# ----------------------------------------------------------------------------------------------
# verify


def test_verify_clean_dataset(tmp_path, capsys):
  root = _brats(tmp_path, n=2, missing={(0, "t1")})
  assert cli(["verify", "--data", str(root)]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2 and out[0].startswith("OK: 2 case(s)")
  assert "1 missing modality" in out[0]
  # No splits.json: verify says a run will make (and write) a seeded split, and its sizes.
  assert out[1].startswith("split: none in the dataset; a seeded") and "train 1, val 1, test 0" in out[1]


def _broken_dataset(tmp_path):
  """One problem per case; returns (root, {file that must be named: words in its line})."""
  root = _brats(tmp_path, n=9)
  expect = {}
  c = root / "BraTS20_000"
  (c / "BraTS20_000_t1.nii.gz").write_bytes(b"corrupt" * 20)
  expect[c / "BraTS20_000_t1.nii.gz"] = "cannot read"
  c = root / "BraTS20_001"
  _save(c / "BraTS20_001_t2.nii.gz", np.stack([_image()] * 2, -1))
  expect[c / "BraTS20_001_t2.nii.gz"] = "3D"
  c = root / "BraTS20_002"
  _save(c / "BraTS20_002_flair.nii.gz", _image(shape=(10, 9, 7)))
  expect[c / "BraTS20_002_flair.nii.gz"] = "shape"
  c = root / "BraTS20_003"
  _save(c / "BraTS20_003_t1ce.nii.gz", _image(), np.diag([1.0, 1.0, 2.0, 1.0]))
  expect[c / "BraTS20_003_t1ce.nii.gz"] = "affine"
  c = root / "BraTS20_004"
  nan = _image()
  nan[4, 4, 4] = np.nan
  _save(c / "BraTS20_004_t1.nii.gz", nan)
  expect[c / "BraTS20_004_t1.nii.gz"] = "NaN"
  c = root / "BraTS20_005"
  bad_label = _label()
  bad_label[5, 5, 4] = 3
  _save(c / "BraTS20_005_seg.nii.gz", bad_label)
  expect[c / "BraTS20_005_seg.nii.gz"] = "label values [3]"
  c = root / "BraTS20_006"
  _save(c / "BraTS20_006_pd.nii.gz", _image())
  expect[c / "BraTS20_006_pd.nii.gz"] = "unknown modality"
  c = root / "BraTS20_007"
  for m in MODS:
    os.unlink(c / f"BraTS20_007_{m}.nii.gz")
  expect[c] = "no image file"
  c = root / "BraTS20_008"
  _save(c / "BraTS20_008_t2.nii.gz", np.zeros(SHAPE, np.float32))
  expect[c / "BraTS20_008_t2.nii.gz"] = "empty"
  return root, expect


def test_verify_reports_one_line_per_problem(tmp_path, capsys):
  root, expect = _broken_dataset(tmp_path)
  assert cli(["verify", "--data", str(root), "--layout", "brats"]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == len(expect)
  for path, words in expect.items():
    matching = [l for l in lines if l.startswith(f"{path}: ")]
    assert len(matching) == 1, (path, lines)
    assert words in matching[0], (words, matching[0])


def test_verify_empty_folder_and_splits(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli(["verify", "--data", str(tmp_path / "empty")]) == 1
  assert capsys.readouterr().out.strip() == f"{tmp_path / 'empty'}: empty folder"
  root = _brats(tmp_path, n=2)
  (root / "splits.json").write_text(json.dumps({"train": ["BraTS20_000", "ghost"]}))
  assert cli(["verify", "--data", str(root)]) == 1
  line, = capsys.readouterr().out.strip().splitlines()
  assert line.startswith(f"{root / 'splits.json'}: ") and "ghost" in line


def test_verify_labels_from_dataset_json_and_task(tmp_path, capsys):
  root = _nnunet(tmp_path)
  assert cli(["verify", "--data", str(root)]) == 0
  capsys.readouterr()
  # The wmh task has no counterpart for the dataset's tumour labels: one line naming dataset.json.
  assert cli(["verify", "--data", str(root), "--task", "wmh"]) == 1
  line, = capsys.readouterr().out.strip().splitlines()
  assert line.startswith(f"{root / 'dataset.json'}: label 'necrotic' has no counterpart in the wmh")


def test_verify_module_entry_point(tmp_path):
  root, _ = _broken_dataset(tmp_path)
  run = subprocess.run([sys.executable, "-m", "hemijax.data", "verify", "--data", str(root)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert run.returncode == 1
  assert "Traceback" not in run.stderr
  assert len(run.stdout.strip().splitlines()) == 9


# ----------------------------------------------------------------------------------------------
# Datasets written by the phantom generator, with missing modality files


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
  """{name: (root, record)}: the tumor task in every layout, and wmh in nnU-Net's, at 8 mm."""
  phantom = pytest.importorskip("hemijax.data.phantom")
  base = tmp_path_factory.mktemp("phantoms")
  out = {}
  try:
    for layout in phantom.LAYOUTS:
      out[layout] = (base / layout, phantom.write_dataset(base / layout, "tumor", 4, 0, spacing=8.0,
                                                          layout=layout, missing_rate=0.4))
    out["wmh"] = (base / "wmh", phantom.write_dataset(base / "wmh", "wmh", 3, 1, spacing=8.0,
                                                      layout="nnunet", missing_rate=0.3))
  except FileNotFoundError as e:  # the MNI template ships with nilearn
    pytest.skip(f"phantom unavailable: {e}")
  return out


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_phantom_layouts_load_with_missing_files(phantoms, layout, tmp_path, capsys):
  from hemijax.data.preprocess import load_dataset, write_prediction
  from hemijax.data.tasks import get_task
  root, record = phantoms[layout]
  task = get_task("tumor")
  assert detect_layout(root) == layout
  cases = discover_cases(root)
  assert [c.case_id for c in cases] == sorted(record["cases"])
  assert any(info["missing"] for info in record["cases"].values())
  for case in cases:
    missing = record["cases"][case.case_id]["missing"]
    assert list(case.images) == [m for m in task.modalities if m not in missing]
    assert case.label is not None and case.label.is_file()
  vols = load_dataset(root, modalities=task.modalities, label_values=task.label_values,
                      split="train", cache_dir=tmp_path / "cache")
  assert [v.case_id for v in vols] == read_splits(root)["train"]
  for v in vols:
    missing = record["cases"][v.case_id]["missing"]
    assert v.available.tolist() == [m not in missing for m in task.modalities]
    assert not v.image[..., ~v.available].any()
  assert cli(["verify", "--data", str(root)]) == 0
  assert capsys.readouterr().out.startswith("OK: 4 case(s)")
  # A prediction written back lands on the file's grid: same shape, affine and label values.
  v = vols[0]
  case = next(c for c in cases if c.case_id == v.case_id)
  write_prediction(tmp_path / "pred.nii.gz", v.label, v.transform, task.label_values)
  pred, truth = nib.load(str(tmp_path / "pred.nii.gz")), nib.load(str(case.label))
  assert pred.shape == truth.shape
  np.testing.assert_allclose(pred.affine, truth.affine, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(pred.dataobj), np.asarray(truth.dataobj))


def test_phantom_resampled_round_trip(phantoms, tmp_path):
  from hemijax.data.preprocess import load_dataset, write_prediction
  from hemijax.data.tasks import get_task
  root, _ = phantoms["brats"]
  task = get_task("tumor")
  v = load_dataset(root, modalities=task.modalities, label_values=task.label_values,
                   split="val", target_spacing=5.0)[0]
  assert v.spacing == pytest.approx((5.0, 5.0, 5.0))
  write_prediction(tmp_path / "pred.nii", v.label, v.transform, task.label_values)
  pred = nib.load(str(tmp_path / "pred.nii"))
  truth = nib.load(str(root / v.case_id / f"{v.case_id}_seg.nii.gz"))
  assert pred.shape == truth.shape
  np.testing.assert_allclose(pred.affine, truth.affine, atol=1e-5)
  assert set(np.unique(np.asarray(pred.dataobj))) <= set(task.label_values)


def test_phantom_wmh_nnunet_channel_order(phantoms, capsys):
  from hemijax.data.preprocess import load_dataset
  from hemijax.data.tasks import get_task
  root, record = phantoms["wmh"]
  task = get_task("wmh")
  vols = load_dataset(root, modalities=task.modalities, label_values=task.label_values)
  for v in vols:
    missing = record["cases"][v.case_id]["missing"]
    assert v.available.tolist() == [m not in missing for m in task.modalities]
  assert cli(["verify", "--data", str(root), "--task", "wmh"]) == 0
  assert "label values (0, 1)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Detection prefers the layout whose file names match (#22)


def test_brats_folder_with_a_clinical_csv_is_not_a_manifest(tmp_path, capsys):
  root = _brats(tmp_path, n=2)
  (root / "clinical.csv").write_text("ID,Age,Survival\nBraTS20_000,60,300\nBraTS20_001,55,410\n")
  assert detect_layout(root) == "brats"
  assert [c.case_id for c in discover_cases(root)] == ["BraTS20_000", "BraTS20_001"]
  assert cli(["verify", "--data", str(root)]) == 0
  assert "in the brats layout" in capsys.readouterr().out
  # A lone CSV that is a real manifest (its files exist) still wins, even beside case folders.
  rows = [{"case_id": c.case_id, **{m: str(p.relative_to(root)) for m, p in c.images.items()}}
          for c in discover_cases(root)]
  (root / "clinical.csv").unlink()
  _write_csv(root / "cases.csv", rows)
  assert detect_layout(root) == "manifest"


# ----------------------------------------------------------------------------------------------
# Case ids that are not plain names (#21)


def test_verify_reports_case_ids_that_are_not_plain_names(tmp_path, capsys):
  rows = _manifest_files(tmp_path, n=3)
  rows[0]["case_id"] = "../../escaped_90000"
  rows[1]["case_id"] = "sub-01/ses-01"
  path = _write_csv(tmp_path / "manifest.csv", rows)
  assert cli(["verify", "--data", str(tmp_path)]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all(l.startswith(f"{path}: case id ") for l in lines)
  assert "'../../escaped_90000'" in lines[0] and "'sub-01/ses-01'" in lines[1]
  with pytest.raises(DataError, match="escaped_90000"):
    discover_cases(tmp_path)


# ----------------------------------------------------------------------------------------------
# Label conventions: nnU-Net's conversion of BraTS (oedema 1, necrosis 2, enhancing 3) (#21)

NNUNET_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                  "enhancing tumor": [3]}  # as nnU-Net v2's Dataset137_BraTS2021 writes it
NNUNET_CLASSES = {"background": 0, "edema": 1, "non-enhancing tumor core": 2, "enhancing tumor": 3}


def _brats_label(enhancing=True):
  label = np.zeros(SHAPE, np.uint8)
  label[3:7, 3:6, 2:6] = 2        # oedema
  label[4:6, 4:6, 3:5] = 1        # necrosis
  if enhancing:
    label[5, 4:6, 3:5] = 4
  return label


def _to_nnunet_values(label):
  return np.select([label == 1, label == 2, label == 4], [2, 1, 3], 0).astype(np.uint8)


def _nnunet_converted(tmp_path, labels, enhancing=True):
  """The same case as a BraTS folder and converted the nnU-Net way; returns (brats, nnunet)."""
  brats = tmp_path / "brats"
  _brats_case(brats, "case0", label=False)
  _save(brats / "case0" / "case0_seg.nii.gz", _brats_label(enhancing))
  nnunet = tmp_path / "Dataset137_BraTS2021"
  for c, m in enumerate(MODS):
    _save(nnunet / "imagesTr" / f"case0_{c:04d}.nii.gz", _image(c))
  _save(nnunet / "labelsTr" / "case0.nii.gz", _to_nnunet_values(_brats_label(enhancing)))
  (nnunet / "dataset.json").write_text(json.dumps(
      {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}, "labels": labels,
       "numTraining": 1, "file_ending": ".nii.gz"}))
  return brats, nnunet


@pytest.mark.parametrize("enhancing", [True, False])
@pytest.mark.parametrize("labels", [NNUNET_REGIONS, NNUNET_CLASSES], ids=["regions", "classes"])
def test_nnunet_label_values_are_read_and_written_the_dataset_s_way(tmp_path, capsys, labels,
                                                                     enhancing):
  from hemijax.data.preprocess import load_dataset, write_prediction
  from hemijax.data.tasks import get_task
  task = get_task("tumor")
  brats, nnunet = _nnunet_converted(tmp_path, labels, enhancing)
  mapping = layouts.dataset_label_mapping(nnunet, task)
  assert mapping.file_values == (0, 2, 1, 3)  # necrotic core, oedema, enhancing as stored
  assert layouts.dataset_label_mapping(brats, task).file_values == task.label_values
  # verify checks the files against the dataset's own values and says how they pair.
  assert cli(["verify", "--data", str(nnunet), "--task", "tumor"]) == 0
  out = capsys.readouterr().out
  assert "labels: label values 0=background, 2=necrotic_core, 1=edema, 3=enhancing" in out
  # Training reads the same class ids from both copies.
  ours, = load_dataset(brats, modalities=MODS, label_values=task.label_values)
  theirs, = load_dataset(nnunet, modalities=MODS, label_values=mapping.file_values)
  np.testing.assert_array_equal(theirs.label, ours.label)
  assert (ours.label == 3).any() == enhancing
  # Evaluate reads the truth in the task's values (TC = necrosis + enhancing stays TC).
  stored = np.asarray(nib.load(str(nnunet / "labelsTr" / "case0.nii.gz")).dataobj)
  np.testing.assert_array_equal(mapping.to_task_values(stored), _brats_label(enhancing))
  # Predict writes the dataset's own values.
  write_prediction(tmp_path / "pred.nii.gz", theirs.label, theirs.transform, mapping.file_values)
  np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj), stored)


@pytest.mark.parametrize("labels,words", [
    ({"background": 0, "tumour": 1, "cyst": 2}, "label 'tumour' has no counterpart"),
    ({"background": 0, "whole tumor": [1, 2, 3]}, "do not tell its value apart"),
    ({"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3, "ET": [4]}, "do not tell"),
    ({"background": 0, "edema": "x"}, "'x' is not an integer"),
])
def test_label_declarations_that_do_not_fit_are_refused_naming_dataset_json(tmp_path, capsys,
                                                                             labels, words):
  from hemijax.data.tasks import get_task
  _, nnunet = _nnunet_converted(tmp_path, labels)
  with pytest.raises(DataError, match=words) as e:
    layouts.dataset_label_mapping(nnunet, get_task("tumor"))
  assert str(e.value).startswith(f"{nnunet / 'dataset.json'}: ")
  assert cli(["verify", "--data", str(nnunet), "--task", "tumor"]) == 1
  assert any(words.split("'")[0] in l for l in capsys.readouterr().out.splitlines())


def test_dataset_json_labels_beside_a_brats_folder(tmp_path):
  """BraTS 2023 stores enhancing as 3: a dataset.json with only `labels` says so."""
  from hemijax.data.tasks import get_task
  root = _brats(tmp_path, n=1)
  (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "NCR": 1, "ED": 2,
                                                            "ET": 3}}))
  assert layouts.dataset_label_mapping(root, get_task("tumor")).file_values == (0, 1, 2, 3)
  assert layouts.dataset_label_values(root) == (0, 1, 2, 3)


# ----------------------------------------------------------------------------------------------
# Splits for a dataset without splits.json (#22)


def _cases(n_full, n_partial, n_unlabelled=0):
  full = {m: pathlib.Path(f"{m}.nii") for m in MODS}
  partial = {m: full[m] for m in ("flair", "t2")}
  cases = [CaseFiles(f"full{i:02d}", full, pathlib.Path("seg.nii")) for i in range(n_full)]
  cases += [CaseFiles(f"part{i:02d}", partial, pathlib.Path("seg.nii")) for i in range(n_partial)]
  cases += [CaseFiles(f"nolabel{i}", full, None) for i in range(n_unlabelled)]
  return cases


def test_generated_split_is_seeded_stratified_and_skips_unlabelled_cases():
  from hemijax.data import splits
  cases = _cases(12, 8, n_unlabelled=2)
  made = splits.make_splits(cases)
  assert made == splits.make_splits(list(reversed(cases)))  # order of discovery does not matter
  assert {k: len(v) for k, v in made.items()} == {"train": 12, "val": 4, "test": 4}
  everything = made["train"] + made["val"] + made["test"]
  assert sorted(everything) == sorted(c.case_id for c in cases if c.label is not None)
  # Both modality patterns in every split: the 12 full cases 7/3/2, the 8 partial ones 5/1/2.
  count = lambda name, prefix: sum(i.startswith(prefix) for i in made[name])
  assert [count(n, "full") for n in ("train", "val", "test")] == [7, 3, 2]
  assert [count(n, "part") for n in ("train", "val", "test")] == [5, 1, 2]
  # Three cases: one per split.
  assert [len(v) for v in splits.make_splits(_cases(3, 0)).values()] == [1, 1, 1]


def test_run_split_is_written_to_the_workdir_reused_and_tied_to_its_dataset(tmp_path):
  from hemijax.data import splits
  root = _brats(tmp_path, n=5)
  workdir = tmp_path / "run"
  workdir.mkdir()
  first = splits.for_run(discover_cases(root), root, workdir)
  assert first.origin == "generated" and first.path == (workdir / "splits.json").absolute()
  written, about = layouts.read_split_file(first.path)
  assert written == first.splits and about["dataset"] == str(root.absolute())
  # A case added later does not move the run's cases between splits.
  _brats_case(root, "BraTS20_999")
  again = splits.for_run(discover_cases(root), root, workdir)
  assert again.splits == first.splits
  # Another dataset in the same workdir is refused with one line naming the file.
  other = _brats(tmp_path / "other", n=3)
  with pytest.raises(DataError, match="made for the dataset") as e:
    splits.for_run(discover_cases(other), other, workdir)
  assert str(e.value).startswith(f"{first.path}: ")
  # The dataset's own splits.json, or an explicit file, is used as given.
  own = {"train": ["BraTS20_000"], "val": ["BraTS20_001"], "test": []}
  (other / "splits.json").write_text(json.dumps(own))
  assert splits.choose(discover_cases(other), other).splits == own
  given = tmp_path / "mine.json"
  given.write_text(json.dumps({"train": ["BraTS20_002"], "val": [], "test": []}))
  assert splits.choose(discover_cases(other), other, given).origin == "config"
  # A generated file for another dataset does not apply to this one.
  assert splits.choose(discover_cases(other), other, first.path).origin == "dataset"


def _own_data_config(root, cache):
  from configs import unet
  config = unet.get_config("smoke")
  config.data.root = str(root)
  if cache is not None:
    config.data.cache_dir = str(cache)
  return config


def test_train_on_a_brats_folder_without_splits_prepares_and_records_the_run(tmp_path,
                                                                            monkeypatch):
  """What the README's own-data command needs: a split, an absolute cache, the training spacing."""
  from hemijax.data import datasets
  root = _brats(tmp_path, n=5)
  workdir = tmp_path / "run"
  workdir.mkdir()
  monkeypatch.chdir(tmp_path)
  config = _own_data_config(root, "relative-cache")
  datasets.prepare_run(config, workdir)
  assert config.data.cache_dir == str(tmp_path / "relative-cache")
  assert config.data.splits_file == str(workdir / "splits.json")
  assert config.data.target_spacing == 1.0  # the files' spacing, so other spacings get resampled
  val = datasets.load_split(config, "val")
  assert [v.case_id for v in val] == json.loads((workdir / "splits.json").read_text())["val"]
  assert list((tmp_path / "relative-cache" / "preprocessed").iterdir())
  # verify names the same split when given the run's file.
  assert cli(["verify", "--data", str(root), "--splits-file", config.data.splits_file]) == 0


def test_cache_root_from_environment_and_config(tmp_path, monkeypatch):
  from hemijax.data import datasets
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HEMIJAX_CACHE", "env-cache")
  config = _own_data_config(tmp_path, None)
  assert datasets.cache_root(config) == tmp_path / "env-cache"
  config.data.cache_dir = "cfg"
  assert datasets.cache_root(config) == tmp_path / "cfg"
  monkeypatch.delenv("HEMIJAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert datasets.default_cache_root() == tmp_path / "xdg" / "hemijax"


def test_cache_command_lists_and_cleans_by_age(tmp_path, capsys):
  from hemijax.data import datasets
  root = _brats(tmp_path, n=2)
  cache = tmp_path / "cache"
  config = _own_data_config(root, cache)
  datasets.load_split(config, None)
  old, new = sorted((cache / "preprocessed").iterdir())
  os.utime(old, (1e9, 1e9))  # not used since 2001
  (cache / "preprocessed" / ".left.abc.tmp").mkdir()
  os.utime(cache / "preprocessed" / ".left.abc.tmp", (1e9, 1e9))
  assert cli(["cache", "--dir", str(cache)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith(f"cache {cache} holds ") and "2 entries" in lines[0]
  assert f"preprocessed {root.absolute()}  2 case(s)" in lines[1]
  assert cli(["cache", "--dir", str(cache), "--clean", "--older-than", "30"]) == 0
  out = capsys.readouterr().out
  assert "removed 1 entry and 1 leftover temporary" in out
  assert sorted(p.name for p in (cache / "preprocessed").iterdir()) == [new.name]
  assert cli(["cache", "--dir", str(cache), "--clean"]) == 0
  assert not list((cache / "preprocessed").iterdir())
  with pytest.raises(SystemExit):
    cli(["cache", "--older-than", "-1"])
