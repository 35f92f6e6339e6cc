"""Unified representation network (URN, Lau et al. 2019) for segmentation with missing modalities.

Encoding: one U-Net encoder per modality (parameters stacked on a leading modality axis, applied
with vmap) maps its image to a `representation_channels`-channel map at input resolution, followed
by a batch normalisation with fixed parameters (no learned scale or shift), so every encoder's
output has zero mean and unit variance before fusion.
Fusion: the generalised f-mean over the available modalities (`hemijax.nn.fusion.masked_f_mean`;
f = identity or exp); in pre-training the voxel-wise variance across the available encoders is a
regularisation term (so the dropout keeps at least two modalities when it is used).
Decoding: per-modality synthesis decoders (two residual blocks and a 1x1 convolution, no final
activation) for unsupervised pre-training by cross-modality synthesis, and a segmentation decoder
(the baseline U-Net) trained on the unified representation with the encoders frozen.

Training is two `Stage`s of one run:
  1. "pretrain": encoders + synthesis decoders; synthesis MSE on every modality the target holds
     (+ variance term), modality dropout theta = 0.8 (at least 2 kept when the variance term is
     on), on the pooled tumour training volumes and a healthy phantom holding only T1 and T2
     (`healthy_volumes`), whose modality sets only partly overlap;
  2. "segmentation": the segmentation decoder on the fused representation of the frozen encoders
     (no gradient reaches them; their batch normalisations use running statistics), modality
     dropout theta = 0.5.
Both stages use Adam with all parameters in the optimiser; the parameters a stage's loss does not
reach get zero gradients and so zero Adam updates.

`config.variant` picks the paper's two URN rows: "md_pooled" (the default: "URN + MD with pooled
healthy data", the two stages above) or "md" ("URN + MD": no pre-training; one "segmentation" stage
trains encoders and segmentation decoder end to end, the encoders' batch normalisations in training
mode; the synthesis decoders stay untrained). "md_pooled_finetuned" is the other reading of the
pooled row, which the paper leaves open: the same pre-training, then segmentation trains the
encoders with the decoder, as "md" does (the synthesis decoders keep their pre-trained weights).
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hemijax import atomic
from hemijax.nn import modality_dropout as dropout_lib
from hemijax.nn import fusion
from hemijax.nn import layers
from hemijax.data import datasets, preprocess, sampling
from hemijax.data.tasks import check_modalities, task_from_config
from hemijax.models import base, unet


class Encoder(unet.UNetSettings, kw_only=True):
  """One modality's encoder: U-Net to the representation, then fixed-parameter normalisation."""
  representation_channels: int
  conv: layers.ModuleDef

  @nn.compact
  def __call__(self, x, item_mask, train: bool = False):
    x = unet.UNet(out_channels=self.representation_channels, conv=self.conv,
                  **base.settings_of(self, unet.UNetSettings), name="unet")(x, train, item_mask)
    return unet.BatchNorm(use_scale=False, use_bias=False, momentum=self.bn_momentum,
                          name="normalise")(x, train, item_mask)


class ResidualBlock(nn.Module):
  """x + conv(leaky_relu(conv(leaky_relu(x)))), same width."""
  conv: layers.ModuleDef
  kernel_size: int
  negative_slope: float

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = self.conv(width, self.kernel_size)(nn.leaky_relu(x, self.negative_slope))
    y = self.conv(width, self.kernel_size)(nn.leaky_relu(y, self.negative_slope))
    return x + y


class SynthesisDecoder(nn.Module):
  """One modality's synthesis decoder: residual blocks, then a 1x1 convolution to one channel."""
  conv: layers.ModuleDef
  num_blocks: int
  kernel_size: int
  negative_slope: float

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_blocks):
      x = ResidualBlock(self.conv, self.kernel_size, self.negative_slope)(x)
    return self.conv(1, 1)(x)  # no final activation: intensities


