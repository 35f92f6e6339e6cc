r"""Probe: other formulations of a 3D kernel gradient against hemijax's blocked loop.

  python benchmarks/probe_kernel_grad_formulations.py                 # all cases
  python benchmarks/probe_kernel_grad_formulations.py loop "flat 27 mm"

One 3x3x3 layer, 48 -> 48 channels, batch 2 x 32^3, SAME. Cases: `loop` (`conv._kernel_grad_loop`),
`flat ...` (the padded volume flattened, so that every tap is one row offset: 9 products with the
three width taps stacked, or 27 products), `im2col ...` (one product over all 27 taps stacked);
each with XLA's dot (`xla`) or XLA:CPU's `__onednn$matmul` custom call (`mm`). Checks every case
against XLA's kernel gradient, then prints median milliseconds and model GFLOP/s (3 rounds,
alternated). A probe: where not to look next (docs/performance.md), not part of the library.
"""
import functools, json, pathlib, time, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir
from jax.interpreters.mlir import ir
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from hemijax.nn import conv as C  # noqa: E402

mm_p = jex_core.Primitive("onednn_matmul_probe")
@mm_p.def_abstract_eval
def _(a, b, *, ta, tb):
  m = a.shape[-1] if ta else a.shape[-2]
  n = b.shape[-2] if tb else b.shape[-1]
  return jax.core.ShapedArray(a.shape[:-2] + (m, n), jnp.float32)
def _low(ctx, a, b, *, ta, tb):
  (out,) = ctx.avals_out
  cfg = json.dumps({"onednn_matmul_config": {"transpose_a": ta, "transpose_b": tb}})
  op = stablehlo.CustomCallOp([mlir.aval_to_ir_type(ctx.module_context, out)], [a, b],
       "__onednn$matmul", backend_config=ir.StringAttr.get(cfg),
       api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1))
  return op.results
mlir.register_lowering(mm_p, _low, platform="cpu")
def mm(a, b, ta=False, tb=False): return mm_p.bind(a, b, ta=ta, tb=tb)

def timeit(f, *args, n=5):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
  return np.median(ts)

B, S, CI, CO = 2, 32, 48, 48
x = jax.random.normal(jax.random.key(0), (B, S, S, S, CI))
g = jax.random.normal(jax.random.key(1), (B, S, S, S, CO))
pads = ((1, 1),) * 3
flop = 2 * B * S**3 * 27 * CI * CO

# check onednn matmul correctness
a = jax.random.normal(jax.random.key(2), (1000, 48)); b = jax.random.normal(jax.random.key(3), (1000, 40))
got = jax.jit(lambda a, b: mm(a, b, ta=True))(a, b)
print("mm err", float(jnp.max(jnp.abs(got - a.T @ b))))

ref = jax.jit(lambda x, g: jax.vjp(lambda k: C._xla_conv(x, k, (1,)*3, (1,)*3, pads),
                                   jnp.zeros((3,3,3,CI,CO)))[1](g)[0])(x, g)

def loop(x, g): return C._kernel_grad_loop(x, g, (3,3,3), (1,)*3, (1,)*3, pads)

def flat(x, g, use_mm=False, fold_w=True):
  # padded grid: x at [1:S+1] in a (S+2)^3... use pads lo=1 hi=1; g at [0:S] top-left
  xp = jnp.pad(x, ((0,0),(1,1),(1,1),(1,1),(0,0)))
  H = W = S + 2  # padded edge
  gp = jnp.pad(g, ((0,0),(0,2),(0,2),(0,2),(0,0)))
  if fold_w:
    # im2col in w only: xw[..., w, (kw, ci)] = xp[..., w+kw, ci]
    xw = jnp.concatenate([jnp.pad(xp[:, :, :, kw:], ((0,0),(0,0),(0,0),(0,kw),(0,0))) for kw in range(3)], -1)
    xf = xw.reshape(-1, 3 * CI); gf = gp.reshape(-1, CO)
    offs = [(kd * H + kh) * W for kd in range(3) for kh in range(3)]
  else:
    xf = xp.reshape(-1, CI); gf = gp.reshape(-1, CO)
    offs = [(kd * H + kh) * W + kw for kd in range(3) for kh in range(3) for kw in range(3)]
  R = xf.shape[0] - max(offs)
  gs = gf[:R]
  parts = []
  for o in offs:
    xs = lax.slice_in_dim(xf, o, o + R)
    if use_mm:
      parts.append(mm(xs, gs, ta=True))
    else:
      parts.append(lax.dot_general(xs, gs, (((0,), (0,)), ((), ()))))
  dk = jnp.stack(parts)  # (9, 3*CI, CO) or (27, CI, CO)
  return dk.reshape(3, 3, 3, CI, CO)

def im2col_mm(x, g, use_mm=True):
  xp = jnp.pad(x, ((0,0),(1,1),(1,1),(1,1),(0,0)))
  cols = jnp.concatenate([xp[:, a:a+S, b:b+S, c:c+S] for a in range(3) for b in range(3) for c in range(3)], -1)
  cols = cols.reshape(-1, 27 * CI)
  gf = g.reshape(-1, CO)
  dk = mm(cols, gf, ta=True) if use_mm else lax.dot_general(cols, gf, (((0,), (0,)), ((), ())))
  return dk.reshape(3, 3, 3, CI, CO)

cases = {
  "loop": loop,
  "flat foldw xla": functools.partial(flat, use_mm=False, fold_w=True),
  "flat foldw mm": functools.partial(flat, use_mm=True, fold_w=True),
  "flat 27 xla": functools.partial(flat, use_mm=False, fold_w=False),
  "flat 27 mm": functools.partial(flat, use_mm=True, fold_w=False),
  "im2col mm": im2col_mm,
  "im2col xla": functools.partial(im2col_mm, use_mm=False),
}
sel = sys.argv[1:] or list(cases)
fs = {k: jax.jit(cases[k]) for k in sel}
for k, f in fs.items():
  err = float(jnp.max(jnp.abs(f(x, g) - ref)) / jnp.max(jnp.abs(ref)))
  print(f"{k:20s} rel err {err:.1e}", flush=True)
res = {k: [] for k in fs}
for r in range(3):
  for k, f in fs.items():
    res[k].append(timeit(f, x, g, n=3))
for k, v in res.items():
  t = np.median(v)
  print(f"{k:20s} {t*1000:7.1f} ms  {flop/t/1e9:6.1f} GFLOP/s", flush=True)
