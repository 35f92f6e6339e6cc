"""The training loop: data -> jitted step -> logs, validation, checkpoints. Knows no method.

Batch `s` is sampled with `np.random.default_rng((seed, s))` (on several processes, share k of it
with `(seed, s, k)`: hemijax.training.sharding.BatchShares) and the step key is
`fold_in(key(seed), s)`, so a run resumed from a checkpoint at step s continues with exactly the
numbers an uninterrupted run would have produced.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import queue
import signal
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from hemijax import atomic
from hemijax.evaluation import plots
from hemijax.inference import sliding_window as inference
from hemijax.evaluation import metrics as metrics_lib
from hemijax.data import datasets
from hemijax.data.preprocess import class_ids_to_label_values
from hemijax.data.tasks import task_from_config
from hemijax.models import get_method
from hemijax.nn import augment as augment_lib
from hemijax.training import TrainingError, checkpoints, init_from, sharding
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
  task = task_from_config(config)
  forward = inference.make_window_forward(method, variables)
  settings = inference.WindowSettings.from_config(config)
  scores = {"all": [], "dropped": []}
  for vol, case_masks in zip(volumes, masks):
    probs = inference.predict_probabilities(method, variables, vol.image, case_masks, settings,
                                            forward=forward)
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
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  All that can refuse the run (the config, the devices, the workdir's saved config and its lock,
  the data) is checked before anything is written. On several processes each one calls this
  (joined by `sharding.initialize_distributed`); all of them write their part of each checkpoint,
  process 0 alone the logs, plots and JSON files.
  """
  workdir = pathlib.Path(workdir)
  sharding.initialize_distributed()  # from the environment, if train.py has not joined already
  datasets.resolve_task(config)   # task=auto: the dataset's task, before the model is built
  method = get_method(config)
  stages = method.training_stages(config)
  _check_steps(config, stages)
  bounds = stages_lib.stage_bounds(stages)
  saved = checkpoints.load_config_dict(workdir) if (workdir / "config.json").is_file() else None
  if saved is not None:
    checkpoints.check_compatible(saved, config, workdir)
  mesh = sharding.make_mesh()
  shares = sharding.batch_shares(config.data.batch_size, mesh, _share_count(config, saved))
  finished = _finished_at(workdir, bounds[-1][1])
  if finished is not None:
    if sharding.is_lead():
      print(f"{workdir}: already finished at step {finished}; nothing to do")
    return {}
  if not checkpoints.saved_steps(workdir):
    init_from.check(config, method)   # a new run: the runs it starts from must serve
  workdir.mkdir(parents=True, exist_ok=True)
  with _locked(workdir):
    return _train(config, workdir, method, stages, bounds, mesh, shares, progress)


def _check_steps(config, stages) -> None:
  num_steps = config.train.num_steps
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"config.train.num_steps={num_steps!r}: must be a positive number of steps")
  for stage in stages:
    if stage.num_steps < 0:
      raise ValueError(f"stage {stage.name!r} of {config.method}: {stage.num_steps} steps; "
                       "a stage's num_steps must be >= 0")
  if not sum(stage.num_steps for stage in stages):
    raise ValueError(f"the stages of {config.method} ({', '.join(s.name for s in stages)}) "
                     "have 0 steps in all; nothing to train")


def _share_count(config, saved):
  """config.data.batch_shares; else what the run recorded when it started (so that resuming
  on another number of processes draws the same batches); else None: one per process."""
  count = config.data.get("batch_shares", None)
  if count is None and saved is not None:
    count = saved.get("data", {}).get("batch_shares")
  return count


def _finished_at(workdir, total_steps: int):
  """The step a finished run ended at (all its steps done, or stopped early), else None."""
  if (workdir / EARLY_STOP_FILE).is_file():
    return json.loads((workdir / EARLY_STOP_FILE).read_text())["step"]
  steps = checkpoints.saved_steps(workdir)
  return steps[-1] if steps and steps[-1] >= total_steps else None


