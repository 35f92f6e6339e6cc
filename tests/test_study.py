"""The study: paired statistics, claims as computed checks, resuming/skipping runs, the report."""
import csv
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

import model_helpers
from configs import study as study_config
from hemijax import atomic
from hemijax.evaluation import claims, statistics, study

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUMOUR = ("flair", "t1", "t1ce", "t2")
SUBSETS = ["+".join(s) for k in range(1, 5) for s in itertools.combinations(TUMOUR, k)]


# ---------------------------------------------------------------------------------------------
# Statistics


def test_holm_against_a_hand_computed_example():
  # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06.
  assert statistics.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, None, 0.02])
  assert statistics.holm([0.5, 0.6]) == [1.0, 1.0]  # 2 * 0.5 capped at 1, then monotone
  assert statistics.holm([]) == []


def test_rank_biserial_on_known_examples():
  # |d| ranks 1, 2, 3, 4; positive ranks 1 + 2 + 4 = 7, negative 3: r = (7 - 3) / 10.
  assert statistics.rank_biserial([1, 2, -3, 4], [0, 0, 0, 0]) == pytest.approx(0.4)
  assert statistics.rank_biserial([0.9, 0.8], [0.1, 0.2]) == 1.0
  assert statistics.rank_biserial([0.1, 0.2], [0.9, 0.8]) == -1.0
  # Zeros dropped; the two remaining differences tie (mid-ranks 1.5) and cancel.
  assert statistics.rank_biserial([0.5, 0.6, 0.4], [0.5, 0.5, 0.5]) == pytest.approx(0.0)
  assert statistics.rank_biserial([0.5], [0.5]) == 0.0
  assert statistics.rank_biserial([], []) is None


def test_exact_signed_rank_pvalue_equals_scipys_permutation_test():
  rng = np.random.default_rng(3)
  for n in (5, 7, 8):
    x, y = np.round(rng.random(n), 1), np.round(rng.random(n), 1)
    x[0] = y[0]  # a zero difference, and rounding makes ties: scipy permutes exhaustively
    assert statistics.wilcoxon_pvalue(x, y) == pytest.approx(stats.wilcoxon(x, y).pvalue)
  no_ties = np.array([0.11, -0.32, 0.53, 0.24, 0.45, 0.76])
  assert statistics.exact_signed_rank_pvalue(no_ties) == pytest.approx(
      stats.wilcoxon(no_ties, method="exact").pvalue)
  assert statistics.wilcoxon_pvalue([0.3, 0.4], [0.3, 0.4]) == 1.0
  assert statistics.wilcoxon_pvalue([], []) is None


