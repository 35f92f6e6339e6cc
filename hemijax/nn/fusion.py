"""Masked statistics over a padded modality axis.

Every method fuses per-modality features with one of these functions. A slot whose mask is false
never reaches the output or any gradient (it is replaced before any arithmetic, so NaN/inf garbage is
harmless), and the statistics stay finite for one or zero available entries. Because the modality axis
is padded to a fixed size, one compiled function serves every subset.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
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


# Up to this many slots, a sum over the modality axis is written as elementwise adds of its
# slices: XLA:CPU runs a reduction over a non-minor axis of a large array some 40x slower than those
# adds, which it fuses into one vectorised loop (the masked mean and variance of 1 x 4 x 64^3 x 48
# features: 0.88 s against 0.068 s; benchmarks/bench_fusion.py). The same holds for the gradient
# of a broadcast along that axis (`x - mean`), which autodiff writes as such a reduction; so the
# sum and the broadcast are each other's transpose here, both unrolled (`jax.custom_vjp`: jax.grad
# and jax.vjp, no forward mode, as the CPU convolutions of `hemijax.nn.conv`).
_UNROLL_SLOTS = 32


def _unrolled_sum(x, axis):
  out = lax.index_in_dim(x, 0, axis)
  for i in range(1, x.shape[axis]):
    out = out + lax.index_in_dim(x, i, axis)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _slot_sum(x, axis):
  return _unrolled_sum(x, axis)


def _slot_sum_fwd(x, axis):
  return _unrolled_sum(x, axis), x.shape


def _slot_sum_bwd(axis, shape, g):
  return (_slot_broadcast(g, shape, axis),)


_slot_sum.defvjp(_slot_sum_fwd, _slot_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _slot_broadcast(v, shape, axis):
  return jnp.broadcast_to(v, shape)


def _slot_broadcast_fwd(v, shape, axis):
  return jnp.broadcast_to(v, shape), None


def _slot_broadcast_bwd(shape, axis, _, g):
  return (_slot_sum(g, axis),)


_slot_broadcast.defvjp(_slot_broadcast_fwd, _slot_broadcast_bwd)


def _unrolls(x, axis):
  return 0 < x.shape[axis] <= _UNROLL_SLOTS


def _sum(x, axis):
  """`jnp.sum(x, axis, keepdims=True)`, unrolled over a short axis."""
  axis = axis % x.ndim
  if not _unrolls(x, axis):
    return jnp.sum(x, axis=axis, keepdims=True)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return _unrolled_sum(x, axis)  # counts: nothing to differentiate
  return _slot_sum(x, axis)


def _spread(v, x, axis):
  """`v` (x's shape with `axis` kept as 1) broadcast along `axis` to x's shape."""
  axis = axis % x.ndim
  if not _unrolls(x, axis):
    return jnp.broadcast_to(v, x.shape)
  return _slot_broadcast(v, tuple(x.shape), axis)


def _count(mask, axis):
  return _sum(mask.astype(jnp.int32), axis)


def masked_mean(x, mask, axis=0, keepdims=False):
  """Mean of `x` over `axis` using only entries where `mask` is true; 0 where none is."""
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  total = _sum(jnp.where(mask, x, 0), axis)
  mean = jnp.where(n > 0, total / jnp.maximum(n, 1).astype(x.dtype), 0)
  return mean if keepdims else jnp.squeeze(mean, axis=axis)


def masked_variance(x, mask, axis=0, keepdims=False):
  """Unbiased (n-1) variance over `axis` of the entries where `mask` is true.

  Exactly 0 where fewer than two entries are available (one modality carries no spread).
  """
  mask = _broadcast_mask(x, mask)
  n = _count(mask, axis)
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  centred = jnp.where(mask, x - _spread(mean, x, axis), 0)
  sum_sq = _sum(centred * centred, axis)
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
  safe_x = jnp.where(mask, x, _spread(fill, x, axis))
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
