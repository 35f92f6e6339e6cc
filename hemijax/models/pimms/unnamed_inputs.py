"""Unlabeled scans with a PIMMS workdir: prediction from unnamed inputs and classifier accuracy.

  from hemijax import load_predictor
  from hemijax.models.pimms import unnamed_inputs as unlabeled
  predictor = load_predictor("runs/pimms_soft")
  labels = unlabeled.predict_unlabeled(predictor, [scan_a, scan_b], affine)  # 3D, any order
  unlabeled.predict_unlabeled_files(predictor, ["a.nii.gz", "b.nii.gz"], "seg.nii.gz")

  python evaluate.py --workdir runs/pimms_soft    # also writes classifier_accuracy.md/.json and
                                                  # permutation_invariance.md/.json

The scans (raw intensities, background 0, with their affine: see `hemijax.inference.inputs`) are
preprocessed together (one brain mask: voxels non-zero in any scan; crop; per-scan normalisation
inside it), padded to `config.model.max_scans` masked scans, and segmented by the model, whose
classifier decides which modality each scan is. The classifier's accuracy is
measured on the windows the model sees at inference (axial slices for 2D models, `roi` windows for
3D ones) that hold any brain voxel: `window_accuracy` over (window, present modality) pairs, and
`volume_accuracy` over (case, present modality) pairs from the window-averaged probabilities.
Permutation invariance (the method's defining property) is measured too: the first evaluation
cases' scans, unnamed, in every order, each order's probabilities against the first order's.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
import weakref

import jax
import numpy as np

from hemijax.inference import inputs, sliding_window as inference
from hemijax.data import io, preprocess
from hemijax import atomic
from hemijax.models.pimms.model import pad_scans

_FORWARDS = weakref.WeakKeyDictionary()  # predictor -> jitted forward over max_scans scan slots


def has_classifier(config) -> bool:
  """Whether the config's model holds a modality classifier (PIMMS soft, hard or online)."""
  return config.method == "pimms" and config.variant != "hemis"


def check_unlabeled_config(config) -> None:
  """Unnamed scans need a PIMMS model with a modality classifier (not the hemis variant)."""
  if config.method != "pimms":
    raise ValueError(f"unnamed inputs need a PIMMS workdir; this one is {config.method!r} "
                     "(give MODALITY=PATH inputs)")
  if config.variant == "hemis":
    raise ValueError("this PIMMS workdir is the 'hemis' variant (true modality labels, no "
                     "classifier); give MODALITY=PATH inputs")


def preprocess_scans(scans, affine, target_spacing=None) -> preprocess.Volume:
  """N unnamed 3D arrays on one grid -> a `Volume` with `image (X, Y, Z, N)`, all available.

  The brain is the voxels non-zero in any scan; every scan is cropped to it, resampled and
  normalised inside it, exactly as named modalities are (`preprocess.preprocess_raw`).
  """
  scans = list(scans)
  if not scans:
    raise ValueError("scans: give at least one scan")
  affine = inputs.check_affine(affine)
  raw = preprocess.raw_case_from_arrays({f"scans[{i}]": s for i, s in enumerate(scans)}, affine)
  inputs.check_background(raw.images, where=lambda name: name)
  brain = np.zeros(raw.shape, bool)
  for array in raw.images.values():
    brain |= array != 0
  # The union brain passed as a 0/1 "label" gives every scan the same crop and normalisation mask.
  volumes = [preprocess.preprocess_raw(
      preprocess.RawCase({"t1": array}, brain.astype(np.int32), raw.affine, None, raw.shape),
      "input", ("t1",), (0, 1), target_spacing=target_spacing) for array in raw.images.values()]
  first = volumes[0]
  image = np.concatenate([v.image for v in volumes], axis=-1)
  return preprocess.Volume("input", image, np.ones(len(scans), bool), None, first.brain,
                           first.spacing, first.transform)


def _slot_forward(predictor):
  """(method, window forward) of `predictor`'s model over `max_scans` scan slots (cached)."""
  cached = _FORWARDS.get(predictor)
  if cached is None:
    max_scans = int(predictor.config.model.max_scans)
    # The same model, seen as taking `max_scans` channels, so the inference code pads nothing.
    method = dataclasses.replace(predictor.method,
                                 modalities=tuple(f"scan{i}" for i in range(max_scans)))
    cached = _FORWARDS[predictor] = (method,
                                     inference.make_window_forward(method, predictor.variables))
  return cached


