"""Feature disentanglement with gated fusion (Chen et al., MICCAI 2019), 3D.

Each modality i has a content encoder E^c_i (a U-Net-style encoder of residual blocks with instance
normalisation and leaky-ReLU; resolution halves and channels double between blocks) and an
appearance encoder E^a_i (convolutions, global average pooling, a dense layer) that gives a Gaussian
code pulled towards N(0, I) by a KL term. At every scale the content codes of the modalities in the
mask are fused: by a voxel-wise sigmoid gate per modality, the gated codes concatenated and mixed by
a 1x1x1 convolution (`fusion="gated"`), or by their masked mean (`fusion="mean"`, the ablation
baseline). The segmentation decoder D^s upsamples the fused bottleneck with the fused scales as
skip connections. In training, per-modality reconstruction decoders D^r_i re-render every available
modality from the fused bottleneck and that modality's appearance code, including modalities whose
content was dropped (the pseudo-cycle consistency). Inference uses the content path only.

Per-modality encoders and decoders have stacked parameters (leading modality axis, `nn.vmap`), so
one compiled function serves every subset. Features of `encode` are a tuple with one
`(B, M, *spatial_s, C_s)` array per scale, finest first.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hemijax.nn import modality_dropout as dropout_lib
from hemijax.nn import fusion
from hemijax.nn import layers
from hemijax.nn import losses
from hemijax.data.tasks import get_task
from hemijax.models import base

FUSIONS = ("gated", "mean")


def _flat_variance_scaling(scale: float):
  """Truncated-normal fan-in variance scaling (flax's he_normal for scale 2, lecun_normal for 1),
  drawn as one flat vector and reshaped: the same distribution, but XLA on CPU compiles random
  bits of many-dimensional shapes (a 3D kernel, or any kernel under vmap) slowly, seconds each."""
  def init(key, shape, dtype=jnp.float32):
    # 0.8796... is the standard deviation of a standard normal truncated to [-2, 2].
    std = math.sqrt(scale / math.prod(shape[:-1])) / 0.87962566103423978
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
    return (flat * std).reshape(shape)
  return init


# Every convolution and dense layer of this model, with the fast-compiling initialisers.
_Conv = functools.partial(layers.Conv, kernel_init=_flat_variance_scaling(2.0))
_Dense = functools.partial(nn.Dense, kernel_init=_flat_variance_scaling(1.0))


def _instance_norm(**kwargs):
  # Normalises each channel of each example over its spatial axes (no running statistics).
  return nn.InstanceNorm(feature_axes=-1, **kwargs)


class ResidualBlock(nn.Module):
  """conv-IN-lReLU-conv-IN plus a (strided 1x1) projection shortcut, then leaky-ReLU."""
  features: int
  strides: int = 1
  kernel_size: int = 3
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    act = lambda v: nn.leaky_relu(v, self.negative_slope)
    h = _Conv(self.features, self.kernel_size, strides=self.strides, use_bias=False,
              impl=self.conv_impl)(x)
    h = act(_instance_norm()(h))
    h = _Conv(self.features, self.kernel_size, use_bias=False, impl=self.conv_impl)(h)
    h = _instance_norm()(h)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _Conv(self.features, 1, strides=self.strides, use_bias=False,
                       impl=self.conv_impl)(x)
    return act(h + shortcut)


class ContentEncoder(nn.Module):
  """One modality's E^c: (B, *sp, 1) -> a list of codes, one per scale, finest first."""
  features: Sequence[int] = (16, 32, 64, 128)
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    codes = []
    for level, width in enumerate(self.features):
      x = ResidualBlock(width, strides=1 if level == 0 else 2,
                        negative_slope=self.negative_slope, conv_impl=self.conv_impl)(x)
      codes.append(x)
    return tuple(codes)


class AppearanceEncoder(nn.Module):
  """One modality's E^a: convolutions, global average pooling, dense -> (mean, log_var)."""
  features: Sequence[int] = (16, 32, 64, 64, 64)
  strides: Sequence[int] = (1, 2, 2, 2, 2)
  code_size: int = 8
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    for width, stride in zip(self.features, self.strides):
      x = nn.leaky_relu(_Conv(width, 3, strides=stride, impl=self.conv_impl)(x),
                        self.negative_slope)
    pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    stats = _Dense(2 * self.code_size)(pooled)
    return stats[..., :self.code_size], stats[..., self.code_size:]


class ReconstructionDecoder(nn.Module):
  """One modality's D^r(z, a): upsampling convolutions from the fused bottleneck to one channel.

  The appearance code modulates every layer after instance normalisation (AdaIN: a per-channel
  scale and shift from a dense layer), since a constant code concatenated to the content would be
  removed by the normalisation.
  """
  features: Sequence[int] = (128, 64, 32, 16)  # coarsest first
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, z, appearance_code):
    spatial_axes = (None,) * (z.ndim - 2)
    x = z
    for level, width in enumerate(self.features):
      if level > 0:
        x = layers.upsample(x)
      x = _Conv(width, 3, use_bias=False, impl=self.conv_impl)(x)
      x = _instance_norm(use_scale=False, use_bias=False)(x)
      scale, shift = jnp.split(_Dense(2 * width)(appearance_code), 2, axis=-1)
      x = x * (1 + scale[:, *spatial_axes, :]) + shift[:, *spatial_axes, :]
      x = nn.leaky_relu(x, self.negative_slope)
    return _Conv(1, 1, impl=self.conv_impl)(x)[..., 0]


