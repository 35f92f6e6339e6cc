"""evaluate.py on data that genuinely lacks modalities (issue 18), --compare refusals, report
folders written as a whole and one-line option errors: a HeMIS smoke run trained for 2 steps on
the built-in phantom with files left out, and BraTS-layout copies of it with more files deleted.

Every expected count is taken from the files on disk, not from the library's view of them."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import hemis as hemis_config
from hemijax.data import datasets
from hemijax.data.tasks import get_task
from hemijax.evaluation import subsets as subset_lib
from hemijax.evaluation import tables
from hemijax.evaluation.evaluate import evaluate_workdir
from hemijax.training import loop
from model_helpers import smoke_training_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK = get_task("tumor")
MODS = TASK.modalities
EVERY = subset_lib.all_subsets(MODS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, phantom root): 2 training steps on a phantom whose cases miss modality files."""
  config = smoke_training_config(hemis_config)
  config.data.phantom_missing_rate = 0.5
  config.train.num_steps = 2
  workdir = tmp_path_factory.mktemp("runs") / "hemis"
  loop.train(config, workdir, progress=False)
  return workdir, datasets.dataset_root(config)


def files_present(root) -> dict[str, tuple[set, bool]]:
  """case id -> (modalities with a file, has a label file), from the BraTS-layout folder."""
  cases = {}
  for folder in sorted(p for p in pathlib.Path(root).iterdir() if p.is_dir()):
    names = {p.name for p in folder.iterdir()}
    held = {m for m in MODS if f"{folder.name}_{m}.nii.gz" in names}
    cases[folder.name] = (held, f"{folder.name}_seg.nii.gz" in names)
  return cases


def expected_counts(*presents) -> dict[str, int]:
  """Subset key -> cases labelled in every `files_present` view that have all of its modalities in
  every one (one view: a single evaluation; two: the cases a comparison pairs)."""
  ids = set.intersection(*(set(p) for p in presents))
  return {"+".join(subset): sum(all(p[c][1] and set(subset) <= p[c][0] for p in presents)
                                for c in ids)
          for subset in EVERY}


def copy_with_deletions(root, dest, delete) -> pathlib.Path:
  """A BraTS-layout copy of `root` without splits.json, minus the files `delete(case, held)`
  names (modalities, or "seg")."""
  shutil.copytree(root, dest, ignore=shutil.ignore_patterns("splits.json", "phantom.json"))
  for case, (held, _) in files_present(dest).items():
    for name in delete(case, sorted(held)):
      (dest / case / f"{case}_{name}.nii.gz").unlink()
  return dest


def check_counts(summary, counts):
  for key, n in counts.items():
    if n:
      assert summary["subsets"][key]["n_cases"] == n, key
    else:  # applies to no case: left out of the tables, never an error
      assert key not in summary["subsets"]
      assert any(entry.endswith(f" {key}") for entry in summary["not_applicable"])


def test_phantom_with_missing_files_scores_each_case_on_the_subsets_it_has(run, tmp_path):
  workdir, root = run
  present = files_present(root)
  assert any(len(held) < len(MODS) for held, _ in present.values())  # the test needs missing data
  out = tmp_path / "eval"
  summary = evaluate_workdir(workdir, split="all", out=out, progress=False)
  counts = expected_counts(files_present(root))
  check_counts(summary, counts)
  assert summary["as_acquired"]["n_cases"] == len(present)
  acquired = ["+".join(m for m in MODS if m in held) for held, _ in present.values()]
  assert summary["as_acquired"]["acquired"] == {key: acquired.count(key) for key in acquired}
  rows = tables.read_cases_csv(out / "cases.csv")
  scored = {(r["case_id"], r["subset"]) for r in rows}
  assert scored == {(c, "+".join(s)) for c, (held, _) in present.items()
                    for s in EVERY if set(s) <= held} | {
                        (c, subset_lib.AS_ACQUIRED) for c in present}
  # The checkpoint evaluated and the metric conventions are recorded.
  best = json.loads((workdir / "best.json").read_text())["step"]
  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk["step"] == summary["step"] == best
  assert on_disk["metric_conventions"]["hd95"].startswith("directed_max")
  md = (out / "summary.md").read_text()
  assert f"checkpoint step {best}" in md.splitlines()[0] and "Metric conventions:" in md
  assert f"| as acquired |  |  |  | {len(present)} |" in md

  # A second evaluation into the same folder replaces it whole: the test split has one case,
  # so the earlier run's other overlays go away.
  test_ids = json.loads((root / "splits.json").read_text())["test"]
  evaluate_workdir(workdir, out=out, progress=False)
  overlays = sorted(p.name for p in out.iterdir() if p.name.startswith("overlay_"))
  assert overlays == [f"overlay_{c}.png" for c in test_ids]
  assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temporary folder left


