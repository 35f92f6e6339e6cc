"""What prediction accepts, checked once for the CLI and the Python API alike.

- Modality names: any spelling the dataset layouts accept ('FLAIR', 'T1Gd', 't1_ce', 'PD'),
  normalised as theirs (`hemijax.data.tasks.normalise_modality`: the BraTS names' spellings onto
  them, any other name lower-cased) before the duplicate check.
- Affine: a finite 4x4 voxel-to-world matrix whose 3x3 part is not degenerate; it gives the voxel
  spacing that preprocessing resamples to, so it is required, never assumed.
- Intensities: raw (or any scaling of) scanner intensities of skull-stripped scans, background
  exactly 0. Preprocessing takes the brain as the voxels non-zero in any scan, crops to it and
  normalises inside it; an image without a single 0 voxel (mean-subtracted, or not skull-stripped)
  would make the whole volume "brain", so it is refused.
- Outputs: never one of the input files; they carry the input's header codes, units and
  description (`output_header`).
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import nibabel as nib
import numpy as np

from hemijax.data.io import DataError, degenerate_affine
from hemijax.data.tasks import normalise_modality


def modality_name(name, option: str = "--input") -> str:
  """'FLAIR' -> 'flair', 'T1Gd' -> 't1ce', 'PD' -> 'pd' (`normalise_modality`; the model's check
  names one it lacks); ValueError naming `option` for a name that is no modality name."""
  return normalise_modality(name, option)


def normalise_names(named: Mapping, option: str = "images") -> dict:
  """{name: value} with every name normalised by `modality_name`; two spellings of one modality
  (t1= and T1=) are refused, naming `option`."""
  out = {}
  for name, value in named.items():
    key = modality_name(name, option)
    if key in out:
      raise ValueError(f"{option}: modality {key!r} given twice")
    out[key] = value
  return out


def check_affine(affine, where: str = "affine") -> np.ndarray:
  """The affine as a float64 (4, 4) array; ValueError naming `where` if it is missing, not 4x4,
  not finite or degenerate (a zero or collinear axis: no voxel spacing can be read from it)."""
  if affine is None:
    raise ValueError(f"{where}: required (the scans' 4x4 voxel-to-world matrix, e.g. nibabel's "
                     "img.affine); it gives the voxel spacing the model resamples to")
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"{where}: expected a finite 4x4 matrix, got shape {affine.shape}")
  if degenerate_affine(affine):
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    raise ValueError(f"{where}: degenerate affine (voxel axes of {spacing.round(6).tolist()} mm "
                     "that span no volume)")
  return affine


def check_background(images: Mapping[str, np.ndarray], where=None) -> None:
  """Refuses an image without a 0 voxel (see the module docstring); `where(name)` names it."""
  for name, image in images.items():
    if np.all(np.asarray(image) != 0):
      label = where(name) if where else f"images[{name!r}]"
      raise DataError(f"{label}: no voxel is 0; give skull-stripped scanner intensities with "
                      "background 0 (not mean-subtracted or normalised over the whole volume)")


def check_outputs(outputs: Mapping[str, object], inputs) -> None:
  """ValueError if an output is one of the inputs (the same file, by any path or link) or two
  outputs are one file. `outputs`: {option name: path or None}."""
  given = {option: pathlib.Path(p) for option, p in outputs.items() if p}
  for option, path in given.items():
    for source in inputs:
      if _same_file(path, pathlib.Path(source)):
        raise ValueError(f"{option} {path}: is the input {source}; write the output elsewhere")
  resolved = {}
  for option, path in given.items():
    key = os.path.normcase(path.resolve())
    if key in resolved:
      raise ValueError(f"{option} {path}: the same file as {resolved[key]}")
    resolved[key] = option


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
  if a.exists() and b.exists():
    return os.path.samefile(a, b)
  return a.resolve() == b.resolve()


def check_out_folder(out, data_root) -> None:
  """Refuses an output folder inside the dataset (its files would become unknown 'modalities')."""
  root = pathlib.Path(data_root).resolve()
  root = root.parent if root.is_file() else root  # a manifest: its folder
  out = pathlib.Path(out).resolve()
  if out == root or root in out.parents:
    raise ValueError(f"--out {out}: inside the dataset folder {root}; write outside it")


def output_header(source, affine) -> nib.Nifti1Header:
  """A header for an output in the grid of `affine` that carries over the input header `source`'s
  qform/sform codes, space and time units and description (None: scanner codes, no units)."""
  header = nib.Nifti1Header()
  qform_code = sform_code = 1
  if source is not None:
    header.set_xyzt_units(*source.get_xyzt_units())
    header["descrip"] = source["descrip"]
    qform_code, sform_code = int(source["qform_code"]), int(source["sform_code"])
  header.set_qform(affine, code=qform_code)
  header.set_sform(affine, code=sform_code)
  return header
