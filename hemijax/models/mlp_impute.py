"""MLP imputation baseline (HeMIS paper): impute the missing modalities, then a full-data U-Net.

For every pattern of missing modalities (each non-empty proper subset of the M modalities being
available: 2^M - 2 patterns) a voxel-wise MLP (two hidden layers of 100 units, MSE) predicts the
missing intensities from the available ones. The segmentation U-Net is trained on full data
(no dropout); at test time it runs on the image whose missing channels the pattern's MLP filled.

Training is two `Stage`s: (1) the U-Net on full data; (2) all pattern MLPs at once, their
parameters stacked on a leading pattern axis and trained in one vmapped, jitted program on voxels
of the training volumes (the U-Net frozen: only `imputer` trains).

One network for both baselines (the paper's): with `config.impute.segmenter_from=WORKDIR`, a
trained `unet` run (the mean-filling baseline, `configs/unet.py`) of the same task, modalities and
model settings, stage 1 has 0 steps and the U-Net's parameters and batch statistics are that run's
(its best checkpoint, as evaluation picks it; `base.ParameterSource`, loaded by the training loop
when the run starts). With every modality present nothing is imputed, so the two baselines then
predict exactly the same.

Pattern p (0-based) is the subset whose bit code sum(2^i for available modality i) equals p + 1,
so the full set (code 2^M - 1) has no MLP and needs none. Every MLP reads all M channels with the
missing ones zeroed, so all patterns share one parameter shape; a pattern's MLP only ever sees
zeros in its missing slots, i.e. it is a function of the available modalities alone.

`per_modality` (config.impute.per_modality): the paper's reading, one single-output MLP per missing
modality per pattern (sum over patterns of their missing modalities: 28 for M = 4) instead of one
M-output MLP per pattern. Their parameters are stacked on (pattern, output modality) axes, so all
patterns still share one shape: slot (p, m) for a modality m present in pattern p is never read and
gets no gradient (its weight in the MSE is 0), so the trained MLPs are exactly the paper's.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hemijax.nn import layers
from hemijax.data.tasks import task_from_config
from hemijax.models import base, unet


def num_patterns(num_modalities: int) -> int:
  return 2 ** num_modalities - 2


def pattern_masks(num_modalities: int) -> np.ndarray:
  """(2^M - 2, M) bool: row p holds the available modalities of pattern p (bits of p + 1)."""
  codes = np.arange(1, 2 ** num_modalities - 1)
  return (codes[:, None] >> np.arange(num_modalities)[None, :]) & 1 == 1


def pattern_index(modality_mask):
  """(B, M) bool -> (B,) int32 pattern index; the full set maps to 0 (and is never imputed)."""
  num_modalities = modality_mask.shape[-1]
  code = jnp.sum(jnp.asarray(modality_mask, jnp.int32) << jnp.arange(num_modalities), axis=-1)
  return jnp.clip(code - 1, 0, num_patterns(num_modalities) - 1)


def mlp_apply(layer_params, x):
  """One pattern's voxel-wise MLP(s): x (..., M) -> (..., M); ReLU between the dense layers.

  Kernels (in, out): one M-output MLP; kernels (M, in, out) ending in out = 1: one single-output
  MLP per modality (per_modality), output m from MLP m.
  """
  if layer_params[0][0].ndim == 3:
    per_modality = jax.vmap(mlp_apply, in_axes=(0, None))(layer_params, x)   # (M, ..., 1)
    return jnp.moveaxis(per_modality[..., 0], 0, -1)
  for i, (kernel, bias) in enumerate(layer_params):
    x = x @ kernel + bias
    if i < len(layer_params) - 1:
      x = nn.relu(x)
  return x


class PatternMLPs(nn.Module):
  """2^M - 2 voxel-wise MLPs with parameters stacked on a leading pattern axis."""
  num_modalities: int
  hidden: Sequence[int] = (100, 100)
  per_modality: bool = False   # one single-output MLP per missing modality per pattern

  def setup(self):
    outputs = 1 if self.per_modality else self.num_modalities
    sizes = (self.num_modalities,) + tuple(self.hidden) + (outputs,)
    # Leading axes: pattern [, output modality]; each MLP's kernel gets its own fan-in.
    lead = ((num_patterns(self.num_modalities),) +
            ((self.num_modalities,) if self.per_modality else ()))
    init = nn.initializers.lecun_normal(batch_axis=tuple(range(len(lead))))
    self.layer_params = [
        (self.param(f"kernel_{i}", init, lead + (n_in, n_out)),
         self.param(f"bias_{i}", nn.initializers.zeros, lead + (n_out,)))
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]

  def __call__(self, image, modality_mask):
    """Fills the absent channels of `image (B, *spatial, M)` with the mask's pattern MLP.

    The pattern's parameters are gathered per batch item with `jnp` indexing, so one compiled
    function serves every subset. Present channels are returned unchanged; voxels where every
    present channel is 0 (outside the brain after preprocessing) stay 0.
    """
    expand = (slice(None),) + (None,) * (image.ndim - 2) + (slice(None),)
    present = modality_mask[expand]
    image = jnp.where(present, image, 0)
    index = pattern_index(modality_mask)
    x = image
    if self.per_modality:
      # (B, *sp, M_out, width): output modality m's MLP on every voxel.
      x = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (self.num_modalities, x.shape[-1]))
      bias_expand = expand + (slice(None),)
      equation = "b...mi,bmio->b...mo"
    else:
      bias_expand, equation = expand, "b...i,bio->b...o"
    for i, (kernel, bias) in enumerate(self.layer_params):
      x = jnp.einsum(equation, x, kernel[index]) + bias[index][bias_expand]
      if i < len(self.layer_params) - 1:
        x = nn.relu(x)
    if self.per_modality:
      x = x[..., 0]
    inside = jnp.any(image != 0, axis=-1, keepdims=True)
    return jnp.where(present, image, jnp.where(inside, x, 0))


def pattern_loss(layer_params, pattern_mask, voxels, available):
  """MSE of one pattern's MLP on the voxels whose files hold all of the pattern's inputs.

  voxels (N, M) intensities, available (N, M) bool; the error counts on the pattern's missing
  modalities that the voxel's files hold.
  """
  usable = jnp.all(available | ~pattern_mask, axis=-1, keepdims=True)
  prediction = mlp_apply(layer_params, jnp.where(pattern_mask, voxels, 0))
  weight = (usable & available & ~pattern_mask).astype(jnp.float32)
  return jnp.sum(weight * jnp.square(prediction - voxels)) / jnp.maximum(jnp.sum(weight), 1.0)


def stacked_layers(imputer_params):
  """PatternMLPs parameters -> [(kernel (P, in, out), bias (P, out)), ...]."""
  count = len([k for k in imputer_params if k.startswith("kernel_")])
  return [(imputer_params[f"kernel_{i}"], imputer_params[f"bias_{i}"]) for i in range(count)]


def pattern_losses(imputer_params, voxels, available):
  """(P,) per-pattern MSE, all patterns in one vmapped computation."""
  num_modalities = voxels.shape[-1]
  masks = jnp.asarray(pattern_masks(num_modalities))
  return jax.vmap(pattern_loss, in_axes=(0, 0, None, None))(
      stacked_layers(imputer_params), masks, voxels, available)


class MLPImputeUNet(unet.UNetSettings, kw_only=True):
  """Imputation of the absent channels by the pattern's MLP, then the full-data U-Net."""
  num_modalities: int
  num_classes: int
  hidden: Sequence[int] = (100, 100)   # config.impute.hidden
  per_modality: bool = False           # config.impute.per_modality
  conv_impl: str = "auto"

  def setup(self):
    self.imputer = PatternMLPs(self.num_modalities, tuple(self.hidden), self.per_modality)
    self.segmenter = unet.UNet(out_channels=self.num_classes,
                               conv=layers.conv_factory(self.conv_impl),
                               **base.settings_of(self, unet.UNetSettings))

  def segment_full(self, image, train: bool = False):
    """The U-Net alone on a complete image (stage 1)."""
    return self.segmenter(image, train)

  def __call__(self, image, modality_mask, train: bool = False):
    return self.segmenter(self.imputer(image, modality_mask), train)


