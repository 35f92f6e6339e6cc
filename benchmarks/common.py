"""Timing helpers shared by the benchmark scripts.

    from benchmarks.common import time_jitted, time_interleaved, matmul_peak_gflops, compiled_memory

All timings block on the result (`jax.block_until_ready`), warm up first (the first call compiles),
and report the median of the timed calls. On a shared machine, compare alternatives with
`time_interleaved`, which alternates them round by round so that load changes hit all alike.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of each timed call, and the process CPU seconds they used."""
  times: list[float]
  cpu_times: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def min(self) -> float:
    return min(self.times)

  @property
  def cpu_median(self) -> float:
    return statistics.median(self.cpu_times)


def _timed_call(fn: Callable, args: Sequence[Any]) -> tuple[float, float]:
  cpu, wall = time.process_time(), time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


def time_jitted(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> Timing:
  """Times `fn(*args)` (a jitted function): `warmup` untimed calls, then `repeats` timed ones."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  walls, cpus = zip(*[_timed_call(fn, args) for _ in range(repeats)])
  return Timing(list(walls), list(cpus))


def time_interleaved(cases: Mapping[str, tuple[Callable, Sequence[Any]]], *, warmup: int = 1,
                     repeats: int = 5, log: Callable[[str], None] | None = None
                     ) -> dict[str, Timing]:
  """Times several `name -> (jitted fn, args)` cases, alternating them round by round."""
  for name, (fn, args) in cases.items():
    start = time.perf_counter()
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
    if log:
      log(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
  results = {name: Timing([], []) for name in cases}
  for round_ in range(repeats):
    for name, (fn, args) in cases.items():
      wall, cpu = _timed_call(fn, args)
      results[name].times.append(wall)
      results[name].cpu_times.append(cpu)
    if log:
      log(f"  round {round_ + 1}/{repeats}: " +
          ", ".join(f"{name} {r.times[-1]:.2f} s" for name, r in results.items()))
  return results


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved float32 GFLOP/s of XLA's own `n x n` matrix product (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  timing = time_jitted(jax.jit(jnp.dot), a, b, repeats=repeats)
  return 2 * n**3 / timing.min / 1e9


def compiled_memory(jitted: Callable, *args) -> dict[str, int]:
  """XLA's buffer assignment for `jitted(*args)`, in bytes (`executable_memory`)."""
  return executable_memory(jitted.lower(*args).compile())


def executable_memory(compiled) -> dict[str, int]:
  """XLA's buffer assignment of a compiled executable, in bytes: arguments, outputs, temporaries
  and their sum less aliased (donated) bytes, the peak the executable holds while it runs."""
  stats = compiled.memory_analysis()
  out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
         "temp": stats.temp_size_in_bytes, "alias": stats.alias_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def executable_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable as XLA's cost analysis counts them (every op, not
  only the convolutions)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per device program on older JAX
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def load_config(spec: str):
  """A config from `path[:preset]` (as train.py's --config takes it), relative to the repository."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()