@contextlib.contextmanager
def _locked(workdir):
  """The workdir's lock, held by process 0 for the run; if it is busy, every process refuses."""
  with contextlib.ExitStack() as stack:
    busy = None
    try:
      stack.enter_context(checkpoints.workdir_lock(workdir, hold=sharding.is_lead()))
    except checkpoints.WorkdirBusy as e:
      busy = e
    if sharding.from_lead(busy is not None):
      raise busy or checkpoints.WorkdirBusy(f"{workdir}: another run is training in this workdir")
    yield


def _train(config, workdir, method, stages, bounds, mesh, shares, progress) -> dict:
  lead = sharding.is_lead()
  # Cache, split and spacing, resolved and recorded in config.json; process 0 writes the split.
  if lead:
    datasets.prepare_run(config, workdir)
  sharding.wait_for_all("prepare_run")
  if not lead:
    datasets.prepare_run(config, workdir)
  if "batch_shares" in config.data:
    config.data.batch_shares = shares.count
  root = datasets.dataset_root(config)
  split_cache = {}

  def load_split(split):
    if split not in split_cache:
      split_cache[split] = datasets.load_split(config, split, root=root)
    return split_cache[split]

  val_volumes = load_split("val")[:config.train.val_cases]
  val_masks = validation_masks(val_volumes, config.seed)
  if lead:
    checkpoints.save_config(workdir, config)
  manager = checkpoints.make_manager(workdir, keep=config.train.keep_checkpoints)
  resume_step = manager.latest_step()
  best = checkpoints.best_step(workdir)
  tracker = {"best_score": -np.inf, "best_step": best, "last": {}, "lead": lead}
  if best is not None:
    tracker["best_score"] = json.loads((workdir / "best.json").read_text())[checkpoints.BEST_METRIC]

  with jax.set_mesh(mesh):
    state = None
    for stage, (begin, end) in zip(stages, bounds):
      if resume_step is not None and resume_step >= end and stage is not stages[-1]:
        continue  # finished before the interruption
      make_batch = stages_lib.stage_batches(stage, config, load_split, shares)
      optimizer = stages_lib.stage_optimizer(stage)
      if state is None:
        # Shaped by the first stage's batch, as in an uninterrupted run (a later stage's own
        # batches need not hold images), also when that stage has 0 steps.
        first = make_batch if stage is stages[0] else stages_lib.stage_batches(
            stages[0], config, load_split, shares)
        example = sharding.put_batch(first(bounds[0][0]), mesh)
        state = jax.jit(
            lambda b: step_lib.init_state(method, optimizer, jax.random.key(config.seed), b),
            out_shardings=sharding.replicated(mesh))(example)
        if resume_step is None:
          # A new run: the runs it starts from (a resumed one restores its own checkpoint).
          state = _start_from_sources(config, workdir, method, state, mesh, lead)
        else:
          # The checkpoint holds the optimiser state of the stage it was written in.
          saved_stage = stages[stages_lib.stage_of_checkpoint(stages, resume_step)]
          if saved_stage is not stage:
            abstract = dict(state, opt_state=stages_lib.stage_optimizer(saved_stage).init(
                state["params"]))
          else:
            abstract = state
          state = checkpoints.restore(manager, int(resume_step), abstract)
          if lead:
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


def _start_from_sources(config, workdir, method, state, mesh, lead):
  """The new run's state with the variables of config.train.init_from and the method's
  `parameter_sources` put in (hemijax.training.init_from); recorded in WORKDIR/init_from.json.
  The optimiser state is made afresh when the first stage starts."""
  if not init_from.sources(config, method):
    return state
  fresh = jax.device_get({"params": state["params"], **state["model_state"]})
  variables, records = init_from.start_variables(config, method, fresh)
  replicated = sharding.replicated(mesh)

  def put(value, like):
    host = np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])
  variables = jax.tree.map(put, variables, {"params": state["params"], **state["model_state"]})
  if lead:
    init_from.write_record(workdir, records)
    for record in records:
      print(f"{workdir}: {record['into'] or 'all variables'} from {record['source']} "
            f"(step {record['step']}); modalities carried {record['modalities']['carried']}, "
            f"new {record['modalities']['new']}; re-initialised {record['reset'] or 'none'}")
  params = variables.pop("params")
  return dict(state, params=params, model_state=variables)


