"""Whole-volume inference: sliding windows with Gaussian blending, every subset from shared encodings.

Volumes are channels-last `(X, Y, Z, M)`. A 3D model sees windows of `roi` voxels; a 2D model sees
axial slices (a window of `(X, Y, 1)`), so both go through the same code. For every window the
per-modality encoders run once and each requested subset is fused and decoded from the same
features (models without `encode` fall back to one full forward per subset).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from hemijax.models.base import Method


BLENDS = ("gaussian", "constant")


@dataclasses.dataclass(frozen=True)
class WindowSettings:
  """How a volume is cut into windows and blended back: the one place these settings are made.

  `roi`: the 3D window in voxels (None: the whole volume; 2D models always use whole axial
  slices); `overlap`: fraction of a window shared with its neighbour, in [0, 1); `batch_size`:
  windows per forward call; `blend`: "gaussian" (nnU-Net/MONAI) or "constant" weights.
  """
  roi: tuple[int, ...] | None = None
  overlap: float = 0.5
  batch_size: int = 4
  blend: str = "gaussian"

  def __post_init__(self):
    if self.roi is not None:
      roi = tuple(int(r) for r in self.roi)
      if not roi or min(roi) < 1:
        raise ValueError(f"eval.roi_size: expected positive window sizes, got {self.roi}")
      object.__setattr__(self, "roi", roi)
    if not 0.0 <= float(self.overlap) < 1.0:
      raise ValueError(f"eval.overlap: expected a fraction in [0, 1), got {self.overlap}")
    if int(self.batch_size) < 1:
      raise ValueError(f"eval.sw_batch_size: expected a positive count, got {self.batch_size}")
    if self.blend not in BLENDS:
      raise ValueError(f"eval.blend: expected one of {BLENDS}, got {self.blend!r}")

  @classmethod
  def from_config(cls, config) -> "WindowSettings":
    """The settings of a run's config: `config.eval` (roi_size None: the training patch)."""
    e = config.eval
    return cls(roi=e.roi_size or tuple(config.data.patch_size), overlap=float(e.overlap),
               batch_size=int(e.sw_batch_size), blend=e.blend)


def subset_masks(subsets, modalities) -> np.ndarray:
  """(S, M) bool masks of modality-name subsets (see `hemijax.evaluation.subsets.all_subsets`)."""
  masks = np.zeros((len(subsets), len(modalities)), bool)
  for i, subset in enumerate(subsets):
    masks[i] = [m in subset for m in modalities]
  return masks


@functools.lru_cache(maxsize=None)
def gaussian_importance(roi: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
  """nnU-Net/MONAI Gaussian window weights: 1 at the centre, sigma = roi * sigma_scale."""
  grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in roi], indexing="ij")
  sq = sum((g / max(n * sigma_scale, 1e-6)) ** 2 for g, n in zip(grids, roi))
  weights = np.exp(-0.5 * sq).astype(np.float32)
  return np.maximum(weights / weights.max(), 1e-3)  # never zero: borders still count a little


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
  """Start offsets covering [0, size) with windows of `roi`, the last aligned to the end."""
  if size <= roi:
    return [0]
  step = max(int(roi * (1 - overlap)), 1)
  starts = list(range(0, size - roi, step))
  return starts + [size - roi]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def make_window_forward(method: Method, variables, share_encoder: bool = True,
                        one_window_at_a_time: bool | None = None):
  """jitted `(windows (B, *roi, M), masks (S, M)) -> probabilities (S, B, *roi, C)`.

  Compiled once per window shape and subset count; the masks are data. `share_encoder=False` runs
  one whole forward per subset instead (what sharing saves; see benchmarks/bench_subsets.py).
  `one_window_at_a_time` (None: for 3D models on CPU) runs the B windows of a call one after
  another inside the compiled call: on CPU one 3D window already keeps both cores busy, and XLA
  then holds one window's activations instead of B (two 96^3 HeMIS-3D windows: 5.12 -> 2.74 GiB
  of XLA buffers; docs/performance.md).
  """
  spatial_dims = method.spatial_dims
  if one_window_at_a_time is None:
    one_window_at_a_time = spatial_dims == 3 and jax.default_backend() == "cpu"

  def forward(variables, windows, masks):
    if spatial_dims == 2:
      windows = windows[..., 0, :]  # (B, X, Y, 1, M) axial slices -> (B, X, Y, M)
    batch = windows.shape[0]
    per_item = lambda mask: jnp.broadcast_to(mask, (batch, mask.shape[-1]))
    if method.has_encoder and share_encoder:
      features = method.encode(variables, windows)
      logits = jax.lax.map(lambda m: method.decode(variables, features, per_item(m)), masks)
    else:
      logits = jax.lax.map(lambda m: method.apply(variables, windows, per_item(m)), masks)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs[..., None, :] if spatial_dims == 2 else probs

  if one_window_at_a_time:
    batched_forward = forward

    def forward(variables, windows, masks):
      per_window = jax.lax.map(lambda w: batched_forward(variables, w[None], masks)[:, 0], windows)
      return jnp.moveaxis(per_window, 0, 1)

  jitted = jax.jit(forward)
  return lambda windows, masks: jitted(variables, windows, masks)