def _stacked(module_cls, num_modalities, in_axes=0):
  """`module_cls` with parameters stacked on a leading modality axis, applied with vmap."""
  return nn.vmap(module_cls, in_axes=in_axes, out_axes=0, variable_axes={"params": 0},
                 split_rngs={"params": True}, axis_size=num_modalities)


class GatedFusion(nn.Module):
  """One scale's fusion of per-modality codes (B, M, *sp, C) -> (B, *sp, C) over the mask.

  Absent codes are zeroed before anything reads them, so neither the gates nor the fused code
  depend on their values: gates = sigmoid(conv(concat codes)) with one channel per modality, then
  leaky-ReLU(1x1 conv(concat gate_i * code_i)).
  """
  features: int
  num_modalities: int
  gate_kernel: int = 3
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, codes, modality_mask):
    present = fusion.expand_modality_mask(modality_mask, codes.ndim)
    codes = jnp.where(present, codes, 0)
    concat = lambda c: jnp.concatenate([c[:, i] for i in range(self.num_modalities)], axis=-1)
    gates = nn.sigmoid(_Conv(self.num_modalities, self.gate_kernel,
                             impl=self.conv_impl)(concat(codes)))
    gated = codes * jnp.moveaxis(gates, -1, 1)[..., None]
    fused = _Conv(self.features, 1, impl=self.conv_impl)(concat(gated))
    return nn.leaky_relu(fused, self.negative_slope)


class SegmentationDecoder(nn.Module):
  """D^s: a residual block on the fused bottleneck, then per finer scale: upsample, conv to that
  scale's width, concatenate the fused skip code, residual block; then a 1x1 classifier."""
  features: Sequence[int]
  num_classes: int
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, fused):
    x = ResidualBlock(self.features[-1], negative_slope=self.negative_slope,
                      conv_impl=self.conv_impl)(fused[-1])
    for level in reversed(range(len(self.features) - 1)):
      width = self.features[level]
      x = _Conv(width, 3, impl=self.conv_impl)(layers.upsample(x))
      x = nn.leaky_relu(x, self.negative_slope)
      x = jnp.concatenate([x, fused[level]], axis=-1)
      x = ResidualBlock(width, negative_slope=self.negative_slope, conv_impl=self.conv_impl)(x)
    return _Conv(self.num_classes, 1, impl=self.conv_impl)(x)


