"""Built-in phantom: MR contrasts, labels, determinism, missing files, layouts, protocols, CLI."""
import csv
import hashlib
import json
import math
import re
import pathlib

import nibabel as nib
import numpy as np
import pytest

from hemijax.data import phantom
from hemijax.data.tasks import get_task

FAST = 4.0  # mm: layout and CLI tests only need a few small volumes


def _files(root):
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _record(root):
  return json.loads((pathlib.Path(root) / "phantom.json").read_text())


def _error(argv):
  with pytest.raises(SystemExit) as e:
    phantom.main(argv)
  message = str(e.value.code)
  assert message.startswith("phantom: ") and "\n" not in message
  return message


# ---------------------------------------------------------------------------------------------
# Physics and contrast


def test_signal_equations():
  # Spin echo: PD (1 - e^-TR/T1) e^-TE/T2.
  assert phantom.mr_signal("se", 0.8, 1000.0, 100.0, 500.0, 20.0) == pytest.approx(
      0.8 * (1 - math.exp(-0.5)) * math.exp(-0.2))
  # Inversion recovery with long TR nulls a tissue at TI = T1 ln 2.
  assert abs(phantom.mr_signal("ir", 1.0, 4000.0, 2000.0, 1e9, 0.0, 4000.0 * math.log(2))) < 1e-9
  # Gadolinium shortens T1: 1/T1' = 1/T1 + r1 C.
  assert phantom.post_contrast_t1(1600.0, 0.0) == pytest.approx(1600.0)
  assert phantom.post_contrast_t1(1600.0, 0.3) == pytest.approx(1000.0 / (1 / 1.6 + 4.0 * 0.3))
  with pytest.raises(ValueError, match="'se' or 'ir'"):
    phantom.mr_signal("gre", 1.0, 1.0, 1.0, 1.0, 1.0)


def test_smooth_field_is_normalised_and_deterministic():
  a = phantom.smooth_field(np.random.default_rng(3), (20, 24, 18), 2.0, 10.0)
  b = phantom.smooth_field(np.random.default_rng(3), (20, 24, 18), 2.0, 10.0)
  assert a.dtype == np.float32 and a.shape == (20, 24, 18)
  np.testing.assert_array_equal(a, b)
  assert abs(float(a.mean())) < 1e-5 and float(a.std()) == pytest.approx(1.0, abs=1e-4)
  # Smooth: neighbouring voxels are strongly correlated.
  assert np.corrcoef(a[1:].ravel(), a[:-1].ravel())[0, 1] > 0.9


@pytest.mark.parametrize("protocol", ["default", "heldout"])
def test_tissue_and_tumour_contrasts(protocol):
  """CSF dark on FLAIR and T1, bright on T2; the enhancing rim bright on T1ce only."""
  tissue = phantom.generate_subject("tissue", 11, 2.0, protocol, modalities=("flair", "t1", "t2"))
  label = tissue["label"]
  mean = {m: [float(im[label == k].mean()) for k in (1, 2, 3)] for m, im in tissue["images"].items()}
  for m in ("flair", "t1"):
    csf, gm, wm = mean[m]
    assert csf < 0.75 * wm and csf < 0.75 * gm, (m, mean[m])
  csf, gm, wm = mean["t2"]
  assert csf > 1.2 * wm and gm > wm, mean["t2"]
  assert mean["t1"][2] > mean["t1"][1]   # WM brighter than GM on T1

  tumor = phantom.generate_subject("tumor", 12, 2.0, protocol, enhancing=True)
  lab = tumor["label"]
  assert (lab == 4).sum() > 10 and (lab == 2).sum() > 10
  enh = {m: float(im[lab == 4].mean()) for m, im in tumor["images"].items()}
  edema = {m: float(im[lab == 2].mean()) for m, im in tumor["images"].items()}
  assert enh["t1ce"] > 1.2 * edema["t1ce"]
  assert enh["t1"] < edema["t1"]
  # Oedema is bright on FLAIR and T2 relative to the normal-appearing brain.
  brain = (lab == 0) & (tumor["images"]["flair"] > 0)
  for m in ("flair", "t2"):
    assert edema[m] > 1.3 * float(tumor["images"][m][brain].mean())


