"""The robustness study: runs x seeds, trained and evaluated alike, one report with computed claims.

A study config (configs/study.py) lists runs (a display name, a method config file, its preset and
config overrides), seeds, the reference run(s), the evaluations (datasets/splits) and the claims.
`run_study` brings every run x seed to "finished", then renders the report:

  WORKDIR/runs/<run>/seed<k>/            the run's training workdir (as train.py's), and
      study.json                         the marker: config fingerprint, training wall time
                                         (summed over attempts), and each evaluation done (data,
                                         split, checkpoint step, wall time summed over
                                         attempts, cases.csv, the method's own reports)
      study_eval/<evaluation>/           evaluate_workdir's output for that evaluation
      study.lock                         held by the study process working on this run x seed
  ARCHIVE/<run>/seed<k>/                 with an archive (`run_study(archive=...)`): the files of
                                         a finished run x seed the report reads (`archived_files`;
                                         no checkpoints), restored into a new workdir
  WORKDIR/report/                        report.md, report.json, dice_by_present_<group>.png,
                                         extra/ (the runs' own reports: synthesis, classifier
                                         accuracy); replaced as a whole (built aside, then renamed)
  WORKDIR/study_config.json              the resolved study config of the last invocation

Resuming: a run x seed is trained unless its marker says it was trained with the same resolved
config (a sha256 of the config JSON); an interrupted training resumes from its checkpoints (the
loop does that); a changed config resets the marker and trains on from the checkpoints (the loop
refuses a changed model). Each evaluation is redone unless the marker records it with the same data
root, split and checkpoint policy. A finished study therefore re-renders its report without
training or evaluating: it reads the markers and the cases.csv files.

Statistics (report): for each run, metric, region and subset, each seed's mean over its cases, then
the mean and sample sd (ddof=1; none with one seed) of those seed means. Paired tests use the
seed-averaged value of each case (mean over the seeds that scored it), against the group's
reference run, over the cases both were scored on (`hemijax.evaluation.statistics`),
Holm-corrected over all the tests of one table (one metric x region: subsets x runs). Wins count
the subset x region cells where a run's mean is the best (ties: each). Runs are compared only
within a *group*: the runs evaluated on the same data root and split under the same evaluation
name. The "as acquired" rows (each case with all the modalities it has) are shown and tested but
are not a subset: no wins, claims or plot points.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

import numpy as np

from hemijax import atomic
from hemijax.evaluation import claims as claims_lib
from hemijax.evaluation import statistics
from hemijax.evaluation.metrics import HIGHER_IS_BETTER
from hemijax.evaluation.subsets import AS_ACQUIRED, all_subsets, display_name, subset_symbol

MARKER = "study.json"
STUDY_LOCK = "study.lock"  # held by the process working on a run x seed (or rendering)
EVAL_FOLDER = "study_eval"
REPORT = "report"
VALIDATION_PLOT = "validation_curves.png"
DEFAULT_METRICS = ("dice", "hd95", "assd")
METRIC_DISPLAY = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)",
                  "sensitivity": "Sensitivity", "precision": "Precision"}
DECIMALS = {"dice": 3, "sensitivity": 3, "precision": 3}  # others (distances in mm): 2
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.+")


# ---------------------------------------------------------------------------------------------
# The study config


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str           # method config file
  preset: str
  overrides: dict       # dotted config field -> value
  seeds: tuple


@dataclasses.dataclass(frozen=True)
class Evaluation:
  name: str
  split: str
  data: str | None      # a dataset folder; None: the run's own data (after data_overrides)
  data_overrides: dict  # config overrides selecting the run's data (a held-out protocol, ...)
  runs: tuple | None    # the runs it applies to; None: all


@dataclasses.dataclass(frozen=True)
class Study:
  title: str
  runs: tuple
  references: tuple     # per group, the first of these in the group is its reference
  evaluations: tuple
  step: str             # checkpoint policy for every evaluation
  overrides: dict       # applied to every run before its own
  metrics: tuple
  claims: tuple
  source: str
  # evaluate_workdir's metric_options (HD95 convention, empty-mask penalty, post-processing); a
  # min_region_volume_mm3 threshold applies to the runs whose task has that region.
  metric_options: dict = dataclasses.field(default_factory=dict)

  def run(self, name) -> Run:
    return next(r for r in self.runs if r.name == name)


def _get(config, field, default=None):
  return config[field] if field in config and config[field] is not None else default


def _check_name(name, where):
  if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS or name[0] == ".":
    raise ValueError(f"{where}: name {name!r} must be letters, digits and _-.+ (a folder name)")
  return name


def parse_study(config, source="study config") -> Study:
  """The study config (a ConfigDict or dict), checked, as a `Study`; ValueError naming the field."""
  seeds = tuple(int(s) for s in _get(config, "seeds", (0,)))
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"{source}: seeds must be distinct and non-empty, got {seeds}")
  runs = []
  for i, entry in enumerate(_get(config, "runs", ())):
    entry, where = dict(entry), f"{source}: runs[{i}]"
    unknown = set(entry) - {"name", "config", "preset", "overrides", "seeds"}
    if unknown or "name" not in entry or "config" not in entry:
      raise ValueError(f"{where}: needs name and config; unknown fields {sorted(unknown)}")
    run_seeds = tuple(int(s) for s in entry.get("seeds") or seeds)
    runs.append(Run(_check_name(entry["name"], where), str(entry["config"]),
                    str(entry.get("preset", "demo")), flatten_overrides(entry.get("overrides")),
                    run_seeds))
  names = [r.name for r in runs]
  if not runs or len(set(names)) != len(names):
    raise ValueError(f"{source}: runs must be non-empty with distinct names, got {names}")
  _check_run_references(runs, source)
  references = _get(config, "reference", names[0])
  references = (references,) if isinstance(references, str) else tuple(references)
  if not set(references) & set(names):
    raise ValueError(f"{source}: reference: none of {list(references)} is a run name ({names})")
  evaluations = []
  for i, entry in enumerate(_get(config, "evaluations", None) or ({"name": "test"},)):
    entry, where = dict(entry), f"{source}: evaluations[{i}]"
    unknown = set(entry) - {"name", "split", "data", "data_overrides", "runs"}
    if unknown or "name" not in entry:
      raise ValueError(f"{where}: needs a name; unknown fields {sorted(unknown)}")
    only = tuple(entry["runs"]) if entry.get("runs") is not None else None
    if only is not None and not set(only) <= set(names):
      raise ValueError(f"{where}: runs {sorted(set(only) - set(names))} are not run names")
    evaluations.append(Evaluation(
        _check_name(entry["name"], where), str(entry.get("split", "test")), entry.get("data"),
        flatten_overrides(entry.get("data_overrides")), only))
  if len({e.name for e in evaluations}) != len(evaluations):
    raise ValueError(f"{source}: evaluation names must be distinct")
  metrics = tuple(_get(config, "metrics", DEFAULT_METRICS))
  unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
  if unknown:
    raise ValueError(f"{source}: unknown metrics {unknown}; choose from {sorted(HIGHER_IS_BETTER)}")
  if "dice" not in metrics:
    raise ValueError(f"{source}: metrics must include dice (wins, the plot and claims use it)")
  return Study(title=str(_get(config, "title", "Study")), runs=tuple(runs), references=references,
               evaluations=tuple(evaluations), step=str(_get(config, "step", "best")),
               overrides=flatten_overrides(_get(config, "overrides", {})), metrics=metrics,
               claims=tuple(claims_lib.validate(_get(config, "claims", ()),
                                                source=f"{source}: claims")),
               source=source, metric_options=_metric_options(config, source))


def _metric_options(config, source) -> dict:
  """config.metric_options, checked (one-line errors) and in a JSON-stable form."""
  from hemijax.evaluation import metrics as metrics_lib

  try:
    return metrics_lib.check_metric_options(_get(config, "metric_options", {}))
  except ValueError as e:
    raise ValueError(f"{source}: metric_options: {e}") from None


def _load_config_module(path, where):
  path = pathlib.Path(path)
  if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
    path = REPO_ROOT / path
  if not path.is_file():
    raise ValueError(f"{where}: config file {path} not found")
  # A config file in a package (configs/) imports its siblings as `configs.<name>`.
  if (path.parent / "__init__.py").is_file() and str(path.parent.parent) not in sys.path:
    sys.path.insert(0, str(path.parent.parent))
  spec = importlib.util.spec_from_file_location(f"_study_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flatten_overrides(overrides, prefix="") -> dict:
  """{"model": {"fusion": "mean"}, "train.num_steps": 3} -> {"model.fusion": "mean",
  "train.num_steps": 3}."""
  flat = {}
  for key, value in (overrides or {}).items():
    if isinstance(value, Mapping) or hasattr(value, "items"):  # dict or ConfigDict
      flat.update(flatten_overrides(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def apply_overrides(config, overrides, where: str):
  """Sets fields of a ConfigDict, given dotted ("model.fusion") or nested; each must exist."""
  for dotted, value in flatten_overrides(overrides).items():
    *parents, leaf = str(dotted).split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"{where}: override {dotted!r}: the config has no field {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"{where}: override {dotted!r}: the config has no field {leaf!r}")
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
      raise ValueError(f"{where}: override {dotted!r}: {e}") from None
  return config


# An override value "run:NAME" is the folder of run NAME at the same seed (e.g. MLP imputation
# into the study's own mean-filling U-Net: impute.segmenter_from="run:unet").
RUN_REFERENCE = "run:"


def method_config(study: Study, run: Run, seed: int, workdir="."):
  """The run's resolved method config for one seed (run references resolved under `workdir`)."""
  where = f"{study.source}: run {run.name!r}"
  config = _load_config_module(run.config, where).get_config(run.preset)
  apply_overrides(config, study.overrides, f"{study.source}: overrides ({run.name})")
  references = run_references(run)
  overrides = {k: (str(run_dir(workdir, references[k], seed).absolute()) if k in references else v)
               for k, v in run.overrides.items()}
  apply_overrides(config, overrides, where)
  config.seed = int(seed)
  return config