def test_wilcoxon_pairs_only_the_cases_both_were_scored_on():
  values = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.65, "e": 0.6, "only_here": 0.0}
  reference = {"a": 0.5, "b": 0.55, "c": 0.4, "d": 0.7, "e": 0.2, "only_there": 1.0}
  result = statistics.paired_comparison(values, reference)
  common = ["a", "b", "c", "d", "e"]
  x, y = [values[c] for c in common], [reference[c] for c in common]
  assert result["n"] == 5
  assert result["p"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
  assert result["effect"] == pytest.approx(statistics.rank_biserial(x, y))
  assert result["mean_difference"] == pytest.approx(np.mean(np.subtract(x, y)))
  # A case only one side has changes nothing.
  assert statistics.paired_comparison(dict(values, only_here=1.0), reference) == result
  assert statistics.paired_comparison({"x": 1.0}, {"y": 1.0})["p"] is None


# ---------------------------------------------------------------------------------------------
# Claims on hand-made result tables


def _means(**runs):
  """run -> {region: {subset: value}} (Dice) into the claims' means layout."""
  return {run: {"dice": regions} for run, regions in runs.items()}


def _wt(values):
  return {"WT": dict(zip(SUBSETS, values))}


def test_beats_in_subsets_holds_does_not_hold_and_not_run():
  claim = dict(kind="beats_in_subsets", run="hemis", baseline="unet", region="WT", min_subsets=10)
  unet = _wt([0.5] * 15)
  holds = claims.check(claim, _means(hemis=_wt([0.6] * 11 + [0.4] * 4), unet=unet))
  assert (holds["status"], holds["holds"]) == ("holds", True)
  assert "11 of 15" in holds["detail"]
  fails = claims.check(claim, _means(hemis=_wt([0.6] * 9 + [0.4] * 6), unet=unet))
  assert (fails["status"], fails["holds"]) == ("does not hold", False)
  assert "9 of 15" in fails["detail"]
  not_run = claims.check(claim, _means(hemis=_wt([0.6] * 15)))
  assert (not_run["status"], not_run["holds"]) == ("not run", None)
  assert "unet" in not_run["detail"]
  # Ties: not "beats", but "at least as good" (strict=False).
  tied = _means(hemis=_wt([0.5] * 15), unet=unet)
  assert claims.check(dict(claim, min_subsets=1), tied)["holds"] is False
  assert claims.check(dict(claim, min_subsets=15, strict=False), tied)["holds"] is True
  # Distances: lower is better.
  hd = {"hemis": {"hd95": _wt([5.0] * 15)}, "unet": {"hd95": _wt([9.0] * 15)}}
  assert claims.check(dict(claim, metric="hd95"), hd)["holds"] is True
  # Every listed region must satisfy it; a region a run lacks -> not run.
  two = dict(claim, region=("WT", "TC"))
  assert claims.check(two, _means(hemis=_wt([0.6] * 15), unet=unet))["status"] == "not run"


def test_better_on_average_over_the_subsets_without_flair():
  claim = dict(kind="better_on_average", run="unet_dropout", baseline="unet", region="WT",
               missing=("flair",))
  without_flair = [s for s in SUBSETS if "flair" not in s.split("+")]
  assert len(without_flair) == 7
  unet = {"WT": {s: (0.8 if "flair" in s.split("+") else 0.1) for s in SUBSETS}}
  # Dropout loses on the FLAIR subsets but wins without FLAIR: holds (only those are counted).
  dropout = {"WT": {s: (0.5 if "flair" in s.split("+") else 0.3) for s in SUBSETS}}
  result = claims.check(claim, _means(unet_dropout=dropout, unet=unet))
  assert result["holds"] is True and "7 subsets" in result["detail"]
  assert claims.check(dict(claim, missing=()), _means(unet_dropout=dropout, unet=unet))[
      "holds"] is False
  assert claims.check(dict(claim, margin=0.25), _means(unet_dropout=dropout, unet=unet))[
      "holds"] is False


def test_within_points():
  claim = dict(kind="within_points", run="joint", baseline="tissue_only", region="WT", points=2)
  base = _wt([0.815] * 15)
  assert claims.check(claim, _means(joint=_wt([0.80] * 15), tissue_only=base))["holds"] is True
  assert claims.check(claim, _means(joint=_wt([0.79] * 15), tissue_only=base))["holds"] is False
  better = _means(joint=_wt([0.90] * 15), tissue_only=base)
  assert claims.check(claim, better)["holds"] is True
  assert claims.check(dict(claim, two_sided=True), better)["holds"] is False
  several = dict(claim, baseline=["tissue_only", "lesion_only"])
  means = _means(joint=_wt([0.80] * 15), tissue_only=base, lesion_only=_wt([0.9] * 15))
  assert claims.check(several, means)["holds"] is False


def _cases(per_subset):
  """run -> subset -> per-case values (lists) into the claims' per-case layout (WT Dice)."""
  return {run: {"dice": {"WT": {s: {f"c{i}": float(v) for i, v in enumerate(values)}
                                for s, values in by_subset.items()}}}
          for run, by_subset in per_subset.items()}


def test_claims_report_paired_evidence_holm_corrected_over_the_subsets():
  rng = np.random.default_rng(0)
  base = {s: rng.uniform(0.4, 0.6, 30) for s in SUBSETS}
  ours = {s: base[s] + rng.normal(0, 0.05, 30) for s in SUBSETS}   # noise: no difference
  for s in SUBSETS[0], SUBSETS[3]:
    ours[s] = base[s] + 0.1 + rng.uniform(0, 0.01, 30)   # better on every case
  ours[SUBSETS[1]] = base[SUBSETS[1]] - 0.1 - rng.uniform(0, 0.01, 30)   # worse on every case
  # Differences of ranks 1..30, the 15 smallest negative: p about 0.02 alone, not after Holm
  # over 15 subsets.
  ours[SUBSETS[2]] = base[SUBSETS[2]] + np.where(np.arange(30) < 15, -1, 1) * (
      1 + np.arange(30)) / 1000
  alone = stats.wilcoxon(ours[SUBSETS[2]], base[SUBSETS[2]]).pvalue
  assert alone < 0.05 and alone * 13 > 0.05
  cases = _cases({"urn": ours, "unet": base})
  means = {run: {"dice": {"WT": {s: float(np.mean(v)) for s, v in by.items()}}}
           for run, by in (("urn", ours), ("unet", base))}
  claim = dict(kind="beats_in_subsets", run="urn", baseline="unet", region="WT", min_subsets=14,
               strict=False)
  plain, paired = claims.check(claim, means), claims.check(claim, means, cases)
  assert (plain["holds"], "evidence" in plain) == (paired["holds"], False)
  [evidence] = paired["evidence"]
  assert (evidence["better"], evidence["worse"], evidence["subsets"]) == (2, 1, 15)
  expected = statistics.holm([statistics.paired_comparison(cases["urn"]["dice"]["WT"][s],
                                                           cases["unet"]["dice"]["WT"][s])["p"]
                              for s in SUBSETS])
  assert list(evidence["p_holm"].values()) == pytest.approx(expected)
  assert "significantly better in 2, worse in 1" in paired["detail"]
  # Distances: lower is better, so the same numbers as HD95 swap better and worse.
  hd = claims.check(dict(claim, metric="hd95"),
                    {r: {"hd95": m["dice"]} for r, m in means.items()},
                    {r: {"hd95": c["dice"]} for r, c in cases.items()})
  assert (hd["evidence"][0]["better"], hd["evidence"][0]["worse"]) == (1, 2)
  # The averaging kinds: one test of each case's mean over the claim's subsets.
  average = claims.check(dict(kind="better_on_average", run="urn", baseline="unet", region="WT",
                              missing=("flair",)), means, cases)
  without = [s for s in SUBSETS if "flair" not in s.split("+")]
  case_mean = lambda by: [np.mean([by[s][i] for s in without]) for i in range(30)]
  [evidence] = average["evidence"]
  assert evidence["n"] == 30 and evidence["p"] == pytest.approx(
      stats.wilcoxon(case_mean(ours), case_mean(base)).pvalue)
  # A case one run lacks in one of the subsets is left out of the case means.
  del cases["urn"]["dice"]["WT"][without[0]]["c0"]
  assert claims.check(dict(kind="within_points", run="urn", baseline="unet", region="WT",
                           points=2, missing=("flair",)), means, cases)["evidence"][0]["n"] == 29


def test_claim_config_errors_name_the_entry():
  with pytest.raises(ValueError, match=r"claims\[0\]: unknown kind"):
    claims.validate([dict(kind="beats_everything")])
  with pytest.raises(ValueError, match=r"claims\[1\].*missing \['min_subsets'\]"):
    claims.validate([dict(kind="better_on_average", run="a", baseline="b", region="WT"),
                     dict(kind="beats_in_subsets", run="a", baseline="b", region="WT")])
  with pytest.raises(ValueError, match="within_points needs a metric"):
    claims.validate([dict(kind="within_points", run="a", baseline="b", region="WT", points=2,
                          metric="hd95")])


def test_measure_claims_check_every_seeds_own_measure():
  claim = dict(kind="measure_at_most", run="pimms_soft", evaluation="unseen30",
               measure="permutation_invariance.voxels_label_changed", value=0)
  runs = [{"name": "pimms_soft", "finished": {
      str(seed): {"evaluations": {"unseen30": {"extras": {"permutation_invariance": {
          "voxels_label_changed": changed, "orders_compared": 46}}}}}
      for seed, changed in ((0, 0), (1, changed_1))}} for changed_1 in (0, 3)]
  held = claims.check(claim, {}, measures=study.run_measures([runs[0]]))
  assert held["status"] == "holds" and "unseen30 seed 1: 0" in held["detail"]
  failed = claims.check(claim, {}, measures=study.run_measures([runs[1]]))
  assert failed["status"] == "does not hold" and "unseen30 seed 1: 3" in failed["detail"]
  other = dict(claim, evaluation="test")  # measured on another evaluation only
  assert claims.check(other, {}, measures=study.run_measures([runs[0]]))["status"] == "not run"
  assert claims.check(claim, {})["status"] == "not run"
  assert claims.runs_needed(claim) == ("pimms_soft",)
  with pytest.raises(ValueError, match=r"claims\[0\].*missing \['value'\]"):
    claims.validate([dict(kind="measure_at_most", run="a", measure="m")])
  # The study passes its measures to the claim once the run is in a group.
  spec = study.parse_study(dict(runs=[dict(name="pimms_soft", config="configs/pimms.py")],
                                claims=[claim], evaluations=[dict(name="unseen30", split="all",
                                                                  data=None)]))
  group = study.group_results({"pimms_soft": {0: _rows({"a": 0.8})}}, TUMOUR, ("WT",), ("dice",),
                              "pimms_soft")
  [result] = study.check_claims(spec, {"g": dict(group, evaluation="unseen30")},
                                measures=study.run_measures([runs[1]]))
  assert result["status"] == "does not hold"


# ---------------------------------------------------------------------------------------------
# Results from rows


def _rows(case_values: dict, region="WT", subsets=SUBSETS, offset=0.0):
  return [{"case_id": case, "subset": s, "region": region, "dice": v + offset,
           "hd95": 10 - v, "assd": 5 - v} for case, v in case_values.items() for s in subsets]


def test_group_results_means_over_seeds_paired_tests_and_wins():
  runs_rows = {
      "hemis": {0: _rows({"a": 0.8, "b": 0.6}), 1: _rows({"a": 0.7, "b": 0.5})},
      "unet": {0: _rows({"a": 0.5, "b": 0.4}), 1: _rows({"a": 0.5, "c": 0.1})},
  }
  group = study.group_results(runs_rows, TUMOUR, ("WT",), ("dice", "hd95", "assd"), "hemis")
  cell = group["tables"]["dice"]["WT"]["flair"]["hemis"]
  # Seed means 0.7 and 0.6: mean 0.65, sample sd sqrt(0.005).
  assert cell["mean"] == pytest.approx(0.65) and cell["sd"] == pytest.approx(np.sqrt(0.005))
  assert (cell["n_seeds"], cell["n_cases"]) == (2, 2)
  unet = group["tables"]["dice"]["WT"]["flair"]["unet"]
  assert unet["mean"] == pytest.approx(np.mean([0.45, 0.3])) and unet["n_cases"] == 3
  test = group["tests"]["dice"]["WT"]["flair"]["unet"]
  # Seed-averaged cases in common: a (0.5 vs 0.75), b (0.4 vs 0.55); c only for unet.
  assert test["n"] == 2 and test["mean_difference"] == pytest.approx(-0.2)
  assert test["effect"] == -1.0
  # Holm over the 15 tests of the table: each p is multiplied by up to 15, capped at 1.
  pvalues = [group["tests"]["dice"]["WT"][s]["unet"]["p"] for s in SUBSETS]
  adjusted = [group["tests"]["dice"]["WT"][s]["unet"]["p_holm"] for s in SUBSETS]
  assert adjusted == pytest.approx(statistics.holm(pvalues))
  assert group["wins"]["dice"]["hemis"]["WT"] == 15 and group["wins"]["dice"]["unet"]["WT"] == 0
  assert group["wins"]["hd95"]["hemis"]["WT"] == 15  # lower is better
  assert group["by_present"]["WT"]["hemis"][1]["mean"] == pytest.approx(0.65)
  means = study.claim_means(group)
  assert means["unet"]["dice"]["WT"]["flair"] == pytest.approx(unet["mean"])


# ---------------------------------------------------------------------------------------------
# The study config


def test_study_presets_parse_and_their_run_configs_load():
  for preset in study_config.PRESETS:
    spec = study.parse_study(study_config.get_config(preset), f"configs/study.py:{preset}")
    for run in spec.runs:
      config = study.method_config(spec, run, run.seeds[-1])
      assert config.seed == run.seeds[-1]
  demo = study.parse_study(study_config.get_config("demo"))
  assert min(len(demo.run(n).seeds) for n in ("hemis", "unet", "unet_dropout", "mlp_impute", "urn_md",
                                              "urn_pooled", "urn_taskdata")) >= 3
  assert study.method_config(demo, demo.run("joint_tissue_only"), 0).variant == "tissue_only"
  # The study's budgets: every disentanglement run 2000 steps (its ablations alike), PIMMS and
  # joint validated every 100 steps; the paper preset keeps its methods' own.
  for name in ("disentangle", "disentangle_mean", "disentangle_mean_dis"):
    config = study.method_config(demo, demo.run(name), 0)
    assert (config.train.num_steps, config.train.eval_every, config.eval.overlap) == (2000, 200,
                                                                                     0.25)
  assert study.method_config(demo, demo.run("disentangle_mean"), 0).model.disentangle is False
  assert study.method_config(demo, demo.run("mlp_impute"), 0).train.eval_every == 100
  # PIMMS' segmenter at twice its demo steps (the online variant's γ scaled to them); the joint
  # model at its own.
  for name, steps in (("pimms_soft", 1600), ("pimms_online", 1600), ("joint_lesion_only", 800)):
    config = study.method_config(demo, demo.run(name), 0)
    assert (config.train.eval_every, config.train.checkpoint_every, config.train.num_steps) == (
        100, 100, steps)
  assert study.method_config(demo, demo.run("pimms_online"), 0).loss.class_weight_decay == (
      pytest.approx(5.0 / 1600))
  paper = study.parse_study(study_config.get_config("paper"))
  assert study.method_config(paper, paper.run("disentangle"), 0).train.num_steps == 50000
  # The diagnosis runs: the disentanglement model at twice its budget; HeMIS on exactly the
  # disentanglement run's 3D patches, batch and windows.
  assert study.method_config(demo, demo.run("disentangle_long"), 1).train.num_steps == 4000
  assert study.method_config(paper, paper.run("disentangle_long"), 1).train.num_steps == 100000
  # ... and sampling patches as HeMIS does, all else as the disentanglement run.
  for spec in (demo, paper):
    balanced = study.method_config(spec, spec.run("disentangle_balanced"), 0)
    hemis = study.method_config(spec, spec.run("hemis"), 0)
    dis = study.method_config(spec, spec.run("disentangle"), 0)
    assert dis.data.sampling == "uniform"
    assert (balanced.data.sampling, balanced.data.balanced_fraction) == (
        hemis.data.sampling, hemis.data.balanced_fraction) == ("balanced", 0.5)
    balanced.data.sampling, balanced.data.balanced_fraction = "uniform", dis.data.balanced_fraction
    assert balanced.to_dict() == dis.to_dict()
  for spec in (demo, paper):
    hemis_3d = study.method_config(spec, spec.run("hemis_3d"), 1)
    dis = study.method_config(spec, spec.run("disentangle"), 1)
    assert hemis_3d.method == "hemis" and len(hemis_3d.data.patch_size) == 3
    assert (hemis_3d.model.backend_kernel, hemis_3d.model.frontend_kernel,
            hemis_3d.model.final_kernel) == (3, 3, 3)
    for field in ("data.patch_size", "data.batch_size", "eval.roi_size", "eval.overlap"):
      section, name = field.split(".")
      assert tuple(np.atleast_1d(hemis_3d[section][name])) == tuple(np.atleast_1d(dis[section][name]))
    # The URN diagnoses: each URN row at twice its segmentation steps, or with a 64-channel
    # representation, nothing else changed.
    for long, row in (("urn_md_long", "urn_md"), ("urn_pooled_long", "urn_pooled")):
      seed = spec.run(long).seeds[0]
      config, base = (study.method_config(spec, spec.run(n), seed) for n in (long, row))
      assert config.train.num_steps == 2 * base.train.num_steps
      config.train.num_steps = base.train.num_steps
      assert config == base
    for wide, row in (("urn_md_wide", "urn_md"), ("urn_pooled_wide", "urn_pooled")):
      config = study.method_config(spec, spec.run(wide), 0)
      assert config.model.representation_channels == 64
      config.model.representation_channels = 16
      assert config == study.method_config(spec, spec.run(row), 0)
    # The joint model at twice its steps, nothing else changed.
    config, base = (study.method_config(spec, spec.run(n), 0) for n in ("joint_long", "joint"))
    assert config.train.num_steps == 2 * base.train.num_steps
    config.train.num_steps = base.train.num_steps
    assert config == base
    # The fine-tuned reading of the pooled row: only the variant (and the preset's name).
    config = study.method_config(spec, spec.run("urn_pooled_finetuned"), 0)
    assert config.variant == "md_pooled_finetuned"
    config.variant, config.preset = "md_pooled", spec.run("urn_pooled").preset
    assert config == study.method_config(spec, spec.run("urn_pooled"), 0)


def test_study_config_errors_name_the_field():
  config = study_config.get_config("smoke")
  config.runs = [dict(name="hemis", config="configs/hemis.py", preset="smoke",
                      overrides={"model.no_such_field": 1})]
  spec = study.parse_study(config, "s.py")
  with pytest.raises(ValueError, match=r"s.py: run 'hemis': override 'model.no_such_field'"):
    study.method_config(spec, spec.runs[0], 0)
  config.runs = [dict(name="a", config="configs/hemis.py")] * 2
  with pytest.raises(ValueError, match="distinct names"):
    study.parse_study(config, "s.py")
  config.runs = [dict(name="../a", config="configs/hemis.py")]
  with pytest.raises(ValueError, match="folder name"):
    study.parse_study(config, "s.py")
  config.runs = [dict(name="hemis", config="configs/no_such.py")]
  spec = study.parse_study(config, "s.py")
  with pytest.raises(ValueError, match="s.py: run 'hemis': config file configs/no_such.py not"):
    study.method_config(spec, spec.runs[0], 0)
  config.reference = ("nobody",)
  with pytest.raises(ValueError, match="reference: none of"):
    study.parse_study(config, "s.py")
  config = study_config.get_config("smoke")
  config.metric_options.min_region_volume_mm3 = {"ET": -5}
  with pytest.raises(ValueError, match="s.py: metric_options: min_region_volume_mm3: ET=-5"):
    study.parse_study(config, "s.py")
  config.metric_options = {"hd95": "pooled"}
  with pytest.raises(ValueError, match="s.py: metric_options: unknown \\['hd95'\\]"):
    study.parse_study(config, "s.py")


# ---------------------------------------------------------------------------------------------
# Resuming and skipping, with stand-ins for training and evaluation (fast)


class Interrupted(Exception):
  pass


def _fake_study(tmp_path, seeds=(0,)):
  config = study_config.get_config("smoke")
  config.seeds = seeds
  data = tmp_path / "data"
  data.mkdir(exist_ok=True)
  config.evaluations = [dict(name="test", split="test", data=str(data))]
  return study.parse_study(config, "fake")


def _install_fakes(monkeypatch, calls, fail_first_train=False, quality=None,
                   fail_first_evaluation=False):
  from hemijax.evaluation import evaluate
  from hemijax.training import loop

  interrupt = [True] if fail_first_train else []
  interrupt_evaluation = [True] if fail_first_evaluation else []
  extra_quality = quality

  def train(config, workdir, progress=False):
    calls.append(("train", pathlib.Path(workdir).parent.name, config.seed))
    if interrupt:
      interrupt.pop()
      raise Interrupted  # as a kill or Ctrl-C would
    (pathlib.Path(workdir) / "checkpoints").mkdir(parents=True, exist_ok=True)

  def evaluate_workdir(workdir, *, data, split, out, step, metric_options, unknown_regions,
                       progress=False):
    run = pathlib.Path(workdir).parent.name
    calls.append(("evaluate", run))
    if interrupt_evaluation:
      interrupt_evaluation.pop()
      time.sleep(0.05)  # a measurable attempt
      raise Interrupted
    quality = {"hemis": 0.7, "unet": 0.5, **(extra_quality or {})}[run]
    rows = _rows({"a": quality, "b": quality - 0.1})
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(out) / "cases.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    (pathlib.Path(out) / "synthesis.md").write_text("# PSNR\n")
    return {"modalities": list(TUMOUR), "regions": ["WT"], "step": 3, "method": run,
            "reports": [str(pathlib.Path(out) / name) for name in ("summary.md", "synthesis.md")],
            "synthesis": {"psnr": 20.0, "note": "text", "missing": None}}

  monkeypatch.setattr(loop, "train", train)
  monkeypatch.setattr(evaluate, "evaluate_workdir", evaluate_workdir)


def test_an_interrupted_evaluations_time_counts_with_its_resumed_attempt(tmp_path, monkeypatch):
  spec, workdir, calls = _fake_study(tmp_path), tmp_path / "study", []
  _install_fakes(monkeypatch, calls, fail_first_evaluation=True)
  with pytest.raises(Interrupted):
    study.run_study(spec, workdir, log=lambda _: None)
  folder = study.run_dir(workdir, "hemis", 0)
  pending = study.read_marker(folder)["evaluations_pending"]["test"]
  assert pending["attempts"] == 1 and pending["wall_s"] >= 0.05
  study.run_study(spec, workdir, log=lambda _: None)
  marker = study.read_marker(folder)
  evaluation = marker["evaluations"]["test"]
  assert evaluation["attempts"] == 2 and evaluation["wall_s"] >= 0.05
  assert marker["evaluations_pending"] == {}
  # The other run was evaluated once, in one attempt.
  assert study.read_marker(study.run_dir(workdir, "unet", 0))["evaluations"]["test"]["attempts"] == 1


def test_a_killed_attempts_time_is_on_disk_up_to_the_last_clock_tick(tmp_path, monkeypatch):
  """A killed process runs no `finally`: what a kill would leave is the marker on disk while the
  attempt runs, which the attempt clock keeps current."""
  from hemijax.evaluation import evaluate
  from hemijax.training import loop

  spec, workdir, calls = _fake_study(tmp_path), tmp_path / "study", []
  _install_fakes(monkeypatch, calls)
  monkeypatch.setattr(study, "ATTEMPT_CLOCK_EVERY_S", 0.02)
  seen = {}
  real_evaluate = evaluate.evaluate_workdir

  def train(config, workdir, progress=False):
    before = study.read_marker(pathlib.Path(workdir))
    time.sleep(0.3)
    seen.setdefault("train", (before, study.read_marker(pathlib.Path(workdir))))
    (pathlib.Path(workdir) / "checkpoints").mkdir(parents=True, exist_ok=True)

  def evaluate_workdir(workdir, **kwargs):
    time.sleep(0.3)
    seen.setdefault("evaluate", study.read_marker(pathlib.Path(workdir)))
    return real_evaluate(workdir, **kwargs)

  monkeypatch.setattr(loop, "train", train)
  monkeypatch.setattr(evaluate, "evaluate_workdir", evaluate_workdir)
  study.run_study(spec, workdir, log=lambda _: None)
  before, during = seen["train"]
  assert before["train_attempts"] == 1 and before["train_wall_s"] < 0.1  # counted at the start
  assert during["train_wall_s"] >= 0.1 and during["train_cpu_s"] >= 0.0
  assert not during["trained"]
  pending = seen["evaluate"]["evaluations_pending"]["test"]
  assert pending["attempts"] == 1 and pending["wall_s"] >= 0.1
  marker = study.read_marker(study.run_dir(workdir, "hemis", 0))
  assert marker["trained"] and marker["train_attempts"] == 1 and marker["train_wall_s"] >= 0.3
  assert marker["evaluations"]["test"]["wall_s"] >= 0.3


def test_logged_step_time_bounds_the_training_time_from_below(tmp_path):
  """metrics.jsonl's steps_per_s, summed over the logged steps: a lower bound that shows a killed
  attempt's time missing from an older marker (the report marks those times ≥)."""
  lines = [{"split": "train", "step": 50, "steps_per_s": 0.5},
           {"split": "train", "step": 100, "steps_per_s": 0.25},
           {"split": "val", "step": 100, "val_score": 0.3},
           {"split": "train", "step": 150, "steps_per_s": 1.0},   # killed after this,
           {"split": "train", "step": 150, "steps_per_s": 0.5},   # resumed from step 100
           {"split": "train", "step": 200, "steps_per_s": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert study.logged_train_seconds(tmp_path) == pytest.approx(50 / 0.5 + 50 / 0.25 + 50 / 0.5
                                                               + 50 / 0.5)
  assert study.logged_train_seconds(tmp_path / "nothing") is None
  recorded = {"train_wall_s": 600.0, "train_cpu_s": 1100.0, "logged_train_s": 500.0}
  assert study._train_time(recorded, "wall") == "10.0 min"
  assert study._train_time(recorded, "cpu") == "18.3 min"
  short = dict(recorded, train_wall_s=200.0, train_cpu_s=300.0)
  assert study._train_time(short, "wall") == "≥ 8.3 min"
  assert study._train_time(short, "cpu") == "≥ 5.0 min"
  assert study._train_time(dict(short, train_cpu_s=None), "cpu") == "–"
  assert study._train_time(dict(short, logged_train_s=None), "wall") == "3.3 min"


def test_interrupted_runs_resume_finished_ones_are_skipped(tmp_path, monkeypatch):
  spec, workdir, calls = _fake_study(tmp_path), tmp_path / "study", []
  _install_fakes(monkeypatch, calls, fail_first_train=True)
  with pytest.raises(Interrupted):
    study.run_study(spec, workdir, log=lambda _: None)
  folder = study.run_dir(workdir, "hemis", 0)
  marker = study.read_marker(folder)
  assert (marker["trained"], marker["train_attempts"]) == (False, 1)
  assert marker["train_cpu_s"] >= 0.0
  assert not (workdir / "report").exists()
  # unet seed 0 was interrupted once by a version that did not record CPU time: its total is
  # unknown, not the CPU time of the attempts after it.
  study.run_dir(workdir, "unet", 0).mkdir(parents=True)
  older = dict(marker, run="unet", train_wall_s=5.0)
  del older["train_cpu_s"]
  (study.run_dir(workdir, "unet", 0) / study.MARKER).write_text(json.dumps(older))

  study.run_study(spec, workdir, log=lambda _: None)
  assert calls[1:] == [("train", "hemis", 0), ("evaluate", "hemis"), ("train", "unet", 0),
                       ("evaluate", "unet")]
  marker = study.read_marker(study.run_dir(workdir, "hemis", 0))
  assert (marker["trained"], marker["train_attempts"]) == (True, 2)
  assert marker["train_cpu_s"] >= 0.0 and marker["evaluations"]["test"]["cpu_s"] >= 0.0
  assert study.read_marker(study.run_dir(workdir, "unet", 0))["train_cpu_s"] is None
  assert marker["evaluations"]["test"]["extras"] == {
      "synthesis": {"psnr": 20.0, "note": "text", "missing": None}}

  calls.clear()
  (workdir / "report" / "sentinel").write_text("")
  report = study.run_study(spec, workdir, log=lambda _: None)
  assert calls == []  # nothing retrained or re-evaluated
  assert not (report / "sentinel").exists()  # the report folder was replaced
  results = json.loads((report / "report.json").read_text())
  assert results["claims"][0]["status"] == "holds"  # hemis 0.7/0.6 vs unet 0.5/0.4 on WT
  assert "15 of 15" in results["claims"][0]["detail"]
  assert {c["status"] for c in results["claims"][1:]} == {"not run"}
  assert results["claims"][1]["detail"] == "not run or not finished: unet_dropout"
  assert (report / "extra" / "hemis" / "seed0" / "test" / "synthesis.md").is_file()
  # The evaluators' numbers, per run over seeds (paths and None left out).
  assert results["measures"] == [
      {"run": run, "evaluation": "test", "measure": "synthesis.psnr", "seeds": {"0": 20.0},
       "mean": 20.0, "sd": None} for run in ("hemis", "unet")]
  text = (report / "report.md").read_text()
  assert "| hemis | test | `synthesis.psnr` | 20.000 | 20.000 (seed 0) |" in text
  assert "| HeMIS beats mean-filling" in text and "**holds**" in text
  assert "(extra/hemis/seed0/test/synthesis.md)" in text
  for heading in ("### Dice: WT", "### HD95 (mm): WT", "### ASSD (mm): WT", "### Wins, Dice"):
    assert heading in text
  assert "Paired Wilcoxon against hemis" in text and "Holm-corrected over the 15 tests" in text

  # A changed run config (here: the study-wide overrides) trains on and re-evaluates that run.
  config = study_config.get_config("smoke")
  config.seeds, config.evaluations = (0,), [dict(name="test", data=str(tmp_path / "data"))]
  config.overrides.train.num_steps = 4
  calls.clear()
  study.run_study(study.parse_study(config, "fake"), workdir, log=lambda _: None)
  assert calls == [("train", "hemis", 0), ("evaluate", "hemis"), ("train", "unet", 0),
                   ("evaluate", "unet")]


def _smoke_with_mlp_impute(tmp_path):
  """The smoke study at seed 0 plus mlp_impute, which uses unet's folder ("run:unet")."""
  config = study_config.get_config("smoke")
  config.seeds = (0,)
  config.runs.append(dict(name="mlp_impute", config="configs/mlp_impute.py", preset="smoke",
                          overrides={"impute.segmenter_from": "run:unet"}))
  (tmp_path / "data").mkdir()
  config.evaluations = [dict(name="test", split="test", data=str(tmp_path / "data"))]
  return config


def test_processes_sharing_a_study_skip_held_runs_and_wait_for_referenced_ones(tmp_path,
                                                                              monkeypatch):
  # Another process holds unet seed 0, and mlp_impute uses unet's folder ("run:unet"): this one
  # trains hemis, waits, then (once the other has finished unet) trains mlp_impute.
  config = _smoke_with_mlp_impute(tmp_path)
  spec, workdir, calls, logged = study.parse_study(config, "fake"), tmp_path / "study", [], []
  _install_fakes(monkeypatch, calls, quality={"mlp_impute": 0.6})
  unet = study.run_dir(workdir, "unet", 0)
  unet.mkdir(parents=True)
  other = atomic.exclusive_lock(unet / study.STUDY_LOCK)
  assert other.__enter__()  # the other process's hold (flock: per open file, so it counts)
  waits, real_sleep = [], study.time.sleep

  def sleep(seconds):  # meanwhile the other process finishes unet and lets go
    if seconds != 7.0:  # not the study's wait (a library's)
      return real_sleep(seconds)
    waits.append(seconds)
    assert len(waits) == 1, "waited again after the held run was finished"
    study.ensure_finished(spec, spec.run("unet"), 0, workdir, log=lambda _: None)
    other.__exit__(None, None, None)

  monkeypatch.setattr(study.time, "sleep", sleep)
  study.run_study(spec, workdir, log=logged.append, poll_s=7.0)
  assert calls == [("train", "hemis", 0), ("evaluate", "hemis"), ("train", "unet", 0),
                   ("evaluate", "unet"), ("train", "mlp_impute", 0), ("evaluate", "mlp_impute")]
  assert waits == [7.0]
  assert any(line.startswith("waiting for unet seed 0, mlp_impute seed 0") for line in logged)
  assert all(study.run_finished(spec, run, 0, workdir) for run in spec.runs)
  assert (workdir / "report" / "report.json").is_file()


def test_an_archive_carries_a_study_to_a_new_workdir_without_checkpoints(tmp_path, monkeypatch):
  # mlp_impute uses unet's checkpoints ("run:unet"), which an archive does not keep.
  config = _smoke_with_mlp_impute(tmp_path)
  spec, archive, calls = study.parse_study(config, "fake"), tmp_path / "archive", []
  _install_fakes(monkeypatch, calls, quality={"mlp_impute": 0.6})
  first = study.run_study(spec, tmp_path / "a", log=lambda _: None, archive=archive)
  assert len(calls) == 6
  for run in ("hemis", "unet", "mlp_impute"):
    kept = sorted(str(p.relative_to(archive / run / "seed0"))
                  for p in (archive / run / "seed0").rglob("*") if p.is_file())
    # The marker, the cases and the method's own report; not the checkpoints.
    assert kept == ["study.json", "study_eval/test/cases.csv", "study_eval/test/synthesis.md"]
  assert (tmp_path / "a" / "runs/hemis/seed0/checkpoints").is_dir()

  # A new workdir resumes from the archive: nothing trained or evaluated, the same report.
  calls.clear()
  logged = []
  second = study.run_study(spec, tmp_path / "b", log=logged.append, archive=archive)
  assert calls == []
  assert sorted(logged) == [f"restored {run} seed 0 from {archive / run / 'seed0'}"
                            for run in ("hemis", "mlp_impute", "unet")]
  claims_of = lambda report: [(c["status"], c["detail"]) for c in study.read_claims(report)]
  assert claims_of(second) == claims_of(first)
  assert (second / "extra/hemis/seed0/test/synthesis.md").is_file()

  # Render only, from the archive alone.
  third = study.run_study(spec, tmp_path / "c", train=False, log=lambda _: None, archive=archive)
  assert claims_of(third) == claims_of(first) and calls == []

  # mlp_impute is not archived: unet is trained again for its checkpoints, hemis is restored.
  shutil.rmtree(archive / "mlp_impute")
  study.run_study(spec, tmp_path / "d", log=lambda _: None, archive=archive)
  assert calls == [("train", "unet", 0), ("evaluate", "unet"), ("train", "mlp_impute", 0),
                   ("evaluate", "mlp_impute")]
  assert (archive / "mlp_impute/seed0/study.json").is_file()  # archived as it finished

  # A changed run config is not taken from the archive: trained and evaluated again.
  config.overrides.train.num_steps = 4
  calls.clear()
  study.run_study(study.parse_study(config, "fake"), tmp_path / "e", log=lambda _: None,
                  archive=archive)
  assert [c for c in calls if c[0] == "train"] == [("train", r, 0)
                                                   for r in ("hemis", "unet", "mlp_impute")]


def test_claims_need_their_runs_on_the_same_data():
  spec = study.parse_study(dict(
      runs=[dict(name="hemis", config="configs/hemis.py"), dict(name="unet", config="c.py")],
      claims=[dict(kind="beats_in_subsets", run="hemis", baseline="unet", region="WT",
                   min_subsets=1)]))
  group = study.group_results({"hemis": {0: _rows({"a": 0.8})}}, TUMOUR, ("WT",), ("dice",),
                              "hemis")
  other = study.group_results({"unet": {0: _rows({"a": 0.1})}}, TUMOUR, ("WT",), ("dice",), "unet")
  groups = {"x": dict(group, evaluation="test"), "y": dict(other, evaluation="test")}
  [result] = study.check_claims(spec, groups)
  assert result["status"] == "not run" and "not evaluated on the same data" in result["detail"]


def test_same_seeds_claims_compare_a_one_seed_run_with_the_others_at_that_seed():
  """A diagnosis run of seed 1 against a row whose seed 0 is strong and seed 1 weak: over all
  seeds the row looks better, at seed 1 the diagnosis run is; means and paired cases alike."""
  cases = [f"c{i}" for i in range(12)]
  rows = {"row": {0: _rows({c: 0.9 for c in cases}), 1: _rows({c: 0.3 + 0.01 * i
                                                                for i, c in enumerate(cases)})},
          "diag": {1: _rows({c: 0.5 + 0.01 * i for i, c in enumerate(cases)})}}
  group = dict(study.group_results(rows, TUMOUR, ("WT",), ("dice",), "row"), evaluation="e")
  claim = dict(kind="better_on_average", run="diag", baseline="row", region="WT")
  spec = lambda c: study.parse_study(dict(
      runs=[dict(name="row", config="c.py"), dict(name="diag", config="c.py")], claims=[c],
      evaluations=[dict(name="e", split="all", data=None)]))
  [pooled] = study.check_claims(spec(claim), {"g": group}, {"g": rows})
  [paired] = study.check_claims(spec(dict(claim, same_seeds=True)), {"g": group}, {"g": rows})
  assert pooled["status"] == "does not hold" and paired["status"] == "holds"
  assert paired["detail"].startswith("seed 1 of every run: ")
  row_seed1 = np.mean([0.3 + 0.01 * i for i in range(12)])
  assert f"vs {row_seed1:.3f}" in paired["detail"]
  [evidence] = paired["evidence"]
  assert evidence["n"] == 12 and evidence["mean_difference"] == pytest.approx(0.2)
  assert study.seeds_in_group(group, "diag") == {1} and study.seeds_in_group(group, "row") == {0, 1}
  # A baseline without the run's seed: not run.
  rows["row"].pop(1)
  group = dict(study.group_results(rows, TUMOUR, ("WT",), ("dice",), "row"), evaluation="e")
  [absent] = study.check_claims(spec(dict(claim, same_seeds=True)), {"g": group}, {"g": rows})
  assert absent["status"] == "not run"


# ---------------------------------------------------------------------------------------------
# End to end: real training and evaluation at smoke size


def _smoke_config(seeds):
  config = study_config.get_config("smoke")
  config.seeds = seeds
  config.overrides.train.num_steps = 2
  config.overrides.data = dict(cache_dir=str(model_helpers.PHANTOM_CACHE))
  config.overrides.model = dict(conv_impl="xla")  # compiles fastest (see model_helpers)
  return config


def _mtimes(workdir, pattern):
  return {p: p.stat().st_mtime_ns for p in pathlib.Path(workdir).glob(pattern) if p.is_file()}


@pytest.mark.parametrize("seeds", [(0,), pytest.param((0, 1), marks=pytest.mark.slow)])
def test_smoke_study_end_to_end_resumes_and_rerenders(tmp_path, seeds):
  spec, workdir = study.parse_study(_smoke_config(seeds), "smoke"), tmp_path / "study"
  report = study.run_study(spec, workdir, log=lambda _: None)
  for run, seed in itertools.product(("hemis", "unet"), seeds):
    marker = study.read_marker(study.run_dir(workdir, run, seed))
    assert marker["trained"] and marker["evaluations"]["test"]["step"] == 2
  results = json.loads((report / "report.json").read_text())
  [group] = results["groups"].values()
  assert group["runs"] == ["hemis", "unet"] and group["reference"] == "hemis"
  assert list(group["tables"]["dice"]["WT"])[:15] == SUBSETS
  # A table cell is the mean over seeds of the per-seed mean over cases in cases.csv.
  seed_means = []
  for seed in seeds:
    rows = study.read_cases(study.run_dir(workdir, "unet", seed) / "study_eval/test/cases.csv",
                            ("dice",))
    seed_means.append(np.mean([r["dice"] for r in rows
                               if (r["subset"], r["region"]) == ("t1+t2", "TC")]))
  cell = group["tables"]["dice"]["TC"]["t1+t2"]["unet"]
  assert cell["mean"] == pytest.approx(np.mean(seed_means)) and cell["n_seeds"] == len(seeds)
  assert (cell["sd"] is None) == (len(seeds) == 1)
  assert results["claims"][0]["status"] in ("holds", "does not hold")
  assert "of 15 subsets" in results["claims"][0]["detail"]
  assert all(c["status"] == "not run" for c in results["claims"][1:])
  assert (report / "report.md").is_file() and list(report.glob("dice_by_present_*.png"))
  for run in results["runs"]:
    assert all(info["train_wall_s"] > 0 and info["train_cpu_s"] > 0
               for info in run["finished"].values())
    assert all(e["cpu_s"] > 0 for info in run["finished"].values()
               for e in info["evaluations"].values())
    assert all(info["validation"] and info["validation"][-1][0] == 2
               for info in run["finished"].values())
  assert (report / study.VALIDATION_PLOT).is_file()
  assert "validation gain" in (report / "report.md").read_text()
  commit = study.git_commit()  # the report names the commit that trained the runs
  if commit:
    assert (f"Runs trained at commit {commit} ({2 * len(seeds)} run x seeds)"
            in (report / "report.md").read_text())

  # Run again: nothing retrained or re-evaluated, the report re-rendered.
  checkpoints = _mtimes(workdir, "runs/*/seed*/checkpoints/**/*")
  evaluations = _mtimes(workdir, "runs/*/seed*/study_eval/**/*")
  assert checkpoints and evaluations
  (report / "sentinel").write_text("")
  logged = []
  study.run_study(spec, workdir, log=logged.append)
  assert logged == []
  assert _mtimes(workdir, "runs/*/seed*/checkpoints/**/*") == checkpoints
  assert _mtimes(workdir, "runs/*/seed*/study_eval/**/*") == evaluations
  assert not (report / "sentinel").exists() and (report / "report.json").is_file()

  # A lost evaluation record: only that evaluation runs again, no training.
  folder = study.run_dir(workdir, "unet", 0)
  marker = study.read_marker(folder)
  del marker["evaluations"]["test"]
  (folder / study.MARKER).write_text(json.dumps(marker))
  logged.clear()
  study.run_study(spec, workdir, log=logged.append)
  assert [line.split(" on ")[0] for line in logged] == ["evaluate unet seed 0"]
  assert _mtimes(workdir, "runs/*/seed*/checkpoints/**/*") == checkpoints

  # The command line re-renders a finished study without training.
  out = subprocess.run(
      [sys.executable, "study.py", "--config", "configs/study.py:smoke", "--workdir",
       str(workdir), "--render_only", f"--config.seeds={tuple(seeds)}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
  assert out.returncode == 0, out.stderr
  assert f"report: {workdir / 'report' / 'report.md'}" in out.stdout
  assert "not run: " in out.stdout
  assert _mtimes(workdir, "runs/*/seed*/checkpoints/**/*") == checkpoints


def test_plateau_gain_of_validation_curves(tmp_path):
  """The rise of the best validation score over the last quarter of the steps."""
  rising = [[100, 0.2], [200, 0.4], [300, 0.5], [350, 0.6], [400, 0.7]]
  assert study.plateau_gain(rising) == pytest.approx(0.2)       # 0.7 - max(0.2, 0.4, 0.5)
  flat = [[100, 0.6], [200, 0.8], [300, 0.81], [350, 0.78], [400, 0.79]]
  assert study.plateau_gain(flat) == pytest.approx(0.0)         # the best came before the tail
  # One validation in the tail cannot show a trend: the disentanglement demo's 600 steps,
  # validated every 200, would read as levelled off at 0.2.
  assert study.plateau_gain([[200, 0.09], [400, 0.22], [600, 0.20]]) is None
  assert study.plateau_gain([[400, 0.7]]) is None
  assert study.plateau_gain([]) is None
  # After an early spike the best score no longer rises, but the curve climbs back: the fitted
  # tail trend catches it (the pimms_soft seed 0 curve of the demo study).
  climbing = [[1100, 0.24], [1200, 0.557], [1300, 0.32], [1400, 0.37], [1500, 0.42],
              [1600, 0.44], [1700, 0.46], [1800, 0.47]]
  assert study.plateau_gain(climbing) == pytest.approx(0.0)
  tail = np.array(climbing[3:])                                  # steps > 0.75 * 1800
  expected = np.polyfit(tail[:, 0], tail[:, 1], 1)[0] * 400
  assert study.tail_trend(climbing) == pytest.approx(expected) and expected > 0.08
  assert study.levelled_off(0.0, study.tail_trend(climbing)) is False
  assert study.tail_trend(flat) == pytest.approx(np.polyfit([350, 400], [0.78, 0.79], 1)[0] * 50)
  assert study.levelled_off(study.plateau_gain(flat), study.tail_trend(flat)) is True
  assert study.levelled_off(0.2, -0.1) is False
  assert study.tail_trend([[400, 0.7]]) is None and study.levelled_off(None, 0.0) is None
  lines = [{"split": "train", "step": 50, "loss": 1.0},
           {"split": "val", "step": 100, "val_score": 0.25, "val_dice_all": 0.3},
           {"split": "val", "step": 200, "val_score": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  assert study.validation_curve(tmp_path) == [[100, 0.25], [200, 0.5]]
  assert study.validation_curve(tmp_path / "nothing") == []


def test_run_reference_overrides_resolve_per_seed(tmp_path):
  """"run:NAME" is run NAME's folder at the same seed; it must name an earlier run."""
  demo = study.parse_study(study_config.get_config("demo"), "demo")
  config = study.method_config(demo, demo.run("mlp_impute"), 2, tmp_path)
  assert config.impute.segmenter_from == str(tmp_path / "runs" / "unet" / "seed2")
  config = study_config.get_config("smoke")
  config.runs = [dict(name="m", config="configs/mlp_impute.py", preset="smoke",
                      overrides={"impute.segmenter_from": "run:u"}),
                 dict(name="u", config="configs/unet.py", preset="smoke")]
  with pytest.raises(ValueError, match="override impute.segmenter_from='run:u' needs a run 'u' "
                                       "listed before it"):
    study.parse_study(config, "s.py")


def test_numeric_leaves_and_measures_over_seeds():
  assert study.numeric_leaves({"a": {"b": 1, "c": "x", "d": None, "e": True, "f": float("nan")},
                               "g": 2.5}) == {"a.b": 1.0, "g": 2.5}
  runs = [{"name": "urn", "finished": {
      "0": {"evaluations": {"e": {"extras": {"synthesis_psnr": {"t1": 20.0, "t2": None}}}}},
      "1": {"evaluations": {"e": {"extras": {"synthesis_psnr": {"t1": 22.0}}}}},
      "2": {"evaluations": {}}}}]
  [measure] = study.run_measures(runs)
  assert measure["measure"] == "synthesis_psnr.t1" and measure["seeds"] == {"0": 20.0, "1": 22.0}
  assert measure["mean"] == 21.0 and measure["sd"] == pytest.approx(np.std([20.0, 22.0], ddof=1))


def test_the_demo_studys_archive_is_not_ignored_by_git():
  # configs/study.py names docs/study/runs as the archive committed with the repository; an
  # ignore rule for the workdirs (runs/) once swallowed it.
  path = "docs/study/runs/hemis/seed0/study.json"
  out = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], capture_output=True)
  if out.returncode == 128:
    pytest.skip("not a git checkout")
  assert out.returncode == 1, f"{path} is ignored by git"