def test_subject_arrays_and_labels_per_task():
  tumor = phantom.generate_subject("tumor", 0, FAST)
  assert set(tumor["images"]) == set(get_task("tumor").modalities)
  shape = tumor["label"].shape
  for im in tumor["images"].values():
    assert im.dtype == np.float32 and im.shape == shape and im.min() >= 0 and im.max() > 0
  assert tumor["label"].dtype == np.int16
  np.testing.assert_allclose(np.diag(tumor["affine"])[:3], FAST)
  # MNI world coordinates: the grid centre is near the origin (AC), with +x/+y/+z = R/A/S.
  centre = tumor["affine"] @ np.array([*(np.array(shape) - 1) / 2, 1.0])
  assert np.all(np.abs(centre[:3]) < 30)
  assert set(np.unique(tumor["label"])) <= {0, 1, 2, 4}

  wmh = phantom.generate_subject("wmh", 1, FAST)
  assert set(np.unique(wmh["label"])) == {0, 1}
  assert (wmh["label"] == 1).sum() < 0.01 * wmh["label"].size   # small lesions
  assert list(wmh["images"]) == ["t1", "t2", "flair"]

  tissue = phantom.generate_subject("tissue", 2, FAST)
  assert set(np.unique(tissue["label"])) == {0, 1, 2, 3}
  with_lesions = phantom.generate_subject("tissue", 2, FAST, lesions=True)
  assert set(np.unique(with_lesions["label"])) == {0, 1, 2, 3, 4}


def test_tumour_variety():
  """Sizes vary widely, and some tumours have no enhancing part."""
  kinds, sizes = set(), []
  for seed in range(12):
    geo = phantom._tumor_geometry(np.random.default_rng(seed), phantom.atlas(FAST))
    kinds.add(geo["kind"])
    sizes.append(geo["core_mm"])
  assert "nonenhancing" in kinds and "ring" in kinds
  assert max(sizes) > 2.5 * min(sizes)
  none = phantom.generate_subject("tumor", 5, FAST, enhancing=False)
  assert not (none["label"] == 4).any() and (none["label"] == 1).any()


def test_same_seed_same_anatomy_under_any_protocol_and_modality_subset():
  a = phantom.generate_subject("tumor", 4, FAST, "default")
  b = phantom.generate_subject("tumor", 4, FAST, "heldout", modalities=("t2", "t1"))
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["images"]["t1"], b["images"]["t1"])
  c = phantom.generate_subject("tumor", 4, FAST, "default", modalities=("t2",))
  np.testing.assert_array_equal(a["images"]["t2"], c["images"]["t2"])
  d = phantom.generate_subject("tumor", 5, FAST, "default")
  assert not np.array_equal(a["label"], d["label"])


def test_generate_subject_errors():
  with pytest.raises(ValueError, match="unknown task"):
    phantom.generate_subject("liver", 0, FAST)
  with pytest.raises(ValueError, match=r"--protocol.*\['default', 'heldout'\]"):
    phantom.generate_subject("tumor", 0, FAST, "siemens")
  with pytest.raises(ValueError, match="--modalities"):
    phantom.generate_subject("tumor", 0, FAST, modalities=("t1", "dwi"))
  with pytest.raises(ValueError, match="--spacing"):
    phantom.generate_subject("tumor", 0, 0.1)
  with pytest.raises(ValueError, match="--lesions"):
    phantom.generate_subject("tumor", 0, FAST, lesions=True)


