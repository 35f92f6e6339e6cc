r"""hemijax.runtime's allocator setting against glibc's default: time, CPU and page faults per call.

  python benchmarks/bench_allocator.py            # about 3 minutes on 2 CPU cores, machine quiet

Runs each case in fresh processes, alternating HEMIJAX_MALLOC=default (glibc's default) and the
setting the entry points apply (`hemijax.runtime.reuse_freed_memory`), `--rounds` pairs, and
prints per process the median over `--calls` calls of wall seconds, CPU seconds (user + system,
all threads) and minor page faults. Cases: `hemis3d_inference`, the HeMIS-3D network of
bench_conv.py on 1 x 4 x 64^3 (large buffers); `unet_step`, the U-Net demo's jitted training step
(`configs/unet.py:demo_dropout`, small buffers).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ("hemis3d_inference", "unet_step")


def _case(name):
  """(function, arguments) of one case, compiled and run once."""
  import jax
  import jax.numpy as jnp
  if name == "hemis3d_inference":
    from benchmarks import bench_conv
    model = bench_conv.hemijax_model("auto")
    image = jax.random.normal(jax.random.key(0), (1, 64, 64, 64, bench_conv.MODALITIES))
    mask = jnp.ones((1, bench_conv.MODALITIES), bool)
    params = model.init(jax.random.key(1), image[:, :8, :8, :8], mask)["params"]
    fn, args = bench_conv.make_inference(model), (params, image, mask)
  else:
    from benchmarks import bench_methods
    stages, _, _ = bench_methods.build_cases("configs/unet.py:demo_dropout", ("auto", "xla"))
    cases, _, _ = next(iter(stages.values()))
    fn, args = cases["auto"]
  jax.block_until_ready(fn(*args))
  return fn, args


def measure(name, calls):
  """Runs in the child process: prints 'applied wall cpu faults' (medians)."""
  import resource
  import time

  from hemijax import runtime
  applied = runtime.reuse_freed_memory()
  import jax
  fn, args = _case(name)
  walls, cpus, faults = [], [], []
  for _ in range(calls):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(fn(*args))
    after = resource.getrusage(resource.RUSAGE_SELF)
    walls.append(time.perf_counter() - start)
    cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    faults.append(after.ru_minflt - before.ru_minflt)
  print(applied, statistics.median(walls), statistics.median(cpus), statistics.median(faults))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--rounds", type=int, default=3, help="process pairs per case")
  parser.add_argument("--calls", type=int, default=7, help="timed calls per process")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return measure(args.child, args.calls)
  rows = []
  for name in args.cases.split(","):
    if name not in CASES:
      parser.error(f"--cases: unknown case {name!r}; choose from {CASES}")
    for round_ in range(args.rounds):
      for setting in ("default", ""):
        env = dict(os.environ, HEMIJAX_MALLOC=setting, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, __file__, "--child", name, "--calls",
                              str(args.calls)], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        applied, wall, cpu, faults = out[0] == "True", float(out[1]), float(out[2]), float(out[3])
        rows.append((name, round_ + 1, "reused (hemijax.runtime)" if applied else
                     "glibc default", wall, cpu, faults))
        print(f"  {name} round {round_ + 1} {rows[-1][2]}: {wall:.3f} s", file=sys.stderr,
              flush=True)
  print(f"# bench_allocator, {os.cpu_count()} CPUs; medians of {args.calls} calls per process, "
        "settings alternated")
  print("| case | round | allocator | wall s | CPU s | minor page faults |")
  print("|---|---:|---|---:|---:|---:|")
  for name, round_, setting, wall, cpu, faults in rows:
    print(f"| {name} | {round_} | {setting} | {wall:.3f} | {cpu:.3f} | {faults:,.0f} |")


if __name__ == "__main__":
  main()
