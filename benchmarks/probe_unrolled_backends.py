r"""The HeMIS-3D benchmark network with its per-modality back ends unrolled (one apply per modality
over that modality's slice of the stacked parameters) against `nn.vmap` (hemijax's), for
inference (1 x 4 x 64^3) and the train step (2 x 4 x 32^3); outputs compared, then timed
alternated.

  python benchmarks/probe_unrolled_backends.py [--repeats 5]

Why: under vmap every back-end layer's per-slot convolutions are stacked into one array and sliced
again by the next layer (a copy of all four modalities' features between layers: about 0.06 s of
the 1.1 s inference, benchmarks/profile_thunks.py's kind `bitcast_concatenate_fusion`); unrolled,
nothing is stacked until the fusion. Kept as the record of a lowering tried and not adopted
(docs/performance.md, "Tried and not adopted").
"""
import argparse
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import bench_conv  # noqa: E402
from benchmarks.common import time_interleaved  # noqa: E402
from hemijax import runtime  # noqa: E402
from hemijax.models import hemis  # noqa: E402
from hemijax.nn import layers  # noqa: E402


class UnrolledBackends(hemis.StackedBackends):
  """`StackedBackends` with the same parameters, applied one modality at a time."""

  @nn.compact
  def __call__(self, x):
    stacked = layers.per_modality(self.backend, self.num_modalities)(name="backend")
    if self.is_initializing():
      return stacked(x)
    params = self.variables["params"]["backend"]
    plain = self.backend(parent=None)
    return jnp.stack([plain.apply({"params": jax.tree.map(lambda p: p[m], params)}, x[m])
                      for m in range(self.num_modalities)])


def compiled_cases(backends_class, params, inference_args, train_args):
  """Jitted inference and train step of the network built with `backends_class`, compiled now
  (HeMIS builds its back ends when traced)."""
  original, hemis.StackedBackends = hemis.StackedBackends, backends_class
  try:
    model = bench_conv.hemijax_model("auto")
    infer, step = bench_conv.make_inference(model), bench_conv.make_train_step(model)
    outputs = (jax.block_until_ready(infer(params, *inference_args)),
               jax.block_until_ready(step(params, *train_args)))
  finally:
    hemis.StackedBackends = original
  return infer, step, outputs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  runtime.reuse_freed_memory(default=True)  # as bench_conv.py
  key = jax.random.key(0)
  inference_args = (jax.random.normal(key, (1, 64, 64, 64, 4)), jnp.ones((1, 4), bool))
  train_args = (jax.random.normal(key, (2, 32, 32, 32, 4)), jnp.ones((2, 4), bool),
                jax.random.randint(key, (2, 32, 32, 32), 0, 4))
  params = bench_conv.hemijax_model("auto").init(
      key, inference_args[0][:, :8, :8, :8], inference_args[1])["params"]
  built = {name: compiled_cases(cls, params, inference_args, train_args)
           for name, cls in (("vmap", hemis.StackedBackends), ("unrolled", UnrolledBackends))}
  (_, _, (y_v, (p_v, _))), (_, _, (y_u, (p_u, _))) = built["vmap"], built["unrolled"]
  print(f"max |logits difference| {float(jnp.abs(y_v - y_u).max()):.2e}; max |updated parameter "
        f"difference| {max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_v), jax.tree.leaves(p_u))):.2e}")
  cases = {}
  for name, (infer, step, _) in built.items():
    cases[f"inference {name}"] = (infer, (params,) + inference_args)
    cases[f"train {name}"] = (step, (params,) + train_args)
  timings = time_interleaved(cases, repeats=args.repeats)
  print(f"# probe_unrolled_backends, jax {jax.__version__} on {jax.default_backend()}; "
        f"{args.repeats} rounds, cases alternated")
  for name, timing in timings.items():
    print(f"{name:20s} median {timing.median:.3f} s  min {timing.min:.3f} s")


if __name__ == "__main__":
  main()