def segmentation_loss(model, config) -> base.LossFn:
  """Stage 1: the U-Net on the complete images (no dropout, nothing to impute)."""

  def loss_fn(params, model_state, batch, key, step):
    del key, step
    variables = {"params": params, **model_state}
    image = base.zero_missing(batch["image"], batch["modality_mask"])
    logits, new_state = model.apply(variables, image, train=True, method="segment_full",
                                    mutable=["batch_stats"])
    loss, terms = base.batch_segmentation_loss(logits, batch, config.loss)
    return loss, (terms, dict(new_state))

  return loss_fn


def imputation_loss(params, model_state, batch, key, step):
  """Stage 2: the sum of the per-pattern MSEs, so each MLP gets exactly its own gradient."""
  del key, step
  per_pattern = pattern_losses(params["imputer"], batch["voxels"], batch["available"])
  return jnp.sum(per_pattern), ({"imputation_mse": jnp.mean(per_pattern)}, model_state)


def voxel_batches(config, load_split):
  """`step -> {"voxels": (N, M), "available": (N, M)}`: brain voxels of the training volumes.

  Voxels are drawn uniformly over all brain voxels of all training volumes, deterministically
  in (seed, step).
  """
  volumes = load_split("train")
  flat_brain = [np.flatnonzero(np.asarray(v.brain)) for v in volumes]
  sizes = np.array([f.size for f in flat_brain], np.float64)
  if not sizes.sum():
    raise ValueError("mlp_impute: the training volumes hold no brain voxel")
  num_voxels = int(config.impute.voxels_per_step)

  def make_batch(step):
    rng = np.random.default_rng((config.seed, 104729, step))
    counts = rng.multinomial(num_voxels, sizes / sizes.sum())
    voxels, available = [], []
    for vol, flat, n in zip(volumes, flat_brain, counts):
      if not n:
        continue
      picks = np.sort(flat[rng.integers(0, flat.size, n)])
      voxels.append(np.asarray(vol.image).reshape(-1, vol.image.shape[-1])[picks])
      available.append(np.broadcast_to(vol.available, (n, vol.available.size)))
    return {"voxels": np.concatenate(voxels).astype(np.float32),
            "available": np.concatenate(available).astype(bool)}

  return make_batch


