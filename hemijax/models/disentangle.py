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
from hemijax.data.tasks import task_from_config
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


# Every dense layer of this model, with the fast-compiling initialiser (the convolutions get theirs
# in `Disentangle.setup`).
_Dense = functools.partial(nn.Dense, kernel_init=_flat_variance_scaling(1.0))


def _instance_norm(**kwargs):
  # Normalises each channel of each example over its spatial axes (no running statistics).
  return nn.InstanceNorm(feature_axes=-1, **kwargs)


class ResidualBlock(nn.Module):
  """conv-IN-lReLU-conv-IN plus a (strided 1x1) projection shortcut, then leaky-ReLU."""
  features: int
  conv: layers.ModuleDef
  negative_slope: float
  strides: int = 1
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x):
    act = lambda v: nn.leaky_relu(v, self.negative_slope)
    h = self.conv(self.features, self.kernel_size, strides=self.strides, use_bias=False)(x)
    h = act(_instance_norm()(h))
    h = _instance_norm()(self.conv(self.features, self.kernel_size, use_bias=False)(h))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.conv(self.features, 1, strides=self.strides, use_bias=False)(x)
    return act(h + shortcut)


class ContentEncoder(nn.Module):
  """One modality's E^c: (B, *sp, 1) -> a list of codes, one per scale, finest first."""
  conv: layers.ModuleDef
  features: Sequence[int]
  negative_slope: float

  @nn.compact
  def __call__(self, x):
    codes = []
    for level, width in enumerate(self.features):
      x = ResidualBlock(width, self.conv, self.negative_slope, strides=1 if level == 0 else 2)(x)
      codes.append(x)
    return tuple(codes)


class AppearanceEncoder(nn.Module):
  """One modality's E^a: convolutions, global average pooling, dense -> (mean, log_var)."""
  conv: layers.ModuleDef
  features: Sequence[int]
  strides: Sequence[int]
  code_size: int
  negative_slope: float

  @nn.compact
  def __call__(self, x):
    for width, stride in zip(self.features, self.strides):
      x = nn.leaky_relu(self.conv(width, 3, strides=stride)(x), self.negative_slope)
    pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    stats = _Dense(2 * self.code_size)(pooled)
    return stats[..., :self.code_size], stats[..., self.code_size:]


class ReconstructionDecoder(nn.Module):
  """One modality's D^r(z, a): upsampling convolutions from the fused bottleneck to one channel.

  The appearance code modulates every layer after instance normalisation (AdaIN: a per-channel
  scale and shift from a dense layer), since a constant code concatenated to the content would be
  removed by the normalisation.
  """
  conv: layers.ModuleDef
  features: Sequence[int]   # coarsest first
  negative_slope: float

  @nn.compact
  def __call__(self, z, appearance_code):
    spatial_axes = (None,) * (z.ndim - 2)
    x = z
    for level, width in enumerate(self.features):
      if level > 0:
        x = layers.upsample(x)
      x = self.conv(width, 3, use_bias=False)(x)
      x = _instance_norm(use_scale=False, use_bias=False)(x)
      scale, shift = jnp.split(_Dense(2 * width)(appearance_code), 2, axis=-1)
      x = x * (1 + scale[:, *spatial_axes, :]) + shift[:, *spatial_axes, :]
      x = nn.leaky_relu(x, self.negative_slope)
    return self.conv(1, 1)(x)[..., 0]


def _adain(x, appearance_code, width):
  """Instance normalisation without its own affine, then a per-channel scale and shift from the
  appearance code (a dense layer): AdaIN."""
  spatial_axes = (None,) * (x.ndim - 2)
  x = _instance_norm(use_scale=False, use_bias=False)(x)
  scale, shift = jnp.split(_Dense(2 * width)(appearance_code), 2, axis=-1)
  return x * (1 + scale[:, *spatial_axes, :]) + shift[:, *spatial_axes, :]


class AdaINResidualBlock(nn.Module):
  """conv-AdaIN-lReLU-conv-AdaIN plus the input, at constant width and resolution."""
  conv: layers.ModuleDef
  features: int
  negative_slope: float

  @nn.compact
  def __call__(self, x, appearance_code):
    h = self.conv(self.features, 3, use_bias=False)(x)
    h = nn.leaky_relu(_adain(h, appearance_code, self.features), self.negative_slope)
    h = _adain(self.conv(self.features, 3, use_bias=False)(h), appearance_code, self.features)
    return x + h


