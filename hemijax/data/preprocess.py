"""Checking, preprocessing and caching cases: files -> `Volume` and predictions -> original grid.

Per case: every file is opened and checked (`check_case`, shared with `verify`), the volume is
reoriented to the closest RAS+ axes (so a case stored LPS, RAS or with permuted axes gives the same
arrays), cropped to the brain's bounding box, optionally N4-corrected and resampled to a target
spacing, and each modality is normalised inside the brain. The forward `GridTransform` is kept so a
prediction on the preprocessed grid can be put back into the file's grid, axes and affine
(`to_original_grid`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
from nibabel import orientations
from scipy import ndimage

from hemijax.data import layouts
from hemijax import atomic
from hemijax.data.io import (DataError, degenerate_affine, load_nifti, one_line, problem,
                             save_nifti_atomic)
from hemijax.data.layouts import CaseFiles
from hemijax.data.tasks import check_modalities

CLIP_QUANTILES = (0.001, 0.999)
CACHE_VERSION = 2  # bump when preprocessing changes, so old cache entries are not reused
IDENTITY_ORIENTATION = ((0, 1), (1, 1), (2, 1))  # nibabel "ornt": already RAS+
# Affines of a subject's files may differ by rounding in the header; more than this is a mismatch.
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: compare `to_dict()` instead
class GridTransform:
  """The file grid -> preprocessed grid map: reorient by `orientation`, crop to `bbox`, then
  resample by `zoom`.

  `orientation` is nibabel's "ornt" of the file's axes (row i: the RAS+ axis file axis i becomes,
  and whether it flips); `bbox` and `zoom` are on the reoriented (canonical) grid. `zoom[i]` is the
  preprocessed voxel size over the canonical one along axis i (1 = not resampled); preprocessed
  voxel j sits at cropped-grid coordinate (j + 0.5) * zoom - 0.5 (centres aligned).
  """
  original_shape: tuple[int, int, int]
  original_affine: np.ndarray
  bbox_start: tuple[int, int, int]
  bbox_stop: tuple[int, int, int]
  zoom: tuple[float, float, float]
  shape: tuple[int, int, int]  # of the preprocessed grid
  affine: np.ndarray           # of the preprocessed grid
  orientation: tuple = IDENTITY_ORIENTATION

  @property
  def bbox(self) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in zip(self.bbox_start, self.bbox_stop))

  @property
  def cropped_shape(self) -> tuple[int, int, int]:
    return tuple(b - a for a, b in zip(self.bbox_start, self.bbox_stop))

  @property
  def resampled(self) -> bool:
    return any(z != 1.0 for z in self.zoom)

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    """The file's shape with its axes reoriented."""
    axes = [int(a) for a, _ in self.orientation]
    shape = [0, 0, 0]
    for n, axis in zip(self.original_shape, axes):
      shape[axis] = n
    return tuple(shape)

  def to_dict(self) -> dict:
    return {"original_shape": list(self.original_shape),
            "original_affine": np.asarray(self.original_affine).tolist(),
            "bbox_start": list(self.bbox_start), "bbox_stop": list(self.bbox_stop),
            "zoom": list(self.zoom), "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "orientation": [[int(a), int(f)] for a, f in self.orientation]}

  @classmethod
  def from_dict(cls, d: dict) -> "GridTransform":
    ints = lambda k: tuple(int(v) for v in d[k])
    return cls(original_shape=ints("original_shape"),
               original_affine=np.asarray(d["original_affine"], np.float64),
               bbox_start=ints("bbox_start"), bbox_stop=ints("bbox_stop"),
               zoom=tuple(float(v) for v in d["zoom"]), shape=ints("shape"),
               affine=np.asarray(d["affine"], np.float64),
               orientation=tuple((int(a), int(f))
                                 for a, f in d.get("orientation", IDENTITY_ORIENTATION)))


@dataclasses.dataclass
class Volume:
  """One preprocessed case. Arrays may be read-only memory maps when loaded from the cache."""
  case_id: str
  image: np.ndarray         # (X, Y, Z, M) float32, normalised; zeros in absent modality channels
  available: np.ndarray     # (M,) bool, in the order of `modalities`
  label: np.ndarray | None  # (X, Y, Z) int32 class ids = index into label_values
  brain: np.ndarray         # (X, Y, Z) bool
  spacing: tuple[float, float, float]
  transform: GridTransform
  modalities: tuple[str, ...] = ()


@dataclasses.dataclass
class RawCase:
  """A case's arrays as read from its files (file grid, file label values)."""
  images: dict[str, np.ndarray]
  label: np.ndarray | None
  affine: np.ndarray
  header: object
  shape: tuple[int, int, int]


def spacing_of(affine) -> tuple[float, float, float]:
  """Voxel size in mm: the lengths of the affine's first three columns."""
  return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _check_modalities(modalities) -> tuple[str, ...]:
  try:
    return check_modalities(modalities)
  except ValueError as e:
    raise DataError(one_line(e)) from None


def _present_values(label: np.ndarray) -> np.ndarray:
  """Distinct values of an int label map (bincount is much faster than np.unique on volumes)."""
  lo, hi = int(label.min()), int(label.max())
  if lo >= 0 and hi < 1 << 16:
    return np.flatnonzero(np.bincount(label.ravel(), minlength=hi + 1))
  return np.unique(label)


def _label_values_problem(label: np.ndarray, label_values) -> str | None:
  extra = sorted(set(_present_values(label).tolist()) - set(int(v) for v in label_values))
  if extra:
    return f"label values {extra} are not in the declared set {tuple(int(v) for v in label_values)}"
  return None


def check_case(case: CaseFiles, modalities, label_values, *, collect: bool = False):
  """Reads and checks every file of `case` -> (RawCase or None, problems).

  Checks: each file opens, is 3D, has no NaN/inf; no image is all zero (empty brain); all files
  share one shape and affine (the most common one, so the odd file is the one named); label values
  are in `label_values`. Without `collect` the first problem is raised as a `DataError`; with it,
  all are returned (for `verify`) and the RawCase is None if there was any.
  """
  modalities = _check_modalities(modalities)
  problems: list[DataError] = []

  def report(error):
    if not collect:
      raise error
    problems.append(error)

  wanted = [m for m in modalities if m in case.images]
  if not wanted:
    report(problem(case.where, f"case {case.case_id} has no image file for any of the modalities "
                               f"{', '.join(modalities)}"))
    return None, problems
  loaded = []  # (modality or None for the label, path, data, affine, header)
  for m in wanted:
    path = case.images[m]
    try:
      data, affine, header = load_nifti(path)
    except DataError as e:
      report(e)
      continue
    if not np.any(data):
      report(problem(path, "empty image: all voxels are 0 (delete the file if the modality is "
                           "missing)"))
      continue
    loaded.append((m, path, data, affine, header))
  if case.label is not None:
    try:
      label, affine, header = load_nifti(case.label, label=True)
    except DataError as e:
      report(e)
    else:
      message = _label_values_problem(label, label_values)
      if message:
        report(problem(case.label, message))
      else:
        loaded.append((None, case.label, label, affine, header))
  ref = _reference(loaded)
  agreeing = [entry for entry in loaded if entry is ref or not _mismatch(entry, ref, report)]
  if problems or not any(m is not None for m, *_ in agreeing):
    return None, problems
  images = {m: data for m, _, data, _, _ in agreeing if m is not None}
  label = next((data for m, _, data, _, _ in agreeing if m is None), None)
  return RawCase(images, label, ref[3], ref[4], tuple(ref[2].shape)), problems


def _same_grid(a, b) -> bool:
  return (a[2].shape == b[2].shape
          and np.allclose(a[3], b[3], rtol=AFFINE_RTOL, atol=AFFINE_ATOL))


def _reference(loaded):
  """The first image of the largest group of files sharing shape and affine (None if none)."""
  images = [e for e in loaded if e[0] is not None] or loaded
  if not images:
    return None
  return max(images, key=lambda e: sum(_same_grid(e, other) for other in loaded))


def _mismatch(entry, ref, report) -> bool:
  _, path, data, affine, _ = entry
  _, ref_path, ref_data, ref_affine, _ = ref
  if data.shape != ref_data.shape:
    report(problem(path, f"shape {data.shape} differs from {ref_data.shape} of {ref_path}"))
    return True
  if not np.allclose(affine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
    diff = float(np.abs(affine - ref_affine).max())
    report(problem(path, f"affine differs from that of {ref_path} (max difference {diff:.3g})"))
    return True
  return False


def load_case(case: CaseFiles, modalities, label_values) -> RawCase:
  """`check_case` that raises the first problem as a `DataError` naming the file."""
  raw, _ = check_case(case, modalities, label_values)
  return raw


# ----------------------------------------------------------------------------------------------
# Pure array steps


def brain_bbox(brain: np.ndarray, margin: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(start, stop) of the smallest box holding all `brain` voxels, grown by `margin` voxels."""
  coords = [np.flatnonzero(np.any(brain, axis=tuple(j for j in range(brain.ndim) if j != i)))
            for i in range(brain.ndim)]
  start = tuple(max(int(c[0]) - margin, 0) for c in coords)
  stop = tuple(min(int(c[-1]) + 1 + margin, n) for c, n in zip(coords, brain.shape))
  return start, stop


def normalise(image: np.ndarray, brain: np.ndarray, quantiles=CLIP_QUANTILES) -> np.ndarray:
  """Clips to the brain's intensity quantiles, then zero mean and unit variance in the brain.

  Voxels outside the brain are 0. A constant image (after clipping) becomes 0 everywhere.
  """
  values = image[brain]
  out = np.zeros(image.shape, np.float32)
  if values.size == 0:
    return out
  lo, hi = np.quantile(values, quantiles)
  values = np.clip(values, lo, hi)
  std = values.std()
  if std > 1e-8 * max(1.0, abs(float(values.mean()))):
    out[brain] = (values - values.mean()) / std
  return out


def _resample_matrix(zoom):
  zoom = np.asarray(zoom, np.float64)
  return zoom, 0.5 * zoom - 0.5


def resample(array: np.ndarray, zoom, shape, *, order: int) -> np.ndarray:
  """Cropped grid -> preprocessed grid: output voxel j samples input coordinate (j+0.5)*zoom-0.5."""
  matrix, offset = _resample_matrix(zoom)
  return ndimage.affine_transform(array, matrix, offset, output_shape=tuple(shape), order=order,
                                  mode="nearest", prefilter=False)


def _target_zoom(spacing, target_spacing):
  if target_spacing is None:
    return (1.0, 1.0, 1.0)
  target = np.broadcast_to(np.asarray(target_spacing, np.float64), (3,))
  if target.shape != (3,) or not np.all(np.isfinite(target)) or np.any(target <= 0):
    raise DataError(f"target_spacing: must be a positive number or three, got {target_spacing!r}")
  zoom = target / np.asarray(spacing)
  # Within 0.1% of the file's spacing: not worth interpolating.
  return tuple(1.0 if abs(z - 1) < 1e-3 else float(z) for z in zoom)


def _grid_after(start, cropped_shape, zoom, affine):
  shape = tuple(max(1, int(round(n / z))) for n, z in zip(cropped_shape, zoom))
  matrix, offset = _resample_matrix(zoom)
  step = np.eye(4)
  step[:3, :3] = np.diag(matrix)
  step[:3, 3] = np.asarray(start) + offset
  return shape, np.asarray(affine, np.float64) @ step


def n4_correct(image: np.ndarray, brain: np.ndarray, spacing, *, shrink: int | None = None,
               iterations=(50, 50, 30)) -> np.ndarray:
  """N4 bias-field correction (SimpleITK) of a 3D image inside `brain`; the `n4` option's engine."""
  try:
    import SimpleITK as sitk
  except ImportError:
    raise DataError("n4: needs SimpleITK, which is not installed (pip install 'hemijax[n4]')") from None
  if shrink is None:
    shrink = 2 if min(image.shape) >= 48 else 1  # fit the bias on a coarser grid, apply at full
  # SimpleITK orders axes (z, y, x).
  img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.maximum(image, 0), (2, 1, 0)),
                                                    dtype=np.float32))
  mask = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(brain & (image > 0), (2, 1, 0)),
                                                     dtype=np.uint8))
  for x in (img, mask):
    x.SetSpacing(tuple(float(s) for s in spacing))
  small, small_mask = (sitk.Shrink(x, [shrink] * 3) for x in (img, mask))
  corrector = sitk.N4BiasFieldCorrectionImageFilter()
  corrector.SetMaximumNumberOfIterations(list(iterations))
  corrector.Execute(small, small_mask)
  log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(img))
  out = image / np.exp(np.transpose(log_bias, (2, 1, 0)))
  return np.where(brain, out, image).astype(np.float32)


