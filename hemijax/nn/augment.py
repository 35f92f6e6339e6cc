"""Training-time data augmentation: pure, jittable functions of a `jax.random` key over a batch.

    augment = make_augment(config.augment)      # the identity when config.augment.enabled is False
    batch = augment(key, batch)                 # inside the jitted train step

A batch is the patch sampler's dict: `image (B, *spatial, M)` float32 channels-last,
`modality_mask (B, M)` bool, `label (B, *spatial)` int and optionally `valid (B, *spatial)` bool;
2D or 3D patches (the spatial rank is read from the image). Each example draws its own parameters
(the batch key is split per example) and each transform has a probability and a range in the
config, so the same key always gives the same batch.

Spatial (per example): flips, a small rotation (2D: in-plane; 3D: about each axis in turn), an
isotropic scaling and an optional elastic deformation (a coarse grid of random displacements,
upsampled). They compose into ONE source-coordinate grid; image (linear) and label and `valid`
(nearest) are resampled once from it with `jax.scipy.ndimage.map_coordinates`. A voxel whose
source falls outside the patch gets `valid = False` (the losses ignore it) and image 0.

Intensity (per example and per modality, each with its own draw), in acquisition order: a smooth
multiplicative bias field, Gaussian blur (resolution loss), Gaussian noise, gamma, an optional
random monotone contrast curve, then a linear scale and shift. Gamma works on the modality's values min-max normalised over the whole patch
(its valid voxels, brain and background alike, as nnU-Net does), then maps back to the same range.
Intensity ranges are in the units of the preprocessed images (z-scores inside the brain).

Augmentation never changes which modalities are present: `modality_mask` is returned as it came,
and absent slots (mask False) and invalid voxels are exactly 0 in the output image, as the
sampler's padding is.

Batches of other shapes pass through: a batch without "image" is augmented entry by entry where an
entry is itself a patch batch (the joint method's {"tissue": ..., "lesion": ...}), and is returned
unchanged otherwise (e.g. the voxel samples of mlp_impute's imputation stage).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

Batch = Mapping[str, jax.Array]
AugmentFn = Callable[[jax.Array, Batch], Batch]

# Control points per axis of the bias field (a low-frequency, smooth multiplicative field).
BIAS_CONTROL_POINTS = 4
# Lower clamp of min-max normalised values before the gamma power, so its gradient stays finite.
_GAMMA_FLOOR = 1e-7
_OPTION = "config.augment"


def default_config(enabled: bool = True) -> ml_collections.ConfigDict:
  """Moderate, nnU-Net-like defaults. Probabilities are per example (intensity: per modality)."""
  return ml_collections.ConfigDict(dict(
      enabled=bool(enabled),
      # Mirroring; axis 0 is left-right in axially acquired NIfTI (BraTS, the built-in phantom).
      flip_prob=0.5, flip_axes=(0,),
      rotate_prob=0.2, rotate_degrees=15.0,          # uniform in +-degrees (3D: about each axis)
      scale_prob=0.2, scale_range=(0.85, 1.15),      # isotropic; > 1 zooms in
      # Elastic: displacements drawn on a grid of control points `elastic_sigma` voxels apart,
      # normal with std `elastic_magnitude` voxels, cubic-upsampled to the patch. Off by default
      # (nnU-Net's default too).
      elastic_prob=0.0, elastic_sigma=8.0, elastic_magnitude=2.0,
      # Intensity: x * U(1 - a, 1 + a) + U(-b, b) with (a, b) = scale_shift.
      intensity_prob=0.15, scale_shift=(0.15, 0.1),
      gamma_prob=0.3, gamma_range=(0.7, 1.5),
      noise_prob=0.1, noise_std=0.1,                 # std drawn uniform in [0, noise_std]
      # Bias: x * exp(bias_strength * a cubic-upsampled 4^d grid of standard normal values).
      bias_prob=0.1, bias_strength=0.2,
      blur_prob=0.2, blur_sigma=(0.5, 1.0),          # Gaussian sigma in voxels, uniform in range
      # Contrast remap: a random monotone piecewise-linear curve over the modality's range (its
      # `remap_points` segments' slopes drawn in 1 +- remap_strength, then rescaled to the range),
      # so the contrast between tissues changes as between scanners and sequences (Models
      # Genesis' non-linear intensity transform). Off by default.
      remap_prob=0.0, remap_points=4, remap_strength=0.7,
  ))


def _fail(option: str, message: str):
  raise ValueError(f"{_OPTION}.{option}: {message}")


def _check_config(cfg: dict) -> None:
  for name, value in cfg.items():
    if name.endswith("_prob") and not 0.0 <= float(value) <= 1.0:
      _fail(name, f"a probability must be in [0, 1], got {value}")
  for name in ("scale_range", "gamma_range", "blur_sigma"):
    lo, hi = _pair(cfg, name)
    if not 0.0 < lo <= hi:
      _fail(name, f"needs 0 < low <= high, got {tuple(cfg[name])}")
  if int(cfg["remap_points"]) < 1:
    _fail("remap_points", f"needs >= 1 segment, got {cfg['remap_points']}")
  if not 0.0 <= float(cfg["remap_strength"]) < 1.0:
    _fail("remap_strength", f"needs 0 <= strength < 1 (slopes stay positive), got "
          f"{cfg['remap_strength']}")
  for name in ("rotate_degrees", "elastic_magnitude", "noise_std", "bias_strength"):
    if float(cfg[name]) < 0:
      _fail(name, f"must be >= 0, got {cfg[name]}")
  if float(cfg["elastic_sigma"]) <= 0:
    _fail("elastic_sigma", f"must be > 0 (voxels between control points), got "
          f"{cfg['elastic_sigma']}")
  scale, shift = _pair(cfg, "scale_shift")
  if not (0.0 <= scale < 1.0 and shift >= 0.0):
    _fail("scale_shift", f"needs (a, b) with 0 <= a < 1 and b >= 0, got "
          f"{tuple(cfg['scale_shift'])}")
  if any(a < 0 for a in cfg["flip_axes"]):
    _fail("flip_axes", f"must be spatial axis indices >= 0, got {tuple(cfg['flip_axes'])}")


def _pair(cfg: dict, name: str) -> tuple[float, float]:
  value = tuple(cfg[name])
  if len(value) != 2:
    _fail(name, f"needs two numbers, got {value}")
  return float(value[0]), float(value[1])


def _as_dict(cfg) -> dict:
  """The config as a plain dict over the defaults; unknown options are an error (typos)."""
  if isinstance(cfg, ml_collections.ConfigDict):
    cfg = cfg.to_dict()
  defaults = default_config(enabled=True).to_dict()
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(f"{_OPTION}: unknown option(s) {unknown}; known: {sorted(defaults)}")
  merged = dict(defaults, **cfg)
  merged["flip_axes"] = tuple(int(a) for a in merged["flip_axes"])
  return merged


def make_augment(cfg) -> AugmentFn:
  """`augment(key, batch) -> batch` from an augment config (ConfigDict or dict, missing options take
  `default_config`'s values). Disabled: the identity, which returns the batch object itself."""
  cfg = _as_dict(cfg)
  if not cfg["enabled"]:
    return lambda key, batch: batch
  _check_config(cfg)

  def augment(key, batch):
    if "image" in batch:
      return augment_patches(key, batch, cfg)
    out = dict(batch)
    for i, name in enumerate(sorted(batch)):  # sorted: the same sub-key for the same entry
      if isinstance(batch[name], Mapping) and "image" in batch[name]:
        out[name] = augment_patches(jax.random.fold_in(key, i), batch[name], cfg)
    return out

  return augment


def augment_patches(key, batch: Batch, cfg: dict) -> dict:
  """Augments one patch batch (see the module docstring); `cfg` is a plain dict of options."""
  image = jnp.asarray(batch["image"])
  spatial = image.shape[1:-1]
  if not 2 <= len(spatial) <= 3:
    raise ValueError(f"augment: image must be (B, X, Y[, Z], M), got shape {image.shape}")
  bad_axes = [a for a in cfg["flip_axes"] if a >= len(spatial)]
  if bad_axes and cfg["flip_prob"] > 0:
    _fail("flip_axes", f"axes {bad_axes} do not exist in {len(spatial)}D patches")
  out = dict(batch)
  valid = batch.get("valid")
  valid = jnp.ones(image.shape[:-1], bool) if valid is None else jnp.asarray(valid, bool)
  label = batch.get("label")
  mask = jnp.asarray(batch["modality_mask"], bool)
  keys = jax.random.split(key, image.shape[0])

  def one(key, image, label, valid, mask):
    spatial_key, intensity_key = jax.random.split(key)
    if _spatial_on(cfg):
      coords = sample_coordinates(spatial_key, spatial, cfg)
      image, label, valid = resample(coords, image, label, valid)
    image = _intensity(intensity_key, image, valid, cfg)
    keep = mask & valid[..., None]
    return jnp.where(keep, image, 0.0), label, valid

  image, label, valid = jax.vmap(one)(keys, image, label, valid, mask)
  out.update(image=image, valid=valid)
  if label is not None:
    out["label"] = label
  return out


# ------------------------------------------------------------------------------------------------
# Spatial


def _spatial_on(cfg) -> bool:
  return ((cfg["flip_prob"] > 0 and bool(cfg["flip_axes"])) or cfg["rotate_prob"] > 0
          or cfg["scale_prob"] > 0 or cfg["elastic_prob"] > 0)


def _rotation(angles, rank: int):
  """Rotation matrix: 2D by angles[0]; 3D about axis 0, then 1, then 2 (radians)."""
  planes = [(0, 1)] if rank == 2 else [(1, 2), (0, 2), (0, 1)]
  matrix = jnp.eye(rank)
  for angle, (i, j) in zip(angles, planes):
    c, s = jnp.cos(angle), jnp.sin(angle)
    plane = jnp.eye(rank).at[i, i].set(c).at[j, j].set(c).at[i, j].set(-s).at[j, i].set(s)
    matrix = plane @ matrix
  return matrix


def sample_coordinates(key, spatial: tuple[int, ...], cfg: dict) -> jax.Array:
  """Source coordinates `(rank, *spatial)` of every output voxel for one example.

  Output voxel p reads the source at `c + F R (p - c) / s + d(p)`: c the patch centre, F the flips,
  R the rotation, s the scale, d the elastic displacement (all drawn from `key` by `cfg`).
  """
  rank = len(spatial)
  k_flip, k_rot_on, k_rot, k_scale_on, k_scale, k_el_on, k_el = jax.random.split(key, 7)
  flippable = jnp.array([axis in cfg["flip_axes"] for axis in range(rank)])
  flips = jnp.where(flippable & jax.random.bernoulli(k_flip, cfg["flip_prob"], (rank,)), -1.0, 1.0)
  max_angle = math.radians(cfg["rotate_degrees"])
  angles = jax.random.uniform(k_rot, (1 if rank == 2 else 3,), minval=-max_angle, maxval=max_angle)
  angles = jnp.where(jax.random.bernoulli(k_rot_on, cfg["rotate_prob"]), angles, 0.0)
  lo, hi = cfg["scale_range"]
  scale = jnp.where(jax.random.bernoulli(k_scale_on, cfg["scale_prob"]),
                    jax.random.uniform(k_scale, (), minval=lo, maxval=hi), 1.0)
  matrix = flips[:, None] * _rotation(angles, rank) / scale

  centre = (jnp.asarray(spatial, jnp.float32) - 1) / 2
  centre = centre.reshape((rank,) + (1,) * rank)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial],
                                indexing="ij"))
  coords = centre + jnp.einsum("ij,j...->i...", matrix, grid - centre)
  if cfg["elastic_prob"] > 0 and cfg["elastic_magnitude"] > 0:
    # Smooth displacements: random values on a coarse grid, upsampled (cheaper than a large blur).
    points = tuple(max(2, round(n / cfg["elastic_sigma"]) + 1) for n in spatial)
    on = jax.random.bernoulli(k_el_on, cfg["elastic_prob"])
    magnitude = jnp.where(on, cfg["elastic_magnitude"], 0.0)
    coarse = jax.random.normal(k_el, (rank,) + points) * magnitude
    coords = coords + jax.image.resize(coarse, (rank,) + tuple(spatial), method="cubic")
  return coords