class ResidualReconstructionDecoder(nn.Module):
  """One modality's D^r(z, a) as the paper describes it: residual blocks (AdaIN) on the fused
  bottleneck, then upsampling + conv (AdaIN) layers back to full resolution, then a 1x1 conv.

  One upsampling per encoder downsampling (len(features) - 1): the paper's 4 upsamplings go with
  its encoder's 4 halvings; this encoder's first block keeps the resolution.
  """
  conv: layers.ModuleDef
  features: Sequence[int]   # coarsest first
  negative_slope: float
  num_blocks: int = 4

  @nn.compact
  def __call__(self, z, appearance_code):
    x = self.conv(self.features[0], 1)(z) if z.shape[-1] != self.features[0] else z
    for _ in range(self.num_blocks):
      x = AdaINResidualBlock(self.conv, self.features[0], self.negative_slope)(x, appearance_code)
    for width in self.features[1:]:
      x = self.conv(width, 3, use_bias=False)(layers.upsample(x))
      x = nn.leaky_relu(_adain(x, appearance_code, width), self.negative_slope)
    return self.conv(1, 1)(x)[..., 0]


RECONSTRUCTION_DECODERS = ("conv", "residual")


class GatedFusion(nn.Module):
  """One scale's fusion of per-modality codes (B, M, *sp, C) -> (B, *sp, C) over the mask.

  Absent codes are zeroed before anything reads them, so neither the gates nor the fused code
  depend on their values: gates = sigmoid(conv(concat codes)) with one channel per modality, then
  leaky-ReLU(1x1 conv(concat gate_i * code_i)).
  """
  features: int
  num_modalities: int
  conv: layers.ModuleDef
  gate_kernel: int = 3
  negative_slope: float = 0.01

  @nn.compact
  def __call__(self, codes, modality_mask):
    present = fusion.expand_modality_mask(modality_mask, codes.ndim)
    codes = jnp.where(present, codes, 0)
    concat = lambda c: jnp.concatenate([c[:, i] for i in range(self.num_modalities)], axis=-1)
    gates = nn.sigmoid(self.conv(self.num_modalities, self.gate_kernel)(concat(codes)))
    gated = codes * jnp.moveaxis(gates, -1, 1)[..., None]
    fused = self.conv(self.features, 1)(concat(gated))
    return nn.leaky_relu(fused, self.negative_slope)


class SegmentationDecoder(nn.Module):
  """D^s: a residual block on the fused bottleneck, then per finer scale: upsample, conv to that
  scale's width, concatenate the fused skip code, residual block; then a 1x1 classifier."""
  features: Sequence[int]
  num_classes: int
  conv: layers.ModuleDef
  negative_slope: float

  @nn.compact
  def __call__(self, fused):
    x = ResidualBlock(self.features[-1], self.conv, self.negative_slope)(fused[-1])
    for level in reversed(range(len(self.features) - 1)):
      width = self.features[level]
      x = nn.leaky_relu(self.conv(width, 3)(layers.upsample(x)), self.negative_slope)
      x = jnp.concatenate([x, fused[level]], axis=-1)
      x = ResidualBlock(width, self.conv, self.negative_slope)(x)
    return self.conv(self.num_classes, 1)(x)


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
  # D^r: "conv" (conv + AdaIN per scale) or "residual" (the paper's: residual blocks, then
  # upsampling + conv layers); `reconstruction_blocks` residual blocks.
  reconstruction_decoder: str = "conv"
  reconstruction_blocks: int = 4
  conv_impl: str = "auto"

  def setup(self):
    m, slope = self.num_modalities, self.negative_slope
    # Every convolution of this model, with the fast-compiling initialiser.
    conv = layers.conv_factory(self.conv_impl, kernel_init=_flat_variance_scaling(2.0))
    widths = tuple(self.content_features)
    self.content_encoders = layers.per_modality(ContentEncoder, m)(conv, widths, slope)
    if self.fusion == "gated":
      self.fusers = [GatedFusion(w, m, conv, self.gate_kernel, slope) for w in widths]
    self.segmentation_decoder = SegmentationDecoder(widths, self.num_classes, conv, slope)
    if self.disentangle:
      self.appearance_encoders = layers.per_modality(AppearanceEncoder, m)(
          conv, tuple(self.appearance_features), tuple(self.appearance_strides),
          self.appearance_size, slope)
      if self.reconstruction_decoder == "residual":
        self.reconstruction_decoders = layers.per_modality(
            ResidualReconstructionDecoder, m, in_axes=(None, 0))(
                conv, widths[::-1], slope, self.reconstruction_blocks)
      else:
        self.reconstruction_decoders = layers.per_modality(
            ReconstructionDecoder, m, in_axes=(None, 0))(conv, widths[::-1], slope)

  @property
  def size_multiple(self) -> int:
    return 2 ** (len(self.content_features) - 1)

  def encode(self, image, train=False):
    """(B, *sp, M) -> content codes: a tuple over scales of (B, M, *sp_s, C_s), finest first."""
    return layers.apply_per_modality(self.content_encoders, image)

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
    mean, log_var = layers.apply_per_modality(self.appearance_encoders, image)
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