def remap_labels(label: np.ndarray, label_values) -> np.ndarray:
  """File label values -> class ids (index into `label_values`), e.g. BraTS 0,1,2,4 -> 0,1,2,3."""
  values = np.asarray(label_values, np.int64)
  if label.size and (label.min() < values.min() or label.max() > values.max()):
    raise ValueError(f"label values outside {tuple(values.tolist())}")
  lut = np.full(int(values.max() - values.min()) + 1, -1, np.int32)
  lut[values - values.min()] = np.arange(len(values), dtype=np.int32)
  out = lut[label - values.min()]
  if np.any(out < 0):
    raise ValueError(f"label values outside {tuple(values.tolist())}")
  return out


def class_ids_to_label_values(class_map, label_values) -> np.ndarray:
  """Inverse of `remap_labels`, for writing predictions with the dataset's label values."""
  class_map = np.asarray(class_map)
  values = np.asarray(label_values, np.int32)
  if class_map.size and (class_map.min() < 0 or class_map.max() >= len(values)):
    raise ValueError(f"class ids must lie in [0, {len(values)}), got "
                     f"[{class_map.min()}, {class_map.max()}]")
  return values[class_map]


def to_original_grid(transform: GridTransform, array, *, order: int = 0, fill=0) -> np.ndarray:
  """Puts an array from the preprocessed grid back into the file's grid (shape, axis order and
  direction): undoes the resampling, the crop and the reorientation.

  `array` is (X, Y, Z) (e.g. class ids; use order=0) or (X, Y, Z, C) (e.g. probabilities; order=1
  is linear in space, classes are not mixed). Voxels outside the brain box get `fill` (a scalar,
  or one value per class, e.g. (1, 0, 0, 0) for background probability 1). Without resampling this
  is the exact inverse of the preprocessing's crop and reorientation.
  """
  array = np.asarray(array)
  if tuple(array.shape[:3]) != tuple(transform.shape) or array.ndim not in (3, 4):
    raise ValueError(f"expected an array of shape {transform.shape} (+ classes), got {array.shape}")
  cropped = transform.cropped_shape
  if transform.resampled:
    inv = 1.0 / np.asarray(transform.zoom)
    matrix, offset = inv, 0.5 * inv - 0.5
    if array.ndim == 4:
      matrix, offset = np.append(matrix, 1.0), np.append(offset, 0.0)
    array = ndimage.affine_transform(array, matrix, offset,
                                     output_shape=tuple(cropped) + array.shape[3:], order=order,
                                     mode="nearest", prefilter=False)
  out = np.empty(tuple(transform.canonical_shape) + array.shape[3:], array.dtype)
  out[...] = np.asarray(fill, array.dtype)
  out[transform.bbox] = array
  back = orientations.ornt_transform(np.asarray(IDENTITY_ORIENTATION, float),
                                     np.asarray(transform.orientation, float))
  return np.ascontiguousarray(orientations.apply_orientation(out, back))


