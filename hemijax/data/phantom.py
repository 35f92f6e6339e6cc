"""Built-in MRI phantoms: MNI152 anatomy, MR-physics contrast, tumours / WM lesions, several layouts.

Anatomy comes from the MNI152 2009a template and GM/WM probability maps that the `nilearn` wheel
ships (read from its package data, never downloaded). Every subject gets its own random smooth
deformation. Image contrast is computed from per-tissue proton density, T1 and T2 through the
spin-echo and inversion-recovery signal equations with per-sequence TR/TE/TI drawn from a named
protocol; then a smooth bias field, Rician noise and an arbitrary per-file intensity scale.

  python -m hemijax.data.phantom --task tumor --out DIR --n-subjects 20 --seed 0 --spacing 2
  python -m hemijax.data.phantom --montage docs/phantom_montage.png

See docs/data.md for the equations, the parameter tables, the protocols and the file layouts.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemijax import atomic
from hemijax.data.tasks import KNOWN_MODALITIES, check_modalities, get_task

try:  # installed with nilearn (via scikit-learn); optional
  from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
  threadpool_limits = None

VERSION = 1
LAYOUTS = ("brats", "brats2018", "nnunet", "manifest")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
# nnU-Net style channel names; readers map them to lower case.
CHANNEL_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}

_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MARGIN_MM = 10.0        # field of view around the template brain: room for scaling and warps
_GD_RELAXIVITY = 4.0     # r1 of gadolinium, 1/(mM s), about 1.5 T


# ----------------------------------------------------------------------------------------------
# Tissue and protocol tables

@dataclasses.dataclass(frozen=True)
class Tissue:
  """Relaxation properties (about 1.5 T); `gd` = gadolinium concentration (mM) at full dose."""
  pd: float        # proton density, relative to CSF
  t1: float        # ms
  t2: float        # ms
  gd: float = 0.0
  sd: float = 0.04  # per-subject log-normal spread of PD, T1 and T2


TISSUES = {
    "csf": Tissue(pd=1.00, t1=4000.0, t2=2000.0, gd=0.0),
    "gm": Tissue(pd=0.82, t1=1200.0, t2=100.0, gd=0.02),      # blood volume: faint uptake
    "wm": Tissue(pd=0.70, t1=700.0, t2=75.0, gd=0.01),
    "edema": Tissue(pd=0.88, t1=1350.0, t2=200.0, gd=0.02, sd=0.08),
    "necrosis": Tissue(pd=0.95, t1=2600.0, t2=600.0, gd=0.0, sd=0.15),
    "nonenhancing": Tissue(pd=0.90, t1=1450.0, t2=150.0, gd=0.02, sd=0.08),
    "enhancing": Tissue(pd=0.86, t1=1600.0, t2=130.0, gd=0.35, sd=0.08),   # leaky blood-brain barrier
    "wmh": Tissue(pd=0.80, t1=1150.0, t2=160.0, gd=0.0, sd=0.08),
}
NORMAL_TISSUES = ("csf", "gm", "wm")
# Label (task.label_values) that each lesion compartment is written as.
TUMOR_LABELS = {"necrosis": 1, "nonenhancing": 1, "edema": 2, "enhancing": 4}


@dataclasses.dataclass(frozen=True)
class Sequence:
  """One acquisition: 'se' (spin echo) or 'ir' (inversion recovery); (low, high) ranges in ms."""
  kind: str
  tr: tuple[float, float]
  te: tuple[float, float]
  ti: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Ranges from which each subject's acquisition is drawn uniformly."""
  description: str
  sequences: dict            # modality -> Sequence
  dose: tuple[float, float]  # contrast-agent dose, relative to the tissue table's `gd`
  bias: tuple[float, float]  # standard deviation of the log bias field
  bias_scale_mm: float       # spatial scale of the bias field
  noise: tuple[float, float]  # Rician sigma relative to the mean brain signal
  slice_blur_mm: float = 0.0  # through-plane (z) blur: thick slices