class _StopRequests:
  """Ctrl-C and SIGTERM (hemijax.cli raises it as Ctrl-C) while a stage's steps run: the first one
  waits for the end of the current step, which the loop then checkpoints before raising it, so that
  resuming repeats no step; a second one raises at once. Only signals whose handler is Python's
  (an exception) are deferred; the others keep their handlers."""

  def __enter__(self):
    self.pending, self.previous = None, {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):
          self.previous[signum] = signal.signal(signum, self._request)
    return self

  def _request(self, signum, frame):
    if self.pending is not None:  # asked twice: now
      self.previous[signum](signum, frame)
    self.pending = signum

  def raise_pending(self):
    if self.pending is not None:
      self.previous[self.pending](self.pending, None)

  def __exit__(self, exc_type, *_):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
    if exc_type is None:  # asked after the last step's check
      self.raise_pending()


def _run_stage(config, workdir, method, stage, begin, end, state, optimizer, make_batch, mesh,
               manager, val_volumes, val_masks, tracker, progress, is_last):
  augment = augment_lib.make_augment(config.augment) if config.get("augment") is not None else None
  train_step = jax.jit(step_lib.make_train_step(stage.loss_fn, optimizer, config.seed,
                                                augment=augment), donate_argnums=0)
  start = int(state["step"])
  validates = stage.validate and bool(val_volumes)
  is_eval_step = lambda done: (done - begin) % config.train.eval_every == 0 or done == end
  # Evaluations since the best one in this stage, as an uninterrupted run would have counted them.
  since = max(tracker["best_step"] or begin, begin)
  evals_since_best = sum(map(is_eval_step, range(since + 1, start + 1))) if validates else 0
  lead = tracker["lead"]
  prefetch = BatchPrefetcher(make_batch, start, end)
  bar = tqdm(range(start, end), initial=start - begin, total=end - begin,
             disable=not (progress and lead), desc=f"{config.method}:{stage.name}",
             dynamic_ncols=True)
  tick, tick_step = time.perf_counter(), start
  saved = start  # the last step checkpointed
  with _StopRequests() as stop:
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
        if lead:
          _append_jsonl(workdir / "metrics.jsonl", tracker["last"])
        bar.set_postfix(loss=f"{host['loss']:.4f}", it_s=f"{host['steps_per_s']:.1f}")
      val = None
      if validates and is_eval_step(done):
        variables = {"params": state["params"], **state["model_state"]}
        val = validate(method, variables, val_volumes, val_masks, config)
        if lead:
          _append_jsonl(workdir / "metrics.jsonl",
                        dict(step=done, split="val", stage=stage.name, **val))
          bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
      if val is not None or (done - begin) % config.train.checkpoint_every == 0 or done == end:
        checkpoints.save(manager, done, state, metrics=val)
        saved = done
      if val is not None:
        if val[checkpoints.BEST_METRIC] > tracker["best_score"]:
          tracker["best_score"], tracker["best_step"] = val[checkpoints.BEST_METRIC], done
          evals_since_best = 0
          if lead:  # after its checkpoint is saved: the previous best is kept until now
            checkpoints.record_best(workdir, done, tracker["best_score"])
        else:
          evals_since_best += 1
        if lead:
          plots.plot_training_curves(workdir / "curves.png", workdir / "metrics.jsonl")
        patience = config.train.patience
        # Early stopping ends the run, so it applies to the last stage only.
        if patience is not None and evals_since_best >= patience and is_last:
          if lead:
            bar.write(f"early stopping at step {done}: no improvement in {patience} evaluations")
            checkpoints.write_json_atomic(workdir / EARLY_STOP_FILE, {"step": done})
          break
      if stop.pending is not None:
        # Keep this step; not in a multi-process run, where a save is collective and the other
        # processes were not stopped.
        if done > saved and jax.process_count() == 1:
          checkpoints.save(manager, done, state)
        stop.raise_pending()
  bar.close()
  return state