def write_prediction(path, class_map, transform: GridTransform, label_values, header=None) -> None:
  """Writes a class-id map from the preprocessed grid as a NIfTI label file in the original grid
  and affine, with the dataset's label values (`LabelMapping.file_values`; e.g. BraTS 0, 1, 2, 4,
  or nnU-Net's 0, 2, 1, 3 for the same classes)."""
  labels = class_ids_to_label_values(to_original_grid(transform, class_map, order=0), label_values)
  dtype = np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int16
  save_nifti_atomic(path, labels.astype(dtype), transform.original_affine, header)


# ----------------------------------------------------------------------------------------------


def preprocess_case(case: CaseFiles, modalities, label_values, *, target_spacing=None,
                    n4: bool = False, margin: int = 0) -> Volume:
  """Reads, checks and preprocesses one case -> `Volume` (DataError naming the file on bad input).

  See `preprocess_raw` for the steps.
  """
  modalities = _check_modalities(modalities)
  raw = load_case(case, modalities, label_values)
  return preprocess_raw(raw, case.case_id, modalities, label_values,
                        target_spacing=target_spacing, n4=n4, margin=margin)


def raw_case_from_arrays(images, affine, label=None, header=None) -> RawCase:
  """A `RawCase` from in-memory arrays ({modality: 3D array}, 4x4 affine, optional label map), with
  the checks `check_case` applies to files; errors name `images[<modality>]`, `label` or `affine`."""
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DataError(f"affine: expected a finite 4x4 matrix, got shape {affine.shape}")
  if degenerate_affine(affine):
    raise DataError(f"affine: degenerate (a voxel axis has zero length or two axes are parallel): "
                    f"{np.round(affine[:3, :3], 6).tolist()}")
  if not images:
    raise DataError("images: no modality given")
  arrays, shape = {}, None
  for name, array in images.items():
    where = f"images[{name!r}]"
    array = np.asarray(array, np.float32)
    if array.ndim != 3:
      raise DataError(f"{where}: expected a 3D array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
      raise DataError(f"{where}: shape {array.shape} differs from {shape}")
    shape = array.shape
    bad = ~np.isfinite(array)
    if bad.any():
      raise DataError(f"{where}: {int(bad.sum())} voxel(s) are NaN/inf")
    if not array.any():
      raise DataError(f"{where}: empty image (all voxels are 0)")
    arrays[name] = array
  if label is not None:
    label = np.asarray(label)
    if label.shape != shape:
      raise DataError(f"label: shape {label.shape} differs from the images' {shape}")
    if np.issubdtype(label.dtype, np.floating) and np.any(np.rint(label) != label):
      raise DataError("label: holds non-integer values")
    label = label.astype(np.int32)
  return RawCase(arrays, label, affine, header, tuple(shape))


def preprocess_raw(raw: RawCase, case_id: str, modalities, label_values, *, target_spacing=None,
                   n4: bool = False, margin: int = 0) -> Volume:
  """Preprocesses checked arrays -> `Volume`.

  Steps: reorient to the closest RAS+ axes (nibabel `io_orientation`; exact flips and axis
  permutations, no interpolation); brain = voxels where any available image is non-zero (or
  labelled); crop to its bounding box (+ `margin` voxels); N4 per modality (`n4=True`); resample to
  `target_spacing` (mm, one number or three; linear for images, nearest for labels and brain);
  clip to the brain's 0.1/99.9% quantiles and normalise to zero mean, unit variance in the brain,
  per modality. `label_values` are the values the label file stores (`LabelMapping.file_values`);
  the Volume's label holds their index (the task's class id).
  """
  modalities = _check_modalities(modalities)
  if not any(m in raw.images for m in modalities):
    raise DataError(f"{case_id}: no image for any of the modalities {', '.join(modalities)}")
  message = _label_values_problem(raw.label, label_values) if raw.label is not None else None
  if message:
    raise DataError(f"{case_id}: {message}")
  ornt = orientations.io_orientation(raw.affine)
  canonical_affine = raw.affine @ orientations.inv_ornt_aff(ornt, raw.shape)
  to_canonical = lambda a: np.ascontiguousarray(orientations.apply_orientation(a, ornt))
  images = {m: to_canonical(raw.images[m]) for m in modalities if m in raw.images}
  raw_label = to_canonical(raw.label) if raw.label is not None else None
  canonical_shape = next(iter(images.values())).shape
  brain = np.zeros(canonical_shape, bool)
  for image in images.values():
    brain |= image != 0
  if not brain.any():
    raise DataError(f"{case_id}: empty brain (no non-zero voxel in any image)")
  if raw_label is not None:
    brain |= raw_label != 0
  start, stop = brain_bbox(brain, margin)
  box = tuple(slice(a, b) for a, b in zip(start, stop))
  spacing = spacing_of(canonical_affine)
  zoom = _target_zoom(spacing, target_spacing)
  cropped_shape = tuple(b - a for a, b in zip(start, stop))
  shape, affine = _grid_after(start, cropped_shape, zoom, canonical_affine)
  transform = GridTransform(tuple(raw.shape), raw.affine, start, stop, zoom, shape, affine,
                            tuple((int(a), int(f)) for a, f in ornt))
  cropped_brain = brain[box]
  brain = cropped_brain
  if transform.resampled:
    brain = resample(cropped_brain.astype(np.uint8), zoom, shape, order=0).astype(bool)
  image = np.zeros(shape + (len(modalities),), np.float32)
  for i, m in enumerate(modalities):
    if m not in images:
      continue
    img = images[m][box]
    if n4:
      img = n4_correct(img, cropped_brain, spacing)
    if transform.resampled:
      img = resample(img, zoom, shape, order=1)
    image[..., i] = normalise(img, brain)
  label = None
  if raw_label is not None:
    label = raw_label[box]
    if transform.resampled:
      label = resample(label, zoom, shape, order=0)
    label = remap_labels(label, label_values)
  available = np.array([m in raw.images for m in modalities])
  return Volume(case_id, image, available, label, brain, spacing_of(affine), transform,
                tuple(modalities))


# ----------------------------------------------------------------------------------------------
# Dataset loading and the .npy cache


def _file_stamp(path: pathlib.Path):
  st = path.stat()
  return [str(path.resolve()), st.st_mtime_ns, st.st_size]


def cache_key(case: CaseFiles, modalities, label_values, target_spacing, n4, margin) -> str:
  """Hash of the case's files (paths, mtimes, sizes) and the preprocessing options."""
  spec = {
      "version": CACHE_VERSION,
      "case_id": case.case_id,
      "images": {m: _file_stamp(p) for m, p in case.images.items()},
      "label": _file_stamp(case.label) if case.label is not None else None,
      "modalities": list(modalities),
      "label_values": [int(v) for v in label_values],
      "target_spacing": None if target_spacing is None
                        else np.broadcast_to(np.asarray(target_spacing, float), (3,)).tolist(),
      "n4": bool(n4),
      "margin": int(margin),
      "clip_quantiles": list(CLIP_QUANTILES),
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _cache_dir_for(cache_dir: pathlib.Path, case_id: str, key: str) -> pathlib.Path:
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80]
  return cache_dir / f"{safe}-{key}"


def _save_cached(folder: pathlib.Path, volume: Volume, source) -> None:
  """Writes the volume's arrays into a temporary folder next to `folder`, then renames it."""
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
  try:
    np.save(tmp / "image.npy", np.ascontiguousarray(volume.image, np.float32))
    np.save(tmp / "brain.npy", np.ascontiguousarray(volume.brain, bool))
    if volume.label is not None:
      np.save(tmp / "label.npy", np.ascontiguousarray(volume.label, np.int32))
    meta = {"case_id": volume.case_id, "source": str(source), "available": volume.available.tolist(),
            "has_label": volume.label is not None, "spacing": list(volume.spacing),
            "modalities": list(volume.modalities), "transform": volume.transform.to_dict()}
    atomic.write_text(tmp / "meta.json", json.dumps(meta))
    try:
      os.rename(tmp, folder)
    except OSError:
      if not (folder / "meta.json").is_file():  # not a concurrent writer's finished entry
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: pathlib.Path) -> Volume | None:
  meta_path = folder / "meta.json"
  if not meta_path.is_file():
    return None
  try:
    meta = json.loads(meta_path.read_text())
    load = lambda name: np.load(folder / name, mmap_mode="r")
    volume = Volume(
        case_id=meta["case_id"], image=load("image.npy"),
        available=np.asarray(meta["available"], bool),
        label=load("label.npy") if meta["has_label"] else None, brain=load("brain.npy"),
        spacing=tuple(meta["spacing"]), transform=GridTransform.from_dict(meta["transform"]),
        modalities=tuple(meta["modalities"]))
  except (OSError, ValueError, KeyError, json.JSONDecodeError):
    return None  # a damaged entry is rebuilt
  touch_used(folder)
  return volume