PROTOCOLS = {
    "default": Protocol(
        description="1.5 T clinical: spin-echo T1/T1ce, spin-echo T2, IR FLAIR (training-like)",
        sequences={
            "flair": Sequence("ir", tr=(8000, 10000), te=(100, 140), ti=(2250, 2450)),
            "t1": Sequence("se", tr=(450, 650), te=(8, 20)),
            "t1ce": Sequence("se", tr=(450, 650), te=(8, 20)),
            "t2": Sequence("se", tr=(3500, 6000), te=(85, 120)),
        },
        dose=(0.8, 1.2), bias=(0.05, 0.15), bias_scale_mm=100.0, noise=(0.02, 0.05)),
    "heldout": Protocol(
        description="different scanner: IR-prepared (MPRAGE-like) T1/T1ce, short-TE T2 and FLAIR, "
                    "shorter TI, stronger bias, more noise, 3 mm slices",
        sequences={
            "flair": Sequence("ir", tr=(6000, 7000), te=(80, 95), ti=(1950, 2150)),
            "t1": Sequence("ir", tr=(1800, 2300), te=(3, 5), ti=(800, 1000)),
            "t1ce": Sequence("ir", tr=(1800, 2300), te=(3, 5), ti=(800, 1000)),
            "t2": Sequence("se", tr=(3000, 4000), te=(70, 85)),
        },
        dose=(0.9, 1.4), bias=(0.2, 0.35), bias_scale_mm=70.0, noise=(0.05, 0.08),
        slice_blur_mm=1.5),
}


def get_protocol(name: str) -> Protocol:
  if name not in PROTOCOLS:
    raise ValueError(f"protocol (--protocol): unknown protocol {name!r}; choose one of "
                     f"{sorted(PROTOCOLS)}")
  return PROTOCOLS[name]


# ----------------------------------------------------------------------------------------------
# MR physics

def mr_signal(kind, pd, t1, t2, tr, te, ti=None):
  """Signed steady-state signal: spin echo or inversion recovery (magnitude is taken later)."""
  recovery = np.exp(-tr / t1)
  if kind == "se":
    longitudinal = 1.0 - recovery
  elif kind == "ir":
    longitudinal = 1.0 - 2.0 * np.exp(-ti / t1) + recovery
  else:
    raise ValueError(f"sequence kind must be 'se' or 'ir', got {kind!r}")
  return pd * longitudinal * np.exp(-te / t2)


def post_contrast_t1(t1, gd):
  """T1 (ms) shortened by a gadolinium concentration `gd` (mM): 1/T1' = 1/T1 + r1 * [Gd]."""
  return 1000.0 / (1000.0 / t1 + _GD_RELAXIVITY * gd)


# ----------------------------------------------------------------------------------------------
# Anatomy: the template, resampled once per spacing

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


# ----------------------------------------------------------------------------------------------
# Random fields and deformations

def _kernel_matrix(n, spacing, scale_mm):
  """(n, m) Gaussian interpolation weights from control points `scale_mm` apart to n voxels."""
  extent = (n - 1) * spacing
  m = int(math.ceil(extent / scale_mm)) + 3
  ctrl = extent / 2 + (np.arange(m) - (m - 1) / 2) * scale_mm   # centred, one beyond each end
  x = np.arange(n) * spacing
  w = np.exp(-0.5 * ((x[:, None] - ctrl[None, :]) / (0.6 * scale_mm))**2)
  return w / w.sum(1, keepdims=True)


def smooth_field(rng, shape, spacing, scale_mm):
  """Zero-mean, unit-variance random field smooth over about `scale_mm`.

  A coarse normal grid interpolated axis by axis (separable, so cheap even for large volumes).
  """
  (n0, n1, n2) = shape
  w0, w1, w2 = (_kernel_matrix(n, spacing, scale_mm) for n in shape)
  field = rng.standard_normal((w0.shape[1], w1.shape[1], w2.shape[1]))
  field = np.matmul(w1, field @ w2.T)                              # (m0, n1, n2), still small
  field = (w0 @ field.reshape(len(field), -1)).reshape(n0, n1, n2)  # one large matrix product
  field -= field.mean()
  field /= max(field.std(), 1e-12)
  return field.astype(np.float32)


