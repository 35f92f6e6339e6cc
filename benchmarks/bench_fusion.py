r"""HeMIS fusion (masked mean + variance over the modality axis): hemijax's against `jnp.sum`'s.

  python benchmarks/bench_fusion.py

`hemijax.nn.fusion.moments` sums the modality axis slot by slot (elementwise adds of the slices,
and the broadcast of the mean's gradient likewise); `reductions` is the same fusion written with
`jnp.sum` over that axis, as hemijax had it before. Features (B, 4 modalities, D, H, W, 48), as
HeMIS-3D's back ends give them: the inference window of bench_conv (1 x 64^3) and its train batch
(2 x 32^3, forward + gradient); 3 of 4 modalities present. Checks that both agree, then times them
alternated round by round.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import time_interleaved  # noqa: E402
from hemijax import runtime  # noqa: E402
from hemijax.nn import fusion  # noqa: E402

MODALITIES, CHANNELS = 4, 48


def reductions(x, mask, axis=1):
  """The masked mean and (n - 1) variance with `jnp.sum` over the modality axis."""
  mask = jnp.broadcast_to(mask, x.shape)
  n = jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32)
  mean = jnp.sum(jnp.where(mask, x, 0), axis=axis, keepdims=True) / jnp.maximum(n, 1)
  mean = jnp.where(n > 0, mean, 0)
  centred = jnp.where(mask, x - mean, 0)
  var = jnp.sum(centred * centred, axis=axis, keepdims=True) / jnp.maximum(n - 1, 1)
  var = jnp.where(n > 1, var, 0)
  return jnp.concatenate([mean, var], axis=-1).squeeze(axis)


def main():
  allocator = ("freed memory reused (hemijax.runtime)" if runtime.reuse_freed_memory()
               else "glibc default")
  ours = lambda x, mask: fusion.moments(x, mask, axis=1)
  cases = {}
  for task, batch, edge in [("inference", 1, 64), ("train", 2, 32)]:
    shape = f"{batch} x {MODALITIES} x {edge}^3 x {CHANNELS}"
    x = jax.random.normal(jax.random.key(0), (batch, MODALITIES) + (edge,) * 3 + (CHANNELS,))
    present = jnp.array([True, True, False, True])
    mask = jnp.broadcast_to(present[None, :, None, None, None, None],
                            (batch, MODALITIES, 1, 1, 1, 1))
    weights = jax.random.normal(jax.random.key(1), (batch,) + (edge,) * 3 + (2 * CHANNELS,))
    for name, fn in [("hemijax", ours), ("reductions", reductions)]:
      if task == "inference":
        jitted = jax.jit(fn)
      else:
        jitted = jax.jit(jax.grad(lambda x, mask, fn=fn: jnp.sum(fn(x, mask) * weights)))
      cases[f"{task} | {shape} | {name}"] = (jitted, (x, mask))
    a, b = (np.asarray(cases[f"{task} | {shape} | {name}"][0](x, mask))
            for name in ("hemijax", "reductions"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  timings = time_interleaved(cases, repeats=5)
  print(f"# bench_fusion, jax {jax.__version__} on {jax.default_backend()}; medians of 5 rounds, "
        f"cases alternated; allocator: {allocator}")
  print("| task | features | fusion | median s | min s | reductions / hemijax |")
  print("|---|---|---|---:|---:|---:|")
  for key, timing in timings.items():
    task, shape, name = key.split(" | ")
    ratio = timings[f"{task} | {shape} | reductions"].median / timing.median
    print(f"| {task} | {shape} | {name} | {timing.median:.4f} | {min(timing.times):.4f} | "
          f"{ratio:.1f}x |")


if __name__ == "__main__":
  main()