def touch_used(folder: pathlib.Path) -> None:
  """Records that a cache entry was used now (its folder's mtime), for `cache --older-than`."""
  try:
    os.utime(folder)
  except OSError:
    pass  # a read-only cache still serves


def select_split(cases: list[CaseFiles], root, split, splits=None, where=None) -> list[CaseFiles]:
  """Keeps the cases of `split` ("train"/"val"/"test"), in the order listed: in `splits` (read
  from `where`) if given, else in root/splits.json."""
  if split is None:
    return cases
  path = pathlib.Path(where) if where is not None else layouts.splits_path(root)
  if splits is None:
    splits = layouts.read_splits(root)
  if splits is None:
    raise problem(path, f"not found (needed for split={split!r})")
  if split not in splits:
    raise problem(path, f"has no split {split!r} (has {', '.join(splits) or 'none'})")
  by_id = {c.case_id: c for c in cases}
  unknown = [i for i in splits[split] if i not in by_id]
  if unknown:
    raise problem(path, f"split {split!r} names case(s) not in the dataset: {unknown[:5]}"
                        + (" ..." if len(unknown) > 5 else ""))
  return [by_id[i] for i in splits[split]]


def load_dataset(root, *, modalities, label_values, layout="auto", split=None, target_spacing=None,
                 cache_dir=None, n4: bool = False, margin: int = 0, splits=None,
                 splits_where=None) -> list[Volume]:
  """Discovers, checks and preprocesses the cases of a dataset -> list of `Volume`.

  split=None: all cases (sorted by id); "train"/"val"/"test": the cases listed in `splits` (a
  mapping read from `splits_where`; default root/splits.json), in its order. `label_values`: the
  values the label files store (`LabelMapping.file_values`). With `cache_dir`, preprocessed arrays
  are stored as .npy under a key hashing the case's files and the options, and later loads
  memory-map them without reading any NIfTI.
  """
  modalities = _check_modalities(modalities)
  cases = select_split(layouts.discover_cases(root, layout, modalities), root, split, splits,
                       splits_where)
  cache = pathlib.Path(cache_dir) if cache_dir is not None else None
  volumes = []
  for case in cases:
    if cache is None:
      volumes.append(preprocess_case(case, modalities, label_values,
                                     target_spacing=target_spacing, n4=n4, margin=margin))
      continue
    folder = _cache_dir_for(cache, case.case_id,
                            cache_key(case, modalities, label_values, target_spacing, n4, margin))
    volume = _load_cached(folder)
    if volume is None:
      volume = preprocess_case(case, modalities, label_values, target_spacing=target_spacing,
                               n4=n4, margin=margin)
      if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # damaged entry
      _save_cached(folder, volume, pathlib.Path(root).absolute())
      volume = _load_cached(folder) or volume
    volumes.append(volume)
  return volumes