def _rotation(rng, max_deg):
  """Random rotation matrix: small rotations about each axis (uniform up to `max_deg`)."""
  out = np.eye(3)
  for axis in range(3):
    a = math.radians(rng.uniform(-max_deg, max_deg))
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    out = r @ out
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


# ----------------------------------------------------------------------------------------------
# Lesions

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


def brain_total(fractions):
  """Summed normal-tissue fraction per voxel (about 1 inside the brain)."""
  return sum(fractions[t] for t in NORMAL_TISSUES)


# ----------------------------------------------------------------------------------------------
# One subject

def _draw_tissues(rng):
  """Per-subject tissue parameters (log-normal spread around the table), fixed draw order."""
  out = {}
  for name, t in TISSUES.items():
    f = np.exp(rng.normal(0.0, t.sd, 3))
    out[name] = dict(pd=t.pd * f[0], t1=t.t1 * f[1], t2=t.t2 * f[2], gd=t.gd)
  return out


def _draw_acquisition(rng, seq: Sequence):
  acq = dict(sequence=seq.kind, TR=float(rng.uniform(*seq.tr)), TE=float(rng.uniform(*seq.te)))
  if seq.ti is not None:
    acq["TI"] = float(rng.uniform(*seq.ti))
  return acq


def _acquire(rng, modality, protocol, fractions, heterogeneity, texture, tissues, brain, spacing,
             keep=None):
  """One image: signal equation per tissue, partial-volume mixing, slice blur, bias, noise, scale."""
  acq = _draw_acquisition(rng, protocol.sequences[modality])
  dose = float(rng.uniform(*protocol.dose)) if modality == "t1ce" else 0.0
  signed = np.zeros(brain.shape, np.float32)
  for name, frac in fractions.items():
    p = tissues[name]
    t1 = post_contrast_t1(p["t1"], p["gd"] * dose) if dose else p["t1"]
    if name in NORMAL_TISSUES:
      s = mr_signal(acq["sequence"], p["pd"], t1, p["t2"], acq["TR"], acq["TE"], acq.get("TI"))
      signed += np.float32(s) * frac
    else:  # lesions: heterogeneous water content lengthens T1 and T2 together
      where = frac > 0
      h = np.exp(heterogeneity[where])
      t1_map = post_contrast_t1(p["t1"] * h, p["gd"] * dose) if dose else p["t1"] * h
      s = mr_signal(acq["sequence"], p["pd"], t1_map, p["t2"] * h**2, acq["TR"], acq["TE"], acq.get("TI"))
      signed[where] += (s * frac[where]).astype(np.float32)
  clean = np.abs(signed) * texture
  if protocol.slice_blur_mm > 0:
    clean = ndimage.gaussian_filter1d(clean, protocol.slice_blur_mm / spacing, axis=2)
  reference = float(clean[brain].mean())
  bias_sd = rng.uniform(*protocol.bias)
  bias = np.exp(np.float32(bias_sd) * smooth_field(rng, brain.shape, spacing, protocol.bias_scale_mm))
  sigma = np.float32(rng.uniform(*protocol.noise) * reference)
  real = clean * bias + sigma * rng.standard_normal(brain.shape, dtype=np.float32)
  imag = sigma * rng.standard_normal(brain.shape, dtype=np.float32)
  image = np.sqrt(real * real + imag * imag)
  scale = math.exp(rng.uniform(math.log(200.0), math.log(4000.0))) / reference
  image *= np.float32(scale)
  if keep is not None:
    image[~keep] = 0.0
  if modality == "t1ce":
    acq["dose"] = dose
  acq.update(bias_sd=float(bias_sd), noise=float(sigma / reference), scale=float(scale))
  return image.astype(np.float32), acq


