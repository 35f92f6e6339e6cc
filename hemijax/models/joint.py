"""Joint lesion and tissue segmentation from task-specific hetero-modal datasets (Dorent et al., 2019).

Two datasets, each annotated for one task and imaged with its own protocol, train one model that
segments tissues and lesions in the label space of `config.task`: `tissue` (background, csf, gm,
wm, lesion) or the paper's `tissue6` (background, which holds the CSF outside the ventricles, wm,
gm, basal ganglia, ventricles, cerebellum, brainstem, lesion); any task with a "lesion" class:
  * a tissue set of control scans: T1 only, labels background and tissue classes;
  * a lesion set: T1 + FLAIR, lesion labels only (other voxels carry no tissue label).

Network: HighResNet (Li et al., 2017: residual blocks of dilated 3x3x3 convolutions at dilations 1, 2,
4, constant resolution) made hetero-modal: its first stage runs per modality (parameters stacked on a
modality axis, applied with vmap) and is averaged over the available modalities (masked mean), so it
accepts T1 alone or T1 + FLAIR.

Loss: the probabilistic Jaccard loss of the paper's Eq. 6, L = 1 - sum_c w_c J_c with
J_c = sum g p / sum (g^2 + p^2 - g p) (`hemijax.nn.losses.probabilistic_jaccard`) and class weights
w (`class_weights`: `config.loss.class_weights`, normalised to sum 1; by default 1/2 for the lesion
and 1/(2 n_tissue) for each other class), split into a tissue part L^t and a lesion part L^l. The
empirical risk is
  R^t_2 = L^t(h(T1), y^t)                on control scans (tissue labels),
  R^l   = L^l(h(T1, FLAIR), y^l)         on lesion scans (only the lesion class is scored),
  R^t_1 = L^t(h(T1, FLAIR), h(T1))       on lesion scans: the inter-modality consistency term that
                                         bounds the unobservable tissue risk there (triangle
                                         inequality), skipped before `consistency_start`;
                                         `consistency_stop_gradient` (not in the issue) makes
                                         h(T1) a constant target.
Eq. 6 is zero iff p == t, so the paper uses the same L^t for the soft target of R^t_1;
`config.loss.jaccard_form` (supervised terms) and `config.loss.consistency_form` (R^t_1) also offer
"soft_union" (sum p t / sum (p + t - p t)) and "min_max" (sum min / sum max, fuzzy sets).

Variants (`config.variant`): "joint" (all three terms), "tissue_only" (R^t_2; the head predicts the
tissue classes only and the network reads T1 only, at training and evaluation) and "lesion_only" (R^l; the head predicts non-lesion vs lesion), the
task-specific baselines with the same network.
"""
from __future__ import annotations

import copy
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hemijax.nn import fusion
from hemijax.nn import layers
from hemijax.nn import losses
from hemijax.data import datasets, sampling
from hemijax.data.tasks import get_task, task_from_config
from hemijax.models import base

VARIANTS = ("joint", "tissue_only", "lesion_only")
NORMS = ("instance", "none")
# Logit of a class the head does not predict (task-specific baselines): softmax gives it 0.
ABSENT_LOGIT = -1e4
LESION_CLASS = "lesion"    # the class of the joint label space (config.task) the lesion set labels
LESION_SET_TASK = "wmh"    # the lesion dataset's task (label 1 = lesion)
SETS = ("tissue", "lesion")


# ----------------------------------------------------------------------------------------------
# Network

def _norm(kind: str):
  """Instance normalisation (per sample and channel: the same for T1 alone and T1 + FLAIR inputs,
  unlike batch statistics), or none."""
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1)
  return lambda x: x