class Disentangle(nn.Module):
  """The whole model; `__call__`/`encode`/`decode` are the inference path (content only) and
  `forward_train` adds the appearance codes and reconstructions the loss needs."""
  num_modalities: int
  num_classes: int
  content_features: Sequence[int] = (16, 32, 64, 128)
  fusion: str = "gated"            # "gated" | "mean"
  gate_kernel: int = 3
  disentangle: bool = True         # False: no appearance encoders or reconstruction decoders
  appearance_features: Sequence[int] = (16, 32, 64, 64, 64)
  appearance_strides: Sequence[int] = (1, 2, 2, 2, 2)
  appearance_size: int = 8
  negative_slope: float = 0.01
  conv_impl: str = "auto"

  def setup(self):
    m, slope, impl = self.num_modalities, self.negative_slope, self.conv_impl
    widths = tuple(self.content_features)
    self.content_encoders = _stacked(ContentEncoder, m)(widths, slope, impl)
    if self.fusion == "gated":
      self.fusers = [GatedFusion(w, m, self.gate_kernel, slope, impl) for w in widths]
    self.segmentation_decoder = SegmentationDecoder(widths, self.num_classes, slope, impl)
    if self.disentangle:
      self.appearance_encoders = _stacked(AppearanceEncoder, m)(
          tuple(self.appearance_features), tuple(self.appearance_strides), self.appearance_size,
          slope, impl)
      self.reconstruction_decoders = _stacked(ReconstructionDecoder, m, in_axes=(None, 0))(
          widths[::-1], slope, impl)

  @property
  def size_multiple(self) -> int:
    return 2 ** (len(self.content_features) - 1)

  def encode(self, image, train=False):
    """(B, *sp, M) -> content codes: a tuple over scales of (B, M, *sp_s, C_s), finest first."""
    per_modality = jnp.moveaxis(image, -1, 0)[..., None]
    return tuple(jnp.moveaxis(c, 0, 1) for c in self.content_encoders(per_modality))

  def fuse(self, features, modality_mask):
    """Fused content code at every scale, from the modalities in the mask only."""
    if self.fusion == "mean":
      return tuple(fusion.masked_mean(c, fusion.expand_modality_mask(modality_mask, c.ndim),
                                      axis=1) for c in features)
    return tuple(fuser(c, modality_mask) for fuser, c in zip(self.fusers, features))

  def decode(self, features, modality_mask, train=False):
    """Logits (B, *sp, C) from the content codes of the modalities in the mask."""
    return self.segmentation_decoder(self.fuse(features, modality_mask))

  def appearance(self, image, train=False):
    """(mean, log_var, code), each (B, M, appearance_size); the code is sampled when training."""
    per_modality = jnp.moveaxis(image, -1, 0)[..., None]
    mean, log_var = (jnp.moveaxis(s, 0, 1) for s in self.appearance_encoders(per_modality))
    code = mean
    if train:
      # Drawn flat: see `_flat_variance_scaling` on compiling random bits of many-axis shapes.
      noise = jax.random.normal(self.make_rng("sample"), (mean.size,), mean.dtype)
      noise = noise.reshape(mean.shape)
      code = mean + jnp.exp(0.5 * log_var) * noise
    return mean, log_var, code

  def reconstruct(self, fused_bottleneck, appearance_code):
    """Every modality re-rendered from the fused bottleneck: (B, *sp, M)."""
    per_modality = self.reconstruction_decoders(fused_bottleneck,
                                                jnp.moveaxis(appearance_code, 1, 0))
    return jnp.moveaxis(per_modality, 0, -1)

  def forward_train(self, image, modality_mask, available, train=True):
    """Training outputs: logits from the kept modalities (`modality_mask`), and, with
    disentanglement, reconstructions of every `available` modality and their appearance codes."""
    features = self.encode(base.zero_missing(image, modality_mask))
    fused = self.fuse(features, modality_mask)
    out = {"logits": self.segmentation_decoder(fused)}
    if self.disentangle:
      # Appearance codes come from every available image, dropped ones included (pseudo-cycle).
      mean, log_var, code = self.appearance(base.zero_missing(image, available), train=train)
      out.update(reconstruction=self.reconstruct(fused[-1], code), appearance_mean=mean,
                 appearance_log_var=log_var)
    return out

  def __call__(self, image, modality_mask, train=False):
    if self.is_initializing() and self.disentangle:
      # Create the training-only parameters too, so `init` gives the full parameter tree.
      return self.forward_train(image, modality_mask, modality_mask, train=False)["logits"]
    image = base.zero_missing(image, modality_mask)
    return self.decode(self.encode(image), modality_mask)


