"""NIfTI reading/writing: one-line errors naming the file, atomic writes."""
import os

import nibabel as nib
import numpy as np
import pytest

from hemijax.data import io
from hemijax.data.io import DataError, load_nifti, save_nifti_atomic

AFFINE = np.array([[1.5, 0, 0, -10], [0, 1, 0, 4], [0, 0, 2, 7], [0, 0, 0, 1]], float)


def _write(path, array, affine=AFFINE):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def _assert_names(excinfo, path):
  message = str(excinfo.value)
  assert str(path) in message
  assert "\n" not in message


def test_load_float_and_label(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  path = _write(tmp_path / "a.nii.gz", data)
  image, affine, header = load_nifti(path)
  assert image.dtype == np.float32 and image.shape == (2, 3, 4)
  np.testing.assert_array_equal(image, data)
  np.testing.assert_allclose(affine, AFFINE)
  assert isinstance(header, nib.Nifti1Header)
  label, _, _ = load_nifti(path, label=True)
  assert label.dtype == np.int32
  np.testing.assert_array_equal(label, data)


def test_trailing_singleton_axis_is_dropped(tmp_path):
  path = _write(tmp_path / "a.nii", np.ones((3, 3, 2, 1), np.float32))
  assert load_nifti(path)[0].shape == (3, 3, 2)


def test_4d_image_is_refused(tmp_path):
  path = _write(tmp_path / "series.nii.gz", np.ones((3, 3, 2, 4), np.float32))
  with pytest.raises(DataError, match="expected a 3D image") as e:
    load_nifti(path)
  _assert_names(e, path)
  assert load_nifti(path, expect_3d=False)[0].shape == (3, 3, 2, 4)


@pytest.mark.parametrize("kind", ["truncated_gz", "truncated_nii", "garbage", "empty", "missing"])
def test_unreadable_file(tmp_path, kind):
  good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).random((8, 8, 8), np.float32))
  raw = _write(tmp_path / "good.nii", np.random.default_rng(0).random((8, 8, 8), np.float32))
  if kind == "truncated_gz":
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(good.read_bytes()[:200])
  elif kind == "truncated_nii":
    path = tmp_path / "bad.nii"
    path.write_bytes(raw.read_bytes()[:600])
  elif kind == "garbage":
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"not an image" * 10)
  elif kind == "empty":
    path = tmp_path / "bad.nii"
    path.write_bytes(b"")
  else:
    path = tmp_path / "absent.nii.gz"
  with pytest.raises(DataError) as e:
    load_nifti(path)
  _assert_names(e, path)


def test_nan_voxels(tmp_path):
  data = np.ones((4, 4, 4), np.float32)
  data[1, 2, 3] = np.nan
  data[0, 0, 0] = np.inf
  path = _write(tmp_path / "nan.nii.gz", data)
  with pytest.raises(DataError, match="2 voxel") as e:
    load_nifti(path)
  _assert_names(e, path)


def test_non_integer_label(tmp_path):
  path = _write(tmp_path / "seg.nii.gz", np.full((2, 2, 2), 0.5, np.float32))
  with pytest.raises(DataError, match="non-integer") as e:
    load_nifti(path, label=True)
  _assert_names(e, path)


def test_data_error_is_value_error():
  assert issubclass(DataError, ValueError)


def test_save_round_trip_and_no_temp_left(tmp_path):
  data = np.random.default_rng(1).random((5, 4, 3)).astype(np.float32)
  path = tmp_path / "out" / "pred.nii.gz"
  save_nifti_atomic(path, data, AFFINE)
  assert os.listdir(path.parent) == ["pred.nii.gz"]
  back, affine, _ = load_nifti(path)
  np.testing.assert_array_equal(back, data)
  np.testing.assert_allclose(affine, AFFINE)
  img = nib.load(str(path))
  np.testing.assert_allclose(img.get_qform(), AFFINE, atol=1e-5)
  np.testing.assert_allclose(img.get_sform(), AFFINE, atol=1e-5)


def test_save_casts_awkward_dtypes_and_resets_scaling(tmp_path):
  # A source header with scaling and int16 storage must not rescale or truncate what we write.
  src = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), AFFINE)
  src.header.set_slope_inter(2.0, 1.0)
  probs = np.linspace(0, 1, 27).reshape(3, 3, 3)  # float64
  save_nifti_atomic(tmp_path / "p.nii", probs, AFFINE, header=src.header)
  np.testing.assert_allclose(load_nifti(tmp_path / "p.nii")[0], probs, atol=1e-6)
  labels = np.array([0, 1, 2, 4] * 2, np.int64).reshape(2, 2, 2)
  save_nifti_atomic(tmp_path / "l.nii.gz", labels, AFFINE, header=src.header)
  np.testing.assert_array_equal(load_nifti(tmp_path / "l.nii.gz", label=True)[0], labels)
  save_nifti_atomic(tmp_path / "b.nii.gz", labels > 1, AFFINE)
  assert nib.load(str(tmp_path / "b.nii.gz")).get_data_dtype() == np.uint8


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "pred.nii.gz"
  save_nifti_atomic(path, np.ones((2, 2, 2), np.float32), AFFINE)
  before = path.read_bytes()

  def broken_save(img, filename):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(io.nib, "save", broken_save)
  with pytest.raises(OSError):
    save_nifti_atomic(path, np.zeros((2, 2, 2), np.float32), AFFINE)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["pred.nii.gz"]


def test_save_needs_nifti_name(tmp_path):
  with pytest.raises(DataError) as e:
    save_nifti_atomic(tmp_path / "pred.npy", np.zeros((2, 2, 2)), AFFINE)
  _assert_names(e, tmp_path / "pred.npy")


def test_write_directory_renames_only_a_complete_folder(tmp_path):
  from hemijax import atomic

  def fill(folder):
    (folder / "a.txt").write_text("a")

  assert atomic.write_directory(tmp_path / "set", fill) == tmp_path / "set"
  assert (tmp_path / "set" / "a.txt").read_text() == "a"

  def fail(folder):
    (folder / "half.txt").write_text("x")
    raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError):
    atomic.write_directory(tmp_path / "other", fail)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]   # no half folder, no temp left
  # A folder another process finished first is kept as it is.
  atomic.write_directory(tmp_path / "set", lambda folder: (folder / "b.txt").write_text("b"))
  assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["a.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_degenerate_affine_is_refused_naming_the_file(tmp_path):
  flat = AFFINE.copy()
  flat[:3, 2] = 0.0  # the third voxel axis has no length: no orientation, no spacing
  img = nib.Nifti1Image(np.ones((3, 3, 2), np.float32), None)
  img.header.set_sform(flat, code=1)
  img.header.set_qform(None, code=0)
  path = tmp_path / "flat.nii.gz"
  nib.save(img, str(path))
  assert np.allclose(nib.load(str(path)).affine, flat)
  with pytest.raises(DataError, match="degenerate affine") as e:
    load_nifti(path)
  _assert_names(e, path)
