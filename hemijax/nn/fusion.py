"""Masked statistics over a padded modality axis.

Every method fuses per-modality features with one of these functions. A slot whose mask is false
never reaches the output or any gradient (it is replaced before any arithmetic, so NaN/inf garbage is
harmless), and the statistics stay finite for one or zero available entries. Because the modality axis
is padded to a fixed size, one compiled function serves every subset.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np


def _broadcast_mask(x, mask):
  """Returns `mask` as a bool array of x's shape, or raises ValueError naming the shapes."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"modality mask must be boolean, got dtype {mask.dtype}")
  try:
    shape = np.broadcast_shapes(mask.shape, x.shape)
  except ValueError:
    raise ValueError(
        f"modality mask of shape {mask.shape} does not broadcast to features of shape {x.shape}"
    ) from None
  if shape != tuple(x.shape):
    raise ValueError(
        f"modality mask of shape {mask.shape} would enlarge features of shape {x.shape}")
  return jnp.broadcast_to(mask, x.shape)


def _count(mask, axis):
  return jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32)


def masked_mean(x, mask, axis=0, keepdims=False):
  """Mean of `x` over `axis` using only entries where `mask` is true; 0 where none is."""
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  total = jnp.sum(jnp.where(mask, x, 0), axis=axis, keepdims=True)
  mean = jnp.where(n > 0, total / jnp.maximum(n, 1).astype(x.dtype), 0)
  return mean if keepdims else jnp.squeeze(mean, axis=axis)


def masked_variance(x, mask, axis=0, keepdims=False):
  """Unbiased (n-1) variance over `axis` of the entries where `mask` is true.

  Exactly 0 where fewer than two entries are available (one modality carries no spread).
  """
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  centred = jnp.where(mask, x - mean, 0)
  sum_sq = jnp.sum(centred * centred, axis=axis, keepdims=True)
  var = jnp.where(n > 1, sum_sq / jnp.maximum(n - 1, 1).astype(x.dtype), 0)
  return var if keepdims else jnp.squeeze(var, axis=axis)


def masked_f_mean(x, mask, f: Callable = lambda v: v, f_inv: Callable = lambda v: v, axis=0,
                  keepdims=False):
  """Generalised f-mean f_inv(mean(f(x))) over the available entries; 0 where none is.

  Masked slots are filled with a point inside f's domain (the arithmetic mean of the available
  entries, or 1 where none is) before f is applied, so f never sees garbage and its gradient stays
  finite (the double-`where` trick).
  """
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  plain_mean = masked_mean(x, mask, axis=axis, keepdims=True)
  fill = jnp.where(n > 0, plain_mean, jnp.ones_like(plain_mean))
  safe_x = jnp.where(mask, x, fill)
  mean_f = masked_mean(f(safe_x), mask, axis=axis, keepdims=True)
  mean_f = jnp.where(n > 0, mean_f, f(jnp.ones_like(mean_f)))
  out = jnp.where(n > 0, f_inv(mean_f), 0)
  return out if keepdims else jnp.squeeze(out, axis=axis)


def masked_max(x, mask, axis=0, keepdims=False):
  """Maximum over the available entries; 0 where none is."""
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  lowest = jnp.finfo(x.dtype).min if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  out = jnp.max(jnp.where(mask, x, lowest), axis=axis, keepdims=True)
  out = jnp.where(n > 0, out, 0)
  return out if keepdims else jnp.squeeze(out, axis=axis)


def moments(x, mask, axis=0, channel_axis=-1):
  """HeMIS abstraction layer: masked mean and variance over `axis`, concatenated along channels."""
  mean = masked_mean(x, mask, axis=axis)
  var = masked_variance(x, mask, axis=axis)
  return jnp.concatenate([mean, var], axis=channel_axis)


F_MEANS = {
    "identity": (lambda v: v, lambda v: v),
    "exp": (jnp.exp, jnp.log),
}


def expand_modality_mask(modality_mask, features_ndim):
  """(B, M) mask -> shape broadcastable to features (B, M, *spatial, C)."""
  modality_mask = jnp.asarray(modality_mask)
  extra = features_ndim - modality_mask.ndim
  return modality_mask.reshape(modality_mask.shape + (1,) * extra)
