"""hemijax.runtime: the allocator setting the entry points apply."""
import os
import pathlib
import subprocess
import sys

import pytest

# Allocates, touches and frees 64 MiB (above glibc's largest mmap threshold) with libc's own
# malloc, then does it again and prints the minor page faults of the second round.
_PROBE = """
import ctypes, ctypes.util, resource, sys
from hemijax import runtime
applied = runtime.reuse_freed_memory(default=sys.argv[1] == 'True')
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def touch_and_free():
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting, default=True):
  env = dict(os.environ, HEMIJAX_MALLOC=setting)
  out = subprocess.run([sys.executable, "-c", _PROBE, str(default)], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  applied, faults = _faults("")
  assert applied and faults < 100
  assert _faults("reuse")[0]
  # glibc's default: the 64 MiB come from a fresh mapping, one fault per 4 KiB page (fewer with
  # transparent huge pages, never this few).
  applied, faults = _faults("default")
  assert not applied and faults > 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_an_entry_points_choice_applies_unless_the_variable_overrides_it():
  # predict.py and evaluate.py choose glibc's default (a kept heap fragments under sliding windows).
  applied, faults = _faults("", default=False)
  assert not applied and faults > 1000
  applied, faults = _faults("reuse", default=False)
  assert applied and faults < 100
  assert not _faults("default", default=True)[0]


def test_predict_and_evaluate_keep_glibcs_default_allocator():
  root = pathlib.Path(__file__).resolve().parents[1]
  for entry, reuse in [("train.py", True), ("study.py", True), ("predict.py", False),
                       ("evaluate.py", False)]:
    source = (root / entry).read_text()
    assert ("cli.run(run, reuse_freed_memory=False)" in source) is not reuse, entry


def test_a_mistyped_setting_is_one_line_naming_the_variable(tmp_path):
  env = dict(os.environ, HEMIJAX_MALLOC="off")
  result = subprocess.run([sys.executable, "train.py", "--config", "configs/hemis.py:smoke",
                           "--workdir", str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: HEMIJAX_MALLOC='off': choose 'reuse' (freed memory kept and reused) or 'default' "
      "(glibc's own allocator settings)"]
  assert not (tmp_path / "run").exists()


# An entry point's main that writes a file in its cleanup, says it has started, then waits.
_SLEEPER = """
import pathlib, sys, time
from hemijax import cli
def main():
  try:
    print("started", flush=True)
    time.sleep(60)
  finally:
    pathlib.Path(sys.argv[1]).write_text("cleaned up")
cli.run(main)
"""


def test_sigterm_ends_an_entry_point_as_ctrl_c_does_its_cleanups_run(tmp_path):
  # A background process started by a script ignores SIGINT, so SIGTERM is how a study worker is
  # stopped; its `finally` blocks (the attempt's time in the study marker) must still run.
  cleanup = tmp_path / "cleanup"
  process = subprocess.Popen([sys.executable, "-c", _SLEEPER, str(cleanup)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert process.stdout.readline().strip() == "started"
  process.terminate()
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 143 and stderr.strip() == "terminated"
  assert cleanup.read_text() == "cleaned up"
