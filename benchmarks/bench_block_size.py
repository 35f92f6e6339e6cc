r"""The block size of the blocked kernel-gradient loop (`conv._BLOCK_ELEMENTS`), measured.

  python benchmarks/bench_block_size.py                       # whole train steps
  python benchmarks/bench_block_size.py --layers              # the loop alone, layer by layer
  python benchmarks/bench_block_size.py --sizes 1048576,393216 --repeats 9

`_kernel_grad_loop` (and the "matmul" forward) walk the output positions in blocks of about
`_BLOCK_ELEMENTS` input + gradient values. This compiles the same program once per size (the
constant patched while tracing) and times them alternately, round by round: the HeMIS-3D train step
of benchmarks/bench_conv.py (batch 2 x 4 modalities x 32^3, `auto`) and the first training stage
of each 3D demo config; with `--layers`, the loop alone on the large 3x3x3 layers of HeMIS-3D
(batch 2, SAME). Medians of wall seconds.
"""
import argparse
import pathlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_conv  # noqa: E402
from benchmarks.bench_methods import build_cases  # noqa: E402
from benchmarks.common import time_interleaved  # noqa: E402
from hemijax import runtime  # noqa: E402
from hemijax.nn import conv as conv_lib  # noqa: E402

SIZES = (1 << 20, 3 << 17, 1 << 19, 1 << 18)
CONFIGS = ("configs/disentangle.py:demo", "configs/joint.py:demo")
# (edge of the cube, Cin, Cout), batch 2: HeMIS-3D's back-end and front-end layers.
LAYERS = ((32, 48, 48), (32, 96, 16), (16, 48, 48))


def hemis3d_step():
  """bench_conv's HeMIS-3D train step (jitted, not yet traced) and its arguments."""
  model = bench_conv.hemijax_model("auto")
  batch, edge = 2, 32
  image = jax.random.normal(jax.random.key(0), (batch, edge, edge, edge, 4))
  mask = jnp.ones((batch, 4), bool)
  labels = jax.random.randint(jax.random.key(1), (batch, edge, edge, edge), 0, 4)
  params = model.init(jax.random.key(2), image, mask)["params"]
  return bench_conv.make_train_step(model), (params, image, mask, labels)


def programs(sizes):
  """{program name: {size: (compiled step, args)}}."""
  out = {"HeMIS-3D train step (bench_conv)": {}}
  for size in sizes:
    with mock.patch.object(conv_lib, "_BLOCK_ELEMENTS", size):
      step, args = hemis3d_step()
      out["HeMIS-3D train step (bench_conv)"][size] = (step.lower(*args).compile(), args)
      for spec in CONFIGS:
        stages, *_ = build_cases(spec, ("auto",))
        stage, (cases, *_) = next(iter(stages.items()))
        step, args = cases["auto"]
        out.setdefault(f"`{spec}` {stage}", {})[size] = (step.lower(*args).compile(), args)
  return out


def layer_programs(sizes):
  window, ones, pads = (3, 3, 3), (1, 1, 1), ((1, 1),) * 3
  out = {}
  for edge, cin, cout in LAYERS:
    x = jax.random.normal(jax.random.key(0), (2, edge, edge, edge, cin))
    g = jax.random.normal(jax.random.key(1), (2, edge, edge, edge, cout))
    name = f"loop, {edge}^3, {cin} -> {cout}"
    for size in sizes:
      with mock.patch.object(conv_lib, "_BLOCK_ELEMENTS", size):
        fn = jax.jit(lambda x, g: conv_lib._kernel_grad_loop(x, g, window, ones, ones, pads))
        out.setdefault(name, {})[size] = (fn.lower(x, g).compile(), (x, g))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                      help="values of _BLOCK_ELEMENTS to compare")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", action="store_true", help="the loop alone on single layers")
  args = parser.parse_args(argv)
  try:
    sizes = tuple(int(s) for s in args.sizes.split(","))
  except ValueError:
    parser.error(f"--sizes: want comma-separated integers, got {args.sizes!r}")
  allocator = ("freed memory reused" if runtime.reuse_freed_memory(default=True)
               else "glibc default")
  log = lambda line: print(line, file=sys.stderr, flush=True)
  built = layer_programs(sizes) if args.layers else programs(sizes)
  unit, scale = ("ms", 1e3) if args.layers else ("s", 1)
  rows = []
  for name, cases in built.items():
    log(name)
    times = time_interleaved({str(s): case for s, case in cases.items()}, repeats=args.repeats,
                             log=log)
    t = [times[str(s)].median for s in sizes]
    rows.append(f"| {name} | " + " | ".join(f"{v * scale:.3f}" for v in t) + " | "
                + " | ".join(f"{t[0] / v:.2f}x" for v in t[1:]) + " |")
  print(f"# bench_block_size, jax {jax.__version__} on {jax.default_backend()}; medians of "
        f"{args.repeats} rounds, sizes alternated; current _BLOCK_ELEMENTS "
        f"{conv_lib._BLOCK_ELEMENTS:,}; allocator: {allocator}")
  print("| program | " + " | ".join(f"{s:,} ({unit})" for s in sizes) + " | "
        + " | ".join(f"{s:,} speed-up over {sizes[0]:,}" for s in sizes[1:]) + " |")
  print("|---|" + "---:|" * (2 * len(sizes) - 1))
  print("\n".join(rows))


if __name__ == "__main__":
  main()
