r"""Where a demo config's train step or inference spends its time, by XLA:CPU thunk.

  python benchmarks/profile_thunks.py --config configs/disentangle.py:demo --task train
  python benchmarks/profile_thunks.py --config configs/hemis.py:demo --task inference --top 20

Builds the config's first training stage and its whole-volume inference as bench_methods.py does,
runs the chosen task once to compile, then `--repeats` times under `jax.profiler.trace` with a
Perfetto trace, and prints the traced seconds per call summed by thunk kind (the name before its
number: `ynn_fusion` = convolutions and matrix products in XNNPACK/YNNPACK, `transpose_copy_fusion`,
`concatenate_bitcast_fusion`, ...) and the largest single thunks. Thunks on different threads
overlap, so the kinds' seconds can add up to more than the wall time; compare kinds within a run.
"""
import argparse
import collections
import gzip
import json
import pathlib
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_methods  # noqa: E402
from hemijax import runtime  # noqa: E402


def thunk_seconds(trace_file: pathlib.Path) -> dict[str, float]:
  """Seconds per traced event name (complete events only) in a Perfetto JSON trace."""
  with gzip.open(trace_file) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      totals[event["name"]] += event.get("dur", 0) / 1e6
  return totals


def is_thunk(name: str) -> bool:
  """XLA's compiled operations, not the runtime's or Python's own events."""
  return not (name.startswith("$") or "::" in name or name.startswith(("Pjit", "end: "))
              or name in ("ParseArguments", "DevicePut", "H2D Dispatch", "while"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/hemis.py:demo")
  parser.add_argument("--task", choices=("train", "inference"), default="train")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args(argv)
  allocator = ("freed memory reused" if runtime.reuse_freed_memory(default=args.task == "train")
               else "glibc default")  # as train.py / predict.py do
  stages, infer_cases, _ = bench_methods.build_cases(args.config, impls=("auto",))
  if args.task == "train":
    stage, (cases, *_) = next(iter(stages.items()))
    step, step_args = cases["auto"]
    call = lambda: jax.block_until_ready(step(*step_args))
    label = f"train step ({stage} stage)"
  else:
    infer, _ = infer_cases["auto"]
    call, label = infer, "inference of one validation volume"
  call()
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(args.repeats):
        call()
      wall = (time.perf_counter() - start) / args.repeats
    totals = thunk_seconds(next(pathlib.Path(folder).rglob("perfetto_trace.json.gz")))
  thunks = {name: seconds / args.repeats for name, seconds in totals.items() if is_thunk(name)}
  kinds = collections.Counter()
  for name, seconds in thunks.items():
    kinds[name.split(".")[0]] += seconds
  print(f"# profile_thunks {args.config} {label}: {wall:.3f} s per call (wall, traced), "
        f"{args.repeats} calls; jax {jax.__version__} on {jax.default_backend()}; allocator: "
        f"{allocator}")
  total = sum(kinds.values())
  print("| thunk kind | s per call | share of thunk time |")
  print("|---|---:|---:|")
  for kind, seconds in kinds.most_common(args.top):
    print(f"| {kind} | {seconds:.3f} | {seconds / total:.0%} |")
  print("\nlargest thunks:")
  for name, seconds in collections.Counter(thunks).most_common(args.top):
    print(f"  {seconds:.4f} s  {name}")


if __name__ == "__main__":
  main()