def split_subgrids(x, dilation: int):
  """(B, *sp, C) -> (d^n B, *ceil(sp / d), C): the d^n interleaved sub-grids as batch items.

  A 'SAME' convolution with dilation d equals a dilation-1 convolution of each sub-grid (the
  sub-grids are zero-padded at the end to a multiple of d, which 'SAME' zero padding implies).
  """
  d = dilation
  b, *spatial, c = x.shape
  n = len(spatial)
  x = jnp.pad(x, [(0, 0)] + [(0, (-s) % d) for s in spatial] + [(0, 0)])
  coarse = [s // d for s in x.shape[1:-1]]
  x = x.reshape([b] + [v for s in coarse for v in (s, d)] + [c])
  phases, grid = [2 + 2 * i for i in range(n)], [1 + 2 * i for i in range(n)]
  x = x.transpose(phases + [0] + grid + [2 * n + 1])
  return x.reshape([d**n * b] + coarse + [c])


def merge_subgrids(y, dilation: int, batch: int, spatial):
  """Inverse of `split_subgrids`: (d^n B, *coarse, C) -> (B, *spatial, C)."""
  d, n = dilation, len(spatial)
  coarse, c = list(y.shape[1:-1]), y.shape[-1]
  y = y.reshape([d] * n + [batch] + coarse + [c])
  order = [n] + [a for i in range(n) for a in (n + 1 + i, i)] + [2 * n + 1]
  y = y.transpose(order).reshape([batch] + [s * d for s in coarse] + [c])
  return y[(slice(None),) + tuple(slice(0, s) for s in spatial)]


class BlockSettings(nn.Module):
  """Settings every convolution block of the network shares.

  space_to_batch: run each dilated convolution as a dilation-1 convolution of the interleaved
  sub-grids (the same numbers; on XLA CPU about 3-4x faster than a dilated convolution).
  """
  kernel_size: int = 3
  norm: str = "instance"
  conv: layers.ModuleDef = layers.Conv
  space_to_batch: bool = True


class ResidualBlock(BlockSettings, kw_only=True):
  """Pre-activation residual block: 2 x (norm, ReLU, dilated conv); a 1x1x1 projection if the
  widths differ."""
  features: int
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    rearrange = self.space_to_batch and self.dilation > 1
    y = x
    for _ in range(2):
      y = nn.relu(_norm(self.norm)(y))
      conv = self.conv(self.features, self.kernel_size, dilation=1 if rearrange else self.dilation)
      if rearrange:
        y = merge_subgrids(conv(split_subgrids(y, self.dilation)), self.dilation, y.shape[0],
                           y.shape[1:-1])
      else:
        y = conv(y)
    if x.shape[-1] != self.features:
      x = self.conv(self.features, 1, use_bias=False)(x)
    return x + y


class ModalityStage(BlockSettings, kw_only=True):
  """One modality's first stage: conv, norm, ReLU, then the residual blocks of the first stages."""
  features: Sequence[int]
  dilations: Sequence[int]
  blocks_per_stage: int

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.features[0], self.kernel_size)(x)
    x = nn.relu(_norm(self.norm)(x))
    settings = base.settings_of(self, BlockSettings)
    for width, dilation in zip(self.features, self.dilations):
      for _ in range(self.blocks_per_stage):
        x = ResidualBlock(features=width, dilation=dilation, **settings)(x)
    return x


