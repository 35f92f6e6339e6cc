"""Shared layers: the convolution every model uses, pooling, upsampling and small blocks.

`conv` takes channels-last `x (B, *spatial, Cin)` and `kernel (*window, Cin, Cout)` for 1, 2 or 3
spatial dims. `impl` picks the lowering: "xla" is `lax.conv_general_dilated`; "auto" chooses per
backend (see `resolve_impl`).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla")


def _tuple(value, n):
  return tuple(value) if isinstance(value, Sequence) else (value,) * n


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown convolution impl {impl!r}; choose one of {IMPLS}")
  return "xla" if impl == "auto" else impl


def conv(x, kernel, *, strides=1, dilation=1, padding="SAME", impl="auto"):
  """N-d convolution, channels last. padding: "SAME", "VALID" or explicit pairs."""
  nd = kernel.ndim - 2
  strides, dilation = _tuple(strides, nd), _tuple(dilation, nd)
  resolve_impl(impl)
  spec = "N" + "DHW"[-nd:] + "C" if nd <= 3 else None
  kspec = "DHW"[-nd:] + "IO"
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=(spec, kspec, spec))


class Conv(nn.Module):
  """Convolution layer built on `conv`; spatial rank follows the input."""
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  dilation: int | Sequence[int] = 1
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.he_normal()

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    window = _tuple(self.kernel_size, nd)
    kernel = self.param("kernel", self.kernel_init, window + (x.shape[-1], self.features))
    y = conv(x, kernel.astype(x.dtype), strides=self.strides, dilation=self.dilation,
             padding=self.padding, impl=self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    return y


def max_pool(x, window=2, strides=None, padding="SAME"):
  """Max-pooling over the spatial axes of a channels-last array."""
  nd = x.ndim - 2
  window = _tuple(window, nd)
  strides = window if strides is None else _tuple(strides, nd)
  return nn.max_pool(x, window, strides, padding=padding)


def upsample(x, factor=2):
  """Nearest-neighbour upsampling of the spatial axes."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, factor, axis=axis)
  return x