def run_references(run: Run) -> dict:
  """{override key: run name} of the run's "run:NAME" override values."""
  return {key: value[len(RUN_REFERENCE):] for key, value in run.overrides.items()
          if isinstance(value, str) and value.startswith(RUN_REFERENCE)}


def _check_run_references(runs, source):
  """A "run:NAME" override names a run listed earlier (trained first) with the same seeds."""
  for i, run in enumerate(runs):
    for key, name in run_references(run).items():
      value = run.overrides[key]
      earlier = {r.name: r for r in runs[:i]}
      if name not in earlier:
        raise ValueError(f"{source}: run {run.name!r}: override {key}={value!r} needs a run "
                         f"{name!r} listed before it")
      if not set(run.seeds) <= set(earlier[name].seeds):
        raise ValueError(f"{source}: run {run.name!r}: override {key}={value!r}: run {name!r} "
                         f"lacks seeds {sorted(set(run.seeds) - set(earlier[name].seeds))}")


def fingerprint(config) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()


def run_dir(workdir, run_name: str, seed: int) -> pathlib.Path:
  return pathlib.Path(workdir) / "runs" / run_name / f"seed{seed}"


# A run has levelled off when its best validation score rose by less than PLATEAU_GAIN over the
# last PLATEAU_TAIL of its validated steps (the issue asks for budgets where validation levelled).
# With fewer than PLATEAU_MIN_TAIL validations in that tail the question stays open: one late
# score below an early best says nothing about the trend (600 steps validated every 200 once read
# as levelled with a score of 0.2).
# The best score alone misses a curve that dipped after an early spike and is climbing back (a
# PIMMS run: 0.56 at one validation, then 0.32 rising to 0.47 at the end), so a line fitted through
# the tail's scores must not rise by PLATEAU_TREND or more across the tail either.
PLATEAU_TAIL = 0.25
PLATEAU_GAIN = 0.01
PLATEAU_TREND = 0.02
PLATEAU_MIN_TAIL = 2
VALIDATION_SCORE = "val_score"  # hemijax.training.checkpoints.BEST_METRIC, what "best" picks


def _metrics_records(folder) -> list[dict]:
  """The records of a run's metrics.jsonl (none if it has none)."""
  path = pathlib.Path(folder) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(folder) -> list[list[float]]:
  """[[step, validation score], ...] of a run, from its metrics.jsonl (empty if none)."""
  records = _metrics_records(folder)
  return [[int(r["step"]), float(r[VALIDATION_SCORE])] for r in records
          if r.get("split") == "val" and r.get(VALIDATION_SCORE) is not None]


def logged_train_seconds(folder) -> float | None:
  """Seconds the run's logged training steps took, from its metrics.jsonl: each train record's
  steps since the one before over its `steps_per_s` (the last record of a step repeated after a
  resume counts once). A lower bound of the training time (no start-up, no lost steps), which a
  marker's recorded time should exceed unless an attempt's time went unrecorded. None if none."""
  rates = {int(r["step"]): float(r["steps_per_s"]) for r in _metrics_records(folder)
           if r.get("split") == "train" and r.get("steps_per_s")}
  seconds, previous = 0.0, 0
  for step in sorted(rates):
    seconds, previous = seconds + (step - previous) / rates[step], step
  return seconds if rates else None


def plateau_gain(curve, tail: float = PLATEAU_TAIL) -> float | None:
  """How much the best validation score rose during the last `tail` of the run's steps: the best
  score overall minus the best one before the tail. None without a score before the tail or with
  fewer than PLATEAU_MIN_TAIL scores in it."""
  if not curve:
    return None
  last = curve[-1][0]
  before = [score for step, score in curve if step <= (1.0 - tail) * last]
  if not before or len(curve) - len(before) < PLATEAU_MIN_TAIL:
    return None
  return max(score for _, score in curve) - max(before)


def tail_trend(curve, tail: float = PLATEAU_TAIL) -> float | None:
  """How much a least-squares line through the validation scores of the last `tail` of the
  run's steps rises across them (its slope times their span). None with fewer than
  PLATEAU_MIN_TAIL scores there."""
  if not curve:
    return None
  last = curve[-1][0]
  points = np.array([(step, score) for step, score in curve if step > (1.0 - tail) * last], float)
  if len(points) < PLATEAU_MIN_TAIL:
    return None
  slope = np.polyfit(points[:, 0], points[:, 1], 1)[0]
  return float(slope * (points[-1, 0] - points[0, 0]))