class HeteroModalHighResNet(nn.Module):
  """HighResNet whose first `modality_stages` stages run per modality, fused by a masked mean.

  `head_classes`: the class ids (of `num_classes`) the head predicts; the others get ABSENT_LOGIT,
  so a task-specific model lives in the joint label space. None: all classes.
  """
  num_modalities: int
  num_classes: int
  features: Sequence[int] = (16, 32, 64)
  dilations: Sequence[int] = (1, 2, 4)
  blocks_per_stage: int = 3
  modality_stages: int = 1
  head_features: int = 80
  kernel_size: int = 3
  norm: str = "instance"
  head_classes: Sequence[int] | None = None
  # Slots the network reads (bool per modality); None: all. The tissue-only baseline reads T1 only,
  # so its never-trained FLAIR branch is not averaged into T1 + FLAIR inputs.
  input_slots: Sequence[bool] | None = None
  conv_impl: str = "auto"
  space_to_batch: bool = True

  def setup(self):
    k = self.modality_stages
    conv = layers.conv_factory(self.conv_impl)
    settings = dict(kernel_size=self.kernel_size, norm=self.norm, conv=conv,
                    space_to_batch=self.space_to_batch)
    self.modality_stage = layers.per_modality(ModalityStage, self.num_modalities)(
        features=tuple(self.features[:k]), dilations=tuple(self.dilations[:k]),
        blocks_per_stage=self.blocks_per_stage, **settings)
    self.shared_blocks = [
        ResidualBlock(features=width, dilation=dilation, **settings)
        for width, dilation in zip(self.features[k:], self.dilations[k:])
        for _ in range(self.blocks_per_stage)]
    self.final_norm = _norm(self.norm)
    self.head_norm = _norm(self.norm)
    self.head = conv(self.head_features, 1)
    self.classifier = conv(len(self._head_classes()), 1)

  def encode(self, image, train=False):
    """(B, *sp, M) -> per-modality first-stage features (B, M, *sp, C)."""
    return layers.apply_per_modality(self.modality_stage, image)

  def _head_classes(self) -> tuple[int, ...]:
    return tuple(range(self.num_classes)) if self.head_classes is None else tuple(self.head_classes)

  def decode(self, features, modality_mask, train=False):
    """Masked mean over the available modalities, the shared dilated stages, then the head."""
    if self.input_slots is not None:
      modality_mask = modality_mask & jnp.asarray(self.input_slots, bool)[None]
    mask = fusion.expand_modality_mask(modality_mask, features.ndim)
    x = fusion.masked_mean(features, mask, axis=1)
    for block in self.shared_blocks:
      x = block(x)
    x = nn.relu(self.final_norm(x))
    x = nn.relu(self.head_norm(self.head(x)))
    logits = self.classifier(x)
    classes = self._head_classes()
    if len(classes) == self.num_classes and classes == tuple(range(self.num_classes)):
      return logits
    full = jnp.full(logits.shape[:-1] + (self.num_classes,), ABSENT_LOGIT, logits.dtype)
    return full.at[..., np.asarray(classes)].set(logits)

  def __call__(self, image, modality_mask, train=False):
    image = base.zero_missing(image, modality_mask)
    return self.decode(self.encode(image), modality_mask)


# ----------------------------------------------------------------------------------------------
# Loss

def class_weights(num_classes: int, lesion_class: int, weights=None) -> np.ndarray:
  """The class weights w_c of Eq. 6, normalised to sum 1.

  `weights` (one per class, in the task's class order; `config.loss.class_weights`) is
  normalised; None: 1/2 for the lesion and 1 / (2 n_tissue) for each other class (background
  included). The paper's ω (1/16 per tissue class, 1/2 for the lesion; `configs/joint.py` paper
  preset) is such a list.
  """
  if weights is None:
    n_tissue = num_classes - 1
    out = np.full(num_classes, 1.0 / (2 * n_tissue), np.float32)
    out[lesion_class] = 0.5
    return out
  out = np.asarray(weights, np.float64)
  if out.shape != (num_classes,) or not np.all(np.isfinite(out)) or np.any(out < 0):
    raise ValueError(f"config.loss.class_weights: needs {num_classes} non-negative weights (one "
                     f"per class of the task), got {tuple(np.ravel(weights))}")
  if out[lesion_class] <= 0 or out.sum() - out[lesion_class] <= 0:
    raise ValueError("config.loss.class_weights: the lesion and at least one tissue class need a "
                     f"positive weight, got {tuple(out)}")
  return (out / out.sum()).astype(np.float32)


