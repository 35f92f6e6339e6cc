"""One phantom subject: deformed anatomy, lesions, labels and every requested modality's image."""
from __future__ import annotations

import contextlib

import numpy as np
from scipy import ndimage

from hemijax.data.phantom.acquisition import (MODALITIES, NORMAL_TISSUES, _acquire, _draw_tissues,
                                              get_protocol)
from hemijax.data.phantom.anatomy import (STRUCTURES, _warp, atlas, brain_total, random_deformation,
                                          structures, warp_labels)
from hemijax.data.phantom.lesions import (TUMOR_LABELS, _ellipsoid_radius, _tumor_compartments,
                                          _tumor_geometry, _wmh_masks)
from hemijax.data.phantom.random_fields import smooth_field
from hemijax.data.tasks import check_modalities, get_task

# Tasks whose labels are tissues (and that may add white-matter lesions, `lesions=True`).
TISSUE_TASKS = ("tissue", "tissue6")

try:  # installed with nilearn (via scikit-learn); optional
  from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
  threadpool_limits = None


def _single_threaded():
  """One BLAS thread: the small matrix products here lose to thread start-up on shared CPUs."""
  if threadpool_limits is None:
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


def generate_subject(task, rng_or_seed, spacing=2.0, protocol="default", modalities=None, *,
                     lesions=None, enhancing=None, skull_strip=True):
  """One phantom subject.

  Args:
    task: 'tumor', 'wmh', 'tissue' or 'tissue6' (hemijax.data.tasks).
    rng_or_seed: a numpy Generator or an int seed. Anatomy, lesions, tissue parameters and each
      modality use separate streams, so the same seed gives the same brain under any protocol
      and any modality subset.
    spacing: isotropic voxel size in mm.
    protocol: a name in PROTOCOLS (or a Protocol).
    modalities: which images to make (default: the task's); any of `acquisition.MODALITIES`
      (the BraTS four and "pd").
    lesions: tissue tasks only: also add white-matter lesions (their "lesion" class). Default False.
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
                                allowed=MODALITIES, option="modalities (--modalities)")
  if lesions and task.name not in TISSUE_TASKS:
    raise ValueError(f"lesions (--lesions) applies to the tissue tasks {list(TISSUE_TASKS)} only")
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
  elif task.name == "wmh" or lesions:   # (lesions: a tissue task)
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
  if task.name in TISSUE_TASKS:
    normal = np.stack([fractions[t] for t in NORMAL_TISSUES])
    label = np.where(brain, 1 + np.argmax(normal, axis=0), 0).astype(np.int16)
    if task.name == "tissue6":
      label = _tissue6_label(label, warp_labels(structures(spacing), coords), task)
  if task.name == "tumor":
    for name in ("edema", "nonenhancing", "necrosis", "enhancing"):
      label[masks[name]] = TUMOR_LABELS[name]
  elif "wmh" in masks:
    label[masks["wmh"]] = task.label_values[task.class_names.index("lesion")]

  tissues = _draw_tissues(tissue_rng)
  keep = ndimage.binary_dilation(brain) if skull_strip else None
  # One stream per contrast the phantom knows (children of one seed: adding a contrast at the end
  # of MODALITIES leaves the others' streams as they were).
  streams = dict(zip(MODALITIES, acq_rng.spawn(len(MODALITIES))))
  images, acquisition = {}, {}
  for m in modalities:
    images[m], acquisition[m] = _acquire(streams[m], m, protocol_obj, fractions, heterogeneity,
                                         texture, tissues, brain, spacing, keep)
  meta["acquisition"] = acquisition
  return dict(images=images, label=label, affine=atl["affine"].copy(), meta=meta)


def _tissue6_label(tissue, structure, task):
  """The `tissue6` label map from the dominant tissue (0 outside, 1 csf, 2 gm, 3 wm) and the
  subject's warped `anatomy.structures` map: CSF is background except in the ventricles; GM in
  the deep-grey region (or the ventricles' rim) is basal ganglia; GM and WM in the cerebellum and
  brainstem regions are those; the rest of GM and WM stay GM and WM."""
  value = dict(zip(task.class_names, task.label_values))
  region = {name: structure == i + 1 for i, name in enumerate(STRUCTURES)}
  csf, gm, wm = tissue == 1, tissue == 2, tissue == 3
  out = np.zeros(tissue.shape, np.int16)
  out[wm] = value["wm"]
  out[gm] = value["gm"]
  out[csf & region["ventricles"]] = value["ventricles"]
  out[gm & (region["basal_ganglia"] | region["ventricles"])] = value["basal_ganglia"]
  for name in ("cerebellum", "brainstem"):
    out[(gm | wm) & region[name]] = value[name]
  return out
