"""Evaluation reports: subsets, cases.csv, summaries, comparisons, plots (fake rows, small data)."""
import json
import math
import os

import numpy as np
import pytest

from hemijax.evaluation import plots, subsets, tables
from hemijax.data.tasks import get_task
from hemijax.evaluation.metrics import METRIC_NAMES, case_metrics, metric_conventions

TUMOR = get_task("tumor")
MODS = TUMOR.modalities
REGIONS = list(TUMOR.regions)


def _fake_rows(seed=0, n_cases=6, offset=0.0, modalities=MODS, regions=REGIONS):
  """Rows with Dice growing with the number of modalities present (+ offset)."""
  rng = np.random.default_rng(seed)
  rows = []
  for subset in subsets.all_subsets(modalities):
    for case in range(n_cases):
      for r, region in enumerate(regions):
        dice = min(1.0, 0.2 * len(subset) + 0.05 * r + 0.01 * rng.random() + offset)
        rows.append({"case_id": f"case{case:03d}", "subset": "+".join(subset), "region": region,
                     "dice": dice, "hd95": 10.0 - 2 * len(subset), "assd": 1.0,
                     "sensitivity": dice, "precision": 1.0, "volume_diff_ml": -0.5})
  return rows


def test_all_subsets_count_order_and_symbols():
  every = subsets.all_subsets(MODS)
  assert len(every) == 2 ** 4 - 1 == len(set(every))
  assert every[:4] == [("flair",), ("t1",), ("t1ce",), ("t2",)]
  assert every[4] == ("flair", "t1") and every[-1] == MODS
  assert [len(s) for s in every] == sorted(len(s) for s in every)
  assert len(subsets.all_subsets(("t1", "flair"))) == 3
  assert subsets.subset_symbol(("flair", "t1ce", "t2"), MODS) == "●○●●"
  assert subsets.subset_symbol("t2", MODS) == "○○○●"
  assert subsets.subset_symbol("t2+flair", MODS) == "●○○●"
  assert subsets.subset_key(("t2", "flair"), MODS) == "flair+t2"
  symbols = {subsets.subset_symbol(s, MODS) for s in every}
  assert len(symbols) == 15 and "○○○○" not in symbols
  with pytest.raises(ValueError):
    subsets.subset_symbol("dwi", MODS)


def test_cases_csv_round_trip(tmp_path):
  truth = np.zeros((8, 8, 8), np.int32)
  truth[2:6, 2:6, 2:6] = 2
  truth[3:5, 3:5, 3:5] = 4
  pred = np.roll(truth, 1, axis=0)
  rows = tables.case_rows("c1", ("t2", "flair"), case_metrics(pred, truth, 1.0, TUMOR.regions),
                              MODS)
  assert [r["region"] for r in rows] == REGIONS and rows[0]["subset"] == "flair+t2"
  path = tmp_path / "cases.csv"
  tables.write_cases_csv(path, rows)
  header = path.read_text().splitlines()[0].split(",")
  assert header == ["case_id", "subset", "region", *METRIC_NAMES]
  back = tables.read_cases_csv(path)
  assert len(back) == 3
  for a, b in zip(rows, back):
    assert a["case_id"] == b["case_id"] and a["region"] == b["region"]
    for name in METRIC_NAMES:
      assert b[name] == pytest.approx(a[name])
  assert [p for p in os.listdir(tmp_path)] == ["cases.csv"]  # no temporary files left


def test_summarise_and_markdown(tmp_path):
  rows = _fake_rows()
  summary = tables.summarise(rows, MODS, REGIONS)
  assert list(summary["subsets"]) == ["+".join(s) for s in subsets.all_subsets(MODS)]
  full = summary["subsets"]["flair+t1+t1ce+t2"]
  assert full["symbol"] == "●●●●" and full["n_cases"] == 6
  assert full["modalities"] == list(MODS)
  wt = [r["dice"] for r in rows if r["subset"] == "flair+t1+t1ce+t2" and r["region"] == "WT"]
  assert full["mean"]["WT"]["dice"] == pytest.approx(np.mean(wt))
  assert full["std"]["WT"]["dice"] == pytest.approx(np.std(wt))
  assert full["mean"]["ET"]["hd95"] == pytest.approx(2.0)
  means = [s["mean"]["TC"]["dice"] for s in summary["subsets"].values()]
  assert summary["overall"]["mean"]["TC"]["dice"] == pytest.approx(np.mean(means))
  assert summary["overall"]["n_subsets"] == 15 and summary["overall"]["n_cases"] == 6

  tables.write_summary(tmp_path, summary, title="HeMIS on BraTS")
  assert json.loads((tmp_path / "summary.json").read_text())["subsets"].keys() == \
      summary["subsets"].keys()
  md = (tmp_path / "summary.md").read_text()
  assert md.startswith("# HeMIS on BraTS")
  lines = md.splitlines()
  dice_at = lines.index("## Dice")
  assert lines[dice_at + 2] == "| FLAIR | T1 | T1ce | T2 | n | WT | TC | ET |"
  assert lines[dice_at + 4].startswith("| ● | ○ | ○ | ○ | 6 | ")  # first row: FLAIR only
  assert lines[dice_at + 4 + 14].startswith("| ● | ● | ● | ● | 6 | ")
  assert lines[dice_at + 4 + 15].startswith("| **mean** |")
  assert f"{full['mean']['WT']['dice']:.3f}" in lines[dice_at + 4 + 14]
  assert "## HD95 (mm)" in lines
  assert sorted(os.listdir(tmp_path)) == ["summary.json", "summary.md"]


