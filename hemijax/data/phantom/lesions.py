"""Phantom lesions: tumours (necrosis, non-enhancing and enhancing parts, oedema) and white-matter
hyperintensities, as boolean masks on the subject grid.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from hemijax.data.phantom.anatomy import brain_total
from hemijax.data.phantom.random_fields import _rotation, smooth_field

# Label (task.label_values) that each lesion compartment is written as.
TUMOR_LABELS = {"necrosis": 1, "nonenhancing": 1, "edema": 2, "enhancing": 4}


def _tumor_geometry(rng, atlas_, enhancing=None):
  """Random tumour: centre (template voxels), sizes (mm), shape and variant."""
  centers = atlas_["tumor_centers"]
  center = centers[rng.integers(len(centers))] + rng.uniform(-0.5, 0.5, 3)
  core = math.exp(rng.uniform(math.log(5.0), math.log(28.0)))     # core radius, mm
  edema = math.exp(rng.uniform(math.log(3.0), math.log(30.0)))    # oedema margin, mm
  u = rng.uniform()
  kind = "ring" if u < 0.55 else ("solid" if u < 0.7 else "nonenhancing")
  if enhancing is not None:
    kind = ("ring" if u < 0.75 else "solid") if enhancing else "nonenhancing"
  if kind == "solid" and core > 12.0:
    kind = "ring"   # large enhancing masses outgrow their blood supply: necrotic centre
  return dict(center=center, core_mm=core, edema_mm=edema, kind=kind,
              axes=rng.uniform(0.75, 1.3, 3), rotation=_rotation(rng, 90.0),
              rim_mm=rng.uniform(2.5, 7.0), mass_effect=rng.uniform(0.2, 0.5) * core / (core + 8.0))


def _ellipsoid_radius(coords, center, spacing, rotation, axes):
  """Ellipsoidal distance (mm) of each voxel from `center`; `coords` in the same voxel frame."""
  d = (coords - center.astype(np.float32)[:, None, None, None]) * spacing
  d = np.einsum("ij,j...->i...", rotation.astype(np.float32), d) / axes.astype(np.float32)[:, None, None, None]
  return np.sqrt(np.sum(d * d, axis=0))


def _tumor_compartments(rng, geo, radius, fractions, brain, spacing):
  """Hard masks of necrosis / non-enhancing / enhancing / oedema from the ellipsoidal radius."""
  shape = radius.shape
  core_mm, kind = geo["core_mm"], geo["kind"]
  boundary = smooth_field(rng, shape, spacing, max(4.0, core_mm / 2))
  fingers = smooth_field(rng, shape, spacing, 6.0)
  patches = smooth_field(rng, shape, spacing, 5.0)
  core_score = radius / core_mm + 0.2 * boundary
  core = (core_score < 1.0) & brain
  # Oedema spreads along white matter: its reach into grey matter is roughly halved, none into CSF.
  wm_share = fractions["wm"] / np.maximum(brain_total(fractions), 1e-3)
  edema_score = radius / (core_mm + geo["edema_mm"]) + 0.15 * fingers + 0.5 * (1.0 - wm_share)
  edema = (edema_score < 1.0) & brain & ~core & (fractions["csf"] < 0.5)
  # Only oedema connected to the mass: drop islands that the finger noise cut off.
  parts, _ = ndimage.label(edema | core)
  edema &= np.isin(parts, np.unique(parts[core]))
  masks = {k: np.zeros(shape, bool) for k in ("necrosis", "nonenhancing", "enhancing")}
  if kind == "nonenhancing":
    masks["nonenhancing"] = core
  else:
    rim = max(geo["rim_mm"], 1.2 * spacing) / core_mm
    inner = core_score < 1.0 - rim if kind == "ring" else np.zeros(shape, bool)
    masks["necrosis"] = core & inner
    shell = core & ~inner
    masks["nonenhancing"] = shell & (patches < -1.0)    # patchy non-enhancing parts of the wall
    masks["enhancing"] = shell & (patches >= -1.0)
  masks["edema"] = edema
  return masks


def _wmh_masks(rng, fractions, ventricle_dist, brain, spacing, max_lesions=15):
  """Several small periventricular / deep white-matter lesions (one boolean mask)."""
  shape = brain.shape
  wm = fractions["wm"]
  out = np.zeros(shape, bool)
  texture = smooth_field(rng, shape, spacing, 3.0)
  periventricular = np.argwhere((wm > 0.6) & (ventricle_dist > 2.0) & (ventricle_dist < 10.0))
  deep = np.argwhere((wm > 0.9) & (ventricle_dist >= 10.0))
  grid = np.indices(shape, dtype=np.float32)
  for _ in range(int(rng.integers(3, max_lesions + 1))):
    pool = periventricular if (rng.uniform() < 0.5 and len(periventricular)) else deep
    if not len(pool):
      continue
    center = pool[rng.integers(len(pool))].astype(np.float32)
    radius_mm = max(math.exp(rng.uniform(math.log(1.5), math.log(6.0))), 0.6 * spacing)
    axes = rng.uniform(0.6, 1.6, 3)
    rotation = _rotation(rng, 90.0)
    half = int(math.ceil(2.0 * radius_mm * 1.6 / spacing)) + 1
    box = tuple(slice(max(int(c) - half, 0), min(int(c) + half + 1, n)) for c, n in zip(center, shape))
    sub = grid[(slice(None),) + box]
    r = _ellipsoid_radius(sub, center, spacing, rotation, axes)
    out[box] |= (r / radius_mm + 0.3 * texture[box] < 1.0) & (wm[box] > 0.3)
  return out & brain