def predict_unlabeled(predictor, scans, affine=None, return_probabilities=False,
                      return_modalities=False):
  """Label map (dataset label values, in the input grid) from a list of unnamed 3D scans and
  their 4x4 affine (required: `hemijax.inference.inputs.check_affine`).

  `predictor`: `hemijax.load_predictor(workdir)` of a PIMMS workdir (soft, hard or online).
  With `return_probabilities`, also the class probabilities `(X, Y, Z, C)`; with
  `return_modalities`, also each scan's modality as the classifier sees it (`classify_scans`).
  """
  config = predictor.config
  check_unlabeled_config(config)
  scans = list(scans)
  max_scans = int(config.model.max_scans)
  if len(scans) > max_scans:
    raise ValueError(f"{len(scans)} scans given; this model takes at most {max_scans} "
                     "(config.model.max_scans)")
  volume = preprocess_scans(scans, affine, config.data.target_spacing)
  image, scan_mask = pad_scans(volume.image, volume.available, max_scans)
  method, forward = _slot_forward(predictor)
  settings = inference.WindowSettings.from_config(config)
  probs = inference.predict_probabilities(method, predictor.variables, image, scan_mask[None],
                                          settings, forward=forward)[0]
  classes = np.argmax(probs, axis=-1)
  labels = preprocess.class_ids_to_label_values(
      preprocess.to_original_grid(volume.transform, classes, order=0),
      predictor.task.label_values)
  out = [labels]
  if return_probabilities:
    out.append(preprocess.to_original_grid(volume.transform, probs, order=1))
  if return_modalities:
    out.append(classify_scans(predictor.method, predictor.variables, volume.image, volume.brain,
                              roi=settings.roi))
  return out[0] if len(out) == 1 else tuple(out)


def read_scans(paths):
  """Loads NIfTI scans that must share one grid -> (arrays, affine, header of the first); errors
  name the file."""
  paths = [pathlib.Path(p) for p in paths]
  if not paths:
    raise ValueError("--input: give at least one scan")
  arrays, affine, shape, header = [], None, None, None
  for path in paths:
    data, aff, hdr = io.load_nifti(path)
    if shape is None:
      affine, shape, header = aff, data.shape, hdr
    elif data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
      raise io.DataError(f"{path}: shape/affine {data.shape} differs from {paths[0]}")
    arrays.append(data)
  return arrays, affine, header


def predict_unlabeled_files(predictor, paths, output, probabilities=None):
  """Segments unnamed NIfTI scans (`predict.py --input a.nii.gz --input b.nii.gz`).

  Writes the label map (and optionally the 4D probabilities) with the inputs' affine and header
  codes; returns [(path, modality, probability)], the classifier's view of each scan.
  """
  inputs.check_outputs({"--output": output, "--probabilities": probabilities}, paths)
  arrays, affine, source_header = read_scans(paths)
  labels, probs, modalities = predict_unlabeled(predictor, arrays, affine,
                                                return_probabilities=True, return_modalities=True)
  header = inputs.output_header(source_header, affine)
  io.save_nifti_atomic(output, labels.astype(np.uint8 if labels.max() < 256 else np.int16), affine,
                       header)
  if probabilities:
    io.save_nifti_atomic(probabilities, probs.astype(np.float32), affine, header)
  return [(str(p), name, prob) for p, (name, prob) in zip(paths, modalities)]


# ---------------------------------------------------------------------------------------------
# The classifier on inference windows


def _windows(shape, spatial_dims, roi, overlap):
  """Slices of the windows the model sees: axial slices (2D) or `roi` windows (3D)."""
  if spatial_dims == 2:
    return [(slice(None), slice(None), z) for z in range(shape[2])]
  roi = tuple(min(int(r), s) for r, s in zip(roi or shape, shape))
  starts = itertools.product(*[inference.window_starts(s, r, overlap) for s, r in zip(shape, roi)])
  return [tuple(slice(a, a + r) for a, r in zip(st, roi)) for st in starts]


def make_classify(method):
  """jitted `(variables, scans (B, *sp, N)) -> probabilities (B, N, M)` of the classifier."""
  if method.name != "pimms" or getattr(method.model, "variant", None) == "hemis":
    raise ValueError("the modality classifier needs a PIMMS method of variant soft, hard or online")
  return jax.jit(lambda v, x: jax.nn.softmax(method.model.apply(v, x, method="classify"), axis=-1))


def window_scan_probabilities(method, variables, image, brain, *, roi=None, overlap=0.5,
                              batch_size=16, classify=None):
  """Classifier probabilities `(W, N, M)` for the W windows of `image (X, Y, Z, N)` holding brain.

  Each scan of each window is classified on its own, as inside the model.
  """
  classify = classify or make_classify(method)
  windows = [w for w in _windows(image.shape[:3], method.spatial_dims, roi, overlap)
             if brain[w].any()]
  if not windows:
    raise ValueError("no window holds a brain voxel")
  out = []
  for i in range(0, len(windows), batch_size):
    chunk = np.stack([image[w] for w in windows[i:i + batch_size]])
    count = len(chunk)
    if count < batch_size:  # one compiled batch shape
      pad = np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    out.append(np.asarray(classify(variables, chunk))[:count])
  return np.concatenate(out)


def classify_scans(method, variables, image, brain, *, roi=None, overlap=0.5):
  """Each scan's modality: [(name, probability)] from the window-averaged probabilities."""
  mean = window_scan_probabilities(method, variables, image, brain, roi=roi,
                                   overlap=overlap).mean(axis=0)
  return [(method.modalities[int(k)], float(p[k])) for p, k in zip(mean, mean.argmax(-1))]