def levelled_off(gain, trend) -> bool | None:
  """Whether validation levelled off (None: too few validations to tell)."""
  if gain is None or trend is None:
    return None
  return gain < PLATEAU_GAIN and trend < PLATEAU_TREND


def evaluations_of(study: Study, run: Run) -> list[Evaluation]:
  return [e for e in study.evaluations if e.runs is None or run.name in e.runs]


# ---------------------------------------------------------------------------------------------
# Bringing a run x seed to "finished"


def read_marker(folder) -> dict:
  path = pathlib.Path(folder) / MARKER
  return json.loads(path.read_text()) if path.is_file() else {}


def trained_and_evaluated(study: Study, run: Run, marker: dict) -> bool:
  """Trained, and every evaluation the study asks of this run recorded in its marker (whatever
  its fingerprint: `is_finished` also checks that)."""
  done = marker.get("evaluations", {})
  return bool(marker.get("trained")) and all(e.name in done for e in evaluations_of(study, run))


def evaluation_spec(study: Study, evaluation: Evaluation, config) -> dict:
  """What an evaluation is done on: data root, split, checkpoint policy (a marker entry key)."""
  if evaluation.data:
    root = pathlib.Path(evaluation.data)
  else:
    from hemijax.data import datasets  # generates a built-in phantom the first time

    root = datasets.dataset_root(apply_overrides(
        config.copy_and_resolve_references(), evaluation.data_overrides,
        f"{study.source}: evaluations {evaluation.name!r}: data_overrides"))
  return {"data": str(pathlib.Path(root).absolute()), "split": evaluation.split, "step": study.step,
          "metric_options": study.metric_options}


def is_finished(marker: dict, fingerprint_: str, specs: dict) -> bool:
  done = marker.get("evaluations", {})
  return (marker.get("fingerprint") == fingerprint_ and marker.get("trained", False)
          and all(done.get(name, {}).get("spec") == spec for name, spec in specs.items()))


def _write_marker(folder, marker):
  atomic.write_json(pathlib.Path(folder) / MARKER, marker)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
  """`git describe --always --dirty` of the hemijax checkout, or None outside one; read once per
  process (`run_study` reads it first), so that it names the code this process loaded even if
  the checkout changes while it runs."""
  try:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _resolved(study: Study, run: Run, seed: int, workdir):
  """(method config, its fingerprint, {evaluation name: spec}) of one run x seed.

  The fingerprint names a referenced run ("run:NAME") by name, not by its folder (the config has
  the folder), so that it does not depend on where the workdir is (an archive restores into
  another)."""
  config = method_config(study, run, seed, workdir)
  specs = {e.name: evaluation_spec(study, e, config) for e in evaluations_of(study, run)}
  unresolved = apply_overrides(config.copy_and_resolve_references(),
                               {key: run.overrides[key] for key in run_references(run)},
                               f"{study.source}: run {run.name!r}")
  return config, fingerprint(unresolved), specs


def run_finished(study: Study, run: Run, seed: int, workdir) -> bool:
  """Whether the run x seed's marker says it is trained and evaluated as the study asks now."""
  _, fp, specs = _resolved(study, run, seed, workdir)
  return is_finished(read_marker(run_dir(workdir, run.name, seed)), fp, specs)


# How often a running attempt's time so far is written to its marker: a killed process (which runs
# no `finally`) loses at most this much of it.
ATTEMPT_CLOCK_EVERY_S = 60.0


