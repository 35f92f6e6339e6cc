"""The test suite at XLA's default backend optimisation level against level 0 (tests/conftest.py).

Runs the given test files (default: the whole fast suite) with HEMIJAX_TEST_XLA_OPT=default and
without (level 0), alternated, and prints each run's wall and CPU seconds (pytest and its
subprocesses) and the ratios. CPU seconds are the fairer measure when other jobs share the cores.

  python benchmarks/bench_suite_opt_level.py --rounds 2 tests/test_hemis.py tests/test_urn.py
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(level: str, paths: list[str]) -> tuple[float, float, str]:
  """(wall s, CPU s of the children, pytest's last line) of one pytest run."""
  env = dict(os.environ, HEMIJAX_TEST_XLA_OPT=level)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                        cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
  if done.returncode != 0:
    raise SystemExit(f"pytest failed at level {level}: {last}")
  return wall, cpu, last


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="*", help="test files or folders (default: the fast suite)")
  parser.add_argument("--rounds", type=int, default=1)
  args = parser.parse_args()
  levels = {"default": "default", "level 0": "0"}
  times = {name: [] for name in levels}
  print(f"# bench_suite_opt_level: {' '.join(args.paths) or 'the fast suite'}, {args.rounds} "
        f"round(s), alternated, {os.cpu_count()} CPUs")
  print("| round | XLA level | wall s | CPU s | pytest |")
  print("|---|---|---:|---:|---|")
  for k in range(args.rounds):
    for name, level in levels.items():
      wall, cpu, last = run_suite(level, args.paths)
      times[name].append((wall, cpu))
      print(f"| {k + 1} | {name} | {wall:.1f} | {cpu:.1f} | {last} |", flush=True)
  for i, what in enumerate(("wall", "CPU")):
    default = statistics.median(t[i] for t in times["default"])
    zero = statistics.median(t[i] for t in times["level 0"])
    print(f"median {what}: default {default:.1f} s, level 0 {zero:.1f} s, "
          f"level 0 takes {zero / default:.2f}x of default")


if __name__ == "__main__":
  main()