def resample(coords, image, label=None, valid=None, image_order: int = 1):
  """One example's image `(*spatial, M)` (order `image_order`), label and valid (nearest) read at
  `coords (rank, *spatial)`; voxels whose source is outside the patch: valid False, image and
  label 0 (as the sampler's padding)."""
  spatial = image.shape[:-1]
  coord_list = list(coords)
  inside = jnp.ones(spatial, bool)
  for axis_coords, n in zip(coord_list, spatial):
    inside &= (axis_coords >= 0) & (axis_coords <= n - 1)

  def read(channels, order):  # (*spatial, K) -> (*spatial, K), the coordinates shared by channels
    sample = lambda c: jax.scipy.ndimage.map_coordinates(c, coord_list, order=order,
                                                          mode="constant", cval=0.0)
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(channels)

  image = jnp.where(inside[..., None], read(image, image_order), 0.0)
  valid = jnp.ones(spatial, bool) if valid is None else valid
  discrete = [valid.astype(jnp.float32)]
  if label is not None:
    discrete.append(label.astype(jnp.float32))  # exact for class ids < 2**24
  discrete = read(jnp.stack(discrete, -1), 0)
  valid = inside & (discrete[..., 0] > 0.5)
  if label is not None:
    label = jnp.where(inside, jnp.round(discrete[..., 1]), 0).astype(label.dtype)
  return image, label, valid