# Small subjects as the phantom drew them before the PD contrast and the tissue6 label space were
# added (commit 6779c69): per modality the acquisition draws (TR, TE, TI, bias SD: straight from its
# random stream, so any change of the streams shows) and the image mean (4 significant digits);
# a hash of the label map (anatomy and lesion streams).
EXISTING_SUBJECTS = [
    (("tumor", 3, {}), {
        "label": "d4d85206514a3b64",
        "flair": [8245.127947302028, 136.90629849071541, 2448.741633381615, 0.09560354579131558, 355.2],
        "t1": [638.2452302106676, 15.155992421805013, None, 0.14598601871506217, 112.9],
        "t1ce": [594.9499844358438, 14.737905189829043, None, 0.14224212779668724, 67.12],
        "t2": [4727.204953528097, 91.49936745599393, None, 0.08419456293706476, 84.74]}),
    (("tissue", 3, {"lesions": True}), {
        "label": "a428cc4a86509273",
        "t1": [638.2452302106676, 15.155992421805013, None, 0.14598601871506217, 112.7],
        "flair": [8245.127947302028, 136.90629849071541, 2448.741633381615, 0.09560354579131558, 354.7]}),
    (("tumor", 3, {"protocol": "heldout", "modalities": ("t2", "t1ce")}), {
        "label": "d4d85206514a3b64",
        "t2": [3490.8819814112385, 72.78544319542597, None, 0.25129184440559715, 208.8],
        "t1ce": [2162.3749610896093, 4.122984198304841, 857.2240960362267, 0.29846057565193823, 826.3]}),
]


def _fingerprint(subject):
  out = {"label": hashlib.sha256(np.ascontiguousarray(subject["label"]).tobytes()).hexdigest()[:16]}
  for m, image in subject["images"].items():
    acq = subject["meta"]["acquisition"][m]
    out[m] = [acq["TR"], acq["TE"], acq.get("TI"), acq["bias_sd"], float(f"{image.mean():.4g}")]
  return out


@pytest.mark.parametrize("args, expected", EXISTING_SUBJECTS)
def test_existing_phantoms_are_unchanged(args, expected):
  task, seed, kwargs = args
  assert _fingerprint(phantom.generate_subject(task, seed, 8.0, **kwargs)) == expected


def test_pd_contrast_is_an_extra_stream():
  """PD: long-TR short-TE spin echo, so little T1 or T2 weighting. Asking for it leaves every
  other image bit-identical."""
  with_pd = phantom.generate_subject("tissue", 11, FAST, modalities=("flair", "t1", "t2", "pd"))
  without = phantom.generate_subject("tissue", 11, FAST, modalities=("flair", "t1", "t2"))
  for m in ("flair", "t1", "t2"):
    np.testing.assert_array_equal(with_pd["images"][m], without["images"][m])
  acq = with_pd["meta"]["acquisition"]["pd"]
  assert acq["sequence"] == "se" and 2500 <= acq["TR"] <= 3500 and 10 <= acq["TE"] <= 20
  # Pure tissues at the protocol's mid TR/TE: signal ranks GM > WM > CSF (TR << T1 of CSF),
  # all within 40 % of each other.
  seq = phantom.PROTOCOLS["default"].sequences["pd"]
  pure = {t: phantom.mr_signal("se", p.pd, p.t1, p.t2, np.mean(seq.tr), np.mean(seq.te))
          for t, p in phantom.TISSUES.items() if t in ("csf", "gm", "wm")}
  assert pure["gm"] > pure["wm"] > pure["csf"] > pure["gm"] / 1.4, pure
  # In the image (partial volume, bias, noise) PD's tissue means spread less than T1's or T2's:
  # the point of a PD acquisition.
  label = with_pd["label"]
  def spread(m):
    means = [float(with_pd["images"][m][label == k].mean()) for k in (1, 2, 3)]
    return max(means) / min(means)
  assert spread("pd") < 1.4 and spread("pd") < spread("t1") and spread("pd") < spread("t2")


