"""PIMMS (Varsavsky et al., 2018): permutation-invariant segmentation of a set of unlabeled scans.

A modality classifier f_mod (a residual CNN) gives, for each input scan n on its own, a
distribution S_{:,n} over the M known modalities. The N scans are mapped to M modality slots,

  soft:  x̂_m = Σ_n S_mn x_n
  hard:  x̂_m = Σ_n 1[argmax_m' S_m'n = m] x_n,

The hard mapping makes a slot that no present scan's argmax points to unavailable; the soft
mapping (Eq. 1) feeds every slot its weighted sum, so every slot is available whenever a scan is
(`config.model.soft_availability`: "all", the paper's reading; "argmax", the hard rule, gives the
slots no argmax picks neither input nor gradient). The HeMIS back ends,
abstraction layer and front end (`hemijax.models.hemis.HeMIS`) segment from the slots. Every
per-scan operation is applied to each scan alone and scans only meet in sums over n, so permuting
the scans (together with their mask entries) changes nothing but float rounding, and a masked
padding scan contributes exact zeros: one compiled function serves every N up to
`config.model.max_scans` (`pad_scans`).

Variants (`config.variant`):
  hemis   the true modality of each scan (`scan_modality`; default: scan n is modality n), no
          classifier: the HeMIS baseline.
  soft    soft mapping; classifier trained first (cross-entropy), then frozen while the
          segmentation network trains: two `Stage`s.
  hard    hard mapping; otherwise as `soft`.
  online  soft mapping; classifier and segmentation trained together with
          L = L_seg + λ(i) L_class, λ(i) = λ0 exp(-γ i).

Training batches follow the usual contract (`image (B, *sp, M)` in the config's modality order);
the losses drop modalities with the config's sampler and shuffle the remaining ones into scan
order with a per-example random permutation drawn from the step key.
"""
from __future__ import annotations

import copy
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hemijax.nn import modality_dropout as dropout_lib
from hemijax.nn import layers
from hemijax.nn import losses
from hemijax.data import sampling
from hemijax.data.tasks import task_from_config
from hemijax.models import base
from hemijax.models.hemis import HeMIS, HeMISSettings

VARIANTS = ("hemis", "soft", "hard", "online")
CLASSIFIER = "modality_classifier"   # top-level parameter names, for `Stage.trainable`
SEGMENTER = "segmenter"


# ---------------------------------------------------------------------------------------------
# The modality classifier


class ResidualBlock(nn.Module):
  """conv-ReLU-conv plus a skip connection, then ReLU (a 1x1 conv on the skip if widths differ).

  The branch's last convolution starts at zero, so a deep stack starts as the identity and trains
  without batch normalisation (no batch statistics: each scan is classified on its own).
  """
  features: int
  conv: layers.ModuleDef
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    skip = x
    if x.shape[-1] != self.features:
      skip = self.conv(self.features, 1, name="project")(x)
    y = nn.relu(self.conv(self.features, self.kernel_size)(x))
    y = self.conv(self.features, self.kernel_size, kernel_init=nn.initializers.zeros)(y)
    return nn.relu(skip + y)


class ModalityClassifier(nn.Module):
  """f_mod: one scan (B, *sp, 1) -> logits over the M modalities (B, M).

  A stem convolution, then stages of residual blocks (stage s has `blocks[s]` blocks of
  `features[s]` maps; 2x max-pooling between stages), global average pooling and a dense layer:
  1 + 2 * sum(blocks) + 1 weight layers (the paper's 36: blocks (3, 4, 6, 4)).
  """
  num_modalities: int
  conv: layers.ModuleDef
  features: Sequence[int]
  blocks: Sequence[int]
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(self.features[0], self.kernel_size)(x))
    for stage, (width, count) in enumerate(zip(self.features, self.blocks)):
      if stage:
        x = layers.max_pool(x, 2)
      for _ in range(count):
        x = ResidualBlock(width, self.conv, self.kernel_size)(x)
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    return nn.Dense(self.num_modalities)(x)


# ---------------------------------------------------------------------------------------------
# Scans -> modality slots (pure)


