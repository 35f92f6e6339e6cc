"""Loading a trained run and predicting: the Python API behind predict.py and evaluate.py.

  predictor = hemijax.load_predictor("runs/hemis")
  labels = predictor.predict({"flair": flair, "t1": t1})        # any non-empty subset, 3D arrays

Inputs are raw intensities in their file grid; preprocessing (brain crop, normalisation) and its
inverse happen inside, so the label map comes back in the input's grid with the dataset's values.
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hemijax.inference import sliding_window as inference
from hemijax.data import preprocess
from hemijax.data.tasks import check_modalities, get_task
from hemijax.models import get_method
from hemijax.training import checkpoints


def load_run(workdir, step="best", return_step=False):
  """(config, method, variables) of a workdir's checkpoint: "best", "latest" or a step number;
  with `return_step`, also the step that was loaded."""
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
    self.task = get_task(self.config.task)
    self.modalities = tuple(self.method.modalities)
    self._forward = inference.make_window_forward(self.method, self.variables)

  def unnamed_inputs(self):
    """The method's way of taking scans without modality names; an error if it has none."""
    if self.method.unnamed_inputs is None:
      raise ValueError(f"this {self.config.method!r} workdir needs named inputs "
                       "(MODALITY=PATH, or a {modality: array} mapping)")
    return self.method.unnamed_inputs

  def probabilities(self, volume: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(S, X, Y, Z, C) probabilities of a preprocessed volume for each mask (S, M)."""
    e = self.config.eval
    return inference.predict_probabilities(
        self.method, self.variables, volume, masks,
        roi=e.roi_size or self.config.data.patch_size, overlap=e.overlap,
        batch_size=e.sw_batch_size, blend=e.blend, forward=self._forward)

  def preprocess(self, images: Mapping[str, np.ndarray], affine=None) -> preprocess.Volume:
    names = check_modalities(images.keys(), allowed=self.modalities, option="images")
    arrays = {n: np.asarray(images[n], np.float32) for n in names}
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    raw = preprocess.raw_case_from_arrays(arrays, affine)
    return preprocess.preprocess_raw(raw, "input", self.modalities, self.task.label_values,
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

  def predict(self, images, affine=None, return_probabilities=False):
    """Label map (dataset label values) in the input grid from a {modality: 3D array} mapping.

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