def predict_probabilities(method: Method, variables, volume: np.ndarray, masks: np.ndarray,
                          settings: WindowSettings = WindowSettings(), *,
                          forward=None) -> np.ndarray:
  """Class probabilities `(S, X, Y, Z, C)` of `volume (X, Y, Z, M)` for each mask in `masks (S, M)`.

  `settings`: the windows (`WindowSettings.from_config(config)` for a run's; the default is the
  whole volume). Absent modalities must already be zero in `volume`; the masks say what each
  subset uses. `forward`: a `make_window_forward` to reuse (compiled once).
  """
  volume = np.asarray(volume, np.float32)
  masks = np.asarray(masks, bool)
  if volume.ndim != 4 or volume.shape[-1] != len(method.modalities):
    raise ValueError(f"volume must be (X, Y, Z, {len(method.modalities)}), got {volume.shape}")
  if masks.ndim != 2 or masks.shape[1] != volume.shape[-1] or not masks.any(-1).all():
    raise ValueError(f"masks must be (subsets, {volume.shape[-1]}) with none empty, got {masks.shape}")
  forward = forward or make_window_forward(method, variables)
  roi, overlap, batch_size, blend = (settings.roi, settings.overlap, settings.batch_size,
                                     settings.blend)
  mult = method.size_multiple
  shape = volume.shape[:3]
  if method.spatial_dims == 2:
    roi = (_round_up(shape[0], mult), _round_up(shape[1], mult), 1)
    overlap_axes, blend = (0.0, 0.0, 0.0), "constant"
  else:
    roi = tuple(shape) if roi is None else tuple(int(r) for r in roi)
    roi = tuple(_round_up(min(r, _round_up(s, mult)), mult) for r, s in zip(roi, shape))
    overlap_axes = (overlap,) * 3
  # Pad so that every window fits; padding is cropped away at the end.
  padded_shape = tuple(max(s, r) for s, r in zip(shape, roi))
  pad = [(0, p - s) for p, s in zip(padded_shape, shape)] + [(0, 0)]
  padded = np.pad(volume, pad)
  weight = gaussian_importance(roi) if blend == "gaussian" else np.ones(roi, np.float32)

  starts = list(itertools.product(*[window_starts(p, r, o)
                                    for p, r, o in zip(padded_shape, roi, overlap_axes)]))
  accum = None
  norm = np.zeros(padded_shape, np.float32)
  for i in range(0, len(starts), batch_size):
    chunk = starts[i:i + batch_size]
    windows = np.stack([padded[tuple(slice(s, s + r) for s, r in zip(st, roi))] for st in chunk])
    if len(chunk) < batch_size and len(starts) > batch_size:  # keep one compiled batch shape
      windows = np.concatenate([windows, np.zeros((batch_size - len(chunk),) + windows.shape[1:],
                                                  windows.dtype)])
    probs = np.asarray(forward(windows, masks))
    if accum is None:
      accum = np.zeros((len(masks),) + padded_shape + (probs.shape[-1],), np.float32)
    for j, st in enumerate(chunk):
      region = tuple(slice(s, s + r) for s, r in zip(st, roi))
      accum[(slice(None),) + region] += probs[:, j] * weight[..., None]
      norm[region] += weight
  accum /= norm[None, ..., None]
  crop = tuple(slice(0, s) for s in shape)
  return accum[(slice(None),) + crop]