# ------------------------------------------------------------------------------------------------
# Intensity (one example, image (*spatial, M); every draw is per modality)


def _intensity(key, image, valid, cfg):
  spatial, num_modalities = image.shape[:-1], image.shape[-1]
  k_bias, k_blur, k_noise, k_gamma, k_linear = jax.random.split(key, 5)
  drawn = lambda k, prob: jax.random.bernoulli(k, prob, (num_modalities,))

  if cfg["bias_prob"] > 0 and cfg["bias_strength"] > 0:
    k_on, k_field = jax.random.split(k_bias)
    strength = jnp.where(drawn(k_on, cfg["bias_prob"]), cfg["bias_strength"], 0.0)
    coarse = jax.random.normal(k_field, (BIAS_CONTROL_POINTS,) * len(spatial) + (num_modalities,))
    field = jax.image.resize(coarse * strength, image.shape, method="cubic")
    image = image * jnp.exp(field)

  if cfg["blur_prob"] > 0:
    k_on, k_sigma = jax.random.split(k_blur)
    lo, hi = cfg["blur_sigma"]
    sigma = jax.random.uniform(k_sigma, (num_modalities,), minval=lo, maxval=hi)
    image = _gaussian_blur(image, jnp.where(drawn(k_on, cfg["blur_prob"]), sigma, 0.0),
                           radius=math.ceil(3 * hi))

  if cfg["noise_prob"] > 0 and cfg["noise_std"] > 0:
    k_on, k_std, k_values = jax.random.split(k_noise, 3)
    std = jax.random.uniform(k_std, (num_modalities,), maxval=cfg["noise_std"])
    std = jnp.where(drawn(k_on, cfg["noise_prob"]), std, 0.0)
    image = image + std * jax.random.normal(k_values, image.shape)

  if cfg["gamma_prob"] > 0:
    k_on, k_gamma = jax.random.split(k_gamma)
    lo, hi = cfg["gamma_range"]
    gamma = jax.random.uniform(k_gamma, (num_modalities,), minval=lo, maxval=hi)
    image = jnp.where(drawn(k_on, cfg["gamma_prob"]), _gamma(image, valid, gamma), image)

  if cfg["remap_prob"] > 0:
    # Its own fold of the key: configs without it draw exactly what they drew before it existed.
    k_on, k_slopes = jax.random.split(jax.random.fold_in(key, 5))
    r = cfg["remap_strength"]
    slopes = jax.random.uniform(k_slopes, (int(cfg["remap_points"]), num_modalities),
                                minval=1 - r, maxval=1 + r)
    image = jnp.where(drawn(k_on, cfg["remap_prob"]), _remap(image, valid, slopes), image)

  if cfg["intensity_prob"] > 0:
    k_on, k_scale, k_shift = jax.random.split(k_linear, 3)
    a, b = cfg["scale_shift"]
    on = drawn(k_on, cfg["intensity_prob"])
    scale = jnp.where(on, jax.random.uniform(k_scale, (num_modalities,), minval=1 - a,
                                             maxval=1 + a), 1.0)
    shift = jnp.where(on, jax.random.uniform(k_shift, (num_modalities,), minval=-b, maxval=b), 0.0)
    image = image * scale + shift
  return image


