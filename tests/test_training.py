"""End to end at smoke size: train, resume after SIGKILL, data parallel, evaluate, predict, errors;
stages, early stopping, non-finite losses, the best checkpoint across restarts, the workdir lock."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "configs/hemis.py:smoke"


def run_cli(args, cache_dir, env_extra=None, check=True, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  cmd = [sys.executable] + args
  if args[0] == "train.py":
    cmd += [f"--config.data.cache_dir={cache_dir}", "--progress=false"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{args} failed:\n{proc.stderr[-3000:]}")
  return proc


def final_params(workdir):
  """Parameters of the latest checkpoint, as a flat dict of arrays."""
  from hemijax.inference.predictor import load_run
  import jax
  _, _, variables = load_run(workdir, step="latest")
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("runs") / "hemis"
  run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
           "--config.train.num_steps=8", "--config.data.batch_size=4"], cache_dir)
  return workdir


def test_train_writes_checkpoints_logs_and_curves(trained):
  assert (trained / "config.json").is_file()
  assert (trained / "curves.png").stat().st_size > 0
  steps = [s for s, _ in losses(trained)]
  assert steps == list(range(1, 9))
  assert json.loads((trained / "best.json").read_text())["step"] in (3, 6, 8)


def test_sigkill_and_resume_gives_the_same_parameters(trained, tmp_path, cache_dir):
  workdir = tmp_path / "killed"
  args = ["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
          "--config.train.num_steps=8", "--config.data.batch_size=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable] + args + [f"--config.data.cache_dir={cache_dir}",
                                                     "--progress=false"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill at a random moment after the first checkpoint exists (mid-run, possibly mid-save).
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "3").exists() and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  time.sleep(np.random.default_rng().uniform(0, 0.3))
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  # The kill landed mid-run: the last step was neither saved nor logged.
  assert not (workdir / "checkpoints" / "8").exists(), "the kill landed after the last checkpoint"
  assert max(s for s, _ in losses(workdir)) < 8, "the kill landed after the last step"
  run_cli(args, cache_dir)
  resumed, reference = final_params(workdir), final_params(trained)
  assert resumed.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
  assert losses(workdir) == losses(trained)


def test_sigterm_saves_the_step_reached_and_resuming_repeats_none(tmp_path, cache_dir):
  """SIGTERM (a scheduler's limit, a study stopped) checkpoints the last completed step, which
  no checkpoint_every or validation step would have saved; the resumed run matches an
  uninterrupted one."""
  def args(workdir):
    return ["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
            "--config.train.num_steps=30", "--config.data.batch_size=4",
            "--config.train.eval_every=100", "--config.train.checkpoint_every=100"]

  reference, workdir = tmp_path / "reference", tmp_path / "terminated"
  run_cli(args(reference), cache_dir)
  proc = subprocess.Popen([sys.executable] + args(workdir) + [
      f"--config.data.cache_dir={cache_dir}", "--progress=false"], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "metrics.jsonl").is_file() and any(s >= 3 for s, _ in losses(workdir)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143, stderr[-2000:]
  steps = checkpoint_steps(workdir)
  assert len(steps) == 1 and 3 <= steps[0] < 30, steps   # the step it reached, not step 30
  assert max(s for s, _ in losses(workdir)) == steps[0]  # logged up to it, not beyond
  run_cli(args(workdir), cache_dir)
  resumed, want = final_params(workdir), final_params(reference)
  for k in want:
    np.testing.assert_array_equal(resumed[k], want[k], err_msg=k)
  assert losses(workdir) == losses(reference)


def test_data_parallel_over_four_devices_matches_one(trained, tmp_path, cache_dir):
  workdir = tmp_path / "dp4"
  run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
           "--config.train.num_steps=8", "--config.data.batch_size=4"], cache_dir,
          env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  one, four = losses(trained), losses(workdir)
  assert [s for s, _ in one] == [s for s, _ in four]
  np.testing.assert_allclose([l for _, l in four], [l for _, l in one], rtol=1e-4)


def test_resume_with_another_model_config_is_refused(trained, cache_dir):
  proc = run_cli(["train.py", f"--config={SMOKE}", f"--workdir={trained}",
                  "--config.model.backend_kernel=5"], cache_dir, check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "another model config" in last and "backend_kernel" in last


def test_evaluate_every_subset(trained, tmp_path, cache_dir):
  out = tmp_path / "eval"
  proc = run_cli(["evaluate.py", f"--workdir={trained}", f"--out={out}"], cache_dir)
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["subsets"]) == 15
  assert (out / "cases.csv").is_file() and (out / "dice_by_subset.png").is_file()
  assert "●●●●" in proc.stdout or "● | ● | ● | ●" in proc.stdout


def test_evaluate_compare_writes_dice_and_surface_distance_tables(trained, tmp_path, cache_dir):
  from hemijax.evaluation.evaluate import evaluate_workdir

  other = tmp_path / "other"
  evaluate_workdir(trained, out=other / "eval", progress=False)
  (other / "config.json").write_text((trained / "config.json").read_text())
  out = tmp_path / "eval"
  summary = evaluate_workdir(trained, out=out, compare=[other], progress=False)
  assert summary["comparison"] == str(out / "comparison.md")
  for metric in ("dice", "assd", "hd95"):
    name = "comparison" if metric == "dice" else f"comparison_{metric}"
    comparison = json.loads((out / f"{name}.json").read_text())
    assert comparison["metric"] == metric and len(comparison["methods"]) == 2
    # The same checkpoint on the same cases: every p-value is 1 (no differences).
    assert all(p == 1.0 for entry in comparison["subsets"].values()
               for by_region in entry["p_value"].values() for p in by_region.values())


def test_evaluate_compare_with_an_unevaluated_workdir_fails_first(trained, tmp_path, cache_dir):
  out = tmp_path / "eval"
  proc = run_cli(["evaluate.py", f"--workdir={trained}", f"--out={out}",
                  f"--compare={tmp_path / 'other'}"], cache_dir, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--compare" in lines[0] and "other" in lines[0], proc.stderr
  assert not out.exists()   # nothing evaluated or written


def test_predict_from_t1_and_flair_keeps_the_affine(trained, tmp_path, cache_dir):
  import nibabel as nib
  from hemijax.data import layouts
  from hemijax.data.datasets import phantom_root
  from hemijax.training.checkpoints import load_config_dict
  import ml_collections
  config = ml_collections.ConfigDict(load_config_dict(trained))
  case = layouts.discover_cases(phantom_root(config))[0]
  out = tmp_path / "seg.nii.gz"
  run_cli(["predict.py", f"--workdir={trained}", f"--input=t1={case.images['t1']}",
           f"--input=flair={case.images['flair']}", f"--output={out}"], cache_dir)
  seg, ref = nib.load(out), nib.load(case.images["t1"])
  np.testing.assert_allclose(seg.affine, ref.affine)
  assert seg.shape == ref.shape
  assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}


@pytest.mark.parametrize("args,needle", [
    (["--input=pd=x.nii.gz", "--output=o.nii.gz"], "unknown modality name(s) ['pd']"),
    (["--input=t1=/nonexistent/t1.nii.gz", "--output=o.nii.gz"], "/nonexistent/t1.nii.gz"),
    (["--input=t1", "--output=o.nii.gz"], "MODALITY=PATH"),
])
def test_predict_bad_input_is_one_clear_line(trained, cache_dir, args, needle):
  proc = run_cli(["predict.py", f"--workdir={trained}"] + args, cache_dir, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert needle in proc.stderr.strip().splitlines()[-1]


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def test_rerun_of_a_finished_run_says_so_and_writes_nothing(trained, cache_dir):
  before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
  proc = run_cli(["train.py", f"--config={SMOKE}", f"--workdir={trained}",
                  "--config.train.num_steps=8", "--config.data.batch_size=4"], cache_dir)
  assert "already finished at step 8" in proc.stdout
  assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_extending_a_run_keeps_its_best_checkpoint(trained, tmp_path, cache_dir):
  workdir = tmp_path / "extended"
  shutil.copytree(trained, workdir)
  best = json.loads((workdir / "best.json").read_text())["step"]
  # Learning rate 0: no later evaluation beats the best, which falls out of the latest two.
  run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.num_steps=14",
           "--config.data.batch_size=4", "--config.optimizer.learning_rate=0"], cache_dir)
  assert json.loads((workdir / "best.json").read_text())["step"] == best
  assert checkpoint_steps(workdir) == sorted({best, 12, 14})
  assert [s for s, _ in losses(workdir)] == list(range(1, 15))


def test_early_stopping_ends_the_run_and_a_rerun_stays_stopped(tmp_path, cache_dir):
  workdir = tmp_path / "early"
  args = ["train.py", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.num_steps=30",
          "--config.train.patience=1", "--config.optimizer.learning_rate=0"]
  proc = run_cli(args, cache_dir)
  # Learning rate 0: the evaluation at step 6 equals the one at 3, no improvement in 1 evaluation.
  assert "early stopping at step 6" in proc.stdout + proc.stderr
  assert json.loads((workdir / "early_stopped.json").read_text()) == {"step": 6}
  assert [s for s, _ in losses(workdir)] == list(range(1, 7))
  assert checkpoint_steps(workdir) == [3, 6]
  assert json.loads((workdir / "best.json").read_text())["step"] == 3
  rerun = run_cli(args, cache_dir)
  assert "already finished at step 6" in rerun.stdout
  assert checkpoint_steps(workdir) == [3, 6]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / "diverged"
  proc = run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
                  "--config.train.num_steps=6", "--config.train.checkpoint_every=1",
                  "--config.optimizer.learning_rate=1e38"], cache_dir, check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "non-finite loss" in lines[0], proc.stderr
  good = int(re.search(r"last good checkpoint \(step (\d+)\)", lines[0]).group(1))
  assert 1 <= good < 6
  assert max(checkpoint_steps(workdir)) == good  # nothing saved after it
  assert max(s for s, _ in losses(workdir)) == good
  params = final_params(workdir)
  assert all(np.isfinite(v).all() for v in params.values())


# PIMMS: a 3-step classifier stage, then 6 segmentation steps with a fresh optimiser.
PIMMS_STAGES = ["--config=configs/pimms.py:smoke", "--config.train.checkpoint_every=1",
                "--config.train.keep_checkpoints=20"]


@pytest.fixture(scope="module")
def pimms_uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("runs") / "pimms"
  run_cli(["train.py", *PIMMS_STAGES, f"--workdir={workdir}"], cache_dir)
  return workdir


# Checkpoint 3 holds the classifier stage's optimiser state; 2 is inside that stage.
@pytest.mark.parametrize("resume_from", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_resume_across_a_stage_boundary_gives_the_same_numbers(pimms_uninterrupted, tmp_path,
                                                               cache_dir, resume_from):
  full, resumed = pimms_uninterrupted, tmp_path / "resumed"
  shutil.copytree(full, resumed)
  for step in checkpoint_steps(resumed):   # as if killed right after saving `resume_from`
    if step > resume_from:
      shutil.rmtree(resumed / "checkpoints" / str(step))
  run_cli(["train.py", *PIMMS_STAGES, f"--workdir={resumed}"], cache_dir)
  assert checkpoint_steps(resumed) == checkpoint_steps(full) == list(range(1, 10))
  got, want = final_params(resumed), final_params(full)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert losses(resumed) == losses(full)


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path, cache_dir):
  workdir = tmp_path / "busy"
  args = ["train.py", f"--config={SMOKE}", f"--workdir={workdir}",
          "--config.train.num_steps=100000", f"--config.data.cache_dir={cache_dir}",
          "--progress=false"]
  first = subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    deadline = time.time() + 240
    while not (workdir / "config.json").exists() and time.time() < deadline:  # under the lock
      assert first.poll() is None, "the first run ended early"
      time.sleep(0.1)
    second = run_cli(args[:3] + ["--config.train.num_steps=100000"], cache_dir, check=False)
    assert first.poll() is None, "the first run ended before the second one tried"
  finally:
    first.kill()
    first.wait()
  assert second.returncode != 0
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and "another run is training in this workdir" in lines[0], second.stderr
  assert str(first.pid) in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--config.train.num_stepz=3"],
     "--config.train.num_stepz: 'train.num_stepz' is not a field of the config; "
     "did you mean --config.train.num_steps?"),
    (["--config=configs/hemis.py:dmeo"], "unknown preset 'dmeo'"),
    (["--config.train.num_steps=0"], "config.train.num_steps=0: must be a positive number"),
    (["--config.train.num_steps=-2"], "config.train.num_steps=-2: must be a positive number"),
    (["--config.train.init_from=/nonexistent/run"],
     "config.train.init_from=/nonexistent/run: no such run folder"),
    (["--config.train.init_reset=classifier"],
     "config.train.init_reset=('classifier',) without config.train.init_from"),
])
def test_config_mistakes_are_one_line_and_write_nothing(tmp_path, cache_dir, args, needle):
  workdir = tmp_path / "never"
  proc = run_cli(["train.py", f"--config={SMOKE}", f"--workdir={workdir}", *args], cache_dir,
                 check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  if "dmeo" in needle:
    assert "did you mean 'demo'?" in lines[0]
  assert not workdir.exists()
