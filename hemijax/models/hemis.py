"""HeMIS (Havaei et al., MICCAI 2016): hetero-modal image segmentation.

Per-modality back-ends (stacked parameters, applied with vmap) -> abstraction layer (mean and
variance over the *available* modalities, concatenated) -> front end -> class logits.
2D or 3D follows the input's rank.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from hemijax.nn import fusion
from hemijax.nn import layers
from hemijax.data.tasks import get_task
from hemijax.models import base


class Backend(nn.Module):
  """One modality's back end: conv+ReLU layers, then a stride-1 max-pool that keeps resolution."""
  features: Sequence[int] = (48, 48)
  kernel_size: int = 5
  pool_window: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(layers.Conv(width, self.kernel_size, impl=self.conv_impl)(x))
    if self.pool_window > 1:
      x = layers.max_pool(x, self.pool_window, strides=1, padding="SAME")
    return x


class StackedBackends(nn.Module):
  """M back ends with parameters stacked on a leading modality axis: (M, B, *sp, 1) -> (M, B, *sp, C)."""
  num_modalities: int
  features: Sequence[int] = (48, 48)
  kernel_size: int = 5
  pool_window: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    vmapped = nn.vmap(Backend, in_axes=0, out_axes=0, variable_axes={"params": 0},
                      split_rngs={"params": True}, axis_size=self.num_modalities)
    return vmapped(self.features, self.kernel_size, self.pool_window, self.conv_impl,
                   name="backend")(x)


class HeMIS(nn.Module):
  num_modalities: int
  num_classes: int
  backend_features: Sequence[int] = (48, 48)
  backend_kernel: int = 5
  pool_window: int = 2
  frontend_features: Sequence[int] = (16,)
  frontend_kernel: int = 5
  final_kernel: int = 21
  conv_impl: str = "auto"

  def setup(self):
    self.backends = StackedBackends(self.num_modalities, tuple(self.backend_features),
                                    self.backend_kernel, self.pool_window, self.conv_impl)
    self.frontend = [layers.Conv(w, self.frontend_kernel, impl=self.conv_impl)
                     for w in self.frontend_features]
    self.classifier = layers.Conv(self.num_classes, self.final_kernel, impl=self.conv_impl)

  def encode(self, image, train=False):
    """(B, *sp, M) -> per-modality features (B, M, *sp, C)."""
    per_modality = jnp.moveaxis(image, -1, 0)[..., None]
    return jnp.moveaxis(self.backends(per_modality), 0, 1)

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


def build(config) -> base.Method:
  task = get_task(config.task)
  modalities = tuple(config.modalities)
  m = config.model
  model = HeMIS(
      num_modalities=len(modalities), num_classes=task.num_classes,
      backend_features=tuple(m.backend_features), backend_kernel=m.backend_kernel,
      pool_window=m.pool_window, frontend_features=tuple(m.frontend_features),
      frontend_kernel=m.frontend_kernel, final_kernel=m.final_kernel, conv_impl=m.conv_impl)
  return base.Method(name="hemis", model=model,
                     loss_fn=base.supervised_segmentation_loss(model, config),
                     modalities=modalities, num_classes=task.num_classes,
                     spatial_dims=len(config.data.patch_size))
