"""Training patch samplers: 2D axial slices or 3D patches, deterministic given a NumPy Generator.

Strategies (how a patch centre is drawn, after a volume is drawn uniformly):
  uniform          a brain voxel, uniformly (the true class distribution);
  balanced         a class uniformly among those present in the volume (or by `class_probs`), then
                   a voxel of that class: HeMIS's first training phase (then switch to uniform);
  lesion_weighted  with probability `lesion_fraction` a voxel of the lesion map of `lesion_class`
                   dilated by `lesion_dilation` voxels, otherwise a brain voxel (joint-learning
                   paper's lesion-weighted sampling).

Per-volume voxel tables are built once, on first use, and kept while the volume lives. Large sets
(e.g. brain, background) are drawn by rejection instead of storing their indices, so the tables
stay small for many full-size volumes.
"""
from __future__ import annotations

import weakref

import numpy as np
from scipy import ndimage

from hemijax.data.io import DataError

STRATEGIES = ("uniform", "balanced", "lesion_weighted")
# Sets covering at least this fraction of a volume are drawn by rejection, not from index tables.
REJECTION_MIN_FRACTION = 0.1
_CANDIDATES = 32  # rejection candidates drawn at once


class _Pool:
  """A set of voxels of one volume, drawn uniformly (from stored indices or by rejection)."""

  def __init__(self, shape, count, indices=None, member=None):
    self.shape = shape
    self.count = int(count)
    self.indices = indices   # flat indices, or None
    self.member = member     # (ix, iy, iz) -> bool array, for rejection

  def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
    if self.indices is not None:
      flat = self.indices[rng.integers(self.indices.size)]
    else:
      size = int(np.prod(self.shape))
      while True:
        cand = rng.integers(0, size, _CANDIDATES)
        hit = np.flatnonzero(self.member(np.unravel_index(cand, self.shape)))
        if hit.size:
          flat = cand[hit[0]]
          break
    return tuple(int(i) for i in np.unravel_index(flat, self.shape))


def _pool_from_mask(mask: np.ndarray) -> _Pool:
  count = int(mask.sum())
  if count >= REJECTION_MIN_FRACTION * mask.size:
    return _Pool(mask.shape, count, member=lambda idx: mask[idx])
  return _Pool(mask.shape, count, indices=_flat_indices(mask))


def _flat_indices(mask):
  flat = np.flatnonzero(mask)
  return flat.astype(np.int32) if mask.size < 2**31 else flat


class _VolumeTables:
  """Lazily built voxel pools of one volume: brain, each class (in the brain), dilated lesion."""

  def __init__(self, volume):
    self.brain = np.asarray(volume.brain, bool)
    self.label = volume.label
    self.shape = self.brain.shape
    self.size = self.brain.size
    self._brain_pool = None
    self._class_pools = None
    self._lesion_pools: dict = {}

  def brain_pool(self) -> _Pool:
    if self._brain_pool is None:
      self._brain_pool = _pool_from_mask(self.brain)
    return self._brain_pool

  def class_pools(self) -> dict[int, _Pool]:
    """Class id -> pool of its voxels inside the brain (only classes present)."""
    if self._class_pools is None:
      label = np.asarray(self.label)
      counts = np.bincount(label[self.brain].ravel())
      pools = {}
      for c in np.flatnonzero(counts):
        c = int(c)
        if counts[c] >= REJECTION_MIN_FRACTION * self.size:
          pools[c] = _Pool(self.shape, counts[c],
                           member=lambda idx, c=c: (self.label[idx] == c) & self.brain[idx])
        else:
          pools[c] = _Pool(self.shape, counts[c],
                           indices=_flat_indices((label == c) & self.brain))
      self._class_pools = pools
    return self._class_pools

  def lesion_pool(self, classes: tuple[int, ...], dilation: int) -> _Pool | None:
    key = (classes, dilation)
    if key not in self._lesion_pools:
      lesion = np.isin(np.asarray(self.label), classes)
      if not lesion.any():
        self._lesion_pools[key] = None
      else:
        if dilation > 0:
          # Dilate only around the lesion's box: much cheaper than the whole volume.
          coords = np.nonzero(lesion)
          box = tuple(slice(max(int(c.min()) - dilation, 0), int(c.max()) + 1 + dilation)
                      for c in coords)
          structure = ndimage.generate_binary_structure(3, 1)
          lesion[box] = ndimage.binary_dilation(lesion[box], structure, iterations=dilation)
        self._lesion_pools[key] = _pool_from_mask(lesion & self.brain)
        if self._lesion_pools[key].count == 0:
          self._lesion_pools[key] = None
    return self._lesion_pools[key]