def _single_threaded():
  """One BLAS thread: the small matrix products here lose to thread start-up on shared CPUs."""
  if threadpool_limits is None:
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


def generate_subject(task, rng_or_seed, spacing=2.0, protocol="default", modalities=None, *,
                     lesions=None, enhancing=None, skull_strip=True):
  """One phantom subject.

  Args:
    task: 'tumor', 'wmh' or 'tissue' (hemijax.data.tasks).
    rng_or_seed: a numpy Generator or an int seed. Anatomy, lesions, tissue parameters and each
      modality use separate streams, so the same seed gives the same brain under any protocol
      and any modality subset.
    spacing: isotropic voxel size in mm.
    protocol: a name in PROTOCOLS (or a Protocol).
    modalities: which images to make (default: the task's).
    lesions: tissue task only: also add white-matter lesions (label 4). Default False.
    enhancing: tumour task: force (True) or forbid (False) an enhancing part; None = random.
    skull_strip: zero the image outside the (dilated) brain, as in BraTS.

  Returns:
    dict(images={modality: float32 3D}, label=int16 3D, affine=4x4 (mm, MNI world), meta=dict).
  """
  with _single_threaded():
    return _generate_subject(task, rng_or_seed, spacing, protocol, modalities, lesions, enhancing,
                             skull_strip)


def _generate_subject(task, rng_or_seed, spacing, protocol, modalities, lesions, enhancing,
                      skull_strip):
  task = get_task(task)
  protocol_obj = get_protocol(protocol) if isinstance(protocol, str) else protocol
  modalities = check_modalities(task.modalities if modalities is None else modalities,
                                option="modalities (--modalities)")
  if lesions and task.name != "tissue":
    raise ValueError("lesions (--lesions) applies to the tissue task only")
  rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
  anatomy_rng, lesion_rng, tissue_rng, acq_rng = rng.spawn(4)
  atl = atlas(spacing)
  spacing = atl["spacing"]

  coords = random_deformation(anatomy_rng, atl)
  texture = 1.0 + np.float32(0.03) * smooth_field(anatomy_rng, atl["shape"], spacing, 5.0)
  heterogeneity = np.float32(0.12) * smooth_field(anatomy_rng, atl["shape"], spacing, 4.0)
  meta = {}
  geo = radius = None
  if task.name == "tumor":
    geo = _tumor_geometry(lesion_rng, atl, enhancing)
    radius = _ellipsoid_radius(coords, geo["center"], spacing, geo["rotation"], geo["axes"])
    # Mass effect: tissue near the tumour is pushed outward (sampled from closer to its centre).
    push = 1.0 - geo["mass_effect"] * np.exp(-(radius / (1.2 * geo["core_mm"]))**2)
    c = geo["center"].astype(np.float32)[:, None, None, None]
    coords = c + (coords - c) * push
    meta["tumor"] = dict(kind=geo["kind"], core_mm=round(geo["core_mm"], 3),
                         edema_mm=round(geo["edema_mm"], 3))
  fractions = {t: _warp(atl[t], coords) for t in NORMAL_TISSUES}
  brain = brain_total(fractions) > 0.5

  masks = {}
  if task.name == "tumor":
    masks = _tumor_compartments(lesion_rng, geo, radius, fractions, brain, spacing)
  elif task.name == "wmh" or lesions:
    vdist = _warp(atl["ventricle_dist"], coords)
    masks = {"wmh": _wmh_masks(lesion_rng, fractions, vdist, brain, spacing)}

  # Lesions displace normal tissue; soft edges give partial volume like the template's.
  soft = {k: ndimage.gaussian_filter(m.astype(np.float32), 0.5) for k, m in masks.items() if m.any()}
  if soft:
    summed = sum(soft.values())
    total = np.minimum(summed, 1.0)
    shrink = total / np.maximum(summed, 1e-6)
    soft = {k: v * shrink for k, v in soft.items()}
    fractions = {t: f * (1.0 - total) for t, f in fractions.items()}
  fractions.update(soft)

  label = np.zeros(atl["shape"], np.int16)
  if task.name == "tissue":
    normal = np.stack([fractions[t] for t in NORMAL_TISSUES])
    label = np.where(brain, 1 + np.argmax(normal, axis=0), 0).astype(np.int16)
  if task.name == "tumor":
    for name in ("edema", "nonenhancing", "necrosis", "enhancing"):
      label[masks[name]] = TUMOR_LABELS[name]
  elif "wmh" in masks:
    label[masks["wmh"]] = 1 if task.name == "wmh" else 4

  tissues = _draw_tissues(tissue_rng)
  keep = ndimage.binary_dilation(brain) if skull_strip else None
  streams = dict(zip(KNOWN_MODALITIES, acq_rng.spawn(len(KNOWN_MODALITIES))))
  images, acquisition = {}, {}
  for m in modalities:
    images[m], acquisition[m] = _acquire(streams[m], m, protocol_obj, fractions, heterogeneity,
                                         texture, tissues, brain, spacing, keep)
  meta["acquisition"] = acquisition
  return dict(images=images, label=label, affine=atl["affine"].copy(), meta=meta)


