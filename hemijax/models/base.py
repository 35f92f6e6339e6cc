"""The method contract: a method is a Flax model plus a pure loss function.

A model is a `flax.linen.Module` whose `__call__(image, modality_mask, train=False)` maps a
channels-last `image (B, *spatial, M)` and a boolean `modality_mask (B, M)` to logits
`(B, *spatial, C)`. Models with per-modality encoders also define `encode(image)` ->
features `(B, M, ...)` and `decode(features, modality_mask)` -> logits, so that evaluation encodes
each modality once and decodes every subset from the same features.

A model's fields are its config section (`model_from_config`: `Model(**config.model)` plus the
few taken from the task); its top level turns `conv_impl` into one convolution factory
(`hemijax.nn.layers.conv_factory`) that its layers take as `conv`.

`loss_fn(params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))` is pure;
`model_state` holds the non-trained collections (e.g. batch statistics), `{}` for most models.
The training loop and evaluation only ever see a `Method`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hemijax.nn import modality_dropout as dropout_lib
from hemijax.nn import losses

LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]
# (config, load_split) -> (step -> host batch dict); load_split(split) -> list of Volumes.
BatchesFn = Callable[[Any, Callable], Callable[[int], dict]]
# (predictor, volumes, out_dir, *, title, progress) -> summary entries; writes its report files
# into out_dir and lists the Markdown ones under "reports" (big_vision's evaluators).
Evaluator = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One phase of training: its loss, length, optimiser and which parameters it trains.

  Stages run in order and share the parameters; each starts a fresh optimiser state. Steps are
  counted globally (stage 2 of a 100 + 50 step run covers steps 100..149), so resuming works.
  """
  name: str
  loss_fn: LossFn
  num_steps: int
  optimizer: Any                             # optimizer config dict (hemijax.training.optim)
  trainable: tuple[str, ...] | None = None   # top-level parameter names trained; None: all
  make_batches: BatchesFn | None = None      # None: the config's patch sampler on its dataset
  validate: bool = True                      # segmentation validation after this stage's evals
  # The stage's batches count steps from here, so a stage that starts late gets the batches (and
  # balanced-sampling phase) of a one-stage run; 0: global steps.
  step_offset: int = 0


@dataclasses.dataclass(frozen=True)
class UnnamedInputs:
  """How a method takes scans whose modality is not given (the PIMMS classifier assigns them)."""
  # (predictor, scans: list of 3D arrays, affine, return_probabilities) -> labels [, probs]
  predict: Callable[..., Any]
  # (predictor, paths, output, probabilities=None) -> [(path, modality, probability)]
  predict_files: Callable[..., list]


@dataclasses.dataclass(frozen=True)
class ParameterSource:
  """A trained run whose variables a new run of this method starts from (a method's own option,
  e.g. MLP imputation's `impute.segmenter_from`). When a run starts (never on resume) the training
  loop restores the source's checkpoint (`step`: best, latest or a number, as evaluation picks
  it), takes the subtree `source_path` of each of its variable collections and puts it at
  `target_path` of this run's; the rest of this run's variables start as initialised. The source
  must be a `method` run and agree with this run's config on the fields in `same`.
  """
  option: str                          # the config field naming the source, for messages
  workdir: str
  method: str                          # the method the source run must have trained
  source_path: tuple[str, ...] = ()    # e.g. ("unet",): the source model's sub-module
  target_path: tuple[str, ...] = ()    # e.g. ("segmenter",): where it goes in this model
  same: tuple[str, ...] = ("task", "task_spec", "modalities", "model")
  step: str | int = "best"
  hint: str = ""                       # how to make the source, added to "no such run" errors


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  model: nn.Module
  loss_fn: LossFn
  modalities: tuple[str, ...]
  num_classes: int
  spatial_dims: int
  size_multiple: int = 1  # spatial sizes the model accepts are multiples of this (U-Net depth)
  stages: tuple[Stage, ...] = ()  # empty: one stage of loss_fn with config.train/optimizer
  evaluators: tuple[Evaluator, ...] = ()   # reports evaluate.py adds beside segmentation
  unnamed_inputs: UnnamedInputs | None = None
  # Runs whose parameters a new run starts from (its own options; config.train.init_from is the
  # generic one): loaded by the training loop when the run starts, in this order.
  parameter_sources: tuple[ParameterSource, ...] = ()

  def training_stages(self, config) -> tuple[Stage, ...]:
    if self.stages:
      return self.stages
    return (Stage("train", self.loss_fn, config.train.num_steps, config.optimizer),)

  def init(self, key, image, modality_mask):
    """Initial variables {'params': ..., other collections...}."""
    variables = self.model.init(key, image, modality_mask, train=False)
    return dict(variables)

  def apply(self, variables, image, modality_mask):
    """Inference logits (deterministic; batch statistics frozen)."""
    return self.model.apply(variables, image, modality_mask, train=False)

  @property
  def has_encoder(self) -> bool:
    return hasattr(self.model, "encode") and hasattr(self.model, "decode")

  def encode(self, variables, image):
    return self.model.apply(variables, image, method="encode")

  def decode(self, variables, features, modality_mask):
    return self.model.apply(variables, features, modality_mask, method="decode")