@contextlib.contextmanager
def _attempt_clock(folder, marker, record, wall_key, cpu_key, every=None):
  """Adds the enclosed attempt's wall and CPU seconds to `record[wall_key]`, `record[cpu_key]`
  (part of `marker`; a None CPU total stays None) and writes the marker: every `every` seconds
  while it runs (a background thread), and once more when it ends, however it ends."""
  every = ATTEMPT_CLOCK_EVERY_S if every is None else every
  wall_base, cpu_base = record[wall_key], record[cpu_key]
  start, cpu_start = time.perf_counter(), time.process_time()
  stop = threading.Event()

  def update():  # the thread's updates end (join) before the last one
    record[wall_key] = wall_base + time.perf_counter() - start
    record[cpu_key] = None if cpu_base is None else cpu_base + time.process_time() - cpu_start
    _write_marker(folder, marker)

  def keep():
    while not stop.wait(every):
      update()

  update()  # the attempt's count is on disk before it starts
  thread = threading.Thread(target=keep, name="study-attempt-clock", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    update()


# The report treats a run's training time as incompletely recorded when its logged steps alone took
# this much longer than the recorded wall time.
UNRECORDED_TIME_S = 60.0


def _cpu_so_far(marker) -> float | None:
  """CPU seconds of the training attempts so far (None: an attempt made before they were
  recorded)."""
  return marker.get("train_cpu_s") if marker.get("train_attempts") else 0.0


def ensure_finished(study: Study, run: Run, seed: int, workdir, *, progress=False,
                    log=print) -> dict:
  """Trains (or resumes) and evaluates one run x seed unless its marker says it is done; returns
  the marker."""
  folder = run_dir(workdir, run.name, seed)
  config, fp, specs = _resolved(study, run, seed, workdir)
  marker = read_marker(folder)
  if is_finished(marker, fp, specs):
    return marker
  if marker.get("fingerprint") != fp:  # new, or the study changed this run's config
    marker = {"run": run.name, "seed": seed, "fingerprint": fp, "trained": False,
              "train_wall_s": marker.get("train_wall_s", 0.0),
              "train_cpu_s": _cpu_so_far(marker),
              "train_attempts": marker.get("train_attempts", 0), "evaluations": {}}
  if not marker["trained"]:
    from hemijax.training import loop

    log(f"train {run.name} seed {seed} -> {folder}")
    marker["train_cpu_s"] = _cpu_so_far(marker)
    marker["train_attempts"] += 1
    with _attempt_clock(folder, marker, marker, "train_wall_s", "train_cpu_s"):
      loop.train(config, folder, progress=progress)
    marker.update(trained=True, trained_at=_now(), commit=git_commit())
    _write_marker(folder, marker)
  for name, spec in specs.items():
    if marker["evaluations"].get(name, {}).get("spec") == spec:
      continue
    marker["evaluations"][name] = _evaluate(folder, name, spec, progress, log, run, seed, marker)
    _write_marker(folder, marker)
  return marker


_SUMMARY_FIELDS = {"modalities", "regions", "metrics", "subsets", "overall", "workdir", "method",
                   "split", "reports", "step", "step_requested", "data", "metric_conventions",
                   "left_out", "not_applicable", "comparison", "as_acquired"}


def _evaluate(folder, name, spec, progress, log, run, seed, marker) -> dict:
  from hemijax.evaluation.evaluate import evaluate_workdir

  log(f"evaluate {run.name} seed {seed} on {spec['data']} ({spec['split']})")
  out = folder / EVAL_FOLDER / name
  # An interrupted evaluation resumes per case (evaluate_workdir), so its time counts as training's
  # does: summed over the attempts at this spec, kept in the marker until the evaluation is done.
  pending = marker.setdefault("evaluations_pending", {})
  if pending.get(name, {}).get("spec") != spec:
    pending[name] = {"spec": spec, "wall_s": 0.0, "cpu_s": 0.0, "attempts": 0}
  attempt = pending[name]
  attempt["attempts"] += 1
  with _attempt_clock(folder, marker, attempt, "wall_s", "cpu_s"):
    summary = evaluate_workdir(folder, data=spec["data"], split=spec["split"], out=out,
                               step=spec["step"], metric_options=spec.get("metric_options"),
                               unknown_regions="ignore", progress=progress)
  wall, cpu, attempts = pending.pop(name)["wall_s"], attempt["cpu_s"], attempt["attempts"]
  reports = [str(pathlib.Path(r).resolve().relative_to(folder.resolve()))
             for r in summary.get("reports", ())
             if not pathlib.Path(r).name.startswith(("summary.", "comparison"))]
  extras = {k: v for k, v in summary.items() if k not in _SUMMARY_FIELDS}
  return {"spec": spec, "wall_s": wall, "cpu_s": cpu, "attempts": attempts,
          "evaluated_at": _now(),
          "step": summary.get("step"),
          "cases": str((out / "cases.csv").relative_to(folder)), "method": summary.get("method"),
          "modalities": list(summary["modalities"]), "regions": list(summary["regions"]),
          "metric_conventions": summary.get("metric_conventions"), "reports": reports,
          "extras": json.loads(json.dumps(extras, default=str))}


# ---------------------------------------------------------------------------------------------
# Results: pure functions of the cases.csv rows


def read_cases(path, metrics) -> list[dict]:
  """cases.csv rows with the `metrics` as floats (read with the csv module)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  missing = [m for m in metrics if rows and m not in rows[0]]
  if missing:
    raise ValueError(f"{path}: no column {missing}")
  return [dict(row, **{m: float(row[m]) for m in metrics}) for row in rows]


def _subset_order(modalities) -> list[str]:
  return ["+".join(s) for s in all_subsets(modalities)] + [AS_ACQUIRED]


def _mean_sd(values) -> tuple:
  values = np.asarray(values, float)
  return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def numeric_leaves(value, prefix: str = "") -> dict:
  """{dotted key: number} of a nested mapping's finite numbers (paths, text and None left out)."""
  if isinstance(value, Mapping):
    out = {}
    for key, item in value.items():
      out.update(numeric_leaves(item, f"{prefix}{key}."))
    return out
  if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
    return {prefix[:-1]: float(value)}
  return {}


def run_measures(runs) -> list[dict]:
  """The numbers the runs' own evaluators reported (synthesis PSNR, classifier accuracy; the
  `extras` of each evaluation): per run, evaluation and measure, each seed's value and the mean
  and sample sd over seeds."""
  out = []
  for run in runs:
    by_measure = collections.defaultdict(dict)
    for seed, info in run["finished"].items():
      for name, evaluation in info.get("evaluations", {}).items():
        for key, value in numeric_leaves(evaluation.get("extras") or {}).items():
          by_measure[(name, key)][seed] = value
    for (name, key), values in by_measure.items():
      mean, sd = _mean_sd(list(values.values()))
      out.append({"run": run["name"], "evaluation": name, "measure": key, "seeds": values,
                  "mean": mean, "sd": sd})
  return out


def run_cells(rows_by_seed: dict, metric: str) -> dict:
  """region -> subset -> {"seed_means": {seed: mean over its cases}, "cases": {case: mean over
  the seeds that scored it}}."""
  values = {}  # region -> subset -> seed -> case -> value
  for seed, rows in rows_by_seed.items():
    for row in rows:
      values.setdefault(row["region"], {}).setdefault(row["subset"], {}).setdefault(
          seed, {})[str(row["case_id"])] = row[metric]
  cells = {}
  for region, by_subset in values.items():
    for subset, by_seed in by_subset.items():
      per_case = {}
      for seed_values in by_seed.values():
        for case, value in seed_values.items():
          per_case.setdefault(case, []).append(value)
      cells.setdefault(region, {})[subset] = {
          "seed_means": {str(s): float(np.mean(list(v.values()))) for s, v in by_seed.items()},
          "cases": {c: float(np.mean(v)) for c, v in per_case.items()}}
  return cells


def group_results(runs_rows: dict, modalities, regions, metrics, reference: str) -> dict:
  """Tables, paired tests, wins and Dice by number of present modalities for one group.

  `runs_rows`: run name -> seed -> cases.csv rows (metrics as floats), runs in display order.
  """
  runs = list(runs_rows)
  order = _subset_order(modalities)
  cells = {run: {m: run_cells(by_seed, m) for m in metrics} for run, by_seed in runs_rows.items()}
  tables, tests, wins = {}, {}, {}
  for metric in metrics:
    tables[metric], tests[metric] = {}, {}
    wins[metric] = {run: {r: 0 for r in regions} for run in runs}
    for region in regions:
      present = {s for run in runs for s in cells[run][metric].get(region, {})}
      subsets = [s for s in order if s in present]
      table, keys, pvalues = {}, [], []
      for subset in subsets:
        row = {}
        for run in runs:
          cell = cells[run][metric].get(region, {}).get(subset)
          if cell is None:
            continue
          mean, sd = _mean_sd(list(cell["seed_means"].values()))
          row[run] = {"mean": mean, "sd": sd, "n_seeds": len(cell["seed_means"]),
                      "n_cases": len(cell["cases"]), "seed_means": cell["seed_means"]}
        table[subset] = row
        reference_cell = cells[reference][metric].get(region, {}).get(subset)
        for run in runs:
          cell = cells[run][metric].get(region, {}).get(subset)
          if run == reference or cell is None or reference_cell is None:
            continue
          keys.append((subset, run))
          test = statistics.paired_comparison(cell["cases"], reference_cell["cases"])
          pvalues.append(test["p"])
          tests[metric].setdefault(region, {}).setdefault(subset, {})[run] = test
        if subset != AS_ACQUIRED and row:  # the as-acquired row is not a subset: no win
          better = max if HIGHER_IS_BETTER[metric] else min
          best = better(entry["mean"] for entry in row.values())
          for run, entry in row.items():
            wins[metric][run][region] += entry["mean"] == best
      for (subset, run), adjusted in zip(keys, statistics.holm(pvalues)):
        tests[metric][region][subset][run]["p_holm"] = adjusted
      tables[metric][region] = table
  return {"runs": runs, "reference": reference, "modalities": list(modalities),
          "regions": list(regions), "metrics": list(metrics), "tables": tables, "tests": tests,
          "wins": wins, "by_present": _by_present(cells, runs, regions, modalities)}


def _by_present(cells, runs, regions, modalities) -> dict:
  """Dice by number of present modalities: per seed the mean over the subsets with k present,
  then mean and sd over seeds. region -> run -> {k: {"mean", "sd"}}."""
  out = {}
  for region in regions:
    for run in runs:
      by_k = {}
      for subset, cell in cells[run]["dice"].get(region, {}).items():
        if subset == AS_ACQUIRED:
          continue
        k = len(subset.split("+"))
        for seed, value in cell["seed_means"].items():
          by_k.setdefault(k, {}).setdefault(seed, []).append(value)
      out.setdefault(region, {})[run] = {
          k: dict(zip(("mean", "sd"), _mean_sd([np.mean(v) for v in by_k[k].values()])))
          for k in sorted(by_k)}
  return out


def claim_means(group: dict, seeds=None) -> dict:
  """run -> metric -> region -> subset -> mean over seeds (the subsets only), for claims; with
  `seeds`, over those seeds only (a run x subset without any of them is left out)."""
  means = {}
  for metric, by_region in group["tables"].items():
    for region, table in by_region.items():
      for subset, row in table.items():
        if subset == AS_ACQUIRED:
          continue
        for run, entry in row.items():
          if seeds is None:
            value = entry["mean"]
          else:
            kept = [v for s, v in entry["seed_means"].items() if int(s) in seeds]
            if not kept:
              continue
            value = float(np.mean(kept))
          means.setdefault(run, {}).setdefault(metric, {}).setdefault(region, {})[subset] = value
  return means


def seeds_in_group(group: dict, run: str) -> set[int]:
  """The seeds of `run` that the group's tables hold."""
  return {int(s) for by_region in group["tables"].values() for table in by_region.values()
          for row in table.values() for name, entry in row.items() if name == run
          for s in entry["seed_means"]}


def claim_cases(rows: dict, runs, metrics) -> dict:
  """run -> metric -> region -> subset -> {case id: mean over seeds}, for the claims' paired
  evidence; `rows`: run -> seed -> cases.csv rows (as in `group_results`)."""
  return {run: {m: {region: {s: cell["cases"] for s, cell in by_subset.items()}
                    for region, by_subset in run_cells(rows[run], m).items()} for m in metrics}
          for run in runs if run in rows}


def check_claims(study: Study, groups: dict, rows: dict | None = None,
                 measures=None) -> list[dict]:
  """Every claim of the study against the group (of its evaluation) that holds all its runs;
  `rows` (group key -> run -> seed -> cases.csv rows) adds each claim's paired evidence;
  `measures` (`run_measures`) are what `measure_at_most` claims check."""
  out = []
  default_evaluation = study.evaluations[0].name
  for claim in study.claims:
    evaluation = claim.get("evaluation", default_evaluation)
    needed = claims_lib.runs_needed(claim)
    candidates = [g for g in groups.values() if g["evaluation"] == evaluation]
    key = next((k for k, g in groups.items()
                if g["evaluation"] == evaluation and set(needed) <= set(g["runs"])), None)
    if key is not None:
      group = groups[key]
      # same_seeds: every run at the claim's run's seeds only (a diagnosis run of one seed
      # against its row at that seed, not against the row's mean over all its seeds).
      seeds = seeds_in_group(group, claim["run"]) if claim.get("same_seeds") else None
      group_rows = None
      if rows is not None and key in rows:
        group_rows = {run: {seed: r for seed, r in by_seed.items()
                            if seeds is None or int(seed) in seeds}
                      for run, by_seed in rows[key].items()}
      cases = (claim_cases(group_rows, needed, study.metrics)
               if group_rows is not None else None)
      result = claims_lib.check(claim, claim_means(group, seeds), cases, measures)
      if seeds is not None and result["status"] != claims_lib.NOT_RUN:
        names = ", ".join(map(str, sorted(seeds)))
        result["detail"] = (f"seed{'s' if len(seeds) > 1 else ''} {names} of every run: "
                            f"{result['detail']}")
    else:
      result = claims_lib.check(claim, {})  # for its text
      absent = [r for r in needed if not any(r in g["runs"] for g in candidates)]
      result.update(holds=None, status=claims_lib.NOT_RUN, detail=(
          f"not run or not finished: {', '.join(absent)}" if absent
          else f"{', '.join(needed)} were not evaluated on the same data"))
    result["evaluation"] = evaluation
    out.append(result)
  return out


# ---------------------------------------------------------------------------------------------
# The archive: what the report needs of each finished run x seed, kept apart from its checkpoints


# A finished run x seed's files that the report reads, plus its resolved config and best step;
# never its checkpoints (megabytes to gigabytes), so an archive fits in a repository.
ARCHIVED_FILES = (MARKER, "metrics.jsonl", "config.json", "best.json")


def archived_files(marker: dict) -> list[str]:
  """The paths (relative to the run folder) an archive keeps of a run x seed with this marker:
  ARCHIVED_FILES and each evaluation's cases.csv, summary and the method's own reports."""
  files = set(ARCHIVED_FILES)
  for entry in marker.get("evaluations", {}).values():
    cases = pathlib.PurePath(entry["cases"])
    files.update([str(cases), str(cases.with_name("summary.md")), *entry.get("reports", ())])
  return sorted(files)


def archive_dir(archive, run_name: str, seed: int) -> pathlib.Path:
  return pathlib.Path(archive) / run_name / f"seed{seed}"


def archive_run(workdir, archive, run_name: str, seed: int) -> bool:
  """Copies a finished run x seed's `archived_files` to ARCHIVE/<run>/seed<k>/ (replaced as a
  whole) unless the archive already holds its marker; returns whether it copied."""
  folder, target = run_dir(workdir, run_name, seed), archive_dir(archive, run_name, seed)
  marker = read_marker(folder)
  if read_marker(target) == marker:
    return False
  with atomic.replacing_directory(target) as tmp:
    for relative in archived_files(marker):
      if (folder / relative).is_file():
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / relative, tmp / relative)
  return True


