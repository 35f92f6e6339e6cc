"""The convolution every model uses, with lowerings that are fast on CPU (`impl`).

`conv` takes channels-last `x (B, *spatial, Cin)` and `kernel (*window, Cin, Cout)` for 1, 2 or 3
spatial dims. `impl` picks the lowering (all give the same numbers up to float rounding):

- "xla": `lax.conv_general_dilated`. Best on GPU/TPU. On CPU XLA's 3D convolution and every
  convolution's kernel gradient run far below the matrix-product peak, and a vmapped kernel (HeMIS'
  per-modality back ends) becomes a grouped convolution that is slower still.
- "planes": CPU lowering. A 3D convolution is one 2D convolution over all depth planes with the
  depth taps stacked on the output channels, then a shifted sum of planes (1D runs as 2D with
  height 1); XLA:CPU runs 2D convolutions as fast, multi-threaded matrix products. The input
  gradient is the same kind of convolution (flipped kernel); the kernel gradient is computed by
  `_kernel_grad` in cache-sized blocks. Under vmap, a batched kernel loops over the mapped axis
  instead of becoming a grouped convolution.
- "slots": XLA's convolution and XLA's own gradients, but a vmapped kernel runs one ungrouped
  convolution per slot (forward and backward) instead of a grouped one. On CPU XLA's 2D kernel
  gradient beats `_kernel_grad`, so this is what "auto" uses for 1D and 2D layers where
  "onednn" is not available.
- "onednn": oneDNN's direct convolution, the library PyTorch runs on CPU, through the custom call
  XLA:CPU executes itself (`hemijax.nn.onednn`); the input gradient is the same call (flipped
  kernel), the kernel gradient as "planes" computes it in 3D and as "slots" in 1D and 2D. Where
  this jaxlib does not run the call correctly (`onednn.available()`, checked once per process),
  or for other dtypes, the forward is "planes"'.
- "matmul": shifted views contracted with `lax.dot_general`, block by block in a loop; no
  convolution primitive at all (any backend, any rank). Slower than "planes" on CPU, kept as the
  portable matrix-product reference.
- "auto": on CPU (`jax.default_backend()`) "onednn" where this jaxlib runs its call
  (`onednn.available()`), else "planes" for 3D layers and "slots" for 1D and 2D ones; "xla"
  elsewhere. "onednn" was the fastest of the three on every method's demo config, training and
  inference, and "planes"/"slots" the faster without it (benchmarks/bench_methods.py;
  docs/performance.md).

"planes", "slots", "onednn" and "matmul" define their own reverse-mode derivative
(`jax.custom_vjp`): `jax.grad` and `jax.vjp` work, forward-mode (`jax.jvp`, `jax.jacfwd`) does
not; use "xla" for that.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from hemijax.nn import onednn

IMPLS = ("auto", "xla", "planes", "slots", "onednn", "matmul")
# A Module class, or a `functools.partial` of one with fields bound (flax examples' `ModuleDef`).
ModuleDef = Any

# Values (input + output channels per output position) that `_kernel_grad` and the "matmul" forward
# handle per loop step: 1.5 MiB of float32, about one core's L2 cache. Much smaller blocks
# (256 KiB) left a core idle; against 4 MiB blocks the loop alone ran 1.14x faster on HeMIS-3D's
# 48 -> 48 layers and 1.35x on its 96 -> 16 front end (benchmarks/bench_block_size.py;
# docs/performance.md).
_BLOCK_ELEMENTS = 3 << 17
# ... but at least this many output positions per step, so that per-step costs stay small.
_MIN_BLOCK = 256
# 3D, stride 1: below this many (depth taps x input channels), fold the depth taps into the input
# channels rather than the output channels (see `_planes_forward`).
_FOLD_INPUT_CHANNELS = 48
# Per-slot convolution outputs above this many bytes run slot after slot (see `_slotwise`):
# 3D inference windows, not training patches (a 2 x 32^3 x 48 HeMIS-3D layer is 12 MiB).
_SEQUENTIAL_SLOT_BYTES = 128 << 20
# Block loops are split into this many independent loops (see `_block_loop`).
_LOOP_SPLIT = 2
# 3D kernel gradients of at most this many multiply-adds per tap (output positions x Cin x Cout)
# run as XLA's 2D kernel gradient over depth-shifted planes (`_planes_kernel_grad`), larger ones
# as the blocked loop. Alone, XLA's was 1.25-2.0x faster up to 2.1M, mixed up to 8.4M and slower
# from 16.8M on; in whole train steps this threshold beat 2.1M (disentanglement demo 1.37x over
# the loop everywhere, against 1.17x; docs/performance.md).
_PLANES_KERNEL_GRAD_MAX_WORK = 8 << 20


def _tuple(value, n):
  return tuple(value) if isinstance(value, Sequence) else (value,) * n


def resolve_impl(impl: str, spatial_dims: int = 3) -> str:
  """Validates `impl` and resolves "auto" for a layer of `spatial_dims`: on CPU "onednn" where
  `onednn.available()`, else "planes" for 3D and "slots" for 1D and 2D; "xla" on GPU/TPU."""
  if impl not in IMPLS:
    raise ValueError(f"unknown convolution impl {impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    if onednn.available():
      return "onednn"
    return "planes" if spatial_dims == 3 else "slots"
  return impl


def _geometry(in_spatial, window, strides, dilation, padding):
  """Explicit ((lo, hi), ...) padding and the output spatial shape of a convolution."""
  nd = len(window)
  extent = [(k - 1) * r + 1 for k, r in zip(window, dilation)]
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or (lo, hi) pairs, got {padding!r}")
    pads = lax.padtype_to_pads(in_spatial, extent, strides, padding.upper())
  else:
    pads = [tuple(p) for p in padding]
    if len(pads) != nd or any(len(p) != 2 for p in pads):
      raise ValueError(f"padding needs one (lo, hi) pair per spatial dim ({nd}), got {padding!r}")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  out = tuple((n + lo + hi - e) // s + 1
              for n, (lo, hi), e, s in zip(in_spatial, pads, extent, strides))
  if min(out) < 1:
    raise ValueError(f"convolution of spatial shape {tuple(in_spatial)} with window {window}, "
                     f"dilation {dilation}, padding {pads} has an empty output")
  return pads, out


def _pad(x, pads, interior=None):
  """Zero-pads (or crops, for negative pads) the spatial axes of a channels-last array."""
  interior = interior or (0,) * len(pads)
  config = [(0, 0, 0)] + [(lo, hi, i) for (lo, hi), i in zip(pads, interior)] + [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _xla_conv(x, kernel, strides, dilation, pads):
  nd = kernel.ndim - 2
  spec = "N" + "DHW"[-nd:] + "C" if nd <= 3 else None
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=pads, rhs_dilation=dilation,
      dimension_numbers=(spec, "DHW"[-nd:] + "IO", spec))


# ----------------------------------------------------------------------------------------------
# Forward lowerings. Each takes explicit pads (negative = crop) and unbatched arrays; `_slotwise`
# gives them their vmap rule.


def _conv2d(x, kernel, strides, dilation, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _slotwise(forward, x, kernel, strides, dilation, pads):
  """`forward(x, kernel, ...)` with a vmap rule that keeps convolutions ungrouped.

  vmap would turn a mapped kernel into a grouped convolution (XLA:CPU runs those about four times
  slower than separate ones) or a batched loop. Instead: a mapped input with a shared kernel is
  folded into the batch; a mapped kernel runs one convolution per slot, an unrolled loop whose
  results XLA writes straight into the stacked output.
  """
  @custom_vmap
  def run(x, kernel):
    return forward(x, kernel, strides, dilation, pads)

  @run.def_vmap
  def run_batched(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not kernel_batched:
      y = _slotwise(forward, x.reshape((-1,) + x.shape[2:]), kernel, strides, dilation, pads)
      return y.reshape((axis_size, -1) + y.shape[1:]), True
    one_slot = lambda x_i, kernel_i: _slotwise(forward, x_i, kernel_i, strides, dilation, pads)
    out = jax.eval_shape(one_slot, x[0] if x_batched else x, kernel[0])
    if out.size * out.dtype.itemsize > _SEQUENTIAL_SLOT_BYTES:
      # Large layers (3D inference windows): one slot after another, so XLA holds one slot's
      # temporaries (the planes lowering's stacked taps) instead of every slot's at once.
      if x_batched:
        return lax.map(lambda xk: one_slot(*xk), (x, kernel)), True
      return lax.map(lambda k: one_slot(x, k), kernel), True
    return _stack_per_slot(one_slot, axis_size, in_batched, x, kernel), True

  return run(x, kernel)


def _shift_planes(y, offsets, size):
  """out[:, i] = sum_a y[a][:, i + offsets[a]], zero where that plane does not exist.

  Each term is a slice and a pad of its own, so XLA fuses the whole sum into one pass.
  """
  out = 0
  for plane, offset in zip(y, offsets):
    lo, hi = max(0, -offset), min(size, plane.shape[1] - offset)
    if hi <= lo:
      continue
    term = plane[:, lo + offset:hi + offset]
    out = out + lax.pad(term, jnp.zeros((), term.dtype),
                        [(0, 0, 0), (lo, size - hi, 0)] + [(0, 0, 0)] * (term.ndim - 2))
  if isinstance(out, int):  # no plane overlaps the output
    return jnp.zeros((y[0].shape[0], size) + y[0].shape[2:], y[0].dtype)
  return out


def _planes_forward(x, kernel, strides, dilation, pads):
  """Convolution out of 2D convolutions; pads may be negative (crop)."""
  nd = kernel.ndim - 2
  if nd == 1:
    y = _conv2d(x[:, None], kernel[None], (1,) + strides, (1,) + dilation, ((0, 0),) + pads)
    return y[:, 0]
  if nd == 2:
    return _conv2d(x, kernel, strides, dilation, pads)
  if nd != 3:
    raise ValueError(f"impl 'planes' supports 1, 2 or 3 spatial dims, got {nd}")
  depth, (lo, hi) = kernel.shape[0], pads[0]
  stride, rate = strides[0], dilation[0]
  b, d = x.shape[:2]
  cin, cout = kernel.shape[-2:]
  d_out = (d + lo + hi - (depth - 1) * rate - 1) // stride + 1
  if stride == 1 and cin < cout and cin * depth <= _FOLD_INPUT_CHANNELS:
    # Few input channels (a first layer): stack the depth taps on the input channels instead, one
    # 2D convolution with depth * Cin inputs. The copy is small and the product three times
    # deeper; measured 2.7x faster for 1 -> 48 channels, 1.5x for 4 -> 16.
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0)] + [(0, 0, 0)] * (x.ndim - 2))
    planes = jnp.concatenate([xp[:, a * rate:a * rate + d_out] for a in range(depth)], axis=-1)
    y = _conv2d(planes.reshape((b * d_out,) + planes.shape[2:]),
                kernel.reshape((depth,) + kernel.shape[1:]).transpose(1, 2, 0, 3, 4)
                .reshape(kernel.shape[1:3] + (depth * cin, cout)),
                strides[1:], dilation[1:], pads[1:])
    return y.reshape((b, d_out) + y.shape[1:])
  if stride == 1:
    # One 2D convolution over every input plane with the depth taps stacked on the output
    # channels (a wider, cheaper product than three narrow ones, and no copy of the input),
    # then out[i] = sum_a y[i + a * rate - lo, tap a].
    k = jnp.moveaxis(kernel, 0, -2)
    y = _conv2d(x.reshape((b * d,) + x.shape[2:]), k.reshape(k.shape[:-2] + (depth * cout,)),
                strides[1:], dilation[1:], pads[1:])
    y = y.reshape((b, d) + y.shape[1:-1] + (depth, cout))
    return _shift_planes([y[..., a, :] for a in range(depth)],
                         [a * rate - lo for a in range(depth)], d_out)
  # Strided depth: only the planes each depth tap reads, one 2D convolution per tap.
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0)] + [(0, 0, 0)] * (x.ndim - 2))
  out = 0
  for a in range(depth):
    planes = xp[:, a * rate:a * rate + (d_out - 1) * stride + 1:stride]
    y = _conv2d(planes.reshape((b * d_out,) + x.shape[2:]), kernel[a], strides[1:], dilation[1:],
                pads[1:])
    out = out + y
  return out.reshape((b, d_out) + out.shape[1:])


def _onednn_forward(x, kernel, strides, dilation, pads):
  if onednn.supports(x, kernel) and onednn.available():
    return onednn.conv(x, kernel, strides, dilation, pads)
  return _planes_forward(x, kernel, strides, dilation, pads)


# ----------------------------------------------------------------------------------------------
# Shifted views and matrix products.


def _blocks(out_spatial, batch, channels):
  """Block of output positions per loop step: whole trailing axes first, about
  `_BLOCK_ELEMENTS` input and gradient values (`channels` per position) so a step stays in cache."""
  remaining = max(_MIN_BLOCK, _BLOCK_ELEMENTS // channels) // batch
  block = [1] * len(out_spatial)
  for i in reversed(range(len(out_spatial))):
    block[i] = min(out_spatial[i], max(1, remaining))
    remaining = remaining // block[i]
  return tuple(block)


def _unravel(index, shape):
  """Row-major multi-index of a traced flat index."""
  out = []
  for n in reversed(shape):
    out.append(index % n)
    index = index // n
  return out[::-1]


def _block_loop(x, out_spatial, window, strides, dilation, pads, block, body, init):
  """Runs `carry = body(views_of, starts, carry)` over blocks of output positions.

  `starts` are the block's first output indices. `views_of(lead)` takes a (traced) row-major index
  over the taps of all kernel axes but the last and returns `views[t] (B * prod(block), Cin)`, the
  input values that tap (lead, t) reads for the block's outputs. Bodies loop over `lead` (see
  `_over_leads`) rather than unrolling every tap, which keeps the program and its compile time
  small for large kernels while the block stays in cache. Outputs past the end are computed on
  zero padding; callers crop or ignore them. Returns one carry per independent loop.
  """
  b, c = x.shape[0], x.shape[-1]
  counts = [-(-o // k) for o, k in zip(out_spatial, block)]
  span = [(k - 1) * s + (w - 1) * r + 1 for k, s, w, r in zip(block, strides, window, dilation)]
  # Pad the input so every block's window is in bounds (extra zeros feed cropped outputs only).
  padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)]
  need = [(n - 1) * k * s + sp for n, k, s, sp in zip(counts, block, strides, span)]
  xp = _pad(x, [(lo, hi + max(0, nd - p)) for (lo, hi), nd, p in zip(pads, need, padded)])
  extent = [(k - 1) * s + 1 for k, s in zip(block[:-1], strides[:-1])] + [span[-1]]

  def step(i, carry):
    starts = [q * k for q, k in zip(_unravel(i, counts), block)]
    xs = lax.dynamic_slice(xp, (0, *[q * s for q, s in zip(starts, strides)], 0), (b, *span, c))

    def views_of(lead):
      origin = [t * r for t, r in zip(_unravel(lead, window[:-1]), dilation[:-1])]
      xt = lax.dynamic_slice(xs, (0, *origin, 0, 0), (b, *extent, c))
      xt = xt[(slice(None),) + tuple(slice(None, None, s) for s in strides[:-1])]
      k, s, r = block[-1], strides[-1], dilation[-1]
      return [xt[..., t * r:t * r + (k - 1) * s + 1:s, :].reshape(-1, c)
              for t in range(window[-1])]

    return body(views_of, starts, carry)

  # Independent loops over disjoint ranges of blocks, so that XLA can run them on separate cores
  # (a loop step is too small to be split across threads itself).
  split = min(_LOOP_SPLIT, math.prod(counts))
  bounds = [math.prod(counts) * i // split for i in range(split + 1)]
  return [lax.fori_loop(lo, hi, step, init) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _over_leads(window, fn, init):
  """fori_loop of `fn(lead, carry)` over the leading taps (a plain call for one)."""
  leads = math.prod(window[:-1])
  return fn(0, init) if leads == 1 else lax.fori_loop(0, leads, fn, init)


def _add_at(acc, index, value):
  """acc[index] += value for a traced leading index, in place."""
  start = (index,) + (0,) * (acc.ndim - 1)
  row = lax.dynamic_slice(acc, start, (1,) + acc.shape[1:])
  return lax.dynamic_update_slice(acc, row + value.reshape(row.shape).astype(acc.dtype), start)


def _stack_per_slot(fn, axis_size, in_batched, *args):
  """A vmap rule's body: `fn` once per slot (batched arguments sliced, the others shared), its
  outputs stacked. Separate ungrouped calls, which XLA may run concurrently."""
  outs = [fn(*(a[i] if batched else a for a, batched in zip(args, in_batched)))
          for i in range(axis_size)]
  return jax.tree.map(lambda *parts: jnp.stack(parts), *outs)


def _kernel_grad(x, g, window, strides, dilation, pads):
  """dL/dkernel = sum over output positions of input patch^T @ output gradient.

  XLA lowers this as a convolution with an output-sized window, which XLA:CPU runs slowly; here
  it is a loop over cache-sized blocks of outputs, each one tap-stacked matrix product, except for
  small 3D layers (`_PLANES_KERNEL_GRAD_MAX_WORK`), which take `_planes_kernel_grad`. Under vmap
  the loop is repeated per mapped slot: separate loops (which XLA may run concurrently) beat one
  loop over batched products.
  """
  @custom_vmap
  def kernel_grad(x, g):
    work = math.prod(g.shape[:-1]) * x.shape[-1] * g.shape[-1]
    if len(window) == 3 and work <= _PLANES_KERNEL_GRAD_MAX_WORK:
      return _planes_kernel_grad(x, g, window, strides, dilation, pads)
    return _kernel_grad_loop(x, g, window, strides, dilation, pads)

  @kernel_grad.def_vmap
  def kernel_grad_batched(axis_size, in_batched, x, g):
    return _stack_per_slot(lambda x, g: _kernel_grad(x, g, window, strides, dilation, pads),
                           axis_size, in_batched, x, g), True

  return kernel_grad(x, g)


def _planes_kernel_grad(x, g, window, strides, dilation, pads):
  """dL/dkernel of a 3D convolution as one XLA 2D kernel gradient: for every output plane, the
  input planes its depth taps read are stacked along channels (tap-major), and the planes of all
  depths form the batch."""
  depth, (lo, hi), stride, rate = window[0], pads[0], strides[0], dilation[0]
  b, d_out, cin, cout, dtype = x.shape[0], g.shape[1], x.shape[-1], g.shape[-1], x.dtype
  x, g = x.astype(jnp.float32), g.astype(jnp.float32)  # accumulate as the blocked loop does
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0)] + [(0, 0, 0)] * 3)
  planes = jnp.concatenate([
      lax.slice_in_dim(xp, a * rate, a * rate + (d_out - 1) * stride + 1, stride, axis=1)
      for a in range(depth)], axis=-1)
  planes = planes.reshape((b * d_out,) + planes.shape[2:])
  zero = jnp.zeros(tuple(window[1:]) + (depth * cin, cout), jnp.float32)
  _, vjp = jax.vjp(lambda k: _conv2d(planes, k, strides[1:], dilation[1:], pads[1:]), zero)
  (dk,) = vjp(g.reshape((b * d_out,) + g.shape[2:]))
  return dk.reshape(tuple(window[1:]) + (depth, cin, cout)).transpose(2, 0, 1, 3, 4).astype(dtype)


def _kernel_grad_loop(x, g, window, strides, dilation, pads):
  b, cin, cout = x.shape[0], x.shape[-1], g.shape[-1]
  out_spatial = g.shape[1:-1]
  block = _blocks(out_spatial, b, cin + cout)
  counts = [-(-o // k) for o, k in zip(out_spatial, block)]
  gp = _pad(g, [(0, n * k - o) for n, k, o in zip(counts, block, out_spatial)])
  contract = (((0,), (0,)), ((), ()))

  def body(views_of, starts, acc):
    gs = lax.dynamic_slice(gp, (0, *starts, 0), (b, *block, cout)).reshape(-1, cout)

    def tap(lead, acc):
      views = views_of(lead)
      if cin < 8:  # few channels: one product over the taps
        cols = jnp.stack(views, axis=1).reshape(gs.shape[0], -1)
        part = lax.dot_general(cols, gs, contract, preferred_element_type=jnp.float32)
      else:  # one product per tap: no stacked copy, each reads its view where it lies in cache
        part = jnp.concatenate([
            lax.dot_general(v, gs, contract, preferred_element_type=jnp.float32) for v in views])
      return _add_at(acc, lead, part)

    return _over_leads(window, tap, acc)

  init = jnp.zeros((math.prod(window[:-1]), window[-1] * cin, cout), jnp.float32)
  acc = sum(_block_loop(x, out_spatial, window, strides, dilation, pads, block, body, init))
  return acc.reshape(tuple(window) + (cin, cout)).astype(x.dtype)


def _matmul_forward(x, kernel, strides, dilation, pads):
  """Convolution as a loop over output blocks: tap-stacked views @ kernel, written in place."""
  window, cout = kernel.shape[:-2], kernel.shape[-1]
  _, out_spatial = _geometry(x.shape[1:-1], window, strides, dilation, pads)
  b, cin = x.shape[0], x.shape[-1]
  block = _blocks(out_spatial, b, cin + cout)
  counts = [-(-o // k) for o, k in zip(out_spatial, block)]
  kmat = kernel.reshape((-1, window[-1] * cin, cout))
  dtype = jnp.result_type(x, kernel)

  def body(views_of, starts, out):
    def tap(lead, y):
      cols = jnp.concatenate(views_of(lead), axis=1)
      return y + jnp.dot(cols, lax.dynamic_index_in_dim(kmat, lead, keepdims=False),
                         preferred_element_type=jnp.float32)

    y = _over_leads(window, tap, jnp.zeros((b * math.prod(block), cout), jnp.float32))
    return lax.dynamic_update_slice(out, y.reshape((b, *block, cout)).astype(dtype),
                                    (0, *starts, 0))

  init = jnp.zeros((b, *[n * size for n, size in zip(counts, block)], cout), dtype)
  # (The loops write disjoint blocks into zeros, so their sum is the whole output.)
  out = sum(_block_loop(x, out_spatial, window, strides, dilation, pads, block, body, init))
  return out[(slice(None),) + tuple(slice(0, o) for o in out_spatial)]


# ----------------------------------------------------------------------------------------------
# Reverse mode for the custom lowerings.


def _input_grad(forward, g, kernel, in_spatial, strides, dilation, pads):
  """dL/dx: a stride-1 convolution of the (stride-dilated) output gradient with the flipped,
  transposed kernel, run by the same `forward` lowering."""
  nd = kernel.ndim - 2
  window = kernel.shape[:nd]
  out_spatial = g.shape[1:-1]
  t_pads = []
  for n, o, k, s, r, (lo, _) in zip(in_spatial, out_spatial, window, strides, dilation, pads):
    lo_t = (k - 1) * r - lo
    t_pads.append((lo_t, n + (k - 1) * r - ((o - 1) * s + 1) - lo_t))
  if any(s > 1 for s in strides):
    g = _pad(g, [(0, 0)] * nd, [s - 1 for s in strides])
  flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
  return forward(g, flipped, (1,) * nd, dilation, tuple(t_pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _custom_conv(x, kernel, strides, dilation, pads, impl):
  return _slotwise(_FORWARD[impl], x, kernel, strides, dilation, pads)


def _custom_conv_fwd(x, kernel, strides, dilation, pads, impl):
  return _custom_conv(x, kernel, strides, dilation, pads, impl), (x, kernel)


def _xla_conv_grads(x, kernel, g, strides, dilation, pads, kernel_only=False):
  """(dL/dx, dL/dkernel), or (dL/dkernel,) with `kernel_only`, by XLA's own convolution
  gradients; under vmap one ungrouped call per slot (vmap would make the kernel gradient a grouped
  convolution, slow on XLA:CPU)."""
  @custom_vmap
  def grads(x, kernel, g):
    if kernel_only:
      return jax.vjp(lambda k: _xla_conv(x, k, strides, dilation, pads), kernel)[1](g)
    _, vjp = jax.vjp(lambda a, k: _xla_conv(a, k, strides, dilation, pads), x, kernel)
    return vjp(g)

  @grads.def_vmap
  def grads_batched(axis_size, in_batched, x, kernel, g):
    one_slot = lambda x, k, g: _xla_conv_grads(x, k, g, strides, dilation, pads, kernel_only)
    out = _stack_per_slot(one_slot, axis_size, in_batched, x, kernel, g)
    return out, (True,) * len(out)

  return grads(x, kernel, g)


def _custom_conv_bwd(strides, dilation, pads, impl, residuals, g):
  x, kernel = residuals
  if impl == "slots":
    dx, dk = _xla_conv_grads(x, kernel, g, strides, dilation, pads)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)
  forward = functools.partial(_slotwise, _FORWARD[impl])
  dx = _input_grad(forward, g, kernel, x.shape[1:-1], strides, dilation, pads)
  if impl == "onednn" and kernel.ndim < 5:
    # 1D and 2D: XLA's own kernel gradient beats `_kernel_grad` there (see "slots").
    (dk,) = _xla_conv_grads(x, kernel, g, strides, dilation, pads, kernel_only=True)
  else:
    dk = _kernel_grad(x, g, kernel.shape[:-2], strides, dilation, pads)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_custom_conv.defvjp(_custom_conv_fwd, _custom_conv_bwd)
_FORWARD = {"planes": _planes_forward, "slots": _xla_conv, "onednn": _onednn_forward,
            "matmul": _matmul_forward}


def conv(x, kernel, *, strides=1, dilation=1, padding="SAME", impl="auto"):
  """N-d convolution, channels last. padding: "SAME", "VALID" or explicit (lo, hi) pairs.

  Same semantics as `lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation)`
  with NDHWC/DHWIO layouts (cross-correlation, no kernel flip). See the module docstring for impl.
  """
  nd = kernel.ndim - 2
  if x.ndim != nd + 2 or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f"input {x.shape} does not match kernel {kernel.shape} "
                     "(want x (B, *spatial, Cin) and kernel (*window, Cin, Cout))")
  strides, dilation = _tuple(strides, nd), _tuple(dilation, nd)
  pads, _ = _geometry(x.shape[1:-1], kernel.shape[:nd], strides, dilation, padding)
  impl = resolve_impl(impl, nd)
  if impl == "xla":
    return _xla_conv(x, kernel, strides, dilation, pads)
  dtype = jnp.result_type(x, kernel)
  return _custom_conv(x.astype(dtype), kernel.astype(dtype), strides, dilation, pads, impl)


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


def conv_factory(impl: str = "auto", **fields) -> ModuleDef:
  """`Conv` with its lowering (and any other `fields`, e.g. `kernel_init`) bound: a model builds
  this once from its `conv_impl` and hands it to its layers, which call it like `Conv`."""
  if impl not in IMPLS:
    raise ValueError(f"config.model.conv_impl: unknown convolution impl {impl!r}; "
                     f"choose one of {IMPLS}")
  return functools.partial(Conv, impl=impl, **fields)
