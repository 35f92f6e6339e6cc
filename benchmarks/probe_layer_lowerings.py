r"""One HeMIS-3D 48 -> 48 layer (2 x 32^3, float32): where its time goes, and two lowerings tried.

  python benchmarks/probe_layer_lowerings.py     # about a minute on 2 CPU cores, machine quiet

Prints, for `planes` and XLA's convolution, the forward, the input gradient (dx) and the kernel
gradient (dk) alone, each as seconds (best of 5) and as a share of the float32 2048^2 matrix-product
peak timed in the same run; then two lowerings that were candidates for issue 17 and are not in
hemijax.nn.conv because they lost:

- Winograd F(2x2x2, 3x3x3) (Lavin & Gray 2016): 8 instead of 27 multiplies per output voxel and
  channel pair; input and output transforms separable per axis, the products one batched matrix
  product over the 64 transform positions; gradients by autodiff. Its parts are timed alone.
- the kernel gradient as 3 matrix products over an in-plane im2col (9 taps x Cin columns).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax import lax

from hemijax.nn import conv as C

SHAPE, CIN, COUT = (2, 32, 32, 32), 48, 48


def best_of(fn, *args, rounds=5):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def _winograd_axis(x, axis, tiles):
  """B^T d along one axis: the 4 transform positions of every 4-wide input tile (stride 2)."""
  s = [lax.slice_in_dim(x, j, j + 2 * tiles - 1, 2, axis) for j in range(4)]
  return [s[0] - s[2], s[1] + s[2], s[2] - s[1], s[1] - s[3]]


def winograd_input(x):
  b, *spatial, cin = x.shape
  tiles = [(n + 1) // 2 for n in spatial]
  xp = jnp.pad(x, [(0, 0)] + [(1, 2 * t + 1 - n) for t, n in zip(tiles, spatial)] + [(0, 0)])
  parts = [xp]
  for axis, t in zip((1, 2, 3), tiles):
    parts = [p for y in parts for p in _winograd_axis(y, axis, t)]
  return jnp.stack(parts).reshape(64, -1, cin)


def winograd_kernel(kernel):
  g = jnp.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], kernel.dtype)
  u = jnp.einsum("ia,jb,kc,abcxy->ijkxy", g, g, g, kernel)
  return u.reshape(64, kernel.shape[-2], kernel.shape[-1])


def winograd_output(m, b, spatial, cout):
  tiles = [(n + 1) // 2 for n in spatial]
  m = m.reshape((4, 4, 4, b) + tuple(tiles) + (cout,))
  out = lambda v: [v[0] + v[1] + v[2], v[1] - v[2] - v[3]]   # A^T along one axis
  m = jnp.stack(out([m[i] for i in range(4)]))
  m = jnp.stack(out([m[:, i] for i in range(4)]), 1)
  m = jnp.stack(out([m[:, :, i] for i in range(4)]), 2)      # (2, 2, 2, b, td, th, tw, cout)
  y = m.transpose(3, 4, 0, 5, 1, 6, 2, 7).reshape((b,) + tuple(2 * t for t in tiles) + (cout,))
  return y[:, :spatial[0], :spatial[1], :spatial[2]]


def winograd_conv(x, kernel):
  """3x3x3, stride 1, SAME, channels last."""
  m = jnp.einsum("pmc,pco->pmo", winograd_input(x), winograd_kernel(kernel))
  return winograd_output(m, x.shape[0], x.shape[1:4], kernel.shape[-1])


def im2col_kernel_grad(x, g):
  b, d, h, w, c = x.shape
  xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
  x9 = jnp.concatenate([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
  gf = g.reshape(-1, g.shape[-1])
  taps = [jnp.einsum("mk,mo->ko", x9[:, a:a + d].reshape(-1, 9 * c), gf) for a in range(3)]
  return jnp.stack(taps).reshape(3, 3, 3, c, -1)


def main():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], SHAPE + (CIN,))
  kernel = jax.random.normal(keys[1], (3, 3, 3, CIN, COUT)) * 0.05
  g = jax.random.normal(keys[2], SHAPE + (COUT,))
  square = jnp.ones((2048, 2048))
  peak = 2 * 2048 ** 3 / best_of(lambda a: a @ a, square) / 1e9
  gflop = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 27 * CIN * COUT / 1e9
  print(f"# {jax.__version__} on {jax.default_backend()}; matmul peak {peak:.0f} GFLOP/s; "
        f"{gflop:.2f} GFLOP per pass (forward, dx or dk)")
  line = lambda name, s, passes=1: print(
      f"{name:34s} {s:7.3f} s  {passes * gflop / s:5.0f} GFLOP/s  {passes * gflop / s / peak:4.0%}")
  reference = C.conv(x, kernel, impl="xla")
  for impl in ("planes", "xla"):
    forward = lambda x, k, impl=impl: C.conv(x, k, impl=impl)
    line(f"{impl} forward", best_of(forward, x, kernel))
    line(f"{impl} dx", best_of(lambda x, k, g: jax.vjp(lambda x: forward(x, k), x)[1](g)[0],
                               x, kernel, g))
    line(f"{impl} dk", best_of(lambda x, k, g: jax.vjp(lambda k: forward(x, k), k)[1](g)[0],
                               x, kernel, g))
  error = float(jnp.max(jnp.abs(jax.jit(winograd_conv)(x, kernel) - reference)))
  print(f"winograd: max |error| {error:.1e} against XLA's convolution (max |y| "
        f"{float(jnp.max(jnp.abs(reference))):.1f})")
  line("winograd forward", best_of(winograd_conv, x, kernel))
  line("winograd dx + dk (autodiff)", best_of(
      lambda x, k, g: jax.vjp(winograd_conv, x, k)[1](g), x, kernel, g), passes=2)
  line("planes dx + dk", best_of(
      lambda x, k, g: jax.vjp(lambda x, k: C.conv(x, k, impl="planes"), x, k)[1](g),
      x, kernel, g), passes=2)
  v, u = winograd_input(x), winograd_kernel(kernel)
  m = jnp.einsum("pmc,pco->pmo", v, u)
  print(f"winograd parts: input transform {best_of(winograd_input, x):.3f} s, "
        f"64 products {best_of(lambda v, u: jnp.einsum('pmc,pco->pmo', v, u), v, u):.3f} s "
        f"({2 * v.size * COUT / 1e9:.2f} GFLOP), output transform "
        f"{best_of(lambda m: winograd_output(m, SHAPE[0], SHAPE[1:], COUT), m):.3f} s")
  line("dk as im2col matrix products", best_of(im2col_kernel_grad, x, g))


if __name__ == "__main__":
  main()