def _restore(source: pathlib.Path, folder: pathlib.Path):
  """Copies an archived run x seed into its run folder, the marker last (until then the folder
  does not read as finished); checkpoints already there are kept."""
  marker = read_marker(source)
  for relative in archived_files(marker):
    if relative != MARKER and (source / relative).is_file():
      atomic.write_bytes(folder / relative, (source / relative).read_bytes())
  _write_marker(folder, marker)


def restore_from_archive(study: Study, workdir, archive, *, check=True) -> list[tuple]:
  """Copies into WORKDIR each run x seed of the study that ARCHIVE holds finished and WORKDIR does
  not (a new machine resumes a study from its archive; checkpoints are not archived); returns the
  (run name, seed) pairs restored.

  With `check` (training) an archived run x seed counts only if it is finished as the study asks
  now (same resolved config and evaluations; `run_finished`), and it is left to be trained again
  when a run still to be trained at that seed needs its checkpoints ("run:NAME"). The evaluations'
  data roots are absolute paths (a built-in phantom's lies in the cache), so a new machine must
  find the data where the archived runs did. Without `check` (render only) an archived marker is
  taken as the report takes the workdir's."""
  restorable, unfinished = {}, set()
  for run in study.runs:
    for seed in run.seeds:
      source = archive_dir(archive, run.name, seed)
      if check:
        _, fp, specs = _resolved(study, run, seed, workdir)
        if is_finished(read_marker(run_dir(workdir, run.name, seed)), fp, specs):
          continue
        if (source / MARKER).is_file() and is_finished(read_marker(source), fp, specs):
          restorable[(run.name, seed)] = source
        else:
          unfinished.add((run.name, seed))
      elif read_marker(source).get("trained") and not read_marker(
          run_dir(workdir, run.name, seed)).get("trained"):
        restorable[(run.name, seed)] = source
  needed = {(name, seed) for run in study.runs for seed in run.seeds
            if (run.name, seed) in unfinished for name in run_references(run).values()}
  restored = []
  for key, source in restorable.items():
    if key in needed:
      continue
    folder = run_dir(workdir, *key)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.exclusive_lock(folder / STUDY_LOCK) as held:
      if held:
        _restore(source, folder)
        restored.append(key)
  return restored