# ----------------------------------------------------------------------------------------------
# Writing datasets

def nifti_bytes(data, affine, compress=True):
  """NIfTI-1 file contents; gzip with mtime 0 and no file name, so same data -> same bytes."""
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  raw = img.to_bytes()
  return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def split_cases(case_ids, seed):
  """Random 60/20/20 split (at least one case per split when there are 3 or more)."""
  n = len(case_ids)
  order = np.random.default_rng([seed, 7]).permutation(n)
  if n >= 3:
    n_val = max(1, int(round(SPLIT_FRACTIONS["val"] * n)))
    n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * n)))
  else:
    n_val, n_test = 0, n - 1
  parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
  return {k: sorted(case_ids[i] for i in parts[k]) for k in ("train", "val", "test")}


def _missing(rng, modalities, rate):
  """Each modality absent with probability `rate`, but never all of them."""
  absent = rng.uniform(size=len(modalities)) < rate
  if absent.all():
    absent[rng.integers(len(modalities))] = False
  return [m for m, a in zip(modalities, absent) if a]


def _layout_paths(layout, case, modalities, grade="HGG"):
  """Relative paths {modality or 'label': path} of one case."""
  if layout == "brats":
    paths = {m: f"{case}/{case}_{m}.nii.gz" for m in modalities}
    paths["label"] = f"{case}/{case}_seg.nii.gz"
  elif layout == "brats2018":
    paths = {m: f"{grade}/{case}/{case}_{m}.nii" for m in modalities}
    paths["label"] = f"{grade}/{case}/{case}_seg.nii"
  elif layout == "nnunet":
    paths = {m: f"imagesTr/{case}_{i:04d}.nii.gz" for i, m in enumerate(modalities)}
    paths["label"] = f"labelsTr/{case}.nii.gz"
  else:
    paths = {m: f"cases/{case}_{m}.nii.gz" for m in modalities}
    paths["label"] = f"cases/{case}_seg.nii.gz"
  return paths