def test_tissue6_labels_the_papers_structures():
  task = get_task("tissue6")
  value = dict(zip(task.class_names, task.label_values))
  subject = phantom.generate_subject("tissue6", 2, FAST, lesions=True)
  label, affine = subject["label"], subject["affine"]
  assert set(np.unique(label)) == set(task.label_values)
  # Class centroids in MNI mm (+x/+y/+z = R/A/S): where the structures are.
  def centroid(name):
    return (affine @ np.r_[np.argwhere(label == value[name]).mean(0), 1.0])[:3]
  deep, stem, cereb, vent = (centroid(n) for n in ("basal_ganglia", "brainstem", "cerebellum",
                                                     "ventricles"))
  assert abs(deep[0]) < 10 and abs(stem[0]) < 8 and abs(vent[0]) < 10 and abs(cereb[0]) < 10
  assert cereb[1] < stem[1] < deep[1] and cereb[2] < deep[2] and stem[2] < deep[2]
  # CSF outside the ventricles is background; GM and WM keep a tissue class.
  tissue = phantom.generate_subject("tissue", 2, FAST, lesions=True)["label"]
  assert set(np.unique(label[tissue == 1])) <= {0, value["ventricles"]}
  assert np.all(label[(tissue == 2) | (tissue == 3)] != 0)
  np.testing.assert_array_equal(label == value["lesion"], tissue == 4)


# ---------------------------------------------------------------------------------------------
# Datasets on disk


def test_determinism_same_seed_same_bytes(tmp_path):
  kw = dict(spacing=FAST, missing_rate=0.3, test_protocol="heldout")
  phantom.write_dataset(tmp_path / "a", "tumor", 3, 7, **kw)
  phantom.write_dataset(tmp_path / "b", "tumor", 3, 7, **kw)
  a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
  assert a.keys() == b.keys() and a == b
  phantom.write_dataset(tmp_path / "c", "tumor", 3, 8, **kw)
  c = _files(tmp_path / "c")
  assert c["Phantom_tumor_000/Phantom_tumor_000_seg.nii.gz"] != a["Phantom_tumor_000/Phantom_tumor_000_seg.nii.gz"]
  # A subject depends on (seed, index), not on how many subjects or which layout.
  phantom.write_dataset(tmp_path / "d", "tumor", 2, 7, spacing=FAST, layout="manifest")
  one = nib.load(tmp_path / "d" / "cases" / "Phantom_tumor_001_seg.nii.gz")
  other = nib.load(tmp_path / "a" / "Phantom_tumor_001" / "Phantom_tumor_001_seg.nii.gz")
  np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(other.dataobj))
  np.testing.assert_array_equal(one.affine, other.affine)


def test_missing_modalities_are_files_not_written(tmp_path):
  root = tmp_path / "ds"
  record = phantom.write_dataset(root, "tumor", 8, 1, spacing=FAST, missing_rate=0.6)
  task = get_task("tumor")
  n_missing = 0
  for case, info in record["cases"].items():
    assert len(info["missing"]) < len(task.modalities)   # never all
    n_missing += len(info["missing"])
    for m in task.modalities:
      path = root / case / f"{case}_{m}.nii.gz"
      assert path.is_file() == (m not in info["missing"]), path
    assert (root / case / f"{case}_seg.nii.gz").is_file()
  assert n_missing > 0
  assert not list(root.rglob("*.tmp*"))


