"""U-Net baseline over the stacked modalities (the modality-dropout paper's baseline).

The modalities are the input channels; a missing one is zero-filled, which equals mean-filling
after each modality was normalised to zero mean. One convolution per resolution level, each
followed by batch normalisation and a leaky ReLU; max-pooling down, nearest-neighbour upsampling
and skip concatenation up; a 1x1 convolution gives the class logits. 2D or 3D follows the input's
rank. Trained without or with modality dropout (the config's sampler).

`UNet` (channels in -> channels out) and `BatchNorm` are reused by the MLP-imputation baseline and
by the unified representation network (`hemijax.models.urn`).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemijax.nn import layers
from hemijax.data.tasks import task_from_config
from hemijax.models import base


class BatchNorm(nn.Module):
  """Batch normalisation whose batch statistics use only the batch items in `item_mask`.

  `item_mask (B,)` marks the items that may be read (e.g. the items where this encoder's modality
  is present); None: every item. Without any such item the running averages normalise and stay
  unchanged. `use_scale=use_bias=False` gives the fixed-parameter normalisation (zero mean, unit
  variance) that URN applies before fusion. `train=False` uses the running averages.
  """
  use_scale: bool = True
  use_bias: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False, item_mask=None):
    channels = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      weight = (jnp.ones(x.shape[:1], jnp.float32) if item_mask is None
                else jnp.asarray(item_mask, jnp.float32))
      weight = weight.reshape(x.shape[:1] + (1,) * (x.ndim - 1))
      count = jnp.sum(weight) * math.prod(x.shape[1:-1])
      denominator = jnp.maximum(count, 1.0)
      batch_mean = jnp.sum(weight * x, axis=axes) / denominator
      batch_var = jnp.sum(weight * jnp.square(x - batch_mean), axis=axes) / denominator
      has_items = count > 0
      mean = jnp.where(has_items, batch_mean, running_mean.value)
      var = jnp.where(has_items, batch_var, running_var.value)
      if not self.is_initializing():
        # Running statistics are state, not a function of the parameters.
        decay = lambda old, new: jnp.where(
            has_items, self.momentum * old + (1 - self.momentum) * jax.lax.stop_gradient(new), old)
        running_mean.value = decay(running_mean.value, batch_mean)
        running_var.value = decay(running_var.value, batch_var)
    else:
      mean, var = running_mean.value, running_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (channels,))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,))
    return y.astype(x.dtype)


class ConvBlock(nn.Module):
  """Convolution -> batch normalisation -> leaky ReLU."""
  features: int
  conv: layers.ModuleDef
  kernel_size: int
  negative_slope: float
  bn_momentum: float

  @nn.compact
  def __call__(self, x, train: bool = False, item_mask=None):
    # No bias: the batch normalisation's shift replaces it.
    x = self.conv(self.features, self.kernel_size, use_bias=False)(x)
    x = BatchNorm(momentum=self.bn_momentum)(x, train, item_mask)
    return nn.leaky_relu(x, self.negative_slope)


class UNetSettings(nn.Module):
  """A U-Net's settings: fields of `config.model` for every model built on the U-Net."""
  features: Sequence[int] = (16, 32, 64, 128)
  kernel_size: int = 3
  negative_slope: float = 0.01
  bn_momentum: float = 0.9


class UNet(UNetSettings, kw_only=True):
  """U-Net `(B, *spatial, Cin) -> (B, *spatial, out_channels)`, 2D or 3D from the input's rank.

  `features[i]` is the width of level i; there are `len(features) - 1` poolings, so spatial sizes
  must be multiples of `2 ** (len(features) - 1)`.
  """
  out_channels: int
  conv: layers.ModuleDef = layers.Conv

  @nn.compact
  def __call__(self, x, train: bool = False, item_mask=None):
    block = lambda width, name: ConvBlock(width, self.conv, self.kernel_size, self.negative_slope,
                                          self.bn_momentum, name=name)
    skips = []
    for level, width in enumerate(self.features):
      if level:
        x = layers.max_pool(x, 2)
      x = block(width, f"down_{level}")(x, train, item_mask)
      skips.append(x)
    for level in reversed(range(len(self.features) - 1)):
      x = jnp.concatenate([layers.upsample(x, 2), skips[level]], axis=-1)
      x = block(self.features[level], f"up_{level}")(x, train, item_mask)
    return self.conv(self.out_channels, 1, name="head")(x)


def size_multiple(features) -> int:
  """Spatial sizes a U-Net of these level widths accepts are multiples of this."""
  return 2 ** (len(tuple(features)) - 1)


class ModalityUNet(UNetSettings, kw_only=True):
  """The baseline: absent modalities zero-filled, then one U-Net over the stacked channels."""
  num_modalities: int
  num_classes: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, image, modality_mask, train: bool = False):
    image = base.zero_missing(image, modality_mask)
    return UNet(out_channels=self.num_classes, conv=layers.conv_factory(self.conv_impl),
                **base.settings_of(self, UNetSettings), name="unet")(image, train)


def check_features(features, option="config.model.features"):
  features = tuple(features)
  if not features or any(int(w) < 1 for w in features):
    raise ValueError(f"{option}: expected one positive width per U-Net level, got {features}")
  return features


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  check_features(config.model.features)
  model = base.model_from_config(ModalityUNet, config.model, num_modalities=len(modalities),
                                 num_classes=task.num_classes)
  return base.Method(name="unet", model=model,
                     loss_fn=base.supervised_segmentation_loss(model, config),
                     modalities=modalities, num_classes=task.num_classes,
                     spatial_dims=len(config.data.patch_size),
                     size_multiple=size_multiple(config.model.features))