def classifier_report(method, variables, volumes, *, roi=None, overlap=0.5) -> dict:
  """Accuracy of the modality classifier on `volumes` (their present modalities, in slot order).

  Returns window_accuracy, volume_accuracy, the counts and the window confusion matrix
  (rows: true modality, columns: predicted, in `method.modalities` order).
  """
  m = len(method.modalities)
  classify = make_classify(method)
  confusion = np.zeros((m, m), np.int64)
  volume_hits, volume_count = 0, 0
  for vol in volumes:
    present = np.flatnonzero(vol.available)
    probs = window_scan_probabilities(method, variables, vol.image[..., present], vol.brain,
                                      roi=roi, overlap=overlap, classify=classify)
    predicted = probs.argmax(-1)                          # (W, present)
    for j, true in enumerate(present):
      confusion[true] += np.bincount(predicted[:, j], minlength=m)
    volume_hits += int(np.sum(probs.mean(0).argmax(-1) == present))
    volume_count += len(present)
  windows = int(confusion.sum())
  return {"window_accuracy": float(np.trace(confusion) / max(windows, 1)),
          "volume_accuracy": float(volume_hits / max(volume_count, 1)),
          "windows": windows, "scans": volume_count, "cases": len(volumes),
          "modalities": list(method.modalities), "confusion": confusion.tolist()}


def accuracy_markdown(report: dict, title: str) -> str:
  names = report["modalities"]
  lines = [f"### {title}", "",
           f"window accuracy {report['window_accuracy']:.3f} ({report['windows']} windows), "
           f"volume accuracy {report['volume_accuracy']:.3f} ({report['scans']} scans of "
           f"{report['cases']} cases)", "",
           "| true \\ predicted | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for name, row in zip(names, report["confusion"]):
    lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


def classifier_evaluator(predictor, volumes, out_dir, *, title, progress=True) -> dict:
  """`evaluate.py`'s extra report for PIMMS workdirs: the modality classifier's accuracy."""
  del progress
  settings = inference.WindowSettings.from_config(predictor.config)
  report = classifier_report(predictor.method, predictor.variables, volumes, roi=settings.roi,
                             overlap=settings.overlap)
  out_dir = pathlib.Path(out_dir)
  atomic.write_json(out_dir / "classifier_accuracy.json", report)
  atomic.write_text(out_dir / "classifier_accuracy.md",
                    accuracy_markdown(report, f"modality classifier, {title}"))
  path = str(out_dir / "classifier_accuracy.md")
  return {"classifier_accuracy": {k: report[k] for k in ("window_accuracy", "volume_accuracy")},
          "classifier": path, "report": path}


PERMUTATION_CASES = 2  # every order of 4 scans is 24 whole-volume predictions per case


def permutation_report(predictor, volumes, cases: int = PERMUTATION_CASES) -> dict:
  """How far the prediction moves when the same scans come in another order: the present scans of
  the first `cases` volumes as unnamed scans in every order, each order's class probabilities
  against the first order's (max |difference|, voxels whose most likely class changes)."""
  method, forward = _slot_forward(predictor)
  settings = inference.WindowSettings.from_config(predictor.config)
  max_scans = int(predictor.config.model.max_scans)
  worst, changed, voxels, compared = 0.0, 0, 0, 0
  for vol in volumes[:cases]:
    first = None
    for order in itertools.permutations(np.flatnonzero(vol.available)):
      image, scan_mask = pad_scans(vol.image[..., list(order)], np.ones(len(order), bool),
                                   max_scans)
      probs = inference.predict_probabilities(method, predictor.variables, image,
                                              scan_mask[None], settings, forward=forward)[0]
      if first is None:
        first = probs
        continue
      worst = max(worst, float(np.abs(probs - first).max()))
      changed += int(np.sum(probs.argmax(-1) != first.argmax(-1)))
      voxels += int(np.prod(probs.shape[:-1]))
      compared += 1
  return {"cases": min(cases, len(volumes)), "orders_compared": compared,
          "max_abs_probability_difference": worst, "voxels_compared": voxels,
          "voxels_label_changed": changed}


def permutation_evaluator(predictor, volumes, out_dir, *, title, progress=True) -> dict:
  """`evaluate.py`'s report of the predictions' permutation invariance (`permutation_report`)."""
  del progress
  report = permutation_report(predictor, volumes)
  out_dir = pathlib.Path(out_dir)
  atomic.write_json(out_dir / "permutation_invariance.json", report)
  path = out_dir / "permutation_invariance.md"
  atomic.write_text(path, (
      f"### Permutation invariance, {title}\n\n"
      f"{report['cases']} case(s), every order of their scans: {report['orders_compared']} "
      f"orders compared with each case's first; max |probability difference| "
      f"{report['max_abs_probability_difference']:.2e}; {report['voxels_label_changed']} of "
      f"{report['voxels_compared']} voxels change their label.\n"))
  return {"permutation_invariance": report, "report": str(path)}