def test_summarise_other_task_and_partial_subsets():
  wmh = get_task("wmh")
  rows = [r for r in _fake_rows(modalities=wmh.modalities, regions=list(wmh.regions))
          if r["subset"] in ("flair", "t1+t2+flair")]
  summary = tables.summarise(rows, wmh.modalities, wmh.regions)
  assert list(summary["subsets"]) == ["flair", "t1+t2+flair"]
  assert summary["subsets"]["flair"]["symbol"] == "○○●"
  with pytest.raises(ValueError):
    tables.summarise(rows + rows[:1], wmh.modalities, wmh.regions)  # duplicate row


def test_compare_wins_and_p_values(tmp_path):
  base = _fake_rows(seed=1, n_cases=10)
  # Distinct improvements per case: tied differences would make scipy run a slow permutation test.
  better = [dict(r, dice=r["dice"] + 0.05 + 0.001 * int(r["case_id"][4:])) for r in base]
  comparison = tables.compare([("base", base), ("better", better), ("same", base)], MODS,
                                  REGIONS)
  assert comparison["methods"] == ["base", "better", "same"]
  assert comparison["n_cells"] == 45
  assert comparison["wins"] == {"base": 0, "better": 45, "same": 0}
  entry = comparison["subsets"]["flair+t1ce"]
  assert entry["symbol"] == "●○●○" and entry["n_cases"]["WT"] == 10
  assert entry["mean"]["better"]["WT"] == pytest.approx(entry["mean"]["base"]["WT"] + 0.0545)
  for e in comparison["subsets"].values():
    for region in REGIONS:
      assert e["p_value"]["better"][region] < 0.01  # better in every case: exact p = 2 / 2^10
      assert e["p_value"]["same"][region] == 1.0  # identical samples: documented p = 1.0
  assert "base" not in entry["p_value"]

  ties = tables.compare([("a", base), ("b", base)], MODS, REGIONS)
  assert ties["wins"] == {"a": 45, "b": 45}  # ties count for each tied method
  lower = tables.compare([("base", base), ("better", better)], MODS, REGIONS, metric="hd95")
  assert lower["wins"] == {"base": 45, "better": 45}  # same hd95 everywhere

  tables.write_comparison(tmp_path, comparison)
  data = json.loads((tmp_path / "comparison.json").read_text())
  assert data["wins"]["better"] == 45
  md = (tmp_path / "comparison.md").read_text()
  assert "| FLAIR | T1 | T1ce | T2 | n | base | better | same | p (better vs base) | " \
         "p (same vs base) |" in md
  assert "| better | 15 | 15 | 15 | **45** |" in md
  assert "## ET" in md and "## Wins" in md


def test_compare_lower_is_better_and_missing_cases():
  base = _fake_rows(seed=2, n_cases=5)
  worse = [dict(r, hd95=r["hd95"] + 1.0) for r in base if r["case_id"] != "case004"]
  comparison = tables.compare([("base", base), ("worse", worse)], MODS, REGIONS, metric="hd95")
  assert comparison["wins"] == {"base": 45, "worse": 0}
  assert comparison["subsets"]["t1"]["n_cases"]["TC"] == 4  # paired on the shared cases
  only_flair = [r for r in worse if r["subset"] == "flair"]
  partial = tables.compare([("base", base), ("partial", only_flair)], MODS, REGIONS, "hd95")
  assert partial["subsets"]["t1"]["mean"]["partial"]["WT"] is None
  assert partial["subsets"]["t1"]["p_value"]["partial"]["WT"] is None
  json.dumps(partial, allow_nan=False)


def test_paired_wilcoxon_edge_cases():
  assert tables.paired_wilcoxon([], []) is None
  assert tables.paired_wilcoxon([0.5, 0.5], [0.5, 0.5]) == 1.0
  assert 0.0 < tables.paired_wilcoxon([1.0, 2.0, 3.0], [1.5, 1.0, 3.0]) <= 1.0
  p = tables.paired_wilcoxon(np.arange(12) + 1.0, np.zeros(12))
  assert math.isclose(p, 2 / 2 ** 12)