def test_layout_file_names(tmp_path):
  task = get_task("tumor")
  recs = {}
  for layout in phantom.LAYOUTS:
    recs[layout] = phantom.write_dataset(tmp_path / layout, "tumor", 3, 2, spacing=FAST, layout=layout)
  case = "Phantom_tumor_000"
  files = set(_files(tmp_path / "brats"))
  assert f"{case}/{case}_t1ce.nii.gz" in files and f"{case}/{case}_seg.nii.gz" in files
  assert {"splits.json", "phantom.json"} <= files

  root = tmp_path / "brats2018"
  files = set(_files(root))
  for c in recs["brats2018"]["cases"]:
    grades = [g for g in ("HGG", "LGG") if (root / g / c).is_dir()]
    assert len(grades) == 1, c   # LGG: no enhancing part
    assert {f"{grades[0]}/{c}/{c}_{m}.nii" for m in task.modalities} | {f"{grades[0]}/{c}/{c}_seg.nii"} <= files
  for p in root.rglob("*.nii"):
    assert p.read_bytes()[344:348] == b"n+1\x00"   # uncompressed single-file NIfTI-1

  root = tmp_path / "nnunet"
  files = set(_files(root))
  assert {f"imagesTr/{case}_{i:04d}.nii.gz" for i in range(4)} | {f"labelsTr/{case}.nii.gz"} <= files
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}
  assert meta["labels"] == {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 4}
  assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"

  root = tmp_path / "manifest"
  rows = list(csv.DictReader((root / "manifest.csv").read_text().splitlines()))
  assert list(rows[0]) == ["case_id", "flair", "t1", "t1ce", "t2", "label"]
  assert rows[0]["case_id"] == case and rows[0]["t2"] == f"cases/{case}_t2.nii.gz"
  for row in rows:
    for key in ("flair", "t1", "t1ce", "t2", "label"):
      assert (root / row[key]).is_file()

  splits = json.loads((tmp_path / "brats" / "splits.json").read_text())
  assert list(splits) == ["train", "val", "test"] and all(len(v) == 1 for v in splits.values())
  assert sorted(sum(splits.values(), [])) == [f"Phantom_tumor_{i:03d}" for i in range(3)]


def test_splits_fractions():
  ids = [f"c{i}" for i in range(20)]
  splits = phantom.split_cases(ids, 0)
  assert [len(splits[k]) for k in ("train", "val", "test")] == [12, 4, 4]
  assert sorted(sum(splits.values(), [])) == sorted(ids)
  assert phantom.split_cases(["a"], 0) == {"train": ["a"], "val": [], "test": []}


def test_wmh_and_tissue_tasks_with_modality_subset(tmp_path):
  root = tmp_path / "wmh"
  phantom.write_dataset(root, "wmh", 2, 0, spacing=FAST, layout="nnunet", modalities=("flair", "t1"))
  meta = json.loads((root / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "T1", "1": "FLAIR"}   # the task's order
  assert meta["labels"] == {"background": 0, "lesion": 1}
  assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
      "Phantom_wmh_000_0000.nii.gz", "Phantom_wmh_000_0001.nii.gz",
      "Phantom_wmh_001_0000.nii.gz", "Phantom_wmh_001_0001.nii.gz"]
  root = tmp_path / "tissue"
  rec = phantom.write_dataset(root, "tissue", 1, 0, spacing=FAST, lesions=True)
  seg = np.asarray(nib.load(root / "Phantom_tissue_000" / "Phantom_tissue_000_seg.nii.gz").dataobj)
  assert set(np.unique(seg)) == {0, 1, 2, 3, 4} and rec["lesions"] is True
  with pytest.raises(ValueError, match=r"--modalities.*t1ce"):
    phantom.write_dataset(tmp_path / "x", "wmh", 1, 0, spacing=FAST, modalities=("t1ce",))


def test_heldout_protocol_for_the_test_split(tmp_path):
  rec = phantom.write_dataset(tmp_path / "ds", "tumor", 5, 3, spacing=FAST, test_protocol="heldout")
  splits = json.loads((tmp_path / "ds" / "splits.json").read_text())
  for case, info in rec["cases"].items():
    expected = "heldout" if case in splits["test"] else "default"
    assert info["protocol"] == expected and info["split"] in splits
  test_case = splits["test"][0]
  assert rec["cases"][test_case]["acquisition"]["t1"]["sequence"] == "ir"   # MPRAGE-like T1
  assert rec["test_protocol"] == "heldout" and _record(tmp_path / "ds")["complete"] is True