def scan_assignment(scan_probs, scan_mask, hard: bool):
  """The mapping matrix, scans on axis 1: `A[b, n, m] = S_mn` (soft) or 1[argmax S_:n = m] (hard).

  `scan_probs (B, N, M)` are the classifier's probabilities (or one-hot true labels),
  `scan_mask (B, N)` marks real scans; rows of masked scans are exactly zero.
  """
  if hard:
    scan_probs = jax.nn.one_hot(jnp.argmax(scan_probs, axis=-1), scan_probs.shape[-1],
                                dtype=scan_probs.dtype)
  return jnp.where(scan_mask[..., None], scan_probs, 0)


AVAILABILITY_RULES = ("all", "argmax")


def slot_availability(scan_probs, scan_mask, rule: str = "argmax"):
  """(B, M) bool: which slots the segmenter reads.

  "argmax": slot m is available iff some present scan's most probable modality is m (hard mapping).
  "all": every slot, if any scan is present (soft mapping, Eq. 1: each slot is a weighted sum).
  """
  if rule == "all":
    return jnp.broadcast_to(jnp.any(scan_mask, axis=1, keepdims=True), scan_probs.shape[::2])
  winners = jax.nn.one_hot(jnp.argmax(scan_probs, axis=-1), scan_probs.shape[-1], dtype=bool)
  return jnp.any(winners & scan_mask[..., None], axis=1)


def map_to_slots(image, assignment):
  """x̂_m = Σ_n A[n, m] x_n: `image (B, *sp, N)`, `assignment (B, N, M)` -> `(B, *sp, M)`."""
  return jnp.einsum("b...n,bnm->b...m", image, assignment.astype(image.dtype))


def pad_scans(image, scan_mask, max_scans: int):
  """Pads the scan axis of `image (B, *sp, N)` and `scan_mask (B, N)` to `max_scans` masked zero
  scans, so every N <= max_scans has the same shapes (NumPy or JAX arrays; raises past the max)."""
  n = image.shape[-1]
  if n > max_scans:
    raise ValueError(f"{n} scans given; this model takes at most {max_scans} "
                     "(config.model.max_scans)")
  xp = jnp if isinstance(image, jax.Array) else np
  image = xp.concatenate([image, xp.zeros(image.shape[:-1] + (max_scans - n,), image.dtype)], -1)
  scan_mask = xp.concatenate([xp.asarray(scan_mask, bool),
                              xp.zeros(scan_mask.shape[:-1] + (max_scans - n,), bool)], -1)
  return image, scan_mask


# ---------------------------------------------------------------------------------------------
# The model