def _png_ok(path):
  data = path.read_bytes()
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_dice_by_subset(tmp_path):
  summary = tables.summarise(_fake_rows(), MODS, REGIONS)
  path = tmp_path / "dice_by_subset.png"
  plots.plot_dice_by_subset(path, summary)
  assert _png_ok(path)
  assert os.listdir(tmp_path) == ["dice_by_subset.png"]


def test_plot_overlays(tmp_path):
  rng = np.random.default_rng(0)
  shape = (24, 28, 16)
  image = rng.normal(size=shape + (4,)).astype(np.float32)
  image[..., 1] = 0.0  # a missing (zeroed) modality must not break the normalisation
  truth = np.zeros(shape, np.int32)
  truth[6:18, 8:20, 4:12] = 2
  truth[9:15, 11:17, 6:10] = 1
  truth[12:15, 14:17, 7:9] = 4
  predictions = {"●○●● flair+t1ce+t2": np.roll(truth, 2, axis=0), "○○○● t2": (truth > 0) * 2}
  path = tmp_path / "overlay_case000.png"
  plots.plot_overlays(path, image, truth, predictions, MODS,
                           label_values=TUMOR.label_values, class_names=TUMOR.class_names,
                           title="case000")
  assert _png_ok(path)
  with pytest.raises(ValueError):
    plots.plot_overlays(path, image[..., :3], truth, predictions, MODS)


# ---------------------------------------------------------------------------------------------
# Cases that genuinely lack modalities


HELD = {"c0": ("flair", "t1ce", "t2"), "c1": ("flair", "t2"), "c2": ("t1ce",),
        "c3": ("t1", "t1ce", "t2")}


def _rows_of_held(held=HELD, offset=0.0):
  """Rows as evaluate_workdir writes them: each case on the subsets it has, then as acquired."""
  rows = []
  for i, (case, modalities) in enumerate(held.items()):
    for subset in subsets.applicable(subsets.all_subsets(MODS), modalities) + [
        subsets.AS_ACQUIRED]:
      size = len(modalities) if subset == subsets.AS_ACQUIRED else len(subset)
      dice = 0.1 * size + 0.01 * i + offset
      values = {r: {"dice": dice, "hd95": 5.0 - size, "assd": 1.0, "sensitivity": dice,
                    "precision": 1.0, "volume_diff_ml": 0.0} for r in REGIONS}
      rows += tables.case_rows(case, subset, values, MODS, acquired=modalities)
  return rows


def test_applicable_subsets_and_held_modalities():
  assert subsets.held_modalities(np.array([True, False, True, False]), MODS) == ("flair", "t1ce")
  every = subsets.all_subsets(MODS)
  assert subsets.applicable(every, ("t2", "flair")) == [("flair",), ("t2",), ("flair", "t2")]
  assert subsets.applicable(every, MODS) == every
  assert subsets.applicable([("t1",)], ("flair",)) == []


def test_summary_counts_the_cases_each_subset_was_scored_on_and_adds_as_acquired(tmp_path):
  rows = _rows_of_held()
  summary = tables.summarise(rows, MODS, REGIONS)
  for key, entry in summary["subsets"].items():
    expected = sum(set(key.split("+")) <= set(held) for held in HELD.values())
    assert entry["n_cases"] == expected > 0, key
  assert "flair+t1" not in summary["subsets"]  # no case has both: not scored, never an error
  assert summary["subsets"]["t1ce"]["n_cases"] == 3 and summary["overall"]["n_cases"] == 4
  acquired = summary["as_acquired"]
  assert acquired["n_cases"] == 4
  assert acquired["acquired"] == {"+".join(h): 1 for h in HELD.values()}
  as_acquired_dice = [0.1 * len(h) + 0.01 * i for i, h in enumerate(HELD.values())]
  assert acquired["mean"]["TC"]["dice"] == pytest.approx(np.mean(as_acquired_dice))
  # The mean row averages the subsets only.
  means = [s["mean"]["WT"]["dice"] for s in summary["subsets"].values()]
  assert summary["overall"]["mean"]["WT"]["dice"] == pytest.approx(np.mean(means))

  summary["metric_conventions"] = metric_conventions()
  summary.update(step=7, step_requested="best", workdir="runs/x")
  tables.write_summary(tmp_path, summary, title="t")
  lines = (tmp_path / "summary.md").read_text().splitlines()
  assert "Checkpoint step 7 (--step best) of runs/x." in lines
  assert any(line.startswith("Metric conventions: HD95 directed_max") for line in lines)
  dice_at = lines.index("## Dice")
  rows_md = lines[dice_at + 4:lines.index("", dice_at + 4)]
  assert rows_md[-2].startswith("| **mean** |")
  assert rows_md[-1] == ("| as acquired |  |  |  | 4 | "
                         + " | ".join(f"{acquired['mean'][r]['dice']:.3f}" for r in REGIONS) + " |")
  flair_t2 = summary["subsets"]["flair+t2"]
  assert f"| ● | ○ | ○ | ● | {flair_t2['n_cases']} |" in "\n".join(rows_md)
  assert json.loads((tmp_path / "summary.json").read_text())["as_acquired"]["n_cases"] == 4


