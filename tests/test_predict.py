"""Prediction from files and arrays: what predict.py and `load_predictor(...).predict` accept,
refuse and write (issues 21 and 22)."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import hemis as hemis_config
from hemijax import atomic
from hemijax.data import io, layouts
from hemijax.data.case_ids import case_filename, check_case_id
from hemijax.data.datasets import phantom_root
from hemijax.inference import inputs, nifti
from hemijax.inference.predictor import Predictor
from model_helpers import smoke_training_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_predict(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "predict.py"] + [str(a) for a in args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, needle):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from hemijax.training import loop
  config = smoke_training_config(hemis_config)
  config.train.num_steps = 2
  path = tmp_path_factory.mktemp("runs") / "hemis"
  loop.train(config, path, progress=False)
  return path


@pytest.fixture(scope="module")
def phantom_cases(workdir):
  return layouts.discover_cases(phantom_root(smoke_training_config(hemis_config)))


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor(workdir)


def copy_case(case, folder, case_id):
  """The case's files under folder/<case_id>/<case_id>_<modality>.nii.gz (and _seg)."""
  target = folder / case_id
  target.mkdir(parents=True)
  for modality, path in case.images.items():
    shutil.copy(path, target / f"{case_id}_{modality}.nii.gz")
  shutil.copy(case.label, target / f"{case_id}_seg.nii.gz")
  return target


# ----------------------------------------------------------------------------------------------
# Outputs never overwrite inputs or leave the output folder


def test_output_that_is_an_input_is_refused_even_by_another_path(workdir, phantom_cases, tmp_path):
  flair = tmp_path / "X_flair.nii.gz"
  shutil.copy(phantom_cases[0].images["flair"], flair)
  (tmp_path / "sub").mkdir()
  os.link(flair, tmp_path / "linked.nii.gz")
  before = flair.read_bytes()
  for output in (tmp_path / "sub" / ".." / "X_flair.nii.gz", tmp_path / "linked.nii.gz"):
    proc = run_predict(["--workdir", workdir, "--input", f"flair={flair}", "--output", output])
    assert_one_line_error(proc, "is the input")
  assert flair.read_bytes() == before


@pytest.mark.parametrize("case_id", ["../../escaped", "sub-01/ses-01", "", "   ", "/abs/x", "..",
                                     ".hidden", "a\\b", "a\x00b"])
def test_case_ids_that_are_not_plain_names_are_refused(case_id):
  with pytest.raises(io.DataError, match="case id"):
    check_case_id(case_id)
  with pytest.raises(io.DataError):
    case_filename(case_id)


def test_plain_case_ids_become_file_names():
  assert case_filename("BraTS2021_00000") == "BraTS2021_00000.nii.gz"
  assert case_filename("sub-01_ses-01", "_probabilities.nii.gz") == \
      "sub-01_ses-01_probabilities.nii.gz"


def test_manifest_case_id_cannot_write_outside_out(workdir, phantom_cases, tmp_path):
  case = phantom_cases[0]
  data = tmp_path / "nested" / "data"
  data.mkdir(parents=True)
  rows = ["case_id,flair,t1"] + [f"{cid},{case.images['flair']},{case.images['t1']}"
                                 for cid in ("good", "../../escaped")]
  (data / "manifest.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "nested" / "out"
  written, problems = nifti.predict_dataset(workdir, data, out)
  assert written == [out / "good.nii.gz"] and written[0].is_file()
  assert any("../../escaped" in p for p in problems), problems
  everything = [p for p in tmp_path.rglob("*") if "escaped" in p.name]
  assert everything == []


def test_out_inside_the_dataset_is_refused(workdir, tmp_path):
  data = tmp_path / "data"
  (data / "case").mkdir(parents=True)
  proc = run_predict(["--workdir", workdir, "--data", data, "--out", data / "predictions"])
  assert_one_line_error(proc, "inside the dataset folder")
  assert not (data / "predictions").exists()


def test_check_outputs_refuses_one_file_for_two_outputs(tmp_path):
  with pytest.raises(ValueError, match="same file"):
    inputs.check_outputs({"--output": tmp_path / "a.nii.gz",
                          "--probabilities": tmp_path / "." / "a.nii.gz"}, [tmp_path / "in.nii.gz"])


# ----------------------------------------------------------------------------------------------
# --data: labels are not read, a bad case is skipped, probabilities, headers


def test_predict_data_does_not_check_label_files(workdir, phantom_cases, tmp_path):
  """A second label file in a case is a problem for training, not for prediction: exit 0."""
  data = tmp_path / "data"
  a = copy_case(phantom_cases[0], data, "a")
  shutil.copy(a / "a_seg.nii.gz", a / "a_label.nii.gz")
  out = tmp_path / "out"
  proc = run_predict(["--workdir", workdir, "--data", data, "--out", out])
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]


