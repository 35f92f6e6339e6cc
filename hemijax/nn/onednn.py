"""oneDNN's direct convolution on CPU, through the custom call XLA:CPU itself executes.

XLA:CPU ships oneDNN and runs a custom call named `__onednn$convolution` (backend config
`xla.cpu.OneDnnConvolutionConfig`, as JSON) with oneDNN's forward convolution, threaded on XLA's
own pool; its rewriter that would emit such calls is not enabled in the released jaxlib. This module
emits the call for a channels-last convolution, which is what PyTorch runs on CPU too.

The config's encoding is an XLA internal that has changed between releases (spatial dims one- or
zero-based), so `available()` checks it once per process against `lax.conv_general_dilated` on a
small case, and callers fall back to another lowering when it does not match or does not compile.
Forward only (oneDNN's `forward_inference`); `hemijax.nn.conv` builds the gradients from it.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir
from jax.interpreters.mlir import ir

TARGET = "__onednn$convolution"

_conv_p = jex_core.Primitive("onednn_convolution")


def _lax_conv(x, kernel, strides, dilation, pads):
  """The same convolution by XLA: the call's shape rule and the reference of `available()`."""
  nd = kernel.ndim - 2
  spec = "N" + "DHW"[-nd:] + "C"
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=(spec, "DHW"[-nd:] + "IO", spec))


@_conv_p.def_abstract_eval
def _abstract_eval(x, kernel, *, strides, dilation, pads):
  out = jax.eval_shape(functools.partial(_lax_conv, strides=strides, dilation=dilation,
                                         pads=pads), x, kernel)
  return jax.core.ShapedArray(out.shape, out.dtype)


@_conv_p.def_impl
def _impl(x, kernel, **params):
  # Outside jit (eager calls): compile the one call.
  return jax.jit(functools.partial(_conv_p.bind, **params))(x, kernel)


def _config(nd: int, strides, dilation, pads) -> str:
  """OneDnnConvolutionConfig for channels-last input/output (N, *spatial, C) and a
  (*window, Cin, Cout) kernel: zero-based axis positions; strides and pads as they are, dilations
  as XLA's (oneDNN's + 1), the encoding of the jaxlib versions `available()` accepts."""
  rank = nd + 2
  data = {"batch_dim": 0, "feature_dim": rank - 1, "spatial_dims": list(range(1, nd + 1))}
  return json.dumps({"onednn_conv_config": {
      "dims": rank,
      "input": {"dims": rank, "data": data},
      "kernel": {"dims": rank, "filter": {"input_feature_dim": nd, "output_feature_dim": nd + 1,
                                          "spatial_dims": list(range(nd))}},
      "output": {"dims": rank, "data": data},
      "window": {"strides": list(strides), "pad_left": [lo for lo, _ in pads],
                 "pad_right": [hi for _, hi in pads], "window_dilations": list(dilation)},
      "feature_groups": 1}})


def _lowering(ctx, x, kernel, *, strides, dilation, pads):
  (out_aval,) = ctx.avals_out
  op = stablehlo.CustomCallOp(
      [mlir.aval_to_ir_type(ctx.module_context, out_aval)], [x, kernel], TARGET,
      backend_config=ir.StringAttr.get(_config(len(strides), strides, dilation, pads)),
      api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1))
  return op.results


mlir.register_lowering(_conv_p, _lowering, platform="cpu")


def conv(x, kernel, strides, dilation, pads):
  """Channels-last convolution `x (B, *spatial, Cin)` * `kernel (*window, Cin, Cout)` by oneDNN
  (1 to 3 spatial dims, float32, explicit (lo, hi) pads; negative pads crop the input first).
  Same numbers as `lax.conv_general_dilated` up to float rounding. CPU only; check `available()`."""
  nd = kernel.ndim - 2
  crop = [(min(lo, 0), min(hi, 0)) for lo, hi in pads]
  if any(lo or hi for lo, hi in crop):
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in crop]
                + [(0, 0, 0)])
  pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads)
  return _conv_p.bind(x, kernel, strides=tuple(strides), dilation=tuple(dilation), pads=pads)


def supports(x, kernel) -> bool:
  """Whether `conv` takes these operands (dtype and rank), whatever `available()` says."""
  return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and 1 <= kernel.ndim - 2 <= 3)


@functools.cache
def available() -> bool:
  """Whether this jaxlib runs `conv` correctly: on the CPU backend, a small strided, dilated and
  asymmetrically padded 3D and 2D convolution agree with `lax.conv_general_dilated`. Checked once
  per process (a few compilations, well under a second)."""
  if jax.default_backend() != "cpu":
    return False
  rng = np.random.default_rng(0)
  try:
    with jax.ensure_compile_time_eval():  # concrete even when first asked inside a trace
      for nd, strides, dilation, pads in ((3, (1, 2, 1), (1, 1, 2), ((1, 0), (2, 1), (1, 1))),
                                          (2, (1, 1), (1, 1), ((1, 1), (1, 1)))):
        x = jnp.asarray(rng.standard_normal((2,) + (7,) * nd + (3,)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3,) * nd + (3, 5)), jnp.float32)
        want = _lax_conv(x, kernel, strides, dilation, pads)
        got = jax.jit(conv, static_argnums=(2, 3, 4))(x, kernel, strides, dilation, pads)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
          return False
  except Exception:  # noqa: BLE001 (a jaxlib without the call fails in many ways: fall back)
    return False
  return True
