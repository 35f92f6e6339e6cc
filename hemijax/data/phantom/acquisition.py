"""MR contrast of the phantom: tissue relaxation and scanner protocol tables, the spin-echo and
inversion-recovery signal equations, and the acquisition of one image (bias field, Rician noise,
per-file intensity scale). See docs/data.md for the equations and the tables.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from hemijax.data.phantom.random_fields import smooth_field

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
# Every contrast the phantom can acquire, in the order of their random streams: append only, so a
# subject's images stay bit-identical when a contrast is added. The BraTS four are the default
# sets of the tasks; "pd" (proton density: long TR, short TE spin echo) is acquired only on request
# (`modalities=`, `--modalities`).
MODALITIES = ("flair", "t1", "t1ce", "t2", "pd")
EXTRA_MODALITIES = ("pd",)   # acquisitions any task may add to its own modalities

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
        description="1.5 T clinical: spin-echo T1/T1ce, spin-echo T2, IR FLAIR (training-like); "
                    "spin-echo PD on request",
        sequences={
            "flair": Sequence("ir", tr=(8000, 10000), te=(100, 140), ti=(2250, 2450)),
            "t1": Sequence("se", tr=(450, 650), te=(8, 20)),
            "t1ce": Sequence("se", tr=(450, 650), te=(8, 20)),
            "t2": Sequence("se", tr=(3500, 6000), te=(85, 120)),
            # Long TR (T1 weighting mostly recovered), short TE (little T2 decay): signal ~ PD.
            "pd": Sequence("se", tr=(2500, 3500), te=(10, 20)),
        },
        dose=(0.8, 1.2), bias=(0.05, 0.15), bias_scale_mm=100.0, noise=(0.02, 0.05)),
    "heldout": Protocol(
        description="different scanner: IR-prepared (MPRAGE-like) T1/T1ce, short-TE T2 and FLAIR, "
                    "shorter TI, shorter-TR PD, stronger bias, more noise, 3 mm slices",
        sequences={
            "flair": Sequence("ir", tr=(6000, 7000), te=(80, 95), ti=(1950, 2150)),
            "t1": Sequence("ir", tr=(1800, 2300), te=(3, 5), ti=(800, 1000)),
            "t1ce": Sequence("ir", tr=(1800, 2300), te=(3, 5), ti=(800, 1000)),
            "t2": Sequence("se", tr=(3000, 4000), te=(70, 85)),
            "pd": Sequence("se", tr=(2000, 2600), te=(8, 14)),
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
# One image

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
