r"""Probe: the 3D kernel gradient from channels-first tap stacks, (taps*Cin, K) @ (K, Cout).

  python benchmarks/probe_kernel_grad_channels_first.py

XLA:CPU runs a (M, K) @ (K, N) product with M >= 144 near its peak, so this builds, per block of K
output positions, the input values of 3 (`w`) or 9 (`hw`) taps in channels-first order and
multiplies them with the output gradient, for HeMIS-3D's layers (batch 2, 32^3, SAME), at three
block sizes and one or two independent loops, against `conv._kernel_grad` (the library's rule).
Checks every case against XLA's kernel gradient; prints median milliseconds (3 rounds,
alternated). A probe (docs/performance.md), not part of the library.
"""
import functools, pathlib, time, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from hemijax.nn import conv as C  # noqa: E402

def timeit(f, *args, n=5):
  jax.block_until_ready(f(*args)); ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
  return np.median(ts)

def dk_cf(x, g, window, pads, target_k=8192, stack="w", split=1):
  """Stride 1, dilation 1. x (b, D, H, W, ci), g (b, Do, Ho, Wo, co)."""
  b, ci, co = x.shape[0], x.shape[-1], g.shape[-1]
  kd, kh, kw = window
  Do, Ho, Wo = g.shape[1:4]
  xp = C._pad(x, pads)
  xc = jnp.transpose(xp, (4, 0, 1, 2, 3))  # (ci, b, Dp, Hp, Wp)
  bd = max(1, min(Do, target_k // (b * Ho * Wo)))
  nblk = -(-Do // bd)
  gpad = jnp.pad(g, ((0, 0), (0, nblk * bd - Do), (0, 0), (0, 0), (0, 0)))
  need = nblk * bd + kd - 1
  xc = jnp.pad(xc, ((0, 0), (0, 0), (0, max(0, need - xc.shape[2])), (0, 0), (0, 0)))
  taps_in = [(a, c) for a in range(kh) for c in range(kw)] if stack == "hw" else [(None, c) for c in range(kw)]
  if stack == "hw":
    leads = [(t,) for t in range(kd)]
  else:
    leads = [(t, u) for t in range(kd) for u in range(kh)]
  nl = len(leads)
  M = len(taps_in) * ci
  def step(i, acc):
    d0 = i * bd
    gs = lax.dynamic_slice(gpad, (0, d0, 0, 0, 0), (b, bd, Ho, Wo, co)).reshape(-1, co)
    xs = lax.dynamic_slice(xc, (0, 0, d0, 0, 0), (ci, b, bd + kd - 1, xc.shape[3], xc.shape[4]))
    parts = []
    for lead in leads:
      rows = []
      for (a, c) in taps_in:
        t = lead[0]
        u = a if stack == "hw" else lead[1]
        rows.append(xs[:, :, t:t + bd, u:u + Ho, c:c + Wo].reshape(ci, -1))
      A = jnp.concatenate(rows, 0)  # (M, K)
      parts.append(A @ gs)
    return acc + jnp.stack(parts)
  bounds = [nblk * j // split for j in range(split + 1)]
  acc0 = jnp.zeros((nl, M, co), jnp.float32)
  acc = sum(lax.fori_loop(lo, hi, step, acc0) for lo, hi in zip(bounds[:-1], bounds[1:]))
  # acc[lead, (tap_in, ci), co]: leads and stacked taps together run (kd, kh, kw) row-major.
  return acc.reshape(kd, kh, kw, ci, co)

cases_shapes = [(2, 32, 48, 48), (2, 32, 96, 16), (2, 32, 1, 48), (2, 32, 16, 4)]
sel = sys.argv[1:]
for (B, S, CI, CO) in cases_shapes:
  x = jax.random.normal(jax.random.key(0), (B, S, S, S, CI))
  g = jax.random.normal(jax.random.key(1), (B, S, S, S, CO))
  pads = ((1, 1),) * 3
  flop = 2 * B * S**3 * 27 * CI * CO
  ref = jax.jit(lambda x, g: jax.vjp(lambda k: C._xla_conv(x, k, (1,)*3, (1,)*3, pads),
                                     jnp.zeros((3,3,3,CI,CO)))[1](g)[0])(x, g)
  cases = {"loop": jax.jit(lambda x, g: C._kernel_grad(x, g, (3,3,3), (1,)*3, (1,)*3, pads))}
  for stack in ("w", "hw"):
    for tk in (4096, 8192, 16384):
      for split in (1, 2):
        cases[f"cf {stack} K{tk} s{split}"] = jax.jit(functools.partial(dk_cf, window=(3,3,3), pads=pads, target_k=tk, stack=stack, split=split))
  res = {k: [] for k in cases}
  for k, f in cases.items():
    err = float(jnp.max(jnp.abs(f(x, g) - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 1e-4, (k, err)
  for r in range(3):
    for k, f in cases.items():
      res[k].append(timeit(f, x, g, n=3))
  print(f"--- {B}x{S}^3 {CI}->{CO}")
  for k, v in res.items():
    t = np.median(v)
    print(f"{k:22s} {t*1000:7.1f} ms  {flop/t/1e9:6.1f} GFLOP/s", flush=True)
