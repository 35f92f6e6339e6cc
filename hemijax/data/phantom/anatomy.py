"""Phantom anatomy: MNI152 tissue maps resampled once per spacing, and per-subject deformations.

The template and GM/WM probability maps come from the installed nilearn wheel's package data
(never downloaded).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemijax.data.phantom.acquisition import NORMAL_TISSUES
from hemijax.data.phantom.random_fields import _rotation, smooth_field

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MARGIN_MM = 10.0        # field of view around the template brain: room for scaling and warps


def _template_path(kind):
  """Path of a template file inside the installed nilearn wheel (found without importing
  nilearn, which would pull in scikit-learn and pandas)."""
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the MNI152 template comes from the nilearn package, which is not installed")
  return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", _TEMPLATE.format(kind))


def _load_template(kind):
  path = _template_path(kind)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MNI152 template {path} not found in the nilearn package")
  img = nib.load(path)
  return np.asarray(img.dataobj, dtype=np.float32) / 255.0, img.affine


def _check_spacing(spacing):
  spacing = float(spacing)
  if not (math.isfinite(spacing) and 0.5 <= spacing <= 8.0):
    raise ValueError(f"spacing (--spacing) must be between 0.5 and 8 mm, got {spacing}")
  return spacing


@functools.lru_cache(maxsize=4)
def atlas(spacing: float = 2.0) -> dict:
  """Tissue fractions (csf, gm, wm) of the MNI152 brain on an isotropic grid, plus helpers.

  CSF is the brain mask minus GM and WM; where that remainder is bright on the template T1
  (brainstem, which the GM/WM maps barely cover) it is counted as WM instead.
  Returns read-only arrays; cached per spacing.
  """
  spacing = _check_spacing(spacing)
  t1, affine = _load_template("t1")
  gm, _ = _load_template("gm")
  wm, _ = _load_template("wm")
  mask = (t1 > 0.2).astype(np.float32)   # nilearn's own brain-mask threshold
  rest = np.clip(mask - gm - wm, 0.0, 1.0)
  # Template T1 of pure CSF / GM / WM is about 0.28 / 0.66 / 0.88: unmix the remainder.
  rest_t1 = (t1 - 0.66 * gm - 0.88 * wm) / np.maximum(rest, 1e-3)
  csf_share = np.where(rest > 0.05, np.clip((0.88 - rest_t1) / 0.60, 0.0, 1.0), 1.0)
  maps = {"csf": rest * csf_share, "gm": gm, "wm": wm + rest * (1.0 - csf_share)}

  # Grid: the brain's bounding box plus a margin, centred on it, in MNI world mm.
  idx = np.argwhere(mask > 0)
  lo = affine[:3, :3] @ idx.min(0) + affine[:3, 3] - _MARGIN_MM
  hi = affine[:3, :3] @ idx.max(0) + affine[:3, 3] + _MARGIN_MM
  shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing).astype(int) + 1)
  origin = (lo + hi) / 2 - (np.array(shape) - 1) / 2 * spacing
  grid_affine = np.diag([spacing, spacing, spacing, 1.0])
  grid_affine[:3, 3] = origin
  # Template voxel coordinates of every grid voxel (the template affine is diagonal, 1 mm).
  axes = [(origin[a] + spacing * np.arange(shape[a]) - affine[a, 3]) / affine[a, a] for a in range(3)]
  coords = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
  sigma = max(spacing - 1.0, 0.0) / 2.0   # anti-aliasing before downsampling
  out = {}
  for name, vol in maps.items():
    if sigma > 0:
      vol = ndimage.gaussian_filter(vol, sigma)
    out[name] = ndimage.map_coordinates(vol, coords, order=1, mode="constant").astype(np.float32)

  brain = (out["csf"] + out["gm"] + out["wm"]) > 0.5
  depth = ndimage.distance_transform_edt(brain, sampling=spacing)
  ventricles = (out["csf"] > 0.5) & (depth > 20.0)
  out["ventricle_dist"] = ndimage.distance_transform_edt(~ventricles, sampling=spacing).astype(np.float32)
  out["tumor_centers"] = np.argwhere((out["wm"] > 0.85) & (depth > 15.0))
  out["center"] = np.argwhere(brain).mean(0)
  out["affine"] = grid_affine
  out["shape"] = shape
  out["spacing"] = spacing
  for v in out.values():
    if isinstance(v, np.ndarray):
      v.setflags(write=False)
  return out


def random_deformation(rng, atlas_):
  """Template voxel coordinates (3, *shape) for each subject voxel: affine plus smooth warp."""
  shape, spacing = atlas_["shape"], atlas_["spacing"]
  center = atlas_["center"]
  scale = rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3)
  matrix = _rotation(rng, 6.0) @ np.diag(scale)
  shift = rng.uniform(-3.0, 3.0, 3) / spacing
  amplitude = rng.uniform(2.0, 4.0) / spacing     # mm of non-linear displacement
  grid = np.indices(shape, dtype=np.float32) - center.astype(np.float32)[:, None, None, None]
  coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), grid)
  for a in range(3):
    coords[a] += center[a] + shift[a] + amplitude * smooth_field(rng, shape, spacing, 24.0)
  return coords


def _warp(volume, coords):
  return ndimage.map_coordinates(volume, coords, order=1, mode="constant", output=np.float32)


def brain_total(fractions):
  """Summed normal-tissue fraction per voxel (about 1 inside the brain)."""
  return sum(fractions[t] for t in NORMAL_TISSUES)


# ----------------------------------------------------------------------------------------------
# Structures of the `tissue6` label space

# Deep structures by their ids in `structures()`. nilearn ships only the MNI152 T1 and the GM and
# WM probability maps (its subcortical and cerebellar atlases are downloads), so these are drawn
# from the tissue maps plus position in MNI space: a coarse, documented mapping, not an atlas.
STRUCTURES = ("basal_ganglia", "ventricles", "cerebellum", "brainstem")
# MNI boxes (mm; x is left-right, y posterior-anterior, z inferior-superior).
_DEEP_GREY_BOX = dict(x=32.0, y=(-35.0, 28.0), z=(-12.0, 24.0))  # caudate, putamen, pallidum,
                                                                   # thalamus
_VENTRICLE_BOX = dict(x=30.0, y=(-50.0, 35.0), z=(-20.0, 35.0))  # lateral and third ventricles
_BRAINSTEM_BOX = dict(x=14.0, y=(-42.0, -8.0), z=(-90.0, -8.0))  # midbrain, pons, medulla
_CEREBELLUM_Y = -40.0      # behind this coronal plane and below the tentorium ...
_TENTORIUM_Z = -10.0       # ... whose height falls by 0.25 mm per mm further back


def _in_box(x, y, z, box):
  return ((np.abs(x) <= box["x"]) & (y >= box["y"][0]) & (y <= box["y"][1])
          & (z >= box["z"][0]) & (z <= box["z"][1]))


@functools.lru_cache(maxsize=4)
def structures(spacing: float = 2.0) -> np.ndarray:
  """int8 map on the `atlas(spacing)` grid: 0 none, else 1 + the index in `STRUCTURES`.

  By tissue and position (see STRUCTURES):
    ventricles     CSF (fraction > 0.5) more than 20 mm deep in the brain, inside the ventricle box,
                   in the large connected components (drops deep sulcal CSF), dilated by a voxel;
    basal ganglia  more than 18 mm deep inside the deep-grey box (its GM voxels are the deep grey
                   matter: caudate, putamen, pallidum and thalamus together);
    brainstem      the brainstem box, below z = -8 mm;
    cerebellum     behind y = -40 mm and below a plane falling from z = -10 mm there by 0.25 mm per
                   mm backwards (the tentorium), outside the brainstem; it also takes a little
                   inferior temporo-occipital cortex.
  This map says where a structure may be; a subject's voxel takes its label only if its own
  tissue fits (`subject._tissue6_label`). Read-only; cached per spacing.
  """
  atl = atlas(spacing)
  shape, affine = atl["shape"], atl["affine"]
  x, y, z = (affine[a, 3] + affine[a, a] * np.arange(shape[a]) for a in range(3))
  x, y, z = np.meshgrid(x, y, z, indexing="ij")
  csf = atl["csf"]
  brain = (csf + atl["gm"] + atl["wm"]) > 0.5
  depth = ndimage.distance_transform_edt(brain, sampling=atl["spacing"])
  out = np.zeros(shape, np.int8)
  ids = {name: i + 1 for i, name in enumerate(STRUCTURES)}

  out[brain & (depth > 18.0) & _in_box(x, y, z, _DEEP_GREY_BOX)] = ids["basal_ganglia"]
  ventricles = (csf > 0.5) & (depth > 20.0) & _in_box(x, y, z, _VENTRICLE_BOX)
  components, n = ndimage.label(ventricles)
  if n:
    sizes = ndimage.sum(ventricles, components, np.arange(1, n + 1))
    ventricles = np.isin(components, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    # One voxel more: a subject's deformed ventricle edge still finds the map (only its CSF
    # voxels become ventricles).
    out[ndimage.binary_dilation(ventricles)] = ids["ventricles"]
  brainstem = brain & _in_box(x, y, z, _BRAINSTEM_BOX)
  tentorium = _TENTORIUM_Z - 0.25 * np.clip(_CEREBELLUM_Y - y, 0.0, None)
  cerebellum = brain & ~brainstem & (y <= _CEREBELLUM_Y) & (z <= tentorium)
  out[cerebellum] = ids["cerebellum"]
  out[brainstem] = ids["brainstem"]
  out.setflags(write=False)
  return out


def warp_labels(labels, coords):
  """An integer map (e.g. `structures()`) carried by a subject's deformation: nearest neighbour."""
  return ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