def _json_bytes(obj):
  return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _clear_previous(out):
  """Removes what an earlier phantom run wrote in `out` (listed in its phantom.json), nothing else."""
  if not os.path.isdir(out):
    if os.path.exists(out):
      raise ValueError(f"out (--out): {out} exists and is not a directory")
    return
  record = os.path.join(out, "phantom.json")
  if not os.path.isfile(record):
    if os.listdir(out):
      raise ValueError(f"out (--out): {out} is not empty and holds no phantom.json; "
                       "choose a new or empty directory")
    return
  try:
    with open(record) as f:
      files = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"out (--out): cannot read the file list of {record}: {e}") from None
  root = os.path.realpath(out)
  for rel in files:
    path = os.path.realpath(os.path.join(out, rel))
    if os.path.commonpath([root, path]) != root:
      raise ValueError(f"out (--out): {record} lists a file outside {out}: {rel}")
    if os.path.isfile(path):
      os.remove(path)
  # Drop the folders those files emptied, deepest first; never `out` itself.
  folders = {os.path.dirname(os.path.join(out, rel)) for rel in files}
  for folder in sorted(folders, key=lambda d: -d.count(os.sep)):
    while os.path.isdir(folder) and os.path.realpath(folder) != root and not os.listdir(folder):
      os.rmdir(folder)
      folder = os.path.dirname(folder)