def test_layout_folder_with_deleted_files_unlabelled_case_and_compare(run, tmp_path, capsys):
  workdir, root = run
  cases = sorted(files_present(root))
  unlabelled = cases[1]

  def delete(case, held):
    if case == unlabelled:
      return ["seg"]
    return held[:1] if case == cases[0] and len(held) > 1 else []

  data = copy_with_deletions(root, tmp_path / "data", delete)
  with pytest.raises(ValueError, match="no split file.*--split all") as e:
    evaluate_workdir(workdir, data=data, layout="brats", out=tmp_path / "refused", progress=False)
  assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()

  other = tmp_path / "other"  # another run, evaluated before the folder lost more files
  summary = evaluate_workdir(workdir, data=data, layout="brats", split="all",
                             out=other / "eval", progress=False)
  shutil.copy(workdir / "config.json", other / "config.json")
  assert f"case {unlabelled} left out" in capsys.readouterr().err
  assert summary["left_out"] == {unlabelled: "no label file"}
  before = files_present(data)
  check_counts(summary, expected_counts(before))
  assert summary["as_acquired"]["n_cases"] == len(cases) - 1
  assert unlabelled not in {r["case_id"] for r in tables.read_cases_csv(other / "eval" /
                                                                          "cases.csv")}

  last = cases[-1]
  for name in sorted(before[last][0])[1:]:  # the last case keeps one modality only
    (data / last / f"{last}_{name}.nii.gz").unlink()
  out = tmp_path / "compared"
  summary = evaluate_workdir(workdir, data=data, layout="brats", split="all", out=out,
                             compare=[other], progress=False)
  check_counts(summary, expected_counts(files_present(data)))
  counts = expected_counts(before, files_present(data))  # what both evaluations scored
  for metric in ("dice", "assd", "hd95"):
    name = "comparison" if metric == "dice" else f"comparison_{metric}"
    comparison = json.loads((out / f"{name}.json").read_text())
    for key, n in counts.items():
      got = comparison["subsets"].get(key, {}).get("n_cases", {r: 0 for r in TASK.regions})
      assert got == {r: n for r in TASK.regions}, key
    assert set(comparison["as_acquired"]["n_cases"].values()) == {len(cases) - 1}
  assert "HD95 (mm): directed_max" in (out / "comparison_hd95.md").read_text()
  assert summary["reports"][-1] == str(out / "comparison.md")


def test_compare_refuses_another_task_and_runs_without_shared_cases(run, tmp_path):
  workdir, root = run
  evaluated = tmp_path / "evaluated"
  evaluate_workdir(workdir, out=evaluated / "eval", progress=False)
  saved = json.loads((workdir / "config.json").read_text())

  other_task = tmp_path / "wmh_run"
  shutil.copytree(evaluated / "eval", other_task / "eval")
  (other_task / "config.json").write_text(json.dumps(dict(saved, task="wmh")))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="--compare: .*wmh_run.*task 'wmh'") as e:
    evaluate_workdir(workdir, out=out, compare=[other_task], progress=False)
  assert "\n" not in str(e.value)

  elsewhere = tmp_path / "elsewhere"
  (elsewhere / "eval").mkdir(parents=True)
  rows = tables.read_cases_csv(evaluated / "eval" / "cases.csv")
  tables.write_cases_csv(elsewhere / "eval" / "cases.csv",
                         [dict(r, case_id=f"other_{r['case_id']}") for r in rows])
  (elsewhere / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="--compare: .*elsewhere was evaluated on no case") as e:
    evaluate_workdir(workdir, out=out, compare=[elsewhere], progress=False)
  assert "\n" not in str(e.value) and not out.exists()

  shutil.copy(workdir / "config.json", evaluated / "config.json")
  copy = copy_with_deletions(root, tmp_path / "copy", lambda case, held: [])
  with pytest.raises(ValueError, match=f"--compare: .*evaluated was evaluated on {root}, not "):
    evaluate_workdir(workdir, data=copy, split="all", out=out, compare=[evaluated],
                     progress=False)
  assert not out.exists()