def masked_appearance_kl(mean, log_var, available):
  """KL(q(a_i) || N(0, I)) averaged over the (subject, modality) pairs that are available."""
  per_code = jax.vmap(jax.vmap(lambda m, v: losses.gaussian_kl(m[None], v[None])))(mean, log_var)
  per_code = jnp.where(available, per_code, 0)
  return jnp.sum(per_code) / jnp.maximum(jnp.sum(available), 1)


def make_loss_fn(model: Disentangle, config):
  """Dice + per-batch weighted CE (+ rec_weight * L1 reconstruction + kl_weight * KL)."""
  sampler = dropout_lib.make_sampler(config.dropout)
  loss_cfg = config.loss

  def loss_fn(params, model_state, batch, key, step):
    dropout_key, sample_key = jax.random.split(key)
    available = batch["modality_mask"]
    mask = sampler(dropout_key, available, step)
    out = model.apply({"params": params, **model_state}, batch["image"], mask, available,
                      train=True, method="forward_train", rngs={"sample": sample_key})
    logits, labels, valid = out["logits"], batch["label"], batch.get("valid")
    # Clamped: under jit, XLA's division can make 1 - n/n a tiny negative number for a class that
    # fills the batch, and cross_entropy would divide that by its 1e-8 floor (a huge negative CE).
    weights = jnp.maximum(losses.batch_class_weights(labels, model.num_classes, valid), 0.0)
    ce = losses.cross_entropy(logits, labels, valid, weights)
    dice = losses.soft_dice(logits, labels, valid)
    loss = loss_cfg.ce_weight * ce + loss_cfg.dice_weight * dice
    metrics = {"cross_entropy": ce, "soft_dice_loss": dice,
               "modalities_kept": jnp.mean(jnp.sum(mask, axis=-1))}
    if model.disentangle:
      spatial = (None,) * (logits.ndim - 2)
      rec_valid = available[:, *spatial, :]
      if valid is not None:
        rec_valid = rec_valid & valid[..., None]
      # Targets of unavailable slots are zeroed first: their values never reach the loss.
      target = base.zero_missing(batch["image"], available)
      rec = losses.masked_l1(out["reconstruction"], target, rec_valid)
      kl = masked_appearance_kl(out["appearance_mean"], out["appearance_log_var"], available)
      loss = loss + loss_cfg.reconstruction_weight * rec + loss_cfg.kl_weight * kl
      metrics.update(reconstruction_l1=rec, appearance_kl=kl)
    return loss, (dict(metrics, loss=loss), dict(model_state))

  return loss_fn


def build(config) -> base.Method:
  task = get_task(config.task)
  modalities = tuple(config.modalities)
  m = config.model
  if m.fusion not in FUSIONS:
    raise ValueError(f"config.model.fusion: unknown fusion {m.fusion!r}; choose one of {FUSIONS}")
  if len(config.data.patch_size) != 3:
    raise ValueError(f"config.data.patch_size: disentangle is a 3D model, expected 3 sizes, got "
                     f"{tuple(config.data.patch_size)}")
  if len(m.appearance_features) != len(m.appearance_strides):
    raise ValueError("config.model.appearance_strides: needs one stride per appearance_features "
                     f"entry, got {len(m.appearance_strides)} for {len(m.appearance_features)}")
  model = Disentangle(
      num_modalities=len(modalities), num_classes=task.num_classes,
      content_features=tuple(m.content_features), fusion=m.fusion, gate_kernel=m.gate_kernel,
      disentangle=bool(m.disentangle), appearance_features=tuple(m.appearance_features),
      appearance_strides=tuple(m.appearance_strides), appearance_size=m.appearance_size,
      negative_slope=m.negative_slope, conv_impl=m.conv_impl)
  multiple = model.size_multiple
  if any(p % multiple for p in config.data.patch_size):
    raise ValueError(f"config.data.patch_size: sizes must be multiples of {multiple} "
                     f"({len(m.content_features)} scales), got {tuple(config.data.patch_size)}")
  return base.Method(name="disentangle", model=model, loss_fn=make_loss_fn(model, config),
                     modalities=modalities, num_classes=task.num_classes, spatial_dims=3,
                     size_multiple=multiple)
