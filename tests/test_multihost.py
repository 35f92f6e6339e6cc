"""Two training processes on 127.0.0.1 (jax.distributed, gloo collectives) give the numbers of one
process with two devices; a killed process and a restart of both change nothing; set-up errors
are one line, without a hang."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_training import ROOT, SMOKE, final_params, losses, run_cli

STEPS = ["--config.train.num_steps=8", "--config.data.batch_size=4"]
ONE_LINE_TIMEOUT_S = 60


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, port, cache_dir, logs, num=2):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = []
  for pid in range(num):
    cmd = [sys.executable, "train.py", f"--config={SMOKE}", f"--workdir={workdir}", *STEPS,
           f"--config.data.cache_dir={cache_dir}", "--progress=false",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num}",
           f"--process_id={pid}", "--initialization_timeout=120"]
    log = open(logs / f"process{pid}.log", "a")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait_all(procs, logs, timeout=600):
  deadline = time.time() + timeout
  codes = [p.wait(timeout=max(deadline - time.time(), 1)) for p in procs]
  if any(codes):
    tails = {f.name: f.read_text()[-2000:] for f in sorted(logs.glob("process*.log"))}
    raise AssertionError(f"exit codes {codes}:\n{tails}")


def assert_same_run(workdir, reference):
  got, want = final_params(workdir), final_params(reference)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  got_losses, want_losses = losses(workdir), losses(reference)
  assert [s for s, _ in got_losses] == [s for s, _ in want_losses] == list(range(1, 9))
  np.testing.assert_allclose([l for _, l in got_losses], [l for _, l in want_losses], rtol=1e-5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_process_two_devices(tmp_path_factory, cache_dir):
  """The reference: one process, two forced CPU devices, the batch drawn as two shares."""
  workdir = tmp_path_factory.mktemp("runs") / "one_process"
  run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}", *STEPS,
           "--config.data.batch_shares=2"], cache_dir,
          env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  return workdir


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(one_process_two_devices, tmp_path,
                                                          cache_dir):
  workdir = tmp_path / "two_processes"
  wait_all(start_processes(workdir, free_port(), cache_dir, tmp_path), tmp_path)
  assert_same_run(workdir, one_process_two_devices)
  # Process 0 alone wrote the logs: one line per step and evaluation, none twice.
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys))
  assert json.loads((workdir / "config.json").read_text())["data"]["batch_shares"] == 2
  best = json.loads((workdir / "best.json").read_text())["step"]
  assert (workdir / "checkpoints" / str(best)).is_dir()
  # One process evaluates the workdir afterwards (checkpoints written by two).
  out = tmp_path / "eval"
  run_cli(["evaluate.py", f"--workdir={workdir}", f"--out={out}",
           "--subsets=flair+t1+t1ce+t2"], cache_dir)
  assert len(json.loads((out / "summary.json").read_text())["subsets"]) == 1


@pytest.mark.slow
def test_killed_process_then_restart_of_both_still_matches(one_process_two_devices, tmp_path,
                                                           cache_dir):
  workdir, port = tmp_path / "killed", free_port()
  procs = start_processes(workdir, port, cache_dir, tmp_path)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "3").exists() and time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before the first checkpoint"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  assert procs[1].wait() == -signal.SIGKILL, "process 1 ended before it could be killed"
  assert not (workdir / "checkpoints" / "8").exists(), "the kill landed after the run finished"
  try:  # process 0 fails on its next collective; if it waits somewhere else, end it too
    procs[0].wait(timeout=30)
  except subprocess.TimeoutExpired:
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
  wait_all(start_processes(workdir, port, cache_dir, tmp_path), tmp_path)
  assert_same_run(workdir, one_process_two_devices)


def run_train_alone(args, tmp_path, timeout=ONE_LINE_TIMEOUT_S):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "train.py", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}",
         "--progress=false", *args]
  start = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - start


def test_unreachable_coordinator_is_one_line_not_a_hang(tmp_path):
  port = free_port()  # nobody listens there
  proc, seconds = run_train_alone([f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   "--process_id=1", "--initialization_timeout=2"], tmp_path)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "cannot reach the coordinator" in lines[0], proc.stderr
  assert f"127.0.0.1:{port}" in lines[0]
  assert not (tmp_path / "run").exists()


def test_processes_that_never_join_end_with_one_line(tmp_path):
  # Process 0 of 2 hosts the coordinator; process 1 never comes.
  proc, seconds = run_train_alone([f"--coordinator_address=127.0.0.1:{free_port()}",
                                   "--num_processes=2", "--process_id=0",
                                   "--initialization_timeout=3"], tmp_path)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "not all 2 processes joined" in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--num_processes=2", "--process_id=2"], "--process_id=2 does not fit --num_processes=2"),
    (["--num_processes=2", "--process_id=-1"], "--process_id=-1 does not fit"),
    (["--num_processes=2"], "needs --process_id"),
])
def test_process_ids_that_do_not_fit_are_one_line(tmp_path, args, needle):
  proc, _ = run_train_alone([f"--coordinator_address=127.0.0.1:{free_port()}", *args], tmp_path)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()