def build(config) -> base.Method:
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  if len(modalities) < 2:
    raise ValueError("config.modalities: MLP imputation needs at least two modalities")
  unet.check_features(config.model.features)
  hidden = tuple(config.impute.hidden)
  if not hidden or min(hidden) < 1:
    raise ValueError(f"config.impute.hidden: expected positive layer widths, got {hidden}")
  model = base.model_from_config(MLPImputeUNet, config.model, num_modalities=len(modalities),
                                 num_classes=task.num_classes, hidden=hidden,
                                 per_modality=bool(config.impute.get("per_modality", False)))
  seg_loss = segmentation_loss(model, config)
  sources = segmenter_sources(config)
  stages = (
      # The combined model's validation would score untrained MLPs here; validate after stage 2.
      # 0 steps when the U-Net comes from a trained run (it also shapes the initial variables).
      base.Stage("segmentation", seg_loss, 0 if sources else config.train.num_steps,
                 config.optimizer, validate=False),
      base.Stage("imputation", imputation_loss, config.impute.num_steps, config.impute.optimizer,
                 trainable=("imputer",), make_batches=voxel_batches),
  )
  return base.Method(name="mlp_impute", model=model, loss_fn=seg_loss, modalities=modalities,
                     num_classes=task.num_classes, spatial_dims=len(config.data.patch_size),
                     size_multiple=unet.size_multiple(config.model.features), stages=stages,
                     parameter_sources=sources)


SEGMENTER_OPTION = "config.impute.segmenter_from"


def segmenter_sources(config) -> tuple[base.ParameterSource, ...]:
  """The mean-filling baseline's U-Net as this model's segmenter, if `impute.segmenter_from`."""
  workdir = config.impute.get("segmenter_from", None)
  if not workdir or workdir == "None":   # `--config.impute.segmenter_from=None` arrives as text
    return ()
  return (base.ParameterSource(
      option=SEGMENTER_OPTION, workdir=str(workdir), method="unet",
      # `unet.ModalityUNet` holds its U-Net as the sub-module "unet"; here it is "segmenter".
      source_path=("unet",), target_path=("segmenter",),
      same=("task", "task_spec", "modalities", "model"), step="best",
      hint=(f"train it first: python train.py --config configs/unet.py:"
            f"{config.get('preset', 'demo')} --workdir {workdir}; or set "
            f"{SEGMENTER_OPTION}=None to train a U-Net of its own")),)