def test_compare_pairs_only_the_cases_both_methods_were_scored_on(tmp_path):
  held = {f"c{i}": MODS if i % 2 else ("flair", "t2") for i in range(12)}
  base = _rows_of_held(held)
  # The other run lacks c10 and c11; distinct improvements (no ties: scipy's exact test is fast).
  other = [dict(r, dice=r["dice"] + 0.01 + 0.002 * int(r["case_id"][1:])) for r in base
           if r["case_id"] not in ("c10", "c11")]
  comparison = tables.compare([("base", base), ("other", other)], MODS, REGIONS)
  entry = comparison["subsets"]["flair"]
  assert entry["n_cases"]["WT"] == 10
  shared = [f"c{i}" for i in range(10)]
  values = lambda rows: [next(r["dice"] for r in rows if r["case_id"] == c
                              and r["subset"] == "flair" and r["region"] == "WT") for c in shared]
  assert entry["mean"]["base"]["WT"] == pytest.approx(np.mean(values(base)))
  assert entry["p_value"]["other"]["WT"] == pytest.approx(
      tables.paired_wilcoxon(values(other), values(base)))
  assert comparison["subsets"]["t1"]["n_cases"]["WT"] == 5  # odd cases below 10 have t1
  acquired = comparison["as_acquired"]
  assert acquired["n_cases"]["TC"] == 10 and acquired["best"]["TC"] == ["other"]
  assert comparison["n_cells"] == 15 * 3 and comparison["wins"]["other"] == 45  # not as acquired
  comparison["metric_conventions"] = metric_conventions()
  tables.write_comparison(tmp_path, comparison, name="comparison_hd95")
  md = (tmp_path / "comparison_hd95.md").read_text()
  assert "| as acquired |  |  |  | 10 |" in md
  comparison = tables.compare([("base", base), ("other", other)], MODS, REGIONS, metric="hd95")
  comparison["metric_conventions"] = metric_conventions()
  tables.write_comparison(tmp_path, comparison, name="comparison_hd95")
  assert "HD95 (mm): directed_max (MONAI/BraTS)" in (tmp_path / "comparison_hd95.md").read_text()


def test_options_fail_with_one_line_before_evaluating():
  from hemijax.evaluation.evaluate import checkpoint_step, parse_subsets_option
  assert parse_subsets_option("t2+flair,t1", MODS) == [("t1",), ("flair", "t2")]
  assert parse_subsets_option("all", MODS) == subsets.all_subsets(MODS)
  for value, words in (("flair,flair", "same subset"), ("flair+t1,t1+flair", "same subset"),
                       ("flair,dwi", "dwi"), ("flair,,t1", "''")):
    with pytest.raises(ValueError, match=words) as e:
      parse_subsets_option(value, MODS)
    assert str(e.value).startswith("--subsets:") and "\n" not in str(e.value)
  assert checkpoint_step("best") == "best" and checkpoint_step("latest") == "latest"
  assert checkpoint_step("12") == 12 and checkpoint_step(3) == 3
  for value in ("abc", "-1", "1.5", ""):
    with pytest.raises(ValueError, match="--step"):
      checkpoint_step(value)


def test_a_report_folder_is_replaced_as_a_whole(tmp_path):
  from hemijax.atomic import replacing_directory
  out = tmp_path / "eval"
  with replacing_directory(out) as tmp:
    (tmp / "cases.csv").write_text("old")
    (tmp / "overlay_gone.png").write_text("old")
  assert sorted(os.listdir(out)) == ["cases.csv", "overlay_gone.png"]
  with pytest.raises(RuntimeError):  # interrupted: the earlier report stays whole
    with replacing_directory(out) as tmp:
      (tmp / "cases.csv").write_text("half")
      raise RuntimeError("killed")
  assert (out / "cases.csv").read_text() == "old" and os.listdir(tmp_path) == ["eval"]
  stale = tmp_path / ".eval.abc-999999999.report-tmp"  # a run killed mid-write (no such pid)
  stale.mkdir()
  with replacing_directory(out) as tmp:
    (tmp / "cases.csv").write_text("new")
  assert os.listdir(out) == ["cases.csv"] and (out / "cases.csv").read_text() == "new"
  assert os.listdir(tmp_path) == ["eval"]  # stale overlays and temporaries are gone