def tissue_term(probs, labels, valid, weights, lesion_class, form="eq6"):
  """L^t(p, y^t) = sum over tissue classes of w_c (1 - J_c), y^t a tissue label map (class ids)."""
  tissue = np.array([c for c in range(probs.shape[-1]) if c != lesion_class])
  target = jax.nn.one_hot(labels, probs.shape[-1])[..., tissue]
  w = jnp.asarray(weights)[tissue]
  # The shared loss normalises by sum(w); undo it so that L^t + L^l = L.
  return jnp.sum(w) * losses.probabilistic_jaccard(probs[..., tissue], target, valid, w, form)


def lesion_term(probs, lesion, valid, weights, lesion_class, form="eq6"):
  """L^l(p, y^l) = w_lesion (1 - J_lesion); `lesion` is a boolean/0-1 lesion map."""
  target = jnp.asarray(lesion, jnp.float32)[..., None]
  return weights[lesion_class] * losses.probabilistic_jaccard(
      probs[..., lesion_class:lesion_class + 1], target, valid, None, form)


def consistency_term(probs_full, probs_tissue_protocol, valid, weights, lesion_class,
                     stop_gradient=False, form="eq6"):
  """R^t_1 = L^t(h(T1, FLAIR), h(T1)): tissue classes of the two predictions (soft target).

  stop_gradient: treat h(T1) as a constant target, so only h(T1, FLAIR) is pulled towards it.
  """
  if stop_gradient:
    probs_tissue_protocol = jax.lax.stop_gradient(probs_tissue_protocol)
  tissue = np.array([c for c in range(probs_full.shape[-1]) if c != lesion_class])
  w = jnp.asarray(weights)[tissue]
  return jnp.sum(w) * losses.probabilistic_jaccard(
      probs_full[..., tissue], probs_tissue_protocol[..., tissue], valid, w, form)


def variant_sets(variant: str) -> tuple[str, ...]:
  """Which datasets a variant trains on."""
  return {"joint": SETS, "tissue_only": ("tissue",), "lesion_only": ("lesion",)}[variant]


def tissue_protocol_slots(config) -> np.ndarray:
  """Boolean (M,): the model slots of the tissue dataset's modalities (T1): h(T1) uses these."""
  names = tuple(config.data.tissue_set.modalities)
  return np.array([m in names for m in config.modalities])


def make_loss_fn(model: nn.Module, config) -> base.LossFn:
  """The variant's loss: R^t_2 + R^l + consistency_weight * [step >= consistency_start] R^t_1."""
  task = task_from_config(config)
  lesion_class = task.class_names.index(LESION_CLASS)
  weights = jnp.asarray(class_weights(task.num_classes, lesion_class,
                                      config.loss.get("class_weights", None)))
  sets = variant_sets(config.variant)
  lc = config.loss
  use_consistency = config.variant == "joint" and lc.consistency_weight > 0
  stop_gradient = bool(lc.get("consistency_stop_gradient", False))
  form, consistency_form = lc.get("jaccard_form", "eq6"), lc.get("consistency_form", "eq6")
  slots = jnp.asarray(tissue_protocol_slots(config))

  def loss_fn(params, model_state, batch, key, step):
    del key  # deterministic network (no dropout)
    variables = {"params": params, **model_state}
    softmax = lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    if "tissue" in sets:
      tb = batch["tissue"]
      probs = softmax(model.apply(variables, tb["image"], tb["modality_mask"], train=True))
      metrics["tissue_loss"] = tissue_term(probs, tb["label"], tb["valid"], weights, lesion_class,
                                            form)
      loss = loss + metrics["tissue_loss"]
    if "lesion" in sets:
      lb = batch["lesion"]
      mask = lb["modality_mask"]
      # Encode once; decode with all modalities and with the tissue protocol's (T1) only.
      features = model.apply(variables, base.zero_missing(lb["image"], mask), method="encode")
      decode = lambda m: softmax(model.apply(variables, features, m, method="decode"))
      probs_full = decode(mask)
      metrics["lesion_loss"] = lesion_term(probs_full, lb["label"] == 1, lb["valid"], weights,
                                           lesion_class, form)
      loss = loss + metrics["lesion_loss"]
      if use_consistency:
        t1_mask = mask & slots[None]
        # Scans without any tissue-protocol modality have no h(T1): left out of the term.
        valid = lb["valid"] & jnp.any(t1_mask, axis=1).reshape((-1,) + (1,) * (lb["valid"].ndim - 1))

        def consistency(_):
          return consistency_term(probs_full, decode(t1_mask), valid, weights, lesion_class,
                                  stop_gradient, consistency_form)

        active = step >= lc.consistency_start
        # lax.cond: the T1-only decode is not computed before the start step.
        term = jax.lax.cond(active, consistency, lambda _: jnp.zeros((), jnp.float32), None)
        metrics["consistency_loss"] = term
        metrics["consistency_active"] = active.astype(jnp.float32)
        loss = loss + lc.consistency_weight * term
    metrics["loss"] = loss
    return loss, (metrics, dict(model_state))

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Data: the two task-specific training sets

