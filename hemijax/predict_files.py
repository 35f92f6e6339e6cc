"""File-level prediction (NIfTI in, NIfTI out) on top of `hemijax.predictor`."""
from __future__ import annotations

import pathlib

import numpy as np

from hemijax.data import io, layouts, preprocess
from hemijax.predictor import Predictor


def _read_inputs(inputs: dict, modalities):
  """Loads {modality: path}; all must share one grid (DataError naming the file otherwise)."""
  unknown = [m for m in inputs if m not in modalities]
  if unknown:
    raise ValueError(f"--input: unknown modality {unknown[0]!r}; this model takes {list(modalities)}")
  arrays, affine, header, ref = {}, None, None, None
  for name, path in inputs.items():
    data, aff, hdr = io.load_nifti(path)
    if ref is None:
      affine, header, ref = aff, hdr, path
    elif data.shape != next(iter(arrays.values())).shape or not np.allclose(aff, affine, atol=1e-3):
      raise io.DataError(f"{path}: shape/affine {data.shape} differs from {ref}")
    arrays[name] = data
  return arrays, affine, header


def predict_files(workdir, inputs: dict, output, probabilities=None, step="best",
                  predictor: Predictor | None = None) -> None:
  predictor = predictor or Predictor(workdir, step)
  arrays, affine, header = _read_inputs(inputs, predictor.modalities)
  labels, probs = predictor.predict(arrays, affine, return_probabilities=True)
  io.save_nifti_atomic(output, labels.astype(np.uint8 if labels.max() < 256 else np.int16), affine)
  if probabilities:
    io.save_nifti_atomic(probabilities, probs.astype(np.float32), affine)


def predict_dataset(workdir, data, out, layout="auto", step="best") -> int:
  predictor = Predictor(workdir, step)
  cases = layouts.discover_cases(data, layout, predictor.modalities)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for case in cases:
    predict_files(workdir, dict(case.images), out / f"{case.case_id}.nii.gz", predictor=predictor)
  return len(cases)