class URN(unet.UNetSettings, kw_only=True):
  """`features` etc. (`unet.UNetSettings`) are the segmentation decoder's, the baseline U-Net;
  the encoders are U-Nets of the same settings but `encoder_features`."""
  num_modalities: int
  num_classes: int
  representation_channels: int = 16
  encoder_features: Sequence[int] = (16, 32, 64, 128)
  synthesis_blocks: int = 2
  f_mean: str = "identity"
  conv_impl: str = "auto"

  def setup(self):
    conv = layers.conv_factory(self.conv_impl)
    unet_settings = base.settings_of(self, unet.UNetSettings)
    self.encoders = layers.per_modality(
        Encoder, self.num_modalities, in_axes=(0, 0, None), collections=("params", "batch_stats"))(
            representation_channels=self.representation_channels, conv=conv,
            **dict(unet_settings, features=tuple(self.encoder_features)))
    self.synthesis = layers.per_modality(SynthesisDecoder, self.num_modalities, in_axes=None)(
        conv, self.synthesis_blocks, self.kernel_size, self.negative_slope)
    self.segmenter = unet.UNet(out_channels=self.num_classes, conv=conv, **unet_settings)

  def encode(self, image, modality_mask=None, train: bool = False):
    """(B, *sp, M) -> normalised per-modality representations (B, M, *sp, C).

    In training mode each encoder's batch statistics use only the items where its modality is
    in `modality_mask` (None: all items).
    """
    if modality_mask is None:
      item_mask = jnp.ones((self.num_modalities, image.shape[0]), bool)
    else:
      item_mask = jnp.asarray(modality_mask, bool).T
    return layers.apply_per_modality(self.encoders, image, item_mask, train)

  def fuse(self, features, modality_mask):
    """Generalised f-mean over the available modalities: (B, M, *sp, C) -> (B, *sp, C)."""
    f, f_inv = fusion.F_MEANS[self.f_mean]
    mask = fusion.expand_modality_mask(modality_mask, features.ndim)
    return fusion.masked_f_mean(features, mask, f, f_inv, axis=1)

  def decode(self, features, modality_mask, train: bool = False):
    """Segmentation logits from the unified representation of the available modalities."""
    return self.segmenter(self.fuse(features, modality_mask), train)

  def synthesize(self, features, modality_mask):
    """Every modality synthesised from the unified representation: (B, *sp, M)."""
    out = self.synthesis(self.fuse(features, modality_mask))    # (M, B, *sp, 1)
    return jnp.moveaxis(out[..., 0], 0, -1)

  def pretrain_forward(self, image, modality_mask, train: bool = True):
    """(synthesised images (B, *sp, M), representations (B, M, *sp, C)) for pre-training."""
    image = base.zero_missing(image, modality_mask)
    features = self.encode(image, modality_mask, train)
    return self.synthesize(features, modality_mask), features

  def __call__(self, image, modality_mask, train: bool = False):
    image = base.zero_missing(image, modality_mask)
    features = self.encode(image, modality_mask, train)
    if self.is_initializing():
      self.synthesize(features, modality_mask)  # creates the synthesis decoders' parameters
    return self.decode(features, modality_mask, train)


# ------------------------------------------------------------------------------------------------
# Losses


def masked_variance_term(features, modality_mask, valid=None):
  """Mean over voxels and channels of the variance across the available encoders' outputs."""
  mask = fusion.expand_modality_mask(modality_mask, features.ndim)
  variance = fusion.masked_variance(features, mask, axis=1)    # (B, *sp, C)
  if valid is None:
    return jnp.mean(variance)
  weight = jnp.asarray(valid, jnp.float32)[..., None]
  return jnp.sum(variance * weight) / jnp.maximum(jnp.sum(weight) * variance.shape[-1], 1.0)


def synthesis_mse(synthesised, image, available, valid=None):
  """MSE over the valid voxels of every modality the target's files hold (B, M `available`)."""
  weight = jnp.asarray(available, jnp.float32)[:, *([None] * (image.ndim - 2)), :]
  if valid is not None:
    weight = weight * jnp.asarray(valid, jnp.float32)[..., None]
  weight = jnp.broadcast_to(weight, image.shape)
  return jnp.sum(weight * jnp.square(synthesised - image)) / jnp.maximum(jnp.sum(weight), 1.0)


def pretrain_loss(model: URN, config) -> base.LossFn:
  """Stage 1: cross-modality synthesis from a dropped-out subset, + variance regularisation."""
  variance_weight = float(config.pretrain.variance_weight)
  sampler = dropout_lib.make_sampler(config.pretrain.dropout)

  def loss_fn(params, model_state, batch, key, step):
    available = batch["modality_mask"]
    mask = sampler(key, available, step)
    variables = {"params": params, **model_state}
    (synthesised, features), new_state = model.apply(
        variables, batch["image"], mask, train=True, method="pretrain_forward",
        mutable=["batch_stats"])
    valid = batch.get("valid")
    mse = synthesis_mse(synthesised, batch["image"], available, valid)
    variance = masked_variance_term(features, mask, valid)
    loss = mse + variance_weight * variance
    metrics = {"synthesis_mse": mse, "representation_variance": variance,
               "modalities_kept": base.modalities_kept(mask)}
    return loss, (metrics, dict(new_state))

  return loss_fn


