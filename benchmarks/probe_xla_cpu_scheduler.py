r"""XLA:CPU's thunk schedulers on the HeMIS-3D network: wall and CPU seconds per call.

  python benchmarks/probe_xla_cpu_scheduler.py    # about 14 minutes on 2 AVX2 cores, machine quiet

At issue 17's sizes hemijax's HeMIS-3D inference used 1.83 CPU seconds in 1.146 s of wall time,
torch.compile 2.09 in 1.046 s (docs/performance.md): both cores were busy 80 % of the call for us,
all of it for torch. XLA:CPU orders the thunks of a compiled program with a scheduler
(`--xla_cpu_scheduler_type`: default, memory- or concurrency-optimised; and
`--xla_cpu_enable_concurrency_optimized_scheduler`); a schedule that lets independent thunks
overlap could fill the idle core. Each setting runs in fresh processes (XLA_FLAGS is read at
start-up), settings alternated, `--rounds` processes each; per process the median over `--calls`
calls of the train step (2 x 4 x 32^3) and of inference (1 x 4 x 64^3), with the allocator
setting of the entry points (`hemijax.runtime`), as bench_conv.py.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": "",
    "concurrency scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "memory scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "concurrency-optimized flag off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}


def measure(calls):
  """Runs in the child process: prints 'train_wall train_cpu infer_wall infer_cpu' (medians)."""
  import resource
  import time

  from hemijax import runtime
  runtime.reuse_freed_memory(default=True)
  import jax
  import jax.numpy as jnp

  from benchmarks import bench_conv

  def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(calls):
      cpu, start = cpu_seconds(), time.perf_counter()
      jax.block_until_ready(fn(*args))
      walls.append(time.perf_counter() - start)
      cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)

  key, m = jax.random.key(0), bench_conv.MODALITIES
  model = bench_conv.hemijax_model("auto")
  image = jax.random.normal(key, (2, 32, 32, 32, m))
  mask = jnp.ones((2, m), bool)
  params = model.init(jax.random.key(1), image[:, :8, :8, :8], mask)["params"]
  labels = jax.random.randint(key, (2, 32, 32, 32), 0, 4)
  step = bench_conv.make_train_step(model)
  train = timed(lambda p: step(p, image, mask, labels), params)
  image = jax.random.normal(key, (1, 64, 64, 64, m))
  infer = timed(bench_conv.make_inference(model), params, image, mask[:1])
  print(*train, *infer)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS),
                      help=f"comma-separated, of: {', '.join(SETTINGS)}")
  parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
  parser.add_argument("--calls", type=int, default=5, help="timed calls per process and task")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return measure(args.calls)
  names = args.settings.split(",")
  for name in names:
    if name not in SETTINGS:
      parser.error(f"--settings: unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
  rows = []
  for round_ in range(args.rounds):
    for name in names:
      env = dict(os.environ, PYTHONPATH=str(ROOT),
                 XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + SETTINGS[name]).strip())
      out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)],
                           env=env, capture_output=True, text=True, check=True).stdout.split()
      rows.append((name, round_ + 1, *map(float, out[-4:])))
      print(f"  {name} round {round_ + 1}: train {rows[-1][2]:.3f} s, inference "
            f"{rows[-1][4]:.3f} s", file=sys.stderr, flush=True)
  print(f"# probe_xla_cpu_scheduler, {os.cpu_count()} CPUs; medians of {args.calls} calls per "
        "process, settings alternated")
  print("| setting | round | train wall s | train CPU s | inference wall s | inference CPU s |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, round_, train_wall, train_cpu, infer_wall, infer_cpu in rows:
    print(f"| {name} | {round_} | {train_wall:.3f} | {train_cpu:.3f} | {infer_wall:.3f} | "
          f"{infer_cpu:.3f} |")


if __name__ == "__main__":
  main()