MODALITY_REDUCTIONS = ("sum", "mean")


def masked_appearance_kl(mean, log_var, available, reduction="sum"):
  """KL(q(a_i) || N(0, I)) of every available (subject, modality) pair.

  "sum" (the paper's Eq. 3): summed over the available modalities, averaged over the batch.
  "mean": averaged over the available (subject, modality) pairs (1 / M of "sum" with all present).
  """
  per_code = jax.vmap(jax.vmap(lambda m, v: losses.gaussian_kl(m[None], v[None])))(mean, log_var)
  per_code = jnp.where(available, per_code, 0)
  if reduction == "sum":
    return jnp.sum(per_code) / available.shape[0]
  return jnp.sum(per_code) / jnp.maximum(jnp.sum(available), 1)


def reconstruction_l1(reconstruction, target, rec_valid, reduction="sum"):
  """L1 reconstruction loss of `(B, *sp, M)` images; `rec_valid (B, *sp, M)` marks the voxels of
  available modalities.

  "sum" (the paper's Eq. 1): per modality, the mean absolute error over its valid voxels, summed
  over the modalities. "mean": the mean over every valid voxel of every modality.
  """
  if reduction == "mean":
    return losses.masked_l1(reconstruction, target, rec_valid)
  weight = jnp.asarray(rec_valid, jnp.float32)
  axes = tuple(range(reconstruction.ndim - 1))
  error = jnp.sum(jnp.abs(reconstruction - target) * weight, axis=axes)
  return jnp.sum(error / jnp.maximum(jnp.sum(weight, axis=axes), 1.0))


def make_loss_fn(model: Disentangle, config):
  """Dice + per-batch weighted CE (+ rec_weight * L1 reconstruction + kl_weight * KL)."""
  sampler = dropout_lib.make_sampler(config.dropout)
  loss_cfg = config.loss
  reduction = loss_cfg.get("modality_reduction", "sum")

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
    loss, terms = losses.segmentation_loss(logits, labels, valid, ce_weight=loss_cfg.ce_weight,
                                           dice_weight=loss_cfg.dice_weight, class_weights=weights)
    metrics = {**terms, "modalities_kept": base.modalities_kept(mask)}
    if model.disentangle:
      spatial = (None,) * (logits.ndim - 2)
      rec_valid = available[:, *spatial, :]
      if valid is not None:
        rec_valid = rec_valid & valid[..., None]
      # Targets of unavailable slots are zeroed first: their values never reach the loss.
      target = base.zero_missing(batch["image"], available)
      rec = reconstruction_l1(out["reconstruction"], target, rec_valid, reduction)
      kl = masked_appearance_kl(out["appearance_mean"], out["appearance_log_var"], available,
                                reduction)
      loss = loss + loss_cfg.reconstruction_weight * rec + loss_cfg.kl_weight * kl
      metrics.update(reconstruction_l1=rec, appearance_kl=kl)
    return loss, (dict(metrics, loss=loss), dict(model_state))

  return loss_fn


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  m = config.model
  if m.fusion not in FUSIONS:
    raise ValueError(f"config.model.fusion: unknown fusion {m.fusion!r}; choose one of {FUSIONS}")
  if m.get("reconstruction_decoder", "conv") not in RECONSTRUCTION_DECODERS:
    raise ValueError(f"config.model.reconstruction_decoder: unknown decoder "
                     f"{m.reconstruction_decoder!r}; choose one of {RECONSTRUCTION_DECODERS}")
  reduction = config.loss.get("modality_reduction", "sum")
  if reduction not in MODALITY_REDUCTIONS:
    raise ValueError(f"config.loss.modality_reduction: unknown {reduction!r}; "
                     f"choose one of {MODALITY_REDUCTIONS}")
  if len(config.data.patch_size) != 3:
    raise ValueError(f"config.data.patch_size: disentangle is a 3D model, expected 3 sizes, got "
                     f"{tuple(config.data.patch_size)}")
  if len(m.appearance_features) != len(m.appearance_strides):
    raise ValueError("config.model.appearance_strides: needs one stride per appearance_features "
                     f"entry, got {len(m.appearance_strides)} for {len(m.appearance_features)}")
  model = base.model_from_config(Disentangle, m, num_modalities=len(modalities),
                                 num_classes=task.num_classes)
  multiple = model.size_multiple
  if any(p % multiple for p in config.data.patch_size):
    raise ValueError(f"config.data.patch_size: sizes must be multiples of {multiple} "
                     f"({len(m.content_features)} scales), got {tuple(config.data.patch_size)}")
  return base.Method(name="disentangle", model=model, loss_fn=make_loss_fn(model, config),
                     modalities=modalities, num_classes=task.num_classes, spatial_dims=3,
                     size_multiple=multiple)
