r"""A 3D kernel gradient as one matrix product with the narrower side stacked over the taps, against
hemijax's (`conv._kernel_grad`); both checked against XLA's gradient, then timed alternated.

  python benchmarks/probe_kernel_grad_stacking.py

Kept as the record of a lowering tried and not adopted (docs/performance.md, "Where the
disentanglement demo's time goes").
"""
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from hemijax import runtime  # noqa: E402
from hemijax.nn import conv as C  # noqa: E402
from benchmarks.common import time_interleaved  # noqa: E402


def dk_shifted(x, g, window, strides, dilation, pads):
  """dk as one matrix product over positions, the narrower side stacked over the taps: g placed
  at each tap's offset in the padded input's frame (fewer output channels), or x's view of each
  tap (fewer input channels)."""
  nd = len(window)
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
  in_sp, out_sp = xp.shape[1:-1], g.shape[1:-1]
  taps = list(itertools.product(*[range(k) for k in window]))
  cin, cout = x.shape[-1], g.shape[-1]
  contract = ((tuple(range(nd + 1)), tuple(range(nd + 1))), ((), ()))
  if cout <= cin:
    parts = []
    for t in taps:
      cfg = [(0, 0, 0)]
      for a, r, s, n, o in zip(t, dilation, strides, in_sp, out_sp):
        lo = a * r
        cfg.append((lo, n - lo - (o - 1) * s - 1, s - 1))
      cfg.append((0, 0, 0))
      parts.append(lax.pad(g, jnp.zeros((), g.dtype), cfg))
    gs = jnp.concatenate(parts, axis=-1)            # (B, *in_sp, taps*cout)
    dk = lax.dot_general(xp, gs, contract, preferred_element_type=jnp.float32)  # cin, taps*cout
    dk = dk.reshape(cin, len(taps), cout).transpose(1, 0, 2)
    return dk.reshape(tuple(window) + (cin, cout))
  parts = []
  for t in taps:
    parts.append(xp[(slice(None),) + tuple(slice(a * r, a * r + (o - 1) * s + 1, s)
                                           for a, r, s, o in zip(t, dilation, strides, out_sp))])
  xs = jnp.concatenate(parts, axis=-1)             # (B, *out_sp, taps*cin)
  dk = lax.dot_general(xs, g, contract, preferred_element_type=jnp.float32)
  return dk.reshape(tuple(window) + (cin, cout))


def xla_kernel_grad(x, g, window, strides, dilation, pads):
  conv = lambda k: lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilation,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  _, vjp = jax.vjp(conv, jnp.zeros(tuple(window) + (x.shape[-1], g.shape[-1]), x.dtype))
  return vjp(g)[0]


def main():
  runtime.reuse_freed_memory()
  geometry = ((3, 3, 3), (1, 1, 1), (1, 1, 1), ((1, 1),) * 3)
  cases = {}
  for cin, cout in [(32, 4), (16, 8), (8, 16), (64, 64), (48, 48)]:
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 32, cin))
    g = jax.random.normal(jax.random.key(1), (2, 32, 32, 32, cout))
    reference = np.asarray(jax.jit(xla_kernel_grad, static_argnums=(2, 3, 4, 5))(x, g, *geometry))
    for name, fn in [("hemijax", C._kernel_grad), ("stacked", dk_shifted)]:
      jitted = jax.jit(lambda x, g, fn=fn: fn(x, g, *geometry))
      error = float(np.abs(np.asarray(jitted(x, g)) - reference).max())
      print(f"{cin} -> {cout} {name}: max |error| against XLA's gradient {error:.1e}", flush=True)
      cases[f"{cin} -> {cout} {name}"] = (jitted, (x, g))
  for name, timing in time_interleaved(cases, repeats=5).items():
    print(f"{name:20s} median {timing.median:.4f} s  min {min(timing.times):.4f} s")


if __name__ == "__main__":
  main()
