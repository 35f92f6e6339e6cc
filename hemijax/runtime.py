"""Process-wide settings that the entry points apply before JAX starts.

`reuse_freed_memory()`: glibc's allocator keeps the memory a process frees and hands it out again
instead of returning it to the kernel. XLA:CPU allocates an executable's temporaries and outputs
with malloc on every call; by default glibc serves requests above its mmap threshold (at most 32
MiB) with fresh mappings and unmaps its per-thread heaps when they empty, so each call faults its
buffers in again and the kernel zeroes every page. One HeMIS-3D inference call on a 64^3 volume
took 438,000 minor page faults; with this setting 49,000-177,000, and the call ran 1.08-1.27x
faster on 2 cores (benchmarks/bench_allocator.py, docs/performance.md). The price: a
process keeps its peak heap until it exits, and that heap fragments when buffers of many sizes
come and go: sliding-window inference of a 4 x 160 x 192 x 160 volume peaked at 5.95 GiB of RSS
with it against 3.88 GiB without, in about the same time (162 s against 158 s). So `train.py` and
`study.py` (a training step's buffers recur at fixed sizes) apply it, `predict.py` and
`evaluate.py` do not.

Linux with glibc only (elsewhere a no-op); HEMIJAX_MALLOC=reuse or =default overrides the entry
point's choice. The same as starting Python with MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_ARENA_MAX=<CPUs>, applied with mallopt(3) instead, so
`python train.py` needs no wrapper.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = (
    # No per-request mappings: buffers above the mmap threshold come from the heap.
    (M_MMAP_MAX, 0),
    # Never give the heap's top back to the kernel.
    (M_TRIM_THRESHOLD, 2**31 - 1),
    # Few per-thread arenas (glibc's default allows 8 per CPU): a thread arena's heap is unmapped
    # whenever it empties, whatever the trim threshold. One arena in all stopped every fault but
    # made the small U-Net demo step 1.3-1.5x slower (lock contention); one per CPU kept it within
    # 0.034-0.040 s against 0.034-0.037 s.
    (M_ARENA_MAX, max(2, os.cpu_count() or 1)),
)
ENV = "HEMIJAX_MALLOC"


def reuse_freed_memory(default: bool = True) -> bool:
  """Applies `SETTINGS` with glibc's mallopt; returns whether all took effect. Call it before the
  first JAX computation (XLA's worker threads pick their arena at their first allocation).
  `default`: whether to apply them when HEMIJAX_MALLOC is unset."""
  choice = os.environ.get(ENV, "").strip().lower()
  if choice not in ("", "reuse", "default"):
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: choose 'reuse' (freed memory kept and reused) "
                     "or 'default' (glibc's own allocator settings)")
  if choice == "default" or (not choice and not default):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in SETTINGS)
