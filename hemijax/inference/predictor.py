"""Loading a trained run and predicting: the Python API behind predict.py and evaluate.py.

  predictor = hemijax.load_predictor("runs/hemis")
  img = nibabel.load("flair.nii.gz")
  labels = predictor.predict({"FLAIR": img.get_fdata(), "t1": t1}, img.affine)  # any subset

Inputs are 3D arrays in their file grid with the file's affine (required: it gives the voxel
spacing; a missing, non-finite or degenerate one is refused). Intensities must be the raw scanner
values (or any scaling) of skull-stripped scans, background exactly 0: the brain is taken as the
voxels non-zero in any scan, and an image without a 0 voxel (mean-subtracted) is refused.
Preprocessing (brain crop, resampling, normalisation) and its inverse happen inside, so the label
map comes back in the input's grid with the dataset's values. Modality names are normalised as the
CLI's (`hemijax.inference.inputs`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hemijax.inference import inputs, sliding_window as inference
from hemijax.data import preprocess
from hemijax.data.tasks import check_modalities, task_from_config
from hemijax.models import get_method
from hemijax.training import checkpoints


def checkpoint_step(step, option: str = "--step"):
  """"best", "latest" or a step number (int); ValueError naming `option` otherwise."""
  if step in ("best", "latest"):
    return step
  try:
    number = int(str(step).strip())
  except ValueError:
    number = -1
  if number < 0:
    raise ValueError(f"{option} {step!r}: expected best, latest or a step number")
  return number


def load_run(workdir, step="best", return_step=False):
  """(config, method, variables) of a workdir's checkpoint: "best", "latest" or a step number;
  with `return_step`, also the step that was loaded."""
  step = checkpoint_step(step)
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(checkpoints.load_config_dict(workdir))
  method = get_method(config)
  manager = checkpoints.make_manager(workdir, keep=config.train.keep_checkpoints)
  steps = manager.all_steps()
  if not steps:
    raise checkpoints.CheckpointError(f"{workdir}/checkpoints: no checkpoint to load")
  if step == "best":
    step = checkpoints.best_step(workdir)
    step = step if step in steps else manager.latest_step()
  elif step == "latest":
    step = manager.latest_step()
  elif int(step) not in steps:
    raise checkpoints.CheckpointError(f"{workdir}/checkpoints: no step {step}; have {sorted(steps)}")
  m = len(method.modalities)
  image = jax.ShapeDtypeStruct((1,) + tuple(config.data.patch_size) + (m,), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, m), jnp.bool_)
  abstract = jax.eval_shape(method.init, jax.random.key(0), image, mask)
  try:
    variables = checkpoints.restore_variables(manager, int(step), abstract)
  except (ValueError, KeyError) as e:
    if isinstance(e, checkpoints.CheckpointError):
      raise
    raise checkpoints.CheckpointError(
        f"{workdir}/checkpoints/{step}: does not match the saved config ({e})") from None
  finally:
    manager.close()
  return (config, method, variables, int(step)) if return_step else (config, method, variables)


class Predictor:
  """A trained model ready for inference on volumes with any non-empty subset of modalities."""

  def __init__(self, workdir, step="best"):
    # `step`: the checkpoint step actually loaded (reports name it).
    self.config, self.method, self.variables, self.step = load_run(workdir, step, return_step=True)
    self.task = task_from_config(self.config)
    self.modalities = tuple(self.method.modalities)
    self.window = inference.WindowSettings.from_config(self.config)
    self._forward = inference.make_window_forward(self.method, self.variables)

  def unnamed_inputs(self):
    """The method's way of taking scans without modality names; an error if it has none."""
    if self.method.unnamed_inputs is None:
      raise ValueError(f"this {self.config.method!r} workdir needs named inputs "
                       "(MODALITY=PATH, or a {modality: array} mapping)")
    return self.method.unnamed_inputs

  def probabilities(self, volume: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(S, X, Y, Z, C) probabilities of a preprocessed volume for each mask (S, M)."""
    return inference.predict_probabilities(self.method, self.variables, volume, masks,
                                           self.window, forward=self._forward)

  def preprocess(self, images: Mapping[str, np.ndarray], affine) -> preprocess.Volume:
    """Checks and preprocesses {modality: 3D array} with their affine (see the module docstring)."""
    images = inputs.normalise_names(images, option="images")
    names = check_modalities(images.keys(), allowed=self.modalities, option="images")
    affine = inputs.check_affine(affine)
    raw = preprocess.raw_case_from_arrays({n: np.asarray(images[n], np.float32) for n in names},
                                          affine)
    return self.preprocess_raw(raw, "input")

  def preprocess_raw(self, raw: preprocess.RawCase, case_id: str, where=None) -> preprocess.Volume:
    """Preprocesses checked arrays (`raw.label` is ignored: prediction never reads ground truth);
    `where(modality)` names an image in messages (a file, or `images[...]`)."""
    inputs.check_affine(raw.affine, where=where(next(iter(raw.images))) if where else "affine")
    inputs.check_background(raw.images, where)
    raw = dataclasses.replace(raw, label=None)
    return preprocess.preprocess_raw(raw, case_id, self.modalities, self.task.label_values,
                                     target_spacing=self.config.data.target_spacing)

  def predict_volume(self, volume: preprocess.Volume, return_probabilities=False):
    """Class-id map (and probabilities) in the preprocessed grid, from the volume's modalities."""
    probs = self.probabilities(volume.image, volume.available[None])[0]
    classes = np.argmax(probs, axis=-1)
    return (classes, probs) if return_probabilities else classes

  def probabilities_in_input_grid(self, volume: preprocess.Volume, probs) -> np.ndarray:
    """Probabilities (X, Y, Z, C) put back in the input grid; outside the crop is background."""
    out = preprocess.to_original_grid(volume.transform, probs, order=1, fill=0)
    out[..., 0] += 1.0 - out.sum(-1).clip(0, 1)
    return out.astype(np.float32)

  def predict(self, images, affine, return_probabilities=False):
    """Label map (dataset label values) in the input grid from a {modality: 3D array} mapping and
    the arrays' 4x4 affine (required; see the module docstring for the intensities expected).

    Methods that take unnamed inputs (`Method.unnamed_inputs`) also take a list of 3D scans.
    """
    if isinstance(images, (list, tuple)):
      return self.unnamed_inputs().predict(self, images, affine,
                                           return_probabilities=return_probabilities)
    volume = self.preprocess(images, affine)
    classes, probs = self.predict_volume(volume, return_probabilities=True)
    labels = preprocess.class_ids_to_label_values(
        preprocess.to_original_grid(volume.transform, classes, order=0), self.task.label_values)
    if return_probabilities:
      return labels, self.probabilities_in_input_grid(volume, probs)
    return labels


def load_predictor(workdir, step="best") -> Predictor:
  return Predictor(workdir, step)