def archive_finished(study: Study, workdir, archive) -> list[tuple]:
  """Archives every finished run x seed not archived yet that no process holds; returns the
  (run name, seed) pairs copied."""
  copied = []
  for run in study.runs:
    for seed in run.seeds:
      folder = run_dir(workdir, run.name, seed)
      if not trained_and_evaluated(study, run, read_marker(folder)):
        continue
      with atomic.exclusive_lock(folder / STUDY_LOCK) as held:
        if held and archive_run(workdir, archive, run.name, seed):
          copied.append((run.name, seed))
  return copied


# ---------------------------------------------------------------------------------------------
# The study: run, collect, render


def run_study(study: Study, workdir, *, train=True, progress=False, command=None, log=print,
              poll_s: float = 30.0, archive=None):
  """Finishes every run x seed (unless `train` is False), then renders the report; returns its
  folder.

  With an `archive` folder, run x seeds finished there are restored first (`restore_from_archive`)
  and each run x seed is archived as it finishes (`archive_run`), and again before rendering, so
  that the archive alone (kilobytes per run, no checkpoints) carries a study to another machine or
  session, and renders its report there.

  Several processes can share one study (the same command started again: on a 2-core CPU two
  trainings side by side get 1.55x the steps of one, docs/performance.md; or one per
  accelerator). Each takes, in the study's order, the next run x seed that no other process holds
  (its folder's `study.lock`) and whose referenced runs ("run:NAME") are finished; when only runs
  held by others are left, it waits for them (polling every `poll_s` seconds).
  """
  workdir = pathlib.Path(workdir)
  git_commit()  # the code this process runs, before its checkout can move
  if archive is not None:
    for name, seed in restore_from_archive(study, workdir, archive, check=train):
      log(f"restored {name} seed {seed} from {archive_dir(archive, name, seed)}")
  if train:
    pending = [(run, seed) for run in study.runs for seed in run.seeds]
    while pending:
      left = []
      for run, seed in pending:
        if not all(run_finished(study, study.run(name), seed, workdir)  # they must finish first
                   for name in run_references(run).values()):
          left.append((run, seed))
          continue
        folder = run_dir(workdir, run.name, seed)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic.exclusive_lock(folder / STUDY_LOCK) as held:
          if not held:
            left.append((run, seed))
            continue
          ensure_finished(study, run, seed, workdir, progress=progress, log=log)
          if archive is not None:
            archive_run(workdir, archive, run.name, seed)
      if len(left) == len(pending):  # everything left is held by another process (or waits on one)
        log(f"waiting for {', '.join(f'{r.name} seed {s}' for r, s in left)} (held by another "
            "study process, or waiting on such a run)")
        time.sleep(poll_s)
      pending = left
  # One process renders at a time (two sharing a study may finish together).
  while True:
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic.exclusive_lock(workdir / STUDY_LOCK) as held:
      if held:
        if archive is not None:  # runs finished before the archive was named, or by others
          for name, seed in archive_finished(study, workdir, archive):
            log(f"archived {name} seed {seed} to {archive_dir(archive, name, seed)}")
        return render_report(study, workdir, command=command)
    time.sleep(1.0)


def collect(study: Study, workdir) -> tuple[dict, list, dict]:
  """(groups, unfinished "run seed k" list, markers) from the markers and cases.csv files."""
  workdir = pathlib.Path(workdir)
  groups, unfinished, markers = {}, [], {}
  for run in study.runs:
    for seed in run.seeds:
      folder = run_dir(workdir, run.name, seed)
      marker = read_marker(folder)
      wanted = [e.name for e in evaluations_of(study, run)]
      done = marker.get("evaluations", {})
      if not trained_and_evaluated(study, run, marker):
        unfinished.append(f"{run.name} seed {seed}")
      if marker:
        markers[(run.name, seed)] = marker
      for name in wanted:
        if (name not in done or done[name]["spec"]["step"] != study.step
            or done[name]["spec"].get("metric_options") != study.metric_options):
          continue
        entry = done[name]
        key = f"{name}|{entry['spec']['data']}|{entry['spec']['split']}"
        group = groups.setdefault(key, {
            "evaluation": name, "data": entry["spec"]["data"], "split": entry["spec"]["split"],
            "modalities": entry["modalities"], "regions": entry["regions"], "rows": {}})
        if entry["modalities"] != group["modalities"] or entry["regions"] != group["regions"]:
          raise ValueError(f"{folder}: evaluation {name!r} has other modalities or regions than "
                           f"the other runs on {group['data']}")
        group["rows"].setdefault(run.name, {})[seed] = read_cases(folder / entry["cases"],
                                                                  study.metrics)
  return groups, unfinished, markers


def build_results(study: Study, workdir, *, command=None) -> dict:
  """Everything the report shows, as JSON-ready data."""
  groups_in, unfinished, markers = collect(study, workdir)
  groups = {}
  for key, g in groups_in.items():
    reference = next((r for r in study.references if r in g["rows"]), next(iter(g["rows"])))
    result = group_results(g["rows"], g["modalities"], g["regions"], study.metrics, reference)
    result.update({k: g[k] for k in ("evaluation", "data", "split")})
    result["cases"] = sorted({str(row["case_id"]) for by_seed in g["rows"].values()
                              for rows in by_seed.values() for row in rows})
    groups[key] = result
  runs = []
  for run in study.runs:
    seeds = {}
    for seed in run.seeds:
      marker = markers.get((run.name, seed))
      if marker:
        seeds[str(seed)] = {k: marker.get(k) for k in (
            "trained", "train_wall_s", "train_cpu_s", "train_attempts", "trained_at", "commit")}
        seeds[str(seed)]["evaluations"] = marker.get("evaluations", {})
        folder = run_dir(workdir, run.name, seed)
        curve = validation_curve(folder)
        seeds[str(seed)].update(validation=curve, plateau_gain=plateau_gain(curve),
                                tail_trend=tail_trend(curve),
                                logged_train_s=logged_train_seconds(folder))
    runs.append({"name": run.name, "config": run.config, "preset": run.preset,
                 "overrides": run.overrides, "seeds": list(run.seeds), "finished": seeds})
  measures = run_measures(runs)
  conventions = next((e.get("metric_conventions") for m in markers.values()
                      for e in m.get("evaluations", {}).values() if e.get("metric_conventions")),
                     None)
  return {"title": study.title, "command": command, "rendered_at": _now(), "commit": git_commit(),
          "checkpoint_policy": study.step, "metrics": list(study.metrics),
          "overrides": study.overrides, "metric_conventions": conventions, "runs": runs,
          "unfinished": unfinished, "groups": groups,
          "claims": check_claims(study, groups, {k: g["rows"] for k, g in groups_in.items()},
                                 measures),
          "measures": measures}