def test_predict_data_ignores_labels_and_skips_unreadable_cases(workdir, phantom_cases, tmp_path):
  data = tmp_path / "data"
  # Case a: a BraTS 2023 label value (3) and a stray brain mask file; its header codes and units
  # must reach the outputs.
  a = copy_case(phantom_cases[0], data, "a")
  seg = nib.load(a / "a_seg.nii.gz")
  values = np.asarray(seg.dataobj).copy()
  values[values == 4] = 3
  nib.save(nib.Nifti1Image(values, seg.affine, seg.header), a / "a_seg.nii.gz")
  shutil.copy(a / "a_seg.nii.gz", a / "a_brainmask.nii.gz")
  for path in a.glob("a_[ft]*.nii.gz"):
    img = nib.load(path)
    header = img.header.copy()
    header["descrip"] = b"scanner 7"
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, header)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=4)  # MNI
    nib.save(img, path)
  # Case b: a non-integer label map.
  b = copy_case(phantom_cases[1], data, "b")
  seg = nib.load(b / "b_seg.nii.gz")
  nib.save(nib.Nifti1Image(np.asarray(seg.dataobj, np.float32) * 0.5, seg.affine),
           b / "b_seg.nii.gz")
  # Case c: an unreadable image; case d: an empty folder.
  c = copy_case(phantom_cases[2], data, "c")
  (c / "c_t1.nii.gz").write_bytes(b"not a NIfTI file")
  (data / "d").mkdir()

  out = tmp_path / "out"
  proc = run_predict(["--workdir", workdir, "--data", data, "--out", out, "--probabilities"])
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
  assert sorted(p.name for p in out.iterdir()) == [
      "a.nii.gz", "a_probabilities.nii.gz", "b.nii.gz", "b_probabilities.nii.gz"]
  lines = proc.stderr.strip().splitlines()
  assert any("c_t1.nii.gz" in line for line in lines[:-1]), proc.stderr
  assert any(str(data / "d") in line for line in lines[:-1]), proc.stderr
  assert lines[-1].startswith("error:") and "problem(s)" in lines[-1]

  source = nib.load(a / "a_flair.nii.gz")
  for name in ("a.nii.gz", "a_probabilities.nii.gz"):
    result = nib.load(out / name)
    assert int(result.header["qform_code"]) == 1 and int(result.header["sform_code"]) == 4
    assert result.header.get_xyzt_units() == source.header.get_xyzt_units() == ("mm", "sec")
    assert result.header["descrip"].tobytes().rstrip(b"\0") == b"scanner 7"
    np.testing.assert_allclose(result.affine, source.affine)
  labels = np.asarray(nib.load(out / "a.nii.gz").dataobj)
  assert labels.shape == source.shape and set(np.unique(labels)) <= {0, 1, 2, 4}
  probs = nib.load(out / "a_probabilities.nii.gz").get_fdata()
  assert probs.shape == source.shape + (4,)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_array_equal(probs.argmax(-1), np.searchsorted([0, 1, 2, 4], labels))


def test_stop_on_error_raises_the_first_problem(workdir, phantom_cases, tmp_path):
  data = tmp_path / "data"
  c = copy_case(phantom_cases[0], data, "c")
  (c / "c_t1.nii.gz").write_bytes(b"not a NIfTI file")
  copy_case(phantom_cases[1], data, "e")
  with pytest.raises(io.DataError, match="c_t1.nii.gz"):
    nifti.predict_dataset(workdir, data, tmp_path / "out", stop_on_error=True)
  assert not (tmp_path / "out" / "e.nii.gz").exists()


def test_probabilities_take_no_path_with_data(workdir, tmp_path):
  proc = run_predict(["--workdir", workdir, "--data", tmp_path, "--out", tmp_path.parent / "o",
                      "--probabilities", tmp_path / "p.nii.gz"])
  assert_one_line_error(proc, "--probabilities")


# ----------------------------------------------------------------------------------------------
# The CLI's help and one-line errors


def test_help_shows_the_module_docstring():
  proc = run_predict(["--help"])
  assert proc.returncode == 0
  assert "python predict.py --workdir runs/hemis --data DIR" in proc.stdout
  assert "--stop-on-error" in proc.stdout


