"""Layers every model shares besides the convolution (`hemijax.nn.conv`): pooling, upsampling,
per-modality stacking."""
from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Models import the convolution from here too.
from hemijax.nn.conv import IMPLS, Conv, ModuleDef, conv, conv_factory, resolve_impl  # noqa: F401
from hemijax.nn.conv import _tuple


def per_modality(layer: ModuleDef, num_modalities: int, in_axes=0,
                 collections: tuple[str, ...] = ("params",)) -> ModuleDef:
  """`layer` once per modality: its variables in `collections` stacked on a leading modality
  axis, applied with vmap over `in_axes` of the inputs, outputs stacked on axis 0.

  `layer` is a Module class or a `functools.partial` of one (its bound fields are kept).
  """
  bound = functools.partial(layer)  # a class becomes a partial without bound fields
  stacked = nn.vmap(bound.func, in_axes=in_axes, out_axes=0,
                    variable_axes={name: 0 for name in collections},
                    split_rngs={"params": True}, axis_size=num_modalities)
  return functools.partial(stacked, *bound.args, **bound.keywords)


def apply_per_modality(stacked, image, *args):
  """Runs per-modality layers (`per_modality`) on each channel of `image (B, *sp, M)` as a
  one-channel image; outputs `(B, M, ...)` (each array of a tuple of outputs)."""
  outputs = stacked(jnp.moveaxis(image, -1, 0)[..., None], *args)
  return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1), outputs)


def max_pool(x, window=2, strides=None, padding="SAME"):
  """Max-pooling over the spatial axes of a channels-last array.

  Same values and gradient as `flax.linen.max_pool` (padding with -inf; on ties the first
  position in the window gets the gradient), computed as a maximum over shifted strided views:
  XLA's `reduce_window` gradient is a `select_and_scatter` that XLA:CPU runs slowly.
  """
  nd = x.ndim - 2
  window = _tuple(window, nd)
  strides = window if strides is None else _tuple(strides, nd)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _max_pool(x, window, strides, pads, x.shape[1:-1])


def _pool_views(x, window, strides, pads):
  """The strided views of x (padded with -inf) that each window position reads."""
  low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  xp = lax.pad(x, jnp.array(low, x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
               + [(0, 0, 0)])
  out = [(n - k) // s + 1 for n, k, s in zip(xp.shape[1:-1], window, strides)]
  for offset in itertools.product(*[range(k) for k in window]):
    yield offset, xp[(slice(None),) + tuple(slice(t, t + (o - 1) * s + 1, s)
                                            for t, o, s in zip(offset, out, strides))]


def _max_pool_winner(x, window, strides, pads):
  """Pooled maximum and, per output, the index of the first window position holding it."""
  views = _pool_views(x, window, strides, pads)
  _, y = next(views)
  winner = jnp.zeros(y.shape, jnp.int8 if math.prod(window) < 128 else jnp.int32)
  for i, (_, view) in enumerate(views, start=1):
    winner = jnp.where(view > y, jnp.array(i, winner.dtype), winner)
    y = jnp.maximum(y, view)  # lax.max semantics (NaN propagates)
  return y, winner


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, in_spatial):
  return _max_pool_winner(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads, in_spatial):
  return _max_pool_winner(x, window, strides, pads)


def _max_pool_bwd(window, strides, pads, in_spatial, winner, g):
  # Each window position scatters the gradient of the outputs it won back to the input: a pad
  # with interior (stride - 1) zeros, shifted by the position and cropped to the input.
  dx = 0
  for i, offset in enumerate(itertools.product(*[range(k) for k in window])):
    config = [(0, 0, 0)]
    for t, (lo, _), n, o, s in zip(offset, pads, in_spatial, g.shape[1:-1], strides):
      config.append((t - lo, n - (t - lo) - (o - 1) * s - 1, s - 1))
    config.append((0, 0, 0))
    dx = dx + lax.pad(jnp.where(winner == i, g, 0), jnp.zeros((), g.dtype), config)
  return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def upsample(x, factor=2):
  """Nearest-neighbour upsampling of the spatial axes."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, factor, axis=axis)
  return x