def render_report(study: Study, workdir, *, command=None) -> pathlib.Path:
  """Writes WORKDIR/report (report.md, report.json, PNGs, extra/) from the finished runs."""
  workdir = pathlib.Path(workdir)
  results = build_results(study, workdir, command=command)
  report = workdir / REPORT
  with atomic.replacing_directory(report) as tmp:
    plots = {}
    for i, (key, group) in enumerate(results["groups"].items()):
      name = f"dice_by_present_{i}_{group['evaluation']}.png"
      plot_by_present(tmp / name, group, title=_group_title(group))
      plots[key] = name
    if any(i.get("validation") for run in results["runs"] for i in run["finished"].values()):
      plot_validation_curves(tmp / VALIDATION_PLOT, results["runs"])
      plots["validation"] = VALIDATION_PLOT
    extras = _copy_extra_reports(results, workdir, tmp)
    # Not sorted: subsets and runs keep their table order.
    atomic.write_text(tmp / "report.json", json.dumps(
        dict(results, plots=plots, extra_reports=extras), indent=2, ensure_ascii=False) + "\n")
    atomic.write_text(tmp / "report.md", report_markdown(results, plots, extras))
  atomic.write_json(workdir / "study_config.json", dataclasses.asdict(study))
  return report


def read_claims(report) -> list[dict]:
  """The claims of a rendered report (report.json)."""
  return json.loads((pathlib.Path(report) / "report.json").read_text())["claims"]


def _copy_extra_reports(results, workdir, tmp) -> list[dict]:
  """The runs' own reports (synthesis PSNR, classifier accuracy) copied under extra/."""
  out = []
  for run in results["runs"]:
    for seed, info in run["finished"].items():
      for name, evaluation in info["evaluations"].items():
        for relative in evaluation.get("reports", ()):
          source = run_dir(workdir, run["name"], int(seed)) / relative
          if not source.is_file():
            continue
          target = pathlib.Path("extra") / run["name"] / f"seed{seed}" / name / source.name
          (tmp / target).parent.mkdir(parents=True, exist_ok=True)
          shutil.copyfile(source, tmp / target)
          out.append({"run": run["name"], "seed": int(seed), "evaluation": name,
                      "path": str(target)})
  return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _group_title(group) -> str:
  return f"{group['evaluation']}: {pathlib.Path(group['data']).name} ({group['split']})"


def _fmt(value, metric, sd=None) -> str:
  if value is None:
    return "–"
  digits = DECIMALS.get(metric, 2)
  return f"{value:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _duration(seconds) -> str:
  if seconds is None:
    return "–"
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _subset_cells(subset, modalities) -> list[str]:
  if subset == AS_ACQUIRED:
    return ["as acquired"] + [""] * (len(modalities) - 1)
  return list(subset_symbol(subset, modalities))


def report_markdown(results, plots=None, extras=()) -> str:
  plots = plots or {}
  lines = [f"# {results['title']}", ""]
  if results.get("command"):
    lines += ["```bash", results["command"], "```", ""]
  lines += [f"Rendered {results['rendered_at']} at commit {results['commit'] or 'unknown'}. "
            f"Every run is evaluated at its `{results['checkpoint_policy']}` checkpoint. "
            "Each table cell: the mean over seeds of each seed's mean over cases ± the sample sd "
            "over seeds (none with one seed); bold: the best mean of the row.", ""]
  trained_at = collections.Counter(
      info.get("commit") or "unknown" for run in results["runs"]
      for info in run["finished"].values() if info.get("trained"))
  if trained_at:  # the code that trained the runs may predate the rendering commit
    lines += ["Runs trained at commit " + ", ".join(
        f"{commit} ({n} run x seed{'s' if n > 1 else ''})"
        for commit, n in sorted(trained_at.items())) + ".", ""]
  if results.get("metric_conventions"):
    lines += ["Metric conventions: " + "; ".join(
        f"{k}: {v}" for k, v in sorted(results["metric_conventions"].items())) + ".", ""]
  if results["unfinished"]:
    lines += [f"**Not finished** (left out of every table): {', '.join(results['unfinished'])}.",
              ""]
  lines += _claims_section(results["claims"]) + _runs_section(results, plots)
  for key, group in results["groups"].items():
    lines += _group_section(group, plots.get(key))
  lines += _measures_section(results.get("measures"))
  if extras:
    lines += ["## The runs' own reports", ""]
    lines += [f"- {e['run']} seed {e['seed']} ({e['evaluation']}): [{pathlib.Path(e['path']).name}]"
              f"({e['path']})" for e in extras]
    lines.append("")
  return "\n".join(lines)


def _measures_section(measures) -> list[str]:
  if not measures:
    return []
  lines = ["## The runs' own measures", "", "What each method's own evaluators reported besides "
           "segmentation (such as the PSNR in dB of each synthesised modality, averaged over "
           "input subsets, or a modality classifier's accuracy): mean ± sample sd over seeds, "
           "and each seed's value.", "",
           _row(["run", "evaluation", "measure", "mean ± sd", "per seed"]),
           _row([":-", ":-", ":-", "-:", "-:"])]
  for m in measures:
    sd = "" if m["sd"] is None else f" ± {m['sd']:.3f}"
    lines.append(_row([m["run"], m["evaluation"], f"`{m['measure']}`", f"{m['mean']:.3f}{sd}",
                       ", ".join(f"{v:.3f} (seed {s})" for s, v in m["seeds"].items())]))
  return lines + [""]


def _claims_section(claims) -> list[str]:
  if not claims:
    return []
  lines = ["## Claims", "", "Each claim is computed from the tables below (per subset, the mean "
           "over seeds; the as-acquired row is not a subset). The verdict is on those means; "
           "after it, the paired Wilcoxon tests over the cases (each case's mean over seeds) "
           "say which differences are significant: per subset, Holm-corrected over the claim's "
           f"subsets (p < {statistics.SIGNIFICANCE}), or of each case's mean over the subsets. "
           "A claim whose numbers start with \"seed k of every run\" compares every run at the "
           "claim's run's seeds only (a diagnosis run of one seed against the others at that "
           "seed), means and cases alike.",
           "",
           _row(["claim", "result", "numbers"]), _row([":-", ":-", ":-"])]
  for claim in claims:
    status = {"holds": "**holds**", "does not hold": "**does not hold**"}.get(
        claim["status"], claim["status"])
    lines.append(_row([claim["text"], status, claim["detail"]]))
  return lines + [""]