def segmentation_loss(model: URN, config, train_encoders: bool = False) -> base.LossFn:
  """Stage 2: the segmentation decoder on the frozen encoders' fused representation; with
  `train_encoders`, encoders and decoder end to end ("URN + MD", no pre-training)."""
  sampler = dropout_lib.make_sampler(config.dropout)

  def loss_fn(params, model_state, batch, key, step):
    mask = sampler(key, batch["modality_mask"], step)
    variables = {"params": params, **model_state}
    if train_encoders:
      logits, new_state = model.apply(variables, batch["image"], mask, train=True,
                                      mutable=["batch_stats"])
      loss, terms = base.batch_segmentation_loss(logits, batch, config.loss)
      return loss, ({**terms, "modalities_kept": base.modalities_kept(mask)}, dict(new_state))
    image = base.zero_missing(batch["image"], mask)
    # Frozen encoders: running statistics, and no gradient (nor its cost) reaches them.
    features = jax.lax.stop_gradient(model.apply(variables, image, method="encode"))
    logits, new_state = model.apply(variables, features, mask, train=True, method="decode",
                                    mutable=["batch_stats"])
    loss, terms = base.batch_segmentation_loss(logits, batch, config.loss)
    return loss, ({**terms, "modalities_kept": base.modalities_kept(mask)}, dict(new_state))

  return loss_fn


# ------------------------------------------------------------------------------------------------
# Pooled pre-training data: the task's training volumes + a healthy phantom with T1 and T2 only


def healthy_root(config) -> pathlib.Path:
  """Cache folder of the healthy phantom; its name encodes every generation option."""
  p = config.pretrain
  names = "-".join(p.healthy_modalities)
  return (datasets.cache_root(config) / "phantoms" /
          f"healthy_{names}_n{p.healthy_subjects}_seed{config.data.phantom_seed}"
          f"_sp{config.data.phantom_spacing:g}_{config.data.phantom_protocol}")


def ensure_healthy_phantom(config) -> pathlib.Path:
  """Writes the healthy phantom once (a temporary folder, then renamed) and returns its root.

  Subjects are the `tissue` task's anatomy without lesions, acquired with only
  `config.pretrain.healthy_modalities`; written in the BraTS layout with an all-zero label (a
  healthy brain holds no tumour), so the usual loader maps them into the task's modality slots
  with the other slots absent. Subject i uses the seed stream (phantom_seed, 1000003, i), apart
  from the task phantom's subjects.
  """
  root = healthy_root(config)
  if (root / "complete").is_file():
    return root
  from hemijax.data import phantom  # heavy (templates); only when generating

  p, d = config.pretrain, config.data

  def fill(folder):
    for i in range(int(p.healthy_subjects)):
      case = f"Phantom_healthy_{i:03d}"
      subject = phantom.generate_subject(
          "tissue", np.random.default_rng([d.phantom_seed, 1000003, i]), d.phantom_spacing,
          d.phantom_protocol, tuple(p.healthy_modalities))
      (folder / case).mkdir()
      for name, image in subject["images"].items():
        (folder / case / f"{case}_{name}.nii.gz").write_bytes(
            phantom.nifti_bytes(image, subject["affine"]))
      label = np.zeros(subject["label"].shape, np.uint8)
      (folder / case / f"{case}_seg.nii.gz").write_bytes(
          phantom.nifti_bytes(label, subject["affine"]))
    (folder / "complete").write_text("")

  return atomic.write_directory(root, fill)


def healthy_volumes(config) -> list:
  """The healthy phantom, preprocessed into the task's modality slots (cached)."""
  root = ensure_healthy_phantom(config)
  return preprocess.load_dataset(
      root, modalities=tuple(config.modalities), label_values=task_from_config(config).label_values,
      layout="brats", split=None, target_spacing=config.data.target_spacing,
      cache_dir=datasets.cache_root(config) / "preprocessed")


