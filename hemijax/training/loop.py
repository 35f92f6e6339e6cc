"""The training loop: data -> jitted step -> logs, validation, checkpoints. Knows no method.

Batch `s` is sampled with `np.random.default_rng((seed, s))` and the step key is
`fold_in(key(seed), s)`, so a run resumed from a checkpoint at step s continues with exactly the
numbers an uninterrupted run would have produced.
"""
from __future__ import annotations

import json
import pathlib
import queue
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from hemijax import atomic
from hemijax.evaluation import report as evaluation
from hemijax.inference import sliding_window as inference
from hemijax.evaluation import metrics as metrics_lib
from hemijax.data import datasets
from hemijax.data.preprocess import class_ids_to_label_values
from hemijax.data.tasks import get_task
from hemijax.models import get_method
from hemijax.training import TrainingError, checkpoints, sharding
from hemijax.training import stages as stages_lib
from hemijax.training import step as step_lib


EARLY_STOP_FILE = "early_stopped.json"


class BatchPrefetcher:
  """Samples batches for steps [start, stop) on a background thread, in order."""

  def __init__(self, make_batch, start: int, stop: int, depth: int = 3):
    self._queue = queue.Queue(maxsize=depth)
    self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop), daemon=True)
    self._thread.start()

  def _run(self, make_batch, start, stop):
    for step in range(start, stop):
      try:
        self._queue.put((step, make_batch(step), None))
      except Exception as e:  # surfaced in the main thread
        self._queue.put((step, None, e))
        return

  def get(self, step: int):
    got_step, batch, error = self._queue.get()
    if error is not None:
      raise error
    assert got_step == step, (got_step, step)
    return batch


def validation_masks(volumes, seed: int) -> list[np.ndarray]:
  """Per case: all available modalities, and one fixed random non-empty subset of them."""
  out = []
  for i, vol in enumerate(volumes):
    rng = np.random.default_rng((seed, 7919, i))
    avail = np.flatnonzero(vol.available)
    keep = rng.choice(avail, size=rng.integers(1, len(avail) + 1), replace=False)
    dropped = np.zeros_like(vol.available)
    dropped[keep] = True
    out.append(np.stack([vol.available, dropped]))
  return out


def validate(method, variables, volumes, masks, config) -> dict:
  """Mean region Dice on the validation cases, with all modalities and with random ones dropped."""
  task = get_task(config.task)
  forward = inference.make_window_forward(method, variables)
  scores = {"all": [], "dropped": []}
  for vol, case_masks in zip(volumes, masks):
    probs = inference.predict_probabilities(
        method, variables, vol.image, case_masks, roi=config.eval.roi_size or config.data.patch_size,
        overlap=config.eval.overlap, batch_size=config.eval.sw_batch_size,
        blend=config.eval.blend, forward=forward)
    truth = class_ids_to_label_values(vol.label, task.label_values)
    for name, p in zip(("all", "dropped"), probs):
      pred = class_ids_to_label_values(np.argmax(p, -1), task.label_values)
      regions = metrics_lib.region_masks(pred, task.regions)
      true_regions = metrics_lib.region_masks(truth, task.regions)
      scores[name].append(np.mean([metrics_lib.dice(regions[r], true_regions[r]) for r in regions]))
  result = {f"val_dice_{k}": float(np.mean(v)) for k, v in scores.items()}
  result[checkpoints.BEST_METRIC] = 0.5 * (result["val_dice_all"] + result["val_dice_dropped"])
  return result


def _append_jsonl(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path, last_step):
  """Drops log lines written after the checkpoint a resumed run restarts from."""
  path = pathlib.Path(path)
  if not path.is_file():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  kept = [l for l in lines if json.loads(l).get("step", 0) <= last_step]
  atomic.write_text(path, "".join(l + "\n" for l in kept))