def set_config(config, which: str):
  """A copy of `config` whose data section names the tissue or the lesion training set.

  Phantoms go through `datasets.ensure_phantom` (generated once into config.data.cache_dir, in a
  temporary folder that is then renamed); `root` in the set's section points at a user's folder.
  """
  if which not in SETS:
    raise ValueError(f"unknown training set {which!r}; choose one of {SETS}")
  spec = config.data[f"{which}_set"]
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    # The tissue set is labelled in the joint label space (without lesions), the lesion set in
    # the lesion task's.
    cfg.task = config.task if which == "tissue" else LESION_SET_TASK
    cfg.data.root = spec.get("root", None)
    cfg.data.phantom_subjects = int(spec.subjects)
    cfg.data.phantom_seed = int(spec.seed)
    cfg.data.phantom_modalities = tuple(spec.modalities)
    cfg.data.phantom_lesions = False
    cfg.data.phantom_missing_rate = 0.0
  return cfg


def load_set(config, which: str, split: str | None = "train"):
  """Preprocessed volumes of the tissue or lesion training set, in the joint model's slots."""
  cfg = set_config(config, which)
  return datasets.load_split(cfg, split, root=datasets.dataset_root(cfg))


def make_batches(config, load_split):
  """`step -> {"tissue": batch, "lesion": batch}` (the variant's sets), deterministic in (seed, step).

  Tissue patches are drawn uniformly in the brain; lesion patches are centred in the dilated lesion
  maps (`lesion_weighted`). A lesion batch's `label` is 1 on lesion, 0 elsewhere (no tissue label).
  `image` and `modality_mask` of the first set are repeated at the top level: the loop initialises
  the model from `batch["image"]`, `batch["modality_mask"]`.
  """
  del load_split  # trains on the two task-specific sets, never on config.task's (evaluation) data
  d = config.data
  lesion_id = get_task(LESION_SET_TASK).class_names.index("lesion")
  samplers = {}
  for which in variant_sets(config.variant):
    volumes = load_set(config, which, "train")
    if which == "tissue":
      samplers[which] = sampling.Sampler(volumes, patch_size=tuple(d.patch_size), strategy="uniform")
    else:
      samplers[which] = sampling.Sampler(
          volumes, patch_size=tuple(d.patch_size), strategy="lesion_weighted",
          lesion_class=lesion_id, lesion_dilation=d.lesion_dilation,
          lesion_fraction=d.lesion_fraction)

  def make_batch(step):
    batch = {}
    for stream, which in enumerate(SETS):  # a fixed stream per set, whatever the variant
      if which in samplers:
        rng = np.random.default_rng((config.seed, step, stream))
        sub = samplers[which].sample(rng, d.batch_size)
        if which == "lesion":
          sub["label"] = (sub["label"] == lesion_id).astype(np.int32)
        batch[which] = sub
    first = batch[next(w for w in SETS if w in batch)]
    batch["image"], batch["modality_mask"] = first["image"], first["modality_mask"]
    return batch

  return make_batch


