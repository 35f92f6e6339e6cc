"""HeMIS (Havaei et al., MICCAI 2016): hetero-modal image segmentation.

Per-modality back-ends (stacked parameters, applied with vmap) -> abstraction layer (mean and
variance over the *available* modalities, concatenated) -> front end -> class logits.
2D or 3D follows the input's rank.

Two-phase training (the paper, after Havaei et al. 2017), when `config.train.final_layer_steps` > 0:
  1. "balanced": every parameter, on class-balanced patch centres with a class-balanced loss
     (cross-entropy weighted by each class's inverse frequency in the batch, so every class present
     carries the same total weight: the classes the loss sees are equiprobable, as with the
     centre-pixel patches of the paper's predecessor);
  2. "final_layer": only the final classification layer (`classifier`), on uniformly drawn patches
     with the plain loss of `config.loss`, i.e. the true class distribution.
Otherwise one stage with `config.loss` and `config.data.sampling`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemijax.nn import fusion
from hemijax.nn import layers
from hemijax.nn import losses
from hemijax.nn import modality_dropout as dropout_lib
from hemijax.data import sampling
from hemijax.data.tasks import task_from_config
from hemijax.models import base


class Backend(nn.Module):
  """One modality's back end: conv+ReLU layers, then a stride-1 max-pool that keeps resolution."""
  conv: layers.ModuleDef
  features: Sequence[int]
  kernel_size: int
  pool_window: int

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(self.conv(width, self.kernel_size)(x))
    if self.pool_window > 1:
      x = layers.max_pool(x, self.pool_window, strides=1, padding="SAME")
    return x


class StackedBackends(nn.Module):
  """M back ends, parameters stacked on a leading modality axis: (M, B, *sp, 1) -> (M, B, *sp, C).

  A module of its own for the parameter path `backends/backend/...` (which also seeds the initial
  weights).
  """
  num_modalities: int
  backend: layers.ModuleDef   # `Backend` with its settings bound

  @nn.compact
  def __call__(self, x):
    return layers.per_modality(self.backend, self.num_modalities)(name="backend")(x)


class HeMISSettings(nn.Module):
  """HeMIS' settings: the fields of its `config.model`, shared by the models built around it."""
  num_modalities: int
  num_classes: int
  backend_features: Sequence[int] = (48, 48)
  backend_kernel: int = 5
  pool_window: int = 2
  frontend_features: Sequence[int] = (16,)
  frontend_kernel: int = 5
  final_kernel: int = 21
  conv_impl: str = "auto"


class HeMIS(HeMISSettings):
  """The network of the module docstring; its per-modality back ends are `encode`."""

  def setup(self):
    conv = layers.conv_factory(self.conv_impl)
    self.backends = StackedBackends(self.num_modalities, functools.partial(
        Backend, conv, tuple(self.backend_features), self.backend_kernel, self.pool_window))
    self.frontend = [conv(w, self.frontend_kernel) for w in self.frontend_features]
    self.classifier = conv(self.num_classes, self.final_kernel)

  def encode(self, image, train=False):
    """(B, *sp, M) -> per-modality features (B, M, *sp, C)."""
    return layers.apply_per_modality(self.backends, image)

  def decode(self, features, modality_mask, train=False):
    """Abstraction layer over the available modalities, then the front end."""
    mask = fusion.expand_modality_mask(modality_mask, features.ndim)
    x = fusion.moments(features, mask, axis=1)
    for layer in self.frontend:
      x = nn.relu(layer(x))
    return self.classifier(x)

  def __call__(self, image, modality_mask, train=False):
    image = base.zero_missing(image, modality_mask)
    return self.decode(self.encode(image), modality_mask)


# The final classification layer: the only parameters phase 2 trains.
FINAL_LAYER = "classifier"


def inverse_frequency_weights(labels, num_classes, valid=None):
  """(C,) class weights 1 / n_c over the batch's valid voxels (0 for absent classes), so that in
  the weighted mean of `losses.cross_entropy` every present class carries the same total weight."""
  weights = jnp.ones(labels.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(labels, num_classes) * weights[..., None],
                   axis=tuple(range(labels.ndim)))
  return jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)


def balanced_segmentation_loss(model: HeMIS, config) -> base.LossFn:
  """Phase 1's loss: class-balanced cross-entropy (+ `config.loss.dice_weight` soft Dice)."""
  sampler = dropout_lib.make_sampler(config.dropout)
  num_classes = model.num_classes

  def loss_fn(params, model_state, batch, key, step):
    mask = sampler(key, batch["modality_mask"], step)
    logits = model.apply({"params": params, **model_state}, batch["image"], mask, train=True)
    class_weights = inverse_frequency_weights(batch["label"], num_classes, batch.get("valid"))
    loss, terms = losses.segmentation_loss(
        logits, batch["label"], batch.get("valid"), ce_weight=config.loss.ce_weight,
        dice_weight=config.loss.dice_weight, class_weights=class_weights)
    return loss, ({"loss": loss, **terms, "modalities_kept": base.modalities_kept(mask)},
                  dict(model_state))

  return loss_fn


def patches_sampled(strategy: str) -> base.BatchesFn:
  """A stage's batch maker: the config's patch sampler with `strategy` for the whole stage."""
  def make_batches(config, load_split):
    stage_config = config.copy_and_resolve_references()
    stage_config.unlock()
    stage_config.data.sampling = strategy
    stage_config.data.balanced_fraction = 1.0   # "balanced" for every step of the stage
    return sampling.make_patch_batches(stage_config, load_split("train"))
  return make_batches


def training_stages(model: HeMIS, config) -> tuple[base.Stage, ...]:
  """The two phases of the module docstring, or () (one stage) when `final_layer_steps` is 0."""
  final_steps = int(config.train.get("final_layer_steps", 0) or 0)
  if final_steps < 0:
    raise ValueError(f"config.train.final_layer_steps: must be >= 0, got {final_steps}")
  if not final_steps:
    return ()
  return (
      base.Stage("balanced", balanced_segmentation_loss(model, config), config.train.num_steps,
                 config.optimizer, make_batches=patches_sampled("balanced")),
      # An inverse-time decay continues from phase 1's updates (the optimiser state is fresh).
      base.Stage("final_layer", base.supervised_segmentation_loss(model, config), final_steps,
                 dict(config.optimizer.to_dict(), start_step=int(config.train.num_steps)),
                 trainable=(FINAL_LAYER,), make_batches=patches_sampled("uniform")),
  )


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  model = base.model_from_config(HeMIS, config.model, num_modalities=len(modalities),
                                 num_classes=task.num_classes)
  return base.Method(name="hemis", model=model,
                     loss_fn=base.supervised_segmentation_loss(model, config),
                     modalities=modalities, num_classes=task.num_classes,
                     spatial_dims=len(config.data.patch_size),
                     stages=training_stages(model, config))
