"""Random smooth fields and rotations shared by the phantom's anatomy, lesions and bias fields."""
from __future__ import annotations

import math

import numpy as np


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