# ----------------------------------------------------------------------------------------------
# Method

def check_config(config) -> None:
  """One-line errors naming the option for settings this method cannot use."""
  task = task_from_config(config)
  if (LESION_CLASS not in task.class_names or task.class_names.index(LESION_CLASS) == 0
      or task.num_classes < 3):
    raise ValueError(f"config.task: the joint model needs a label space with tissue classes and a "
                     f"{LESION_CLASS!r} class besides the background (e.g. tissue, tissue6), "
                     f"got {config.task!r}")
  class_weights(task.num_classes, task.class_names.index(LESION_CLASS),
                config.loss.get("class_weights", None))
  if config.variant not in VARIANTS:
    raise ValueError(f"config.variant: unknown variant {config.variant!r}; choose one of {VARIANTS}")
  m = config.model
  if m.norm not in NORMS:
    raise ValueError(f"config.model.norm: unknown norm {m.norm!r}; choose one of {NORMS}")
  if len(m.features) != len(m.dilations) or not m.features:
    raise ValueError(f"config.model.features {tuple(m.features)} and config.model.dilations "
                     f"{tuple(m.dilations)} must be non-empty and of the same length")
  if not 1 <= m.modality_stages <= len(m.features):
    raise ValueError(f"config.model.modality_stages must be in [1, {len(m.features)}], "
                     f"got {m.modality_stages}")
  if m.blocks_per_stage < 1:
    raise ValueError(f"config.model.blocks_per_stage must be >= 1, got {m.blocks_per_stage}")
  if config.loss.consistency_weight < 0:
    raise ValueError(f"config.loss.consistency_weight must be >= 0, "
                     f"got {config.loss.consistency_weight}")
  if config.loss.consistency_start < 0:
    raise ValueError(f"config.loss.consistency_start must be >= 0, "
                     f"got {config.loss.consistency_start}")
  for field in ("jaccard_form", "consistency_form"):
    if config.loss.get(field, "eq6") not in losses.JACCARD_FORMS:
      raise ValueError(f"config.loss.{field}: unknown form {config.loss[field]!r}; "
                       f"choose one of {losses.JACCARD_FORMS}")
  for which in SETS:
    names = tuple(config.data[f"{which}_set"].modalities)
    extra = [n for n in names if n not in config.modalities]
    if not names or extra:
      raise ValueError(f"config.data.{which}_set.modalities: {list(names)} must be a non-empty "
                       f"subset of config.modalities {list(config.modalities)}")


def head_classes(config) -> tuple[int, ...] | None:
  """The classes the variant's head predicts (None: all of the joint label space)."""
  task = task_from_config(config)
  lesion_class = task.class_names.index(LESION_CLASS)
  if config.variant == "tissue_only":
    return tuple(c for c in range(task.num_classes) if c != lesion_class)
  if config.variant == "lesion_only":
    return (0, lesion_class)  # not lesion (reported as background), lesion
  return None


def input_slots(config) -> tuple[bool, ...] | None:
  """The slots the variant's network reads: the tissue protocol's (T1) for tissue_only, else all."""
  if config.variant == "tissue_only":
    return tuple(bool(v) for v in tissue_protocol_slots(config))
  return None


def build(config) -> base.Method:
  check_config(config)
  task = task_from_config(config)
  modalities = tuple(config.modalities)
  model = base.model_from_config(HeteroModalHighResNet, config.model,
                                 num_modalities=len(modalities), num_classes=task.num_classes,
                                 head_classes=head_classes(config), input_slots=input_slots(config))
  loss_fn = make_loss_fn(model, config)
  stage = base.Stage(config.variant, loss_fn, config.train.num_steps, config.optimizer,
                     make_batches=make_batches)
  return base.Method(name="joint", model=model, loss_fn=loss_fn, modalities=modalities,
                     num_classes=task.num_classes, spatial_dims=len(config.data.patch_size),
                     stages=(stage,))