class PIMMS(HeMISSettings):
  """`__call__(image (B, *sp, N), modality_mask (B, N))`: the channels are unlabeled scans.

  `scan_modality (B, N)` int (the hemis variant only) gives each scan's true modality; without it,
  scan n is modality n (the evaluation code passes slots in the config's order). The HeMIS
  settings (`HeMISSettings`) are the segmenter's.
  """
  variant: str = "soft"   # config.variant
  # Inputs of unnamed scans are padded to this many (`pad_scans`): one compiled function for any N.
  max_scans: int = 6
  classifier_features: Sequence[int] = (16, 32, 64)
  classifier_blocks: Sequence[int] = (1, 1, 1)
  classifier_kernel: int = 3
  # Which slots a soft mapping makes available (`slot_availability`); the hard variant and the
  # hemis baseline always use "argmax".
  soft_availability: str = "all"

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"config.variant: unknown PIMMS variant {self.variant!r}; "
                       f"choose one of {VARIANTS}")
    if self.soft_availability not in AVAILABILITY_RULES:
      raise ValueError(f"config.model.soft_availability: unknown rule {self.soft_availability!r}; "
                       f"choose one of {AVAILABILITY_RULES}")
    if self.variant != "hemis":
      self.modality_classifier = ModalityClassifier(
          self.num_modalities, layers.conv_factory(self.conv_impl),
          tuple(self.classifier_features), tuple(self.classifier_blocks), self.classifier_kernel)
    self.segmenter = HeMIS(**base.settings_of(self, HeMISSettings))

  def classify(self, image):
    """Per-scan modality logits `(B, N, M)` of `image (B, *sp, N)`; each scan is seen alone."""
    batch, num_scans = image.shape[0], image.shape[-1]
    scans = jnp.moveaxis(image, -1, 1).reshape((batch * num_scans,) + image.shape[1:-1] + (1,))
    return self.modality_classifier(scans).reshape(batch, num_scans, self.num_modalities)

  def segment_and_classify(self, image, modality_mask, train=False, scan_modality=None):
    """(segmentation logits `(B, *sp, C)`, per-scan modality logits `(B, N, M)` or None)."""
    del train  # no dropout or batch statistics
    image = base.zero_missing(image, modality_mask)
    if self.variant == "hemis":
      if scan_modality is None:
        if image.shape[-1] != self.num_modalities:
          raise ValueError(f"the hemis variant needs scan_modality for {image.shape[-1]} scans "
                           f"(without it, scan n is modality n of {self.num_modalities})")
        scan_modality = jnp.broadcast_to(jnp.arange(self.num_modalities), modality_mask.shape)
      scan_logits = None
      scan_probs = jax.nn.one_hot(scan_modality, self.num_modalities, dtype=image.dtype)
    else:
      scan_logits = self.classify(image)
      scan_probs = jax.nn.softmax(scan_logits.astype(jnp.float32), axis=-1).astype(image.dtype)
    return self.segment_mapped(image, modality_mask, scan_probs), scan_logits

  def segment_mapped(self, image, modality_mask, scan_probs):
    """Segmentation logits of scans `image (B, *sp, N)` mapped to slots by `scan_probs (B, N, M)`."""
    soft = self.variant in ("soft", "online")
    assignment = scan_assignment(scan_probs, modality_mask, hard=not soft)
    rule = self.soft_availability if soft else "argmax"
    slot_mask = slot_availability(scan_probs, modality_mask, rule)
    return self.segmenter(map_to_slots(image, assignment), slot_mask)

  def __call__(self, image, modality_mask, train=False, scan_modality=None):
    return self.segment_and_classify(image, modality_mask, train, scan_modality)[0]


# ---------------------------------------------------------------------------------------------
# Losses


def shuffle_into_scans(image, kept, key):
  """Slots `(B, *sp, M)` -> scans in a random order per example: (scans, scan_mask, true modality).

  Scan n of example b holds slot `perm[b, n]`; the permutation is drawn from `key`.
  """
  batch, m = kept.shape
  perm = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(key, batch))
  # Multiplying by a permutation matrix moves values exactly (x*1 + 0s).
  scans = jnp.einsum("b...m,bnm->b...n", image, jax.nn.one_hot(perm, m, dtype=image.dtype))
  return scans, jnp.take_along_axis(kept, perm, axis=1), perm


def classification_loss(scan_logits, true_modality, scan_mask):
  """Mean categorical cross-entropy over the present scans, and their accuracy."""
  log_probs = jax.nn.log_softmax(scan_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, true_modality[..., None], axis=-1)[..., 0]
  weight = scan_mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  correct = (jnp.argmax(scan_logits, axis=-1) == true_modality).astype(jnp.float32)
  return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count


def class_loss_weight(step, initial: float, decay: float):
  """λ(i) = λ0 exp(-γ i)."""
  return initial * jnp.exp(-decay * jnp.asarray(step, jnp.float32))