def _runs_section(results, plots=None) -> list[str]:
  lines = ["## Runs", "", "Training time: per seed, summed over attempts, including data "
           "loading and compilation (an attempt interrupted by Ctrl-C or an error counts in full; "
           f"one whose process was killed, up to the last {ATTEMPT_CLOCK_EVERY_S:.0f} s before, "
           "or, under the study's older code, not at all). ≥: lower bounds, where the run's "
           "logged training steps alone (`metrics.jsonl`) took more than "
           f"{UNRECORDED_TIME_S:.0f} s longer than the recorded wall time; the wall time shown is "
           "then their sum. Wall time also counts the "
           "time other jobs took on the machine (or the process was paused); CPU time (all the "
           "process's threads) does not, so it is the one to compare. Evaluation time: all of "
           "the run's evaluations, each summed over its attempts as training's (an interrupted "
           "evaluation resumes with the cases it had not scored). Evaluated checkpoint step per "
           "seed. Validation gain: per seed, how much the best validation score (mean Dice with "
           f"all and with random modalities) rose over the last {PLATEAU_TAIL:.0%} of the run's "
           f"steps, and the rise across that part of a line fitted through its scores (trend); "
           f"levelled off (marked ✓) when the gain is under {PLATEAU_GAIN} and the trend under "
           f"{PLATEAU_TREND}; ?: too few validations to tell (fewer than {PLATEAU_MIN_TAIL} in "
           "that last part). –: not recorded.",
           "",
           _row(["run", "config", "overrides", "seeds trained", "training wall time",
                 "training CPU time", "evaluation wall time", "evaluation CPU time",
                 "checkpoint steps", "validation gain"]),
           _row([":-"] * 3 + ["-:"] * 7)]
  for run in results["runs"]:
    done = {s: i for s, i in run["finished"].items() if i.get("trained")}
    overrides = ", ".join(f"`{k}={v!r}`" for k, v in run["overrides"].items()) or "–"
    per_seed = lambda cell: ", ".join(cell(i) for i in done.values()) or "–"
    evaluation_time = lambda key: lambda i: (
        _duration(sum(e[key] for e in i["evaluations"].values()))
        if i["evaluations"] and all(key in e for e in i["evaluations"].values()) else "–")
    lines.append(_row([
        run["name"], f"`{run['config']}:{run['preset']}`", overrides,
        f"{len(done)} of {len(run['seeds'])}",
        per_seed(lambda i: _train_time(i, "wall")), per_seed(lambda i: _train_time(i, "cpu")),
        per_seed(evaluation_time("wall_s")), per_seed(evaluation_time("cpu_s")),
        ", ".join(str(e.get("step")) for i in done.values() for e in i["evaluations"].values())
        or "–",
        per_seed(lambda i: _gain(i.get("plateau_gain"), i.get("tail_trend")))]))
  if "validation" in (plots or {}):
    lines += ["", f"![Validation score against step, one line per seed]({plots['validation']})"]
  return lines + [""]


def _train_time(info, kind) -> str:
  """A seed's training wall or CPU time; '≥' lower bounds where an attempt's time went unrecorded
  (`logged_train_seconds`)."""
  wall, logged = info["train_wall_s"], info.get("logged_train_s")
  if logged is None or logged <= wall + UNRECORDED_TIME_S:
    return _duration(wall if kind == "wall" else info.get("train_cpu_s"))
  cpu = info.get("train_cpu_s")
  return "≥ " + _duration(logged) if kind == "wall" else (
      "–" if cpu is None else "≥ " + _duration(cpu))


def _gain(gain, trend) -> str:
  if levelled_off(gain, trend) is None:
    return "?"
  return f"{gain:+.3f} (trend {trend:+.3f})" + (" ✓" if levelled_off(gain, trend) else "")


def _group_section(group, plot) -> list[str]:
  runs, modalities, reference = group["runs"], group["modalities"], group["reference"]
  names = [display_name(m) for m in modalities]
  lines = [f"## {_group_title(group)}", "",
           f"Data `{group['data']}`, split `{group['split']}`: {len(group['cases'])} case(s); "
           f"runs {', '.join(runs)}; reference **{reference}**.", ""]
  if plot:
    lines += [f"![Dice by number of present modalities]({plot})", ""]
  others = [r for r in runs if r != reference]
  for metric in group["metrics"]:
    for region in group["regions"]:
      table = group["tables"][metric].get(region, {})
      if not table:
        continue
      lines += [f"### {METRIC_DISPLAY.get(metric, metric)}: {region}", "",
                _row(names + ["n"] + runs), _row([":-:"] * len(names) + ["-:"] * (1 + len(runs)))]
      better = max if HIGHER_IS_BETTER[metric] else min
      for subset, row in table.items():
        best = better(e["mean"] for e in row.values()) if row else None
        cells = [("**{}**" if e["mean"] == best else "{}").format(_fmt(e["mean"], metric, e["sd"]))
                 if (e := row.get(run)) else "–" for run in runs]
        n = max((e["n_cases"] for e in row.values()), default=0)
        lines.append(_row(_subset_cells(subset, modalities) + [n] + cells))
      lines.append("")
      tests = group["tests"][metric].get(region, {})
      if others and tests:
        count = sum(len(v) for v in tests.values())
        lines += [f"Paired Wilcoxon against {reference} over the cases both were scored on "
                  f"(seed-averaged per case), Holm-corrected over the {count} tests of this "
                  f"table: p (* below {statistics.SIGNIFICANCE}), and the matched-pairs "
                  f"rank-biserial r (run - {reference}: + means higher values).", "",
                  _row(names + others), _row([":-:"] * len(names) + ["-:"] * len(others))]
        for subset in table:
          cells = []
          for run in others:
            test = tests.get(subset, {}).get(run)
            if test is None or test["p"] is None:
              cells.append("–")
              continue
            star = "*" if test["p_holm"] < statistics.SIGNIFICANCE else ""
            cells.append(f"p={test['p_holm']:.3g}{star} r={test['effect']:+.2f} (n={test['n']})")
          lines.append(_row(_subset_cells(subset, modalities) + cells))
        lines.append("")
  for metric in group["metrics"]:
    regions = group["regions"]
    n_cells = sum(len([s for s in group["tables"][metric].get(r, {}) if s != AS_ACQUIRED])
                  for r in regions)
    lines += [f"### Wins, {METRIC_DISPLAY.get(metric, metric)}", "",
              f"Subset x region cells where a run has the best mean (ties: each), of {n_cells}.",
              "",
              _row(["run"] + regions + ["total"]), _row([":-"] + ["-:"] * (len(regions) + 1))]
    for run in runs:
      counts = group["wins"][metric][run]
      lines.append(_row([run] + [counts[r] for r in regions] + [f"**{sum(counts.values())}**"]))
    lines.append("")
  return lines


def plot_validation_curves(path, runs):
  """Validation score against step: one subplot per run, one line per seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = [r for r in runs if any(i.get("validation") for i in r["finished"].values())]
  cols = min(4, len(shown))
  rows = -(-len(shown) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
  for ax, run in zip(axes.flat, shown):
    for seed, info in run["finished"].items():
      curve = np.asarray(info.get("validation") or [], float).reshape(-1, 2)
      ax.plot(curve[:, 0], curve[:, 1], marker=".", label=f"seed {seed}")
    ax.set(title=run["name"], xlabel="step", ylabel="validation score", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  for ax in list(axes.flat)[len(shown):]:
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_by_present(path, group, title=""):
  """Dice against the number of present modalities, one subplot per region, one line per run
  (band: ± sd over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  regions = group["regions"]
  fig, axes = plt.subplots(1, len(regions), figsize=(4 * len(regions), 3.6), squeeze=False)
  for ax, region in zip(axes[0], regions):
    for run in group["runs"]:
      points = group["by_present"][region].get(run, {})
      if not points:
        continue
      ks = sorted(points)
      mean = np.array([points[k]["mean"] for k in ks])
      sd = np.array([points[k]["sd"] or 0.0 for k in ks])
      line, = ax.plot(ks, mean, marker="o", label=run)
      ax.fill_between(ks, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.set(title=region, xlabel="present modalities", ylabel="Dice", ylim=(0, 1),
           xticks=range(1, len(group["modalities"]) + 1))
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8, loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