def write_dataset(out, task, n_subjects, seed, spacing=2.0, layout="brats", missing_rate=0.0,
                  protocol="default", modalities=None, *, test_protocol=None, lesions=False,
                  skull_strip=True, verbose=False):
  """Writes a phantom dataset; returns the record also saved as DIR/phantom.json.

  Files: the layout's images and labels, DIR/splits.json ({"train","val","test"} -> case ids),
  DIR/phantom.json (options, per-case protocol, acquisition, missing modalities, file list), and
  DIR/dataset.json (nnunet) or DIR/manifest.csv (manifest). Subject i's images depend only on
  (seed, i, its protocol, spacing), not on n_subjects, the layout or the missing rate.
  `test_protocol` acquires the test split with another protocol (unseen in training).
  """
  task_obj = get_task(task)
  spacing = _check_spacing(spacing)
  if layout not in LAYOUTS:
    raise ValueError(f"layout (--layout): unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
  if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
    raise ValueError(f"n_subjects (--n-subjects) must be a positive integer, got {n_subjects!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
  if not (0.0 <= float(missing_rate) <= 1.0):
    raise ValueError(f"missing_rate (--missing-rate) must be in [0, 1], got {missing_rate}")
  get_protocol(protocol)
  if test_protocol is not None:
    get_protocol(test_protocol)
  if modalities is None:
    modalities = task_obj.modalities
  else:
    modalities = check_modalities(modalities, option="modalities (--modalities)")
    extra = [m for m in modalities if m not in task_obj.modalities]
    if extra:
      raise ValueError(f"modalities (--modalities): {extra} not among task {task_obj.name!r}'s "
                       f"modalities {list(task_obj.modalities)}")
    modalities = tuple(m for m in task_obj.modalities if m in modalities)   # task order
  if lesions and task_obj.name != "tissue":
    raise ValueError("lesions (--lesions) applies to the tissue task only")

  out = os.fspath(out)
  _clear_previous(out)
  os.makedirs(out, exist_ok=True)
  case_ids = [f"Phantom_{task_obj.name}_{i:03d}" for i in range(n_subjects)]
  splits = split_cases(case_ids, seed)
  split_of = {c: s for s, cs in splits.items() for c in cs}
  record = dict(generator="hemijax.data.phantom", version=VERSION, task=task_obj.name, seed=int(seed),
                n_subjects=int(n_subjects), spacing=spacing, layout=layout,
                missing_rate=float(missing_rate), protocol=protocol, test_protocol=test_protocol,
                modalities=list(modalities), lesions=bool(lesions), skull_strip=bool(skull_strip),
                complete=False, cases={}, files=[])
  # Cases are planned first so that an interrupted run can still be cleaned up by the next one.
  plans = []
  for i, case in enumerate(case_ids):
    missing = _missing(np.random.default_rng([seed, i, 1]), modalities, float(missing_rate))
    present = [m for m in modalities if m not in missing]
    case_protocol = test_protocol if (test_protocol and split_of[case] == "test") else protocol
    plans.append((i, case, present, missing, case_protocol))
    # brats2018 folders are by grade; the grade is only known after generation (see below).
    for grade in (("HGG", "LGG") if layout == "brats2018" and task_obj.name == "tumor" else ("HGG",)):
      paths = _layout_paths(layout, case, modalities, grade)
      record["files"] += [paths[m] for m in present] + [paths["label"]]
  extra_files = ["splits.json", {"nnunet": "dataset.json", "manifest": "manifest.csv"}.get(layout)]
  record["files"] = sorted(set(record["files"]) | {f for f in extra_files if f})
  atomic.write_bytes(os.path.join(out, "phantom.json"), _json_bytes(record))

  manifest_rows = []
  written = []
  for i, case, present, missing, case_protocol in plans:
    subject = generate_subject(task_obj.name, np.random.default_rng([seed, i]), spacing, case_protocol,
                               present, lesions=lesions, skull_strip=skull_strip)
    grade = "HGG"
    if layout == "brats2018" and task_obj.name == "tumor" and not (subject["label"] == 4).any():
      grade = "LGG"   # no enhancing part: the usual low-grade appearance
    paths = _layout_paths(layout, case, modalities, grade)
    gz = layout != "brats2018"
    for m in present:
      atomic.write_bytes(os.path.join(out, paths[m]), nifti_bytes(subject["images"][m], subject["affine"], gz))
    atomic.write_bytes(os.path.join(out, paths["label"]), nifti_bytes(subject["label"], subject["affine"], gz))
    written += [paths[m] for m in present] + [paths["label"]]
    record["cases"][case] = dict(split=split_of[case], protocol=case_protocol, missing=missing,
                                 **subject["meta"])
    manifest_rows.append([case] + [paths[m] if m in present else "" for m in KNOWN_MODALITIES]
                         + [paths["label"]])
    if verbose:
      print(f"{case}: {split_of[case]}, {case_protocol}, missing {missing or 'none'}", file=sys.stderr)

  atomic.write_bytes(os.path.join(out, "splits.json"), _json_bytes(splits))
  if layout == "nnunet":
    labels = dict(zip(task_obj.class_names, task_obj.label_values))
    dataset = {"channel_names": {str(i): CHANNEL_NAMES[m] for i, m in enumerate(modalities)},
               "labels": labels, "numTraining": int(n_subjects), "file_ending": ".nii.gz",
               "name": f"Phantom_{task_obj.name}"}
    atomic.write_bytes(os.path.join(out, "dataset.json"), _json_bytes(dataset))
    written.append("dataset.json")
  elif layout == "manifest":
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", *KNOWN_MODALITIES, "label"])
    w.writerows(manifest_rows)
    atomic.write_bytes(os.path.join(out, "manifest.csv"), buf.getvalue().encode())
    written.append("manifest.csv")
  record["files"] = sorted(written + ["splits.json"])
  record["complete"] = True
  atomic.write_bytes(os.path.join(out, "phantom.json"), _json_bytes(record))
  return record


# ----------------------------------------------------------------------------------------------
# Montage

def render_montage(path, seed=0, spacing=2.0):
  """PNG of axial slices through the tumour; columns = FLAIR, T1, T1ce, T2, labels over FLAIR.

  Rows: subject 1 (enhancing), subject 2 (no enhancing part), subject 3 (random), then subject 1
  again acquired with the 'heldout' protocol: same anatomy, another scanner.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  rows = [(0, "default", True), (1, "default", False), (2, "default", None), (0, "heldout", True)]
  cols = ["flair", "t1", "t1ce", "t2"]
  fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(2.2 * (len(cols) + 1), 2.5 * len(rows)),
                           facecolor="black")
  # BraTS colours: necrotic/non-enhancing red, oedema green, enhancing yellow.
  cmap = ListedColormap([(0, 0, 0, 0), (1, 0.15, 0.15, 0.8), (0.2, 0.9, 0.2, 0.55),
                         (0, 0, 0, 0), (1, 0.95, 0.1, 0.85)])
  for r, (i, protocol, enhancing) in enumerate(rows):
    subject = generate_subject("tumor", np.random.default_rng([seed, i]), spacing, protocol,
                               enhancing=enhancing)
    label = subject["label"]
    z = int(np.argmax((label > 0).sum((0, 1)) + 0.5 * np.isin(label, (1, 4)).sum((0, 1))))
    for c, m in enumerate(cols + ["label"]):
      ax = axes[r, c]
      img = subject["images"]["flair" if m == "label" else m][:, :, z]
      vals = img[img > 0]
      lo, hi = np.percentile(vals, (1.0, 99.5)) if vals.size else (0.0, 1.0)
      ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
      if m == "label":
        ax.imshow(label[:, :, z].T, origin="lower", cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for s in ax.spines.values():
        s.set_visible(False)
      if r == 0:
        ax.set_title({"label": "labels (1/2/4)"}.get(m, m.upper().replace("CE", "ce")),
                     color="white", fontsize=11)
    kind = subject["meta"]["tumor"]["kind"]
    axes[r, 0].set_ylabel(f"subject {i + 1}\n{protocol}, {kind}", color="white", fontsize=9)
  fig.suptitle(f"hemijax phantom, task tumor, seed {seed}, {spacing:g} mm", color="white", fontsize=11)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80, facecolor="black", metadata={"Software": None})
  plt.close(fig)
  atomic.write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# CLI

def _parser():
  p = argparse.ArgumentParser(
      prog="python -m hemijax.data.phantom",
      description="Write a phantom MRI dataset (NIfTI + splits.json), or render the docs montage.")
  p.add_argument("--task", default="tumor", help="tumor | wmh | tissue (default tumor)")
  p.add_argument("--out", help="output directory (new, empty, or written by this tool before)")
  p.add_argument("--n-subjects", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm (default 2)")
  p.add_argument("--layout", default="brats", help=f"one of {', '.join(LAYOUTS)} (default brats)")
  p.add_argument("--missing-rate", type=float, default=0.0,
                 help="probability that each modality file of a subject is absent (never all)")
  p.add_argument("--protocol", default="default", help=f"one of {', '.join(PROTOCOLS)}")
  p.add_argument("--test-protocol", default=None, help="acquire the test split with this protocol")
  p.add_argument("--modalities", default=None, help="comma-separated subset of the task's modalities")
  p.add_argument("--lesions", action="store_true", help="tissue task: add white-matter lesions (label 4)")
  p.add_argument("--no-skull-strip", action="store_true", help="keep the noise outside the brain")
  p.add_argument("--montage", metavar="PNG", help="render the docs montage to PNG instead")
  p.add_argument("--list-protocols", action="store_true", help="print the protocols and exit")
  p.add_argument("-q", "--quiet", action="store_true")
  return p


def main(argv=None):
  parser = _parser()
  def one_line_error(message):
    raise SystemExit(f"phantom: {message}")
  parser.error = one_line_error
  args = parser.parse_args(argv)
  try:
    if args.list_protocols:
      for name, p in PROTOCOLS.items():
        print(f"{name}: {p.description}")
      return 0
    if args.montage:
      render_montage(args.montage, seed=args.seed, spacing=args.spacing)
      return 0
    if not args.out:
      raise ValueError("--out is required (or give --montage PNG)")
    modalities = None
    if args.modalities is not None:
      modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    record = write_dataset(args.out, args.task, args.n_subjects, args.seed, spacing=args.spacing,
                           layout=args.layout, missing_rate=args.missing_rate, protocol=args.protocol,
                           modalities=modalities, test_protocol=args.test_protocol,
                           lesions=args.lesions, skull_strip=not args.no_skull_strip,
                           verbose=not args.quiet)
  except (ValueError, OSError) as e:   # bad option, or an unwritable --out / --montage path
    raise SystemExit(f"phantom: {e}") from None
  if not args.quiet:
    print(f"wrote {len(record['cases'])} {record['task']} subjects ({len(record['files'])} files) "
          f"to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