def make_segmentation_loss(model: PIMMS, config, with_classifier_term: bool,
                           step_offset: int = 0) -> base.LossFn:
  """L_seg (Dice, plus optional cross-entropy) on shuffled, dropped scans; `with_classifier_term`
  adds λ(i) L_class (the online variant). The dropout curriculum and λ(i) count steps from
  `step_offset` (the stage's first step)."""
  sampler = dropout_lib.make_sampler(config.dropout)
  loss_cfg = config.loss
  hemis_variant = model.variant == "hemis"

  def loss_fn(params, model_state, batch, key, step):
    step = step - step_offset
    dropout_key, shuffle_key = jax.random.split(key)
    kept = sampler(dropout_key, batch["modality_mask"], step)
    scans, scan_mask, true_modality = shuffle_into_scans(batch["image"], kept, shuffle_key)
    logits, scan_logits = model.apply(
        {"params": params, **model_state}, scans, scan_mask, train=True,
        scan_modality=true_modality if hemis_variant else None, method="segment_and_classify")
    seg, terms = base.batch_segmentation_loss(logits, batch, loss_cfg)
    metrics = {**terms, "segmentation_loss": seg, "modalities_kept": base.modalities_kept(kept)}
    loss = seg
    if scan_logits is not None:
      class_loss, accuracy = classification_loss(scan_logits, true_modality, scan_mask)
      metrics.update(classifier_loss=class_loss, classifier_accuracy=accuracy)
      if with_classifier_term:
        weight = class_loss_weight(step, loss_cfg.class_weight, loss_cfg.class_weight_decay)
        loss = seg + weight * class_loss
        metrics["class_loss_weight"] = weight
    metrics["loss"] = loss
    return loss, (metrics, model_state)

  return loss_fn


def classifier_batches(config, load_split):
  """The classifier stage's batches: the config's patch sampler at `config.classifier.batch_size`
  (None: config.data.batch_size)."""
  size = config.classifier.get("batch_size", None)
  if size is None:
    return sampling.make_patch_batches(config, load_split("train"))
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.data.batch_size = int(size)
  return sampling.make_patch_batches(cfg, load_split("train"))


def make_classifier_loss(model: PIMMS) -> base.LossFn:
  """Cross-entropy of f_mod on every available scan of the batch, in a random order."""

  def loss_fn(params, model_state, batch, key, step):
    del step
    scans, scan_mask, true_modality = shuffle_into_scans(batch["image"], batch["modality_mask"],
                                                         key)
    scan_logits = model.apply({"params": params, **model_state}, scans, method="classify")
    loss, accuracy = classification_loss(scan_logits, true_modality, scan_mask)
    return loss, ({"loss": loss, "classifier_accuracy": accuracy}, model_state)

  return loss_fn


# ---------------------------------------------------------------------------------------------
# Build


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  m, variant = config.model, config.variant
  if variant not in VARIANTS:
    raise ValueError(f"config.variant: unknown PIMMS variant {variant!r}; "
                     f"choose one of {VARIANTS}")
  batch = config.classifier.get("batch_size", None)
  if batch is not None and int(batch) < 1:
    raise ValueError(f"config.classifier.batch_size: must be >= 1 or None, got {batch}")
  reduction = config.loss.get("dice_reduction", "batch")
  if reduction not in losses.DICE_REDUCTIONS:
    raise ValueError(f"config.loss.dice_reduction: unknown reduction {reduction!r}; choose one of "
                     f"{losses.DICE_REDUCTIONS}")
  if int(m.max_scans) < 1:
    raise ValueError(f"config.model.max_scans: must be >= 1, got {m.max_scans}")
  model = base.model_from_config(PIMMS, m, num_modalities=len(modalities),
                                 num_classes=task.num_classes, variant=variant)
  if len(m.classifier_features) != len(m.classifier_blocks):
    raise ValueError("config.model.classifier_blocks: needs one count per classifier_features "
                     f"entry, got {tuple(m.classifier_blocks)} for {tuple(m.classifier_features)}")
  loss_fn = make_segmentation_loss(model, config, with_classifier_term=variant == "online")
  stages = ()
  if variant in ("soft", "hard"):
    # Offline: the classifier first, then the segmentation network with the classifier frozen;
    # the segmentation stage counts its steps from its start (curriculum, sampling phases).
    offset = int(config.classifier.num_steps)
    stages = (
        base.Stage("classifier", make_classifier_loss(model), offset,
                   config.classifier.optimizer, trainable=(CLASSIFIER,), validate=False,
                   make_batches=classifier_batches),
        base.Stage("segmentation", make_segmentation_loss(model, config, False, offset),
                   config.train.num_steps, config.optimizer, trainable=(SEGMENTER,),
                   step_offset=offset),
    )
  return base.Method(name="pimms", model=model, loss_fn=loss_fn, modalities=modalities,
                     num_classes=task.num_classes, spatial_dims=len(config.data.patch_size),
                     stages=stages)
