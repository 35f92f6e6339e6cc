"""File-level prediction (NIfTI in, NIfTI out) on top of `hemijax.inference.predictor`."""
from __future__ import annotations

import pathlib


from hemijax.data import io, layouts, preprocess
from hemijax.data.tasks import check_modalities
from hemijax.inference.predictor import Predictor


def parse_named_inputs(values) -> dict:
  """['FLAIR=a.nii.gz', ...] -> {'flair': Path}; names are checked against the model later."""
  inputs = {}
  for value in values:
    name, sep, path = value.partition("=")
    name = name.strip().lower()  # one spelling before the duplicate check: t1= and T1= clash
    if not sep or not name or not path:
      raise ValueError(f"--input {value!r}: expected MODALITY=PATH, e.g. flair=a.nii.gz")
    if name in inputs:
      raise ValueError(f"--input: modality {name!r} given twice")
    inputs[name] = pathlib.Path(path)
  return inputs


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


def predict_unnamed_files(workdir, paths, output, probabilities=None, step="best") -> list:
  """Segments scans given without modality names, for methods that take them
  (`Method.unnamed_inputs`); returns [(path, modality, probability)] as the method assigned them."""
  predictor = Predictor(workdir, step)
  return predictor.unnamed_inputs().predict_files(predictor, paths, output,
                                                   probabilities=probabilities)
