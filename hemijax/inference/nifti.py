"""File-level prediction (NIfTI in, NIfTI out) on top of `hemijax.inference.predictor`.

Prediction reads image files only: label files are never opened. With a dataset folder, a case
that cannot be read is reported and skipped (`predict_dataset`), and every output name is made
from its case id by `hemijax.data.case_ids`. Outputs carry the input's header codes and units and
are never one of the inputs (`hemijax.inference.inputs`).
"""
from __future__ import annotations

import dataclasses
import pathlib

from hemijax.data import io, layouts, preprocess
from hemijax.data.case_ids import case_filename
from hemijax.data.tasks import check_modalities
from hemijax.inference import inputs as checks
from hemijax.inference.predictor import Predictor, checkpoint_step

PROBABILITIES_SUFFIX = "_probabilities.nii.gz"


def parse_named_inputs(values) -> dict:
  """['FLAIR=a.nii.gz', ...] -> {'flair': Path}; names are checked against the model later."""
  inputs = {}
  for value in values:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path:
      raise ValueError(f"--input {value!r}: expected MODALITY=PATH, e.g. flair=a.nii.gz")
    key = checks.modality_name(name)  # one spelling before the duplicate check: t1= and T1= clash
    if key in inputs:
      raise ValueError(f"--input: modality {key!r} given twice")
    inputs[key] = pathlib.Path(path)
  return inputs


def predict_case(predictor: Predictor, case: layouts.CaseFiles, output, probabilities=None):
  """Segments one case's image files (its label file is not read); writes the label map (and
  probabilities) in the input's grid, with the input's header codes and units."""
  checks.check_outputs({"--output": output, "--probabilities": probabilities},
                       case.images.values())
  case = dataclasses.replace(case, label=None)  # prediction never reads ground truth
  raw = preprocess.load_case(case, predictor.modalities, predictor.task.label_values)
  volume = predictor.preprocess_raw(raw, case.case_id, where=lambda m: str(case.images[m]))
  classes, probs = predictor.predict_volume(volume, return_probabilities=True)
  header = checks.output_header(raw.header, raw.affine)
  preprocess.write_prediction(output, classes, volume.transform, predictor.task.label_values,
                              header)
  if probabilities:
    io.save_nifti_atomic(probabilities, predictor.probabilities_in_input_grid(volume, probs),
                         volume.transform.original_affine, header)


def predict_files(workdir, inputs: dict, output, probabilities=None, step="best") -> None:
  """`inputs`: {modality: path}, any non-empty subset of the model's modalities (any spelling
  `hemijax.inference.inputs.modality_name` accepts)."""
  inputs = checks.normalise_names(inputs, option="--input")
  checks.check_outputs({"--output": output, "--probabilities": probabilities}, inputs.values())
  predictor = Predictor(workdir, checkpoint_step(step))
  check_modalities(inputs, allowed=predictor.modalities, option="--input")
  case = layouts.CaseFiles("input", {m: pathlib.Path(p) for m, p in inputs.items()}, None)
  predict_case(predictor, case, output, probabilities)


def predict_dataset(workdir, data, out, layout="auto", step="best", *, probabilities=False,
                    stop_on_error=False) -> tuple[list[pathlib.Path], list[str]]:
  """Segments every case of a dataset folder into OUT/<case_id>.nii.gz (and, with
  `probabilities`, OUT/<case_id>_probabilities.nii.gz) -> (written label maps, problems).

  A case that cannot be read (or whose id is not a plain name) is skipped and its problem
  returned, one line each; problems of the folder (a stray file) are returned too. With
  `stop_on_error`, the first problem is raised instead. Label files are not read.
  """
  checks.check_out_folder(out, data)
  predictor = Predictor(workdir, checkpoint_step(step))
  cases, problems = layouts.discover_cases_and_problems(data, layout, predictor.modalities,
                                                        collect=not stop_on_error, labels=False)
  problems = [str(p) for p in problems]
  out = pathlib.Path(out)
  written, taken = [], {}
  for case in cases:
    try:
      output = out / case_filename(case.case_id)
      prob_path = out / case_filename(case.case_id, PROBABILITIES_SUFFIX) if probabilities else None
      for path in filter(None, (output, prob_path)):  # e.g. ids 'a' and 'A' on macOS
        key = path.name.casefold()
        if key in taken:
          raise io.DataError(f"case id {case.case_id!r}: output {path.name} is also that of case "
                             f"{taken[key]!r}")
        taken[key] = case.case_id
      predict_case(predictor, case, output, prob_path)
      written.append(output)
    except ValueError as e:  # DataError and the input checks: this case only
      if stop_on_error:
        raise
      problems.append(f"case {case.case_id!r} skipped: {io.one_line(e)}")
  return written, problems


def predict_unnamed_files(workdir, paths, output, probabilities=None, step="best") -> list:
  """Segments scans given without modality names, for methods that take them
  (`Method.unnamed_inputs`); returns [(path, modality, probability)] as the method assigned them."""
  checks.check_outputs({"--output": output, "--probabilities": probabilities}, paths)
  predictor = Predictor(workdir, checkpoint_step(step))
  return predictor.unnamed_inputs().predict_files(predictor, paths, output,
                                                   probabilities=probabilities)


def predict_cli(args) -> None:
  """`predict.py`'s work once its flags are parsed; prints what was written, then the problems."""
  import sys

  checkpoint_step(args.step)  # a typo fails before anything is loaded
  if args.data:
    if args.input or args.output or not args.out:
      raise ValueError("--data needs --out, and no --input or --output")
    if args.probabilities not in (None, True):
      raise ValueError(f"--probabilities {args.probabilities}: with --data it takes no path "
                       f"(each case's map goes to OUT/<case>{PROBABILITIES_SUFFIX})")
    written, problems = predict_dataset(args.workdir, args.data, args.out, layout=args.layout,
                                        step=args.step, probabilities=bool(args.probabilities),
                                        stop_on_error=args.stop_on_error)
    print(f"wrote {len(written)} segmentation(s) to {args.out}")
    for line in problems:
      print(f"problem: {line}", file=sys.stderr)
    if problems:
      raise ValueError(f"{len(problems)} problem(s) listed above; {len(written)} case(s) written "
                       f"to {args.out}")
    return
  if not args.input or not args.output or args.out:
    raise ValueError("give --input MODALITY=PATH (one or more) and --output, or --data and --out")
  if args.probabilities is True:
    raise ValueError("--probabilities: with --input, give the file to write (PATH.nii.gz)")
  named = ["=" in value for value in args.input]
  if any(named) and not all(named):
    raise ValueError("--input: give every input as MODALITY=PATH, or none (unnamed scans)")
  if all(named):
    predict_files(args.workdir, parse_named_inputs(args.input), args.output,
                  probabilities=args.probabilities, step=args.step)
  else:
    for path, modality, prob in predict_unnamed_files(
        args.workdir, args.input, args.output, probabilities=args.probabilities, step=args.step):
      print(f"{path}: classified as {modality} (p={prob:.2f})")
  print(f"wrote {args.output}")