def test_rewrite_cleans_stale_files_only(tmp_path):
  root = tmp_path / "ds"
  phantom.write_dataset(root, "tumor", 3, 0, spacing=FAST)
  (root / "notes.txt").write_text("mine")
  rec = phantom.write_dataset(root, "tumor", 3, 0, spacing=FAST, missing_rate=0.7)
  for case, info in rec["cases"].items():
    for m in info["missing"]:
      assert not (root / case / f"{case}_{m}.nii.gz").exists()   # the earlier file is gone
  assert (root / "notes.txt").read_text() == "mine"
  assert sorted(_files(root)) == sorted(rec["files"] + ["notes.txt", "phantom.json"])
  # A non-empty folder that this tool did not write is refused.
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.nii.gz").write_bytes(b"x")
  with pytest.raises(ValueError, match="--out.*not empty"):
    phantom.write_dataset(other, "tumor", 1, 0, spacing=FAST)


def test_verifier_accepts_the_phantom(tmp_path):
  verify = pytest.importorskip("hemijax.data.verify")
  root = tmp_path / "ds"
  phantom.write_dataset(root, "tumor", 3, 0, spacing=FAST, missing_rate=0.3)
  report = verify.verify_dataset(root, modalities=get_task("tumor").modalities, label_values=(0, 1, 2, 4))
  assert report.ok, report.problems
  assert report.num_cases == 3


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_dataset(tmp_path, capsys):
  out = tmp_path / "cli"
  assert phantom.main(["--task", "wmh", "--out", str(out), "--n-subjects", "3", "--seed", "1",
                       "--spacing", str(FAST), "--layout", "brats", "--protocol", "heldout", "-q"]) == 0
  rec = _record(out)
  assert rec["task"] == "wmh" and rec["protocol"] == "heldout" and len(rec["cases"]) == 3
  assert (out / "Phantom_wmh_002" / "Phantom_wmh_002_flair.nii.gz").is_file()
  assert phantom.main(["--list-protocols"]) == 0
  assert "heldout" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--protocol", "siemens"], r"unknown protocol 'siemens'; choose one of \['default', 'heldout'\]"),
    (["--test-protocol", "x"], "--protocol"),
    (["--layout", "bids"], "--layout"),
    (["--modalities", "t1,dwi"], "--modalities"),
    (["--task", "wmh", "--modalities", "t1ce"], "--modalities"),
    (["--missing-rate", "1.5"], "--missing-rate"),
    (["--n-subjects", "0"], "--n-subjects"),
    (["--seed", "-1"], "--seed"),
    (["--spacing", "0"], "--spacing"),
    (["--task", "knee"], "unknown task"),
    (["--lesions"], "--lesions"),
    (["--n-subjects", "two"], "--n-subjects"),
])
def test_cli_errors(tmp_path, argv, expected):
  message = _error(["--out", str(tmp_path / "x")] + argv)
  assert re.search(expected, message), message
  assert not (tmp_path / "x").exists()   # validated before anything is written


def test_cli_pd_modality(tmp_path):
  out = tmp_path / "pd"
  assert phantom.main(["--task", "tumor", "--out", str(out), "--n-subjects", "1", "--spacing",
                       str(FAST), "--layout", "nnunet", "--modalities", "flair,t1,t2,pd", "-q"]) == 0
  meta = json.loads((out / "dataset.json").read_text())
  assert meta["channel_names"] == {"0": "FLAIR", "1": "T1", "2": "T2", "3": "PD"}
  assert (out / "imagesTr" / "Phantom_tumor_000_0003.nii.gz").is_file()
  assert _record(out)["modalities"] == ["flair", "t1", "t2", "pd"]
  rec = phantom.write_dataset(tmp_path / "m", "wmh", 1, 0, spacing=FAST, layout="manifest",
                              modalities=("pd", "flair"))
  assert rec["modalities"] == ["flair", "pd"]   # the task's order, then the extras
  with open(tmp_path / "m" / "manifest.csv") as f:
    header, row = list(csv.reader(f))
  assert header == ["case_id", "flair", "t1", "t1ce", "t2", "pd", "label"]
  assert row[5] == "cases/Phantom_wmh_000_pd.nii.gz" and row[2] == ""


def test_cli_needs_out():
  assert "--out" in _error(["--task", "tumor"])


def test_montage_renders(tmp_path):
  path = tmp_path / "m.png"
  assert phantom.main(["--montage", str(path), "--spacing", "4"]) == 0
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
