"""Test setup: repository root importable (configs/), small and deterministic."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Most of the suite's time is XLA compiling many small programs; at backend optimisation level 0
# the suite takes 50-70 % of the CPU time (docs/performance.md, "The test suite"). The tests
# compare numbers against references and against each other, never timings, so they hold at any
# level. Set before JAX starts, so the tests' subprocesses (the command-line tests) inherit it;
# HEMIJAX_TEST_XLA_OPT=default runs the suite at XLA's default level.
if os.environ.get("HEMIJAX_TEST_XLA_OPT", "0") != "default":
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
