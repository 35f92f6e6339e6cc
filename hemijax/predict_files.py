"""File-level prediction (NIfTI in, NIfTI out) on top of `hemijax.predictor`."""
from __future__ import annotations

import pathlib

import numpy as np

from hemijax.data import io, layouts, preprocess
from hemijax.data.tasks import check_modalities
from hemijax.predictor import Predictor


def predict_case(predictor: Predictor, case: layouts.CaseFiles, output, probabilities=None):
  """Segments one case's files; writes the label map (and probabilities) in the input's grid."""
  volume = preprocess.preprocess_case(case, predictor.modalities, predictor.task.label_values,
                                      target_spacing=predictor.config.data.target_spacing)
  classes, probs = predictor.predict_volume(volume, return_probabilities=True)
  preprocess.write_prediction(output, classes, volume.transform, predictor.task.label_values)
  if probabilities:
    io.save_nifti_atomic(probabilities, predictor.probabilities_in_input_grid(volume, probs),
                         volume.transform.original_affine)


def predict_files(workdir, inputs: dict, output, probabilities=None, step="best") -> None:
  """`inputs`: {modality: path}, any non-empty subset of the model's modalities."""
  predictor = Predictor(workdir, step)
  check_modalities(inputs, allowed=predictor.modalities, option="--input")
  case = layouts.CaseFiles("input", {m: pathlib.Path(p) for m, p in inputs.items()}, None)
  predict_case(predictor, case, output, probabilities)


def predict_dataset(workdir, data, out, layout="auto", step="best") -> int:
  """Segments every case of a dataset folder into OUT/<case_id>.nii.gz."""
  predictor = Predictor(workdir, step)
  cases = layouts.discover_cases(data, layout, predictor.modalities)
  out = pathlib.Path(out)
  for case in cases:
    predict_case(predictor, case, out / f"{case.case_id}.nii.gz")
  return len(cases)
