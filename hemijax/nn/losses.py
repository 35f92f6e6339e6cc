"""Losses on channels-last logits `(B, *spatial, C)` and integer labels `(B, *spatial)`.

`valid (B, *spatial)` marks voxels inside the volume; padding outside it never counts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _valid_weights(labels, valid):
  if valid is None:
    return jnp.ones(labels.shape, jnp.float32)
  return jnp.asarray(valid, jnp.float32)


def cross_entropy(logits, labels, valid=None, class_weights=None):
  """Voxel-wise (optionally class-weighted) cross-entropy, averaged over valid voxels.

  With class weights the average is the weighted mean (sum w_y * ce / sum w_y), as in PyTorch.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = _valid_weights(labels, valid)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[labels]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def batch_class_weights(labels, num_classes, valid=None):
  """Per-batch inverse-frequency class weights (disentanglement paper): w_c = 1 - n_c / n."""
  weights = _valid_weights(labels, valid)
  one_hot = jax.nn.one_hot(labels, num_classes) * weights[..., None]
  counts = jnp.sum(one_hot, axis=tuple(range(one_hot.ndim - 1)))
  return 1.0 - counts / jnp.maximum(jnp.sum(counts), 1.0)


DICE_REDUCTIONS = ("batch", "example")


def soft_dice(logits, labels, valid=None, include_background=False, smooth=1e-5, reduction="batch"):
  """1 - mean soft Dice over classes (probabilities from softmax).

  `reduction` says over what each class's Dice is computed:
    "batch"    one Dice per class, its sums pooled over the whole batch (the default);
    "example"  one Dice per (example, class), then the mean over both (nnU-Net's
               `batch_dice=False`).
               An example's poor Dice then weighs 1/B of the loss whatever the rest of the batch
               does; an example without the class scores 1 only if it predicts none of it.
  """
  if reduction not in DICE_REDUCTIONS:
    raise ValueError(f"soft_dice: unknown reduction {reduction!r}; choose one of {DICE_REDUCTIONS}")
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  target = jax.nn.one_hot(labels, num_classes)
  weights = _valid_weights(labels, valid)[..., None]
  axes = tuple(range(0 if reduction == "batch" else 1, logits.ndim - 1))
  intersection = jnp.sum(probs * target * weights, axis=axes)
  denominator = jnp.sum((probs + target) * weights, axis=axes)
  dice = (2 * intersection + smooth) / (denominator + smooth)   # (C,) or (B, C)
  if not include_background:
    dice = dice[..., 1:]
  return 1.0 - jnp.mean(dice)


JACCARD_FORMS = ("eq6", "soft_union", "min_max")


def probabilistic_jaccard(probs, target, valid=None, class_weights=None, form="eq6", smooth=1e-5):
  """Weighted probabilistic Jaccard loss L = 1 - sum_c w_c J_c (w normalised to sum 1).

  `probs` and `target` (one-hot or soft) have the same shape `(B, *spatial, C)`; sums run over the
  valid voxels of the whole batch. `form` picks J_c:
    "eq6"         sum g p / sum (g^2 + p^2 - g p)   (Dorent et al. 2019, Eq. 6; zero loss iff p == g)
    "soft_union"  sum g p / sum (g + p - g p)       (equal to eq6 on one-hot g and p; not zero at p == g)
    "min_max"     sum min(g, p) / sum max(g, p)     (Jaccard of fuzzy sets; zero loss iff p == g;
                                                     equal to soft_union on one-hot g)
  """
  if form not in JACCARD_FORMS:
    raise ValueError(f"probabilistic_jaccard: unknown form {form!r}; choose one of {JACCARD_FORMS}")
  num_classes = probs.shape[-1]
  weights = (_valid_weights(target[..., 0], valid))[..., None]
  axes = tuple(range(probs.ndim - 1))
  if form == "min_max":
    overlap, union = jnp.minimum(probs, target), jnp.maximum(probs, target)
  elif form == "soft_union":
    overlap, union = probs * target, probs + target - probs * target
  else:
    overlap, union = probs * target, target**2 + probs**2 - probs * target
  jaccard = (jnp.sum(overlap * weights, axis=axes) + smooth) / (
      jnp.sum(union * weights, axis=axes) + smooth)
  class_weights = (jnp.ones(num_classes) if class_weights is None
                   else jnp.asarray(class_weights, jnp.float32))
  return 1.0 - jnp.sum(class_weights * jaccard) / jnp.sum(class_weights)


def gaussian_kl(mean, log_var):
  """KL(N(mean, exp(log_var)) || N(0, I)), summed over the code, averaged over the batch."""
  kl = 0.5 * jnp.sum(jnp.exp(log_var) + mean**2 - 1.0 - log_var, axis=-1)
  return jnp.mean(kl)


def masked_l1(prediction, target, valid=None):
  """Mean absolute error over valid entries (valid broadcastable to prediction)."""
  if valid is None:
    return jnp.mean(jnp.abs(prediction - target))
  valid = jnp.broadcast_to(jnp.asarray(valid, jnp.float32), prediction.shape)
  return jnp.sum(jnp.abs(prediction - target) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def segmentation_loss(logits, labels, valid=None, *, ce_weight, dice_weight, class_weights=None,
                      dice_reduction="batch"):
  """ce_weight * cross-entropy + dice_weight * soft Dice: every method's segmentation objective.

  `dice_reduction` is `soft_dice`'s `reduction` (default "batch": Dice pooled over the batch).
  Returns (loss, terms); `terms` holds both terms ("cross_entropy", "soft_dice_loss"), whatever
  their weights, for the training metrics.
  """
  ce = cross_entropy(logits, labels, valid, class_weights)
  dice = soft_dice(logits, labels, valid, reduction=dice_reduction)
  return ce_weight * ce + dice_weight * dice, {"cross_entropy": ce, "soft_dice_loss": dice}