def pretrain_batches(config, load_split):
  """`step -> batch`: uniform patches from the pooled training volumes (labels unused)."""
  volumes = list(load_split("train"))
  if config.pretrain.healthy_subjects:
    volumes += healthy_volumes(config)
  sampler = sampling.Sampler(volumes, patch_size=tuple(config.data.patch_size), strategy="uniform")
  batch_size = int(config.pretrain.batch_size)

  def make_batch(step):
    return sampler.sample(np.random.default_rng((config.seed, 15485863, step)), batch_size)

  return make_batch


# ------------------------------------------------------------------------------------------------


VARIANTS = ("md_pooled", "md", "md_pooled_finetuned")


def pretrains(config) -> bool:
  """Whether the variant has the synthesis pre-training stage ("md_pooled"; "md" has none)."""
  return config.get("variant", "md_pooled") != "md"


def check_config(config):
  m, p = config.model, config.pretrain
  variant = config.get("variant", "md_pooled")
  if variant not in VARIANTS:
    raise ValueError(f"config.variant: unknown URN variant {variant!r}; choose one of {VARIANTS}")
  if variant == "md" and int(p.num_steps) != 0:
    raise ValueError(f"config.pretrain.num_steps: the 'md' variant has no pre-training; set it to "
                     f"0, got {p.num_steps}")
  unet.check_features(m.features)
  unet.check_features(m.encoder_features, option="config.model.encoder_features")
  if m.f_mean not in fusion.F_MEANS:
    raise ValueError(f"config.model.f_mean: unknown f-mean {m.f_mean!r}; choose one of "
                     f"{sorted(fusion.F_MEANS)}")
  if int(m.representation_channels) < 1:
    raise ValueError(f"config.model.representation_channels: must be >= 1, got "
                     f"{m.representation_channels}")
  if float(p.variance_weight) < 0:
    raise ValueError(f"config.pretrain.variance_weight: must be >= 0, got {p.variance_weight}")
  if float(p.variance_weight) > 0 and p.dropout.get("min_kept", 1) < 2:
    raise ValueError("config.pretrain.dropout.min_kept: the variance term needs at least 2 "
                     "modalities kept; set min_kept=2 or config.pretrain.variance_weight=0")
  if int(p.batch_size) < 1:
    raise ValueError(f"config.pretrain.batch_size: must be >= 1, got {p.batch_size}")
  if int(p.healthy_subjects) < 0:
    raise ValueError(f"config.pretrain.healthy_subjects: must be >= 0, got {p.healthy_subjects}")
  if int(p.healthy_subjects) == 0:  # no healthy phantom (own data, "URN + MD" without pooling)
    return
  names = check_modalities(p.healthy_modalities, option="config.pretrain.healthy_modalities")
  extra = [n for n in names if n not in config.modalities]
  if extra:
    raise ValueError(f"config.pretrain.healthy_modalities: {extra} not among config.modalities "
                     f"{list(config.modalities)}")


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  check_config(config)
  m = config.model
  model = base.model_from_config(URN, m, num_modalities=len(modalities),
                                 num_classes=task.num_classes)
  multiple = max(unet.size_multiple(m.features), unet.size_multiple(m.encoder_features))
  if not pretrains(config):
    # "URN + MD": encoders trained end to end on segmentation, no pre-training stage.
    seg_loss = segmentation_loss(model, config, train_encoders=True)
    return base.Method(name="urn", model=model, loss_fn=seg_loss, modalities=modalities,
                       num_classes=task.num_classes, spatial_dims=len(config.data.patch_size),
                       size_multiple=multiple,
                       stages=(base.Stage("segmentation", seg_loss, config.train.num_steps,
                                          config.optimizer),))
  seg_loss = segmentation_loss(model, config,
                               train_encoders=config.variant == "md_pooled_finetuned")
  stages = (
      # The segmentation decoder is untrained here: validating it would only add noise.
      base.Stage("pretrain", pretrain_loss(model, config), config.pretrain.num_steps,
                 config.pretrain.optimizer, make_batches=pretrain_batches, validate=False),
      # Segmentation batches count from this stage's start, so its class-balanced phase covers
      # the first `balanced_fraction` of this stage, as for U-Net.
      base.Stage("segmentation", seg_loss, config.train.num_steps, config.optimizer,
                 step_offset=int(config.pretrain.num_steps)),
  )
  return base.Method(name="urn", model=model, loss_fn=seg_loss, modalities=modalities,
                     num_classes=task.num_classes, spatial_dims=len(config.data.patch_size),
                     size_multiple=multiple, stages=stages)