_TABLES: dict[int, _VolumeTables] = {}  # id(volume) -> tables, dropped when the volume is collected


def _tables(volume) -> _VolumeTables:
  key = id(volume)
  tables = _TABLES.get(key)
  if tables is None:
    tables = _TABLES[key] = _VolumeTables(volume)
    weakref.finalize(volume, _TABLES.pop, key, None)
  return tables


def _copy_patch(array, starts, sizes, z, out):
  """Copies the part of `array` under the patch into `out` (zeros elsewhere) -> valid mask."""
  src, dst = [], []
  for s, p, n in zip(starts, sizes, array.shape):
    lo, hi = max(s, 0), min(s + p, n)
    if hi <= lo:
      return np.zeros(sizes, bool)
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  if z is not None:
    src.append(z)
  valid = np.zeros(sizes, bool)
  valid[tuple(dst)] = True
  for a, o in out:
    o[tuple(dst)] = a[tuple(src)]
  return valid


class Sampler:
  """Draws training batches from preprocessed volumes; see the module docstring for strategies.

  Batches: image (B, *patch, M) float32, modality_mask (B, M) bool (the volume's `available`),
  label (B, *patch) int32 class ids, valid (B, *patch) bool (False where the patch hangs over the
  volume's edge and was zero-padded). A 2-element `patch_size` gives axial slices (X, Y at one Z).
  """

  def __init__(self, volumes, *, patch_size, strategy="uniform", class_probs=None,
               lesion_class=None, lesion_dilation: int = 3, lesion_fraction: float = 0.5):
    self.volumes = list(volumes)
    if not self.volumes:
      raise DataError("sampling: no volumes to sample from")
    self.patch_size = tuple(int(p) for p in patch_size)
    if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
      raise DataError(f"patch_size: expected 2 or 3 positive sizes, got {tuple(patch_size)}")
    if strategy not in STRATEGIES:
      raise DataError(f"sampling: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    self.strategy = strategy
    self.class_probs = None
    if class_probs is not None:
      self.class_probs = np.asarray(class_probs, np.float64)
      probs = self.class_probs
      if probs.ndim != 1 or np.any(probs < 0) or not np.all(np.isfinite(probs)):
        raise DataError(f"class_probs: expected non-negative weights per class, got {class_probs!r}")
    if lesion_class is None:
      self.lesion_classes = None  # all foreground classes
    else:
      self.lesion_classes = tuple(sorted({int(c) for c in np.atleast_1d(lesion_class)}))
    self.lesion_dilation = int(lesion_dilation)
    if self.lesion_dilation < 0:
      raise DataError(f"lesion_dilation: must be >= 0, got {lesion_dilation}")
    if not 0.0 <= lesion_fraction <= 1.0:
      raise DataError(f"lesion_fraction: must lie in [0, 1], got {lesion_fraction}")
    self.lesion_fraction = float(lesion_fraction)
    num_modalities = {v.image.shape[-1] for v in self.volumes}
    if len(num_modalities) != 1:
      raise DataError(f"sampling: volumes have different modality counts {sorted(num_modalities)}")
    self.num_modalities = num_modalities.pop()
    for v in self.volumes:
      if v.label is None:
        raise DataError(f"{v.case_id}: case has no label file; training patches need labels")
      if v.image.ndim != 4 or v.label.shape != v.image.shape[:3] or v.brain.shape != v.image.shape[:3]:
        raise DataError(f"{v.case_id}: image {v.image.shape}, label {v.label.shape} and brain "
                        f"{v.brain.shape} do not match")

  def _lesion_classes(self, tables):
    if self.lesion_classes is not None:
      return self.lesion_classes
    return tuple(c for c in tables.class_pools() if c != 0)

  def centre(self, rng: np.random.Generator, volume) -> tuple[int, int, int]:
    """Draws one patch centre (a voxel) in `volume` according to the strategy."""
    tables = _tables(volume)
    if self.strategy == "balanced":
      pools = tables.class_pools()
      classes = np.array(sorted(pools))
      if not classes.size:
        raise DataError(f"{volume.case_id}: no brain voxel to sample")
      p = None
      if self.class_probs is not None:
        if classes.max() >= self.class_probs.size:
          raise DataError(f"class_probs: {self.class_probs.size} weights, but {volume.case_id} "
                          f"has class {int(classes.max())}")
        w = self.class_probs[classes]
        p = w / w.sum() if w.sum() > 0 else None  # no weight on any present class: uniform
      return pools[int(classes[rng.choice(classes.size, p=p)])].draw(rng)
    if self.strategy == "lesion_weighted" and rng.random() < self.lesion_fraction:
      pool = tables.lesion_pool(self._lesion_classes(tables), self.lesion_dilation)
      if pool is not None:
        return pool.draw(rng)
    pool = tables.brain_pool()
    if pool.count == 0:
      raise DataError(f"{volume.case_id}: no brain voxel to sample")
    return pool.draw(rng)

  def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
    """One batch; the same Generator state gives the same batch."""
    if int(batch_size) < 1:
      raise DataError(f"batch_size: must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    patch = self.patch_size
    image = np.zeros((batch_size,) + patch + (self.num_modalities,), np.float32)
    label = np.zeros((batch_size,) + patch, np.int32)
    valid = np.zeros((batch_size,) + patch, bool)
    mask = np.zeros((batch_size, self.num_modalities), bool)
    for b in range(batch_size):
      volume = self.volumes[int(rng.integers(len(self.volumes)))]
      c = self.centre(rng, volume)
      starts = [ci - p // 2 for ci, p in zip(c, patch)]
      z = c[2] if len(patch) == 2 else None
      valid[b] = _copy_patch(volume.label, starts, patch, z,
                             [(volume.image, image[b]), (volume.label, label[b])])
      mask[b] = volume.available
    return {"image": image, "modality_mask": mask, "label": label, "valid": valid}


def sample_batch(volumes, rng: np.random.Generator, *, patch_size, batch_size: int,
                 strategy="uniform", class_probs=None, lesion_class=None, lesion_dilation: int = 3,
                 lesion_fraction: float = 0.5) -> dict[str, np.ndarray]:
  """Functional entry point: `Sampler(...).sample(rng, batch_size)` (tables are cached per volume,
  so calling this every step costs no more than keeping a Sampler)."""
  sampler = Sampler(volumes, patch_size=patch_size, strategy=strategy, class_probs=class_probs,
                    lesion_class=lesion_class, lesion_dilation=lesion_dilation,
                    lesion_fraction=lesion_fraction)
  return sampler.sample(rng, batch_size)


def make_patch_batches(config, volumes, step_offset: int = 0, shares=(0,), num_shares: int = 1):
  """`step -> host batch` of the config's patch sampler, deterministic in (seed, step).

  With `num_shares` > 1 the batch is drawn as `num_shares` shares of `batch_size // num_shares`
  patches, share s keyed by (seed, step, s), and this returns the shares `shares` concatenated:
  the part of the batch one process of a multi-process run feeds (hemijax.training.sharding).

  With `sampling="balanced"` the first `balanced_fraction` of `config.train.num_steps` draws
  class-balanced centres, then uniform ones. Steps count from `step_offset` (a stage that starts
  late sees the batches of a one-stage run).
  """
  d = config.data
  balanced_until = int(d.balanced_fraction * config.train.num_steps) if d.sampling == "balanced" else 0
  samplers = {}

  def strategy_for(step):
    if d.sampling == "balanced":
      return "balanced" if step < balanced_until else "uniform"
    return d.sampling

  def make_batch(step):
    step -= step_offset
    strategy = strategy_for(step)
    if strategy not in samplers:
      samplers[strategy] = Sampler(
          volumes, patch_size=tuple(d.patch_size), strategy=strategy,
          lesion_class=d.get("lesion_class", None))
    if num_shares == 1:
      return samplers[strategy].sample(np.random.default_rng((config.seed, step)), d.batch_size)
    parts = [samplers[strategy].sample(np.random.default_rng((config.seed, step, share)),
                                       d.batch_size // num_shares) for share in shares]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

  return make_batch
