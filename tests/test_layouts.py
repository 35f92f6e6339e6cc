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
                                           ("T2w", "t2"), ("t2-flair", "flair"), ("DWI", None)])
def test_canonical_modality(name, expected):
  assert layouts.canonical_modality(name) == expected


def test_nnunet_unknown_channel_name(tmp_path):
  root = _nnunet(tmp_path, channels=("FLAIR", "DWI"))
  with pytest.raises(DataError, match="DWI") as e:
    discover_cases(root)
  assert str(root / "dataset.json") in str(e.value)


def test_nnunet_v1_dataset_json(tmp_path):
  root = _nnunet(tmp_path, channels=("T1", "FLAIR"))
  meta = {"modality": {"0": "T1", "1": "FLAIR"}, "labels": {"0": "background", "1": "lesion"}}
  (root / "dataset.json").write_text(json.dumps(meta))
  cases = discover_cases(root, "nnunet")
  assert list(cases[0].images) == ["flair", "t1"]
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


def test_manifest_unknown_column(tmp_path):
  rows = _manifest_files(tmp_path)
  for r in rows:
    r["pd"] = r["t1"]
  path = _write_csv(tmp_path / "manifest.csv", rows)
  with pytest.raises(DataError, match="'pd'") as e:
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
  with pytest.raises(DataError, match="modalities.*'pd'"):
    discover_cases(root, modalities=("t1", "pd"))


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
  assert len(out) == 1 and out[0].startswith("OK: 2 case(s)")
  assert "1 missing modality" in out[0]


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
  # The wmh task allows labels 0 and 1 only.
  assert cli(["verify", "--data", str(root), "--task", "wmh"]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all("not in the declared set (0, 1)" in l for l in lines)


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