def test_a_requested_subset_no_case_has_is_refused(run, tmp_path):
  workdir, root = run
  # Every case lacks at least its first modality file (cases with a single file keep it).
  data = copy_with_deletions(root, tmp_path / "data", lambda case, held: held[:1]
                             if len(held) == len(MODS) else [])
  with pytest.raises(ValueError, match="--subsets: no case of .* flair\\+t1\\+t1ce\\+t2$"):
    evaluate_workdir(workdir, data=data, layout="brats", split="all",
                     subsets="flair,flair+t1+t1ce+t2", out=tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def cli(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "evaluate.py"] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_help_and_one_line_errors(run, tmp_path):
  workdir, _ = run
  help_text = cli(["--help"]).stdout
  assert "a dataset with neither needs --split all" in help_text
  assert "--subsets all|flair+t1,t2" in help_text
  for args, words in ((["--step", "abc"], "--step"), (["--subsets", "flair,flair"], "--subsets"),
                      (["--subsets", "flair,dwi"], "dwi")):
    proc = cli([f"--workdir={workdir}", f"--out={tmp_path / 'out'}"] + args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and words in lines[0]
  assert not (tmp_path / "out").exists()


def test_an_interrupted_evaluation_resumes_with_the_cases_it_had_not_scored(run, tmp_path,
                                                                           monkeypatch):
  from hemijax.evaluation import evaluate as evaluate_lib
  workdir, root = run
  whole = evaluate_workdir(workdir, split="all", out=tmp_path / "whole", progress=False)
  n_cases = len(files_present(root))
  assert n_cases > evaluate_lib.OVERLAY_CASES + 2  # else nothing would be skipped
  score, calls = evaluate_lib._score_case, []

  def scoring(stop_after):
    def counted(*args, **kwargs):
      if len(calls) == stop_after:
        raise KeyboardInterrupt
      calls.append(args[1].case_id)
      return score(*args, **kwargs)
    return counted

  out = tmp_path / "eval"
  saved = evaluate_lib.OVERLAY_CASES + 2
  monkeypatch.setattr(evaluate_lib, "_score_case", scoring(saved))
  with pytest.raises(KeyboardInterrupt):
    evaluate_workdir(workdir, split="all", out=out, progress=False)
  assert not out.exists()
  partial = tmp_path / ".eval.cases.partial.jsonl"
  with open(partial, "a") as f:
    f.write('{"case_id": "cut sh')  # the line being written when the process was killed
  calls.clear()
  monkeypatch.setattr(evaluate_lib, "_score_case", scoring(None))
  resumed = evaluate_workdir(workdir, split="all", out=out, progress=False)
  # The overlays' cases again, then only those not scored before.
  assert len(calls) == evaluate_lib.OVERLAY_CASES + n_cases - saved
  assert (out / "cases.csv").read_text() == (tmp_path / "whole" / "cases.csv").read_text()
  assert resumed["subsets"] == whole["subsets"]
  assert not partial.exists()

  # Scored cases are reused only for the same checkpoint, data, split, subsets and options.
  monkeypatch.setattr(evaluate_lib, "_score_case", scoring(saved))
  with pytest.raises(KeyboardInterrupt):
    evaluate_workdir(workdir, split="all", out=out, progress=False)
  calls.clear()
  monkeypatch.setattr(evaluate_lib, "_score_case", scoring(None))
  evaluate_workdir(workdir, split="all", out=out, progress=False,
                   metric_options={"hd95_convention": "pooled"})
  assert len(calls) == n_cases
