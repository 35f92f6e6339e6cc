"""NIfTI reading and writing with one-line errors that name the file.

Everything that can go wrong with an input file becomes a `DataError` whose message starts with the
path, so the CLIs can print it as one line instead of a traceback.
"""
from __future__ import annotations

import pathlib
import zlib

import nibabel as nib
import numpy as np

from hemijax import atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DataError(ValueError):
  """A problem with an input file, folder or option; the message names it (`path: problem`)."""


def problem(path, message: str) -> DataError:
  """Builds a `DataError` reading `path: message` (on one line)."""
  return DataError(f"{path}: {one_line(message)}")


def one_line(text) -> str:
  """Collapses whitespace so library messages (some span lines) fit on one line."""
  return " ".join(str(text).split())


def is_nifti(path) -> bool:
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
  """'case_t1.nii.gz' -> 'case_t1'."""
  lower = name.lower()
  for suffix in NIFTI_SUFFIXES:
    if lower.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _open(path: pathlib.Path):
  if not path.is_file():
    raise problem(path, "file not found" if not path.exists() else "not a regular file")
  try:
    return nib.load(str(path))
  except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
    raise problem(path, f"cannot read NIfTI file ({type(e).__name__}: {e})") from None


def _squeeze_to_3d(path, data, expect_3d: bool):
  """Drops trailing singleton axes (X, Y, Z, 1) that some tools write; rejects real 4D data."""
  if not expect_3d:
    return data
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise problem(path, f"expected a 3D image, got shape {tuple(data.shape)}")
  return data


def load_nifti(path, *, expect_3d: bool = True, label: bool = False):
  """Reads a NIfTI file -> (data, affine, header).

  data is float32 (scaling applied), or int32 with `label=True` (which then rejects non-integer
  values). Raises `DataError` naming the file if it is missing, unreadable or corrupt, not 3D
  (with `expect_3d`), or holds NaN/inf.
  """
  path = pathlib.Path(path)
  img = _open(path)
  if expect_3d and len(img.shape) > 3 and any(n != 1 for n in img.shape[3:]):
    # Checked on the header first so a 4D series is refused without reading it.
    raise problem(path, f"expected a 3D image, got shape {tuple(img.shape)}")
  try:
    if label:
      data = np.asanyarray(img.dataobj)
    else:
      data = img.get_fdata(dtype=np.float32)
  except (OSError, EOFError, ValueError, zlib.error, MemoryError) as e:
    raise problem(path, f"cannot read image data ({type(e).__name__}: {e})") from None
  data = _squeeze_to_3d(path, data, expect_3d)
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)):
    raise problem(path, "affine holds NaN/inf")
  if degenerate_affine(affine):
    raise problem(path, "degenerate affine (a voxel axis has zero length or two axes are "
                        "parallel): check the header's pixdim/qform/sform")
  if np.issubdtype(data.dtype, np.floating):
    bad = ~np.isfinite(data)
    if bad.any():
      raise problem(path, f"{int(bad.sum())} voxel(s) are NaN/inf")
  if label:
    if np.issubdtype(data.dtype, np.floating):
      rounded = np.rint(data)
      if np.any(rounded != data):
        raise problem(path, "label map holds non-integer values")
      data = rounded
    data = np.asarray(data, np.int32)
  return np.ascontiguousarray(data), affine, img.header


def degenerate_affine(affine) -> bool:
  """Whether the voxel axes of `affine` do not span 3D space (no orientation, no spacing)."""
  m = np.asarray(affine, np.float64)[:3, :3]
  lengths = np.linalg.norm(m, axis=0)
  return bool(np.any(lengths <= 1e-8) or abs(np.linalg.det(m)) <= 1e-6 * np.prod(lengths))


def read_header(path):
  """Opens a NIfTI file without reading its voxels -> (shape, affine); DataError naming it."""
  img = _open(pathlib.Path(path))
  return tuple(int(n) for n in img.shape), np.asarray(img.affine, np.float64)


def _storable(array: np.ndarray) -> np.ndarray:
  """Casts dtypes NIfTI tools choke on: bool -> uint8, int64 -> int32, float64 -> float32."""
  if array.dtype == bool:
    return array.astype(np.uint8)
  if array.dtype == np.int64 or array.dtype == np.uint64:
    return array.astype(np.int32)
  if array.dtype == np.float64:
    return array.astype(np.float32)
  return array


def save_nifti_atomic(path, array, affine, header=None) -> None:
  """Writes `array` to `path` via a temporary name in the same folder and `os.replace`.

  A reader never sees a half-written file, and an interrupted write leaves the old file intact.
  `header` (e.g. the source image's) keeps units and codes; its data type and scaling are reset so
  the values are stored as given.
  """
  path = pathlib.Path(path)
  if not is_nifti(path):
    raise problem(path, f"output name must end in {' or '.join(NIFTI_SUFFIXES)}")
  array = _storable(np.asarray(array))
  affine = np.asarray(affine, np.float64)
  if header is not None:
    header = header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
  img = nib.Nifti1Image(array, affine, header=header)
  if header is None:
    img.header.set_data_dtype(array.dtype)
  img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
  img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
  # Same suffix as the target: nibabel picks gzip from the file name.
  suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
  with atomic.temporary_path(path, suffix) as tmp:
    nib.save(img, tmp)