def train(config, workdir, *, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  sharding.maybe_initialize_distributed()
  if (workdir / "config.json").is_file():
    checkpoints.check_compatible(checkpoints.load_config_dict(workdir), config, workdir)
  checkpoints.save_config(workdir, config)
  if (workdir / EARLY_STOP_FILE).is_file():
    return {}  # finished by early stopping; a re-run must not train on

  method = get_method(config)
  stages = method.training_stages(config)
  bounds = stages_lib.stage_bounds(stages)
  root = datasets.dataset_root(config)
  split_cache = {}

  def load_split(split):
    if split not in split_cache:
      split_cache[split] = datasets.load_split(config, split, root=root)
    return split_cache[split]

  val_volumes = load_split("val")[:config.train.val_cases]
  val_masks = validation_masks(val_volumes, config.seed)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.data.batch_size, mesh)
  manager = checkpoints.make_manager(workdir, keep=config.train.keep_checkpoints)
  resume_step = manager.latest_step()
  best = checkpoints.best_step(workdir)
  tracker = {"best_score": -np.inf, "last": {}}
  if best is not None:
    tracker["best_score"] = json.loads((workdir / "best.json").read_text())[checkpoints.BEST_METRIC]

  with jax.set_mesh(mesh):
    state = None
    for stage, (begin, end) in zip(stages, bounds):
      if resume_step is not None and resume_step >= end and stage is not stages[-1]:
        continue  # finished before the interruption
      make_batch = stages_lib.stage_batches(stage, config, load_split)
      optimizer = stages_lib.stage_optimizer(stage)
      example = sharding.put_batch(make_batch(begin), mesh)
      if state is None:
        state = jax.jit(
            lambda b: step_lib.init_state(method, optimizer, jax.random.key(config.seed), b),
            out_shardings=sharding.replicated(mesh))(example)
        if resume_step is not None:
          # The checkpoint holds the optimiser state of the stage it was written in.
          saved_stage = stages[stages_lib.stage_of_checkpoint(stages, resume_step)]
          if saved_stage is not stage:
            abstract = dict(state, opt_state=stages_lib.stage_optimizer(saved_stage).init(
                state["params"]))
          else:
            abstract = state
          state = checkpoints.restore(manager, int(resume_step), abstract)
          _truncate_jsonl(workdir / "metrics.jsonl", resume_step)
      if int(state["step"]) >= end:
        continue
      if int(state["step"]) == begin:  # a fresh optimiser for a stage that starts now
        state = dict(state, opt_state=jax.jit(optimizer.init,
                                              out_shardings=sharding.replicated(mesh))(
                                                  state["params"]))
      state = _run_stage(config, workdir, method, stage, begin, end, state, optimizer, make_batch,
                         mesh, manager, val_volumes, val_masks, tracker, progress,
                         is_last=stage is stages[-1])
    manager.close()
  return tracker["last"]


def _run_stage(config, workdir, method, stage, begin, end, state, optimizer, make_batch, mesh,
               manager, val_volumes, val_masks, tracker, progress, is_last):
  train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, config.seed),
                       donate_argnums=0)
  start = int(state["step"])
  evals_since_best = 0
  prefetch = BatchPrefetcher(make_batch, start, end)
  bar = tqdm(range(start, end), initial=start - begin, total=end - begin, disable=not progress,
             desc=f"{config.method}:{stage.name}", dynamic_ncols=True)
  tick, tick_step = time.perf_counter(), start
  for step in bar:
    batch = sharding.put_batch(prefetch.get(step), mesh)
    state, step_metrics = train_step(state, batch)
    if not bool(step_metrics["finite"]):
      raise TrainingError(
          f"non-finite loss or gradient at step {step}; stopped, the last good checkpoint "
          f"(step {manager.latest_step()}) is kept in {workdir}/checkpoints")
    done = step + 1
    if done % config.train.log_every == 0 or done == end:
      now = time.perf_counter()
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "finite"}
      host["steps_per_s"] = (done - tick_step) / max(now - tick, 1e-9)
      tick, tick_step = now, done
      tracker["last"] = dict(step=done, split="train", stage=stage.name, **host)
      _append_jsonl(workdir / "metrics.jsonl", tracker["last"])
      bar.set_postfix(loss=f"{host['loss']:.4f}", it_s=f"{host['steps_per_s']:.1f}")
    val = None
    if (stage.validate and val_volumes
        and ((done - begin) % config.train.eval_every == 0 or done == end)):
      variables = {"params": state["params"], **state["model_state"]}
      val = validate(method, variables, val_volumes, val_masks, config)
      _append_jsonl(workdir / "metrics.jsonl", dict(step=done, split="val", stage=stage.name, **val))
      bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
    if val is not None or (done - begin) % config.train.checkpoint_every == 0 or done == end:
      checkpoints.save(manager, done, state, metrics=val)
    if val is not None:
      if val[checkpoints.BEST_METRIC] > tracker["best_score"]:
        tracker["best_score"], evals_since_best = val[checkpoints.BEST_METRIC], 0
        checkpoints.record_best(workdir, done, tracker["best_score"])
      else:
        evals_since_best += 1
      evaluation.plot_training_curves(workdir / "curves.png", workdir / "metrics.jsonl")
      patience = config.train.patience
      # Early stopping ends the run, so it applies to the last stage only.
      if patience is not None and evals_since_best >= patience and is_last:
        bar.write(f"early stopping at step {done}: no improvement in {patience} evaluations")
        checkpoints.write_json_atomic(workdir / EARLY_STOP_FILE, {"step": done})
        break
  bar.close()
  return state