def test_step_typo_is_one_line_naming_the_option(workdir, tmp_path):
  proc = run_predict(["--workdir", workdir, "--step", "abc", "--input", "t1=x.nii.gz",
                      "--output", tmp_path / "o.nii.gz"])
  assert_one_line_error(proc, "--step 'abc'")


# ----------------------------------------------------------------------------------------------
# Modality names: one normalisation for the CLI and the Python API


def test_cli_names_are_normalised_before_the_duplicate_check():
  assert nifti.parse_named_inputs(["FLAIR=a.nii.gz", "T1Gd=b.nii.gz"]) == {
      "flair": pathlib.Path("a.nii.gz"), "t1ce": pathlib.Path("b.nii.gz")}
  with pytest.raises(ValueError, match="'t1' given twice"):
    nifti.parse_named_inputs(["t1=a.nii.gz", "T1=b.nii.gz"])
  with pytest.raises(ValueError, match="'t1ce' given twice"):
    nifti.parse_named_inputs(["t1ce=a.nii.gz", "T1-Gd=b.nii.gz"])


def load_arrays(case, names=("flair", "t1")):
  images = {m: nib.load(case.images[m]).get_fdata(dtype=np.float32) for m in names}
  return images, nib.load(case.images[names[0]]).affine


def test_api_takes_the_names_the_cli_takes(predictor, phantom_cases):
  images, affine = load_arrays(phantom_cases[0])
  lower = predictor.predict(images, affine)
  upper = predictor.predict({"FLAIR": images["flair"], "T1": images["t1"]}, affine)
  np.testing.assert_array_equal(lower, upper)
  with pytest.raises(ValueError, match="'t1' given twice"):
    predictor.predict({"t1": images["t1"], "T1": images["t1"]}, affine)


# ----------------------------------------------------------------------------------------------
# The Python API: the affine is required and checked; intensities need a 0 background


def test_api_requires_the_affine(predictor, phantom_cases):
  images, _ = load_arrays(phantom_cases[0])
  with pytest.raises(TypeError, match="affine"):
    predictor.predict(images)
  with pytest.raises(ValueError, match="affine: required"):
    predictor.predict(images, None)


@pytest.mark.parametrize("broken", ["zero_axis", "parallel_axes"])
def test_api_refuses_a_degenerate_affine(predictor, phantom_cases, broken):
  images, affine = load_arrays(phantom_cases[0])
  affine = affine.copy()
  if broken == "zero_axis":
    affine[:3, 2] = 0
  else:
    affine[:3, 1] = affine[:3, 0]
  with pytest.raises(ValueError, match="affine"):
    predictor.predict(images, affine)


def test_api_refuses_mean_subtracted_intensities(predictor, phantom_cases):
  images, affine = load_arrays(phantom_cases[0])
  shifted = dict(images, t1=images["t1"] - images["t1"].mean())
  with pytest.raises(ValueError, match=r"images\['t1'\]: no voxel is 0"):
    predictor.predict(shifted, affine)
  # Any positive scaling of the raw intensities gives the same labels (normalised inside).
  scaled = {m: 3.0 * a for m, a in images.items()}
  np.testing.assert_array_equal(predictor.predict(scaled, affine),
                                predictor.predict(images, affine))


# ----------------------------------------------------------------------------------------------
# A writer killed mid-write leaves a temporary that the next write of the target removes


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
  target = tmp_path / "seg.nii.gz"
  child = ("import os, signal, sys\n"
           "from hemijax import atomic\n"
           "with atomic.temporary_path(sys.argv[1], '.nii.gz') as tmp:\n"
           "  open(tmp, 'wb').write(b'half')\n"
           "  os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.run([sys.executable, "-c", child, str(target)], cwd=ROOT)
  assert proc.returncode == -signal.SIGKILL
  left = [p for p in tmp_path.iterdir() if p.name.startswith(".seg.nii.gz.")]
  assert len(left) == 1 and not target.exists()
  # A running writer's temporary (same host, live pid) is left alone.
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    live = tmp_path / f".seg.nii.gz.{atomic._writer_tag(sleeper.pid)}.abcdefgh.tmp.nii.gz"
    live.write_bytes(b"in progress")
    io.save_nifti_atomic(target, np.zeros((2, 2, 2), np.uint8), np.eye(4))
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted([live.name, target.name])
  finally:
    sleeper.kill()
    sleeper.wait()