def check_modality_mask(modality_mask, num_modalities, option="modality_mask"):
  """Python-boundary validation of a concrete mask: right shape, boolean, never empty."""
  mask = np.asarray(modality_mask)
  if mask.ndim != 2 or mask.shape[1] != num_modalities:
    raise ValueError(f"{option} must have shape (batch, {num_modalities}), got {mask.shape}")
  if mask.dtype != bool:
    raise ValueError(f"{option} must be boolean, got {mask.dtype}")
  if not mask.any(axis=1).all():
    empty = np.flatnonzero(~mask.any(axis=1)).tolist()
    raise ValueError(f"{option}: empty modality set for batch item(s) {empty}")
  return mask


def check_image(image, num_modalities, spatial_dims, option="image"):
  shape = np.shape(image)
  if len(shape) != spatial_dims + 2 or shape[-1] != num_modalities:
    raise ValueError(f"{option} must have shape (batch, {spatial_dims} spatial dims..., "
                     f"{num_modalities}), got {shape}")


def zero_missing(image, modality_mask):
  """Zeroes the channels of absent modalities so no encoder ever reads their values."""
  return jnp.where(modality_mask[:, *([None] * (image.ndim - 2)), :], image, 0)


def model_from_config(model_cls, model_config, **derived) -> nn.Module:
  """`model_cls(**derived, **config.model)` (big_vision's habit): the fields of the config's `model`
  section are the model's settings; `derived` are the few a method takes from elsewhere (the
  task's num_modalities and num_classes, a variant). Sequences become tuples (hashable; a config
  restored from JSON holds lists)."""
  settings = {key: tuple(value) if isinstance(value, (list, tuple)) else value
              for key, value in model_config.items()}
  fields = {f.name for f in dataclasses.fields(model_cls) if f.init} - {"parent", "name"}
  allowed = fields - set(derived)   # the derived ones come from elsewhere in the config
  unknown = sorted(set(settings) - allowed)
  if unknown:
    raise ValueError(f"config.model.{unknown[0]}: not a setting of {model_cls.__name__} "
                     f"(its settings: {', '.join(sorted(allowed))})")
  return model_cls(**derived, **settings)


def settings_of(module: nn.Module, settings_cls) -> dict:
  """`module`'s values of the fields of `settings_cls`, a block of settings that several models
  share (e.g. a U-Net's): the keyword arguments of the sub-model that block describes."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(settings_cls)
          if f.init and f.name not in ("parent", "name")}


def batch_segmentation_loss(logits, batch, loss_config):
  """`losses.segmentation_loss` against the batch's label (valid voxels only), with the weights
  and Dice reduction of `config.loss`: (loss, terms)."""
  return losses.segmentation_loss(
      logits, batch["label"], batch.get("valid"), ce_weight=loss_config.ce_weight,
      dice_weight=loss_config.dice_weight, class_weights=loss_config.get("class_weights"),
      dice_reduction=loss_config.get("dice_reduction", "batch"))


def modalities_kept(modality_mask):
  """Mean number of modalities a batch item kept after modality dropout (a training metric)."""
  return jnp.mean(jnp.sum(modality_mask, axis=-1))


def supervised_segmentation_loss(model: nn.Module, config) -> LossFn:
  """Loss for models trained end to end on segmentation with a modality-dropout sampler."""
  sampler = dropout_lib.make_sampler(config.dropout)
  mutable = list(config.loss.get("mutable", ()))

  def loss_fn(params, model_state, batch, key, step):
    dropout_key, model_key = jax.random.split(key)
    mask = sampler(dropout_key, batch["modality_mask"], step)
    variables = {"params": params, **model_state}
    if mutable:
      logits, new_state = model.apply(variables, batch["image"], mask, train=True,
                                      mutable=mutable, rngs={"dropout": model_key})
    else:
      logits = model.apply(variables, batch["image"], mask, train=True,
                           rngs={"dropout": model_key})
      new_state = model_state
    loss, terms = batch_segmentation_loss(logits, batch, config.loss)
    metrics = {"loss": loss, **terms, "modalities_kept": modalities_kept(mask)}
    return loss, (metrics, dict(new_state))

  return loss_fn