def _valid_range(image, valid):
  """Per modality (lo, hi + eps - lo) of the values at valid voxels; (0, eps) without any."""
  inside = valid[..., None]
  axes = tuple(range(image.ndim - 1))
  lo = jnp.min(jnp.where(inside, image, jnp.inf), axis=axes)
  hi = jnp.max(jnp.where(inside, image, -jnp.inf), axis=axes)
  lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)   # no valid voxel: +-inf, swapped
  lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
  return lo, hi - lo + 1e-7


def _gamma(image, valid, gamma):
  """x -> lo + (hi - lo) ((x - lo) / (hi - lo))^gamma per modality, lo/hi over valid voxels."""
  lo, span = _valid_range(image, valid)
  normalised = jnp.clip((image - lo) / span, _GAMMA_FLOOR, 1.0)
  return lo + span * normalised**gamma


def _remap(image, valid, slopes):
  """A monotone piecewise-linear curve per modality over [lo, hi] of its valid voxels: segment k
  of `slopes (K, M)` covers [k/K, (k+1)/K] of the range with slope proportional to slopes[k];
  the curve is rescaled to end at hi, so lo and hi stay where they are."""
  lo, span = _valid_range(image, valid)
  segments = slopes.shape[0]
  knots = jnp.concatenate([jnp.zeros((1,) + slopes.shape[1:]), jnp.cumsum(slopes, axis=0)])
  knots = knots / knots[-1]                                  # (K + 1, M), 0 ... 1, increasing
  t = jnp.clip((image - lo) / span, 0.0, 1.0) * segments     # position in segments
  index = jnp.clip(jnp.floor(t), 0, segments - 1).astype(jnp.int32)
  left = jnp.take_along_axis(knots, index.reshape(-1, image.shape[-1]), axis=0).reshape(t.shape)
  right = jnp.take_along_axis(knots, index.reshape(-1, image.shape[-1]) + 1,
                              axis=0).reshape(t.shape)
  return lo + span * (left + (t - index) * (right - left))


def _gaussian_blur(image, sigma, radius: int):
  """Separable Gaussian blur of each modality with its own `sigma` (voxels; 0: unchanged)."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)[:, None]
  weights = jnp.exp(-0.5 * offsets**2 / jnp.maximum(sigma, 1e-3)**2)  # sigma 0: a delta
  weights = weights / jnp.sum(weights, axis=0)                           # (taps, M)
  for axis in range(image.ndim - 1):
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="edge")
    n = image.shape[axis]
    image = sum(weights[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
                for k in range(2 * radius + 1))
  return image
