"""Your own data (issue 20): tasks read from the dataset (`--config.task=auto`), modality names
outside the four BraTS ones, any number of modalities M >= 1.

Datasets are written here with nibabel (tiny volumes), not with the phantom: an nnU-Net-layout
one with channels T2 + PD and a binary label, and a BraTS-style one with five modalities named by
a hemijax_task.json."""
import importlib
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from configs import common, hemis as hemis_config
from hemijax.data import datasets, labels as labels_lib, layouts, tasks
from hemijax.data.__main__ import main as data_cli
from hemijax.data.io import DataError
from hemijax.data.tasks import Task, normalise_modality, task_from_config
from hemijax.evaluation import subsets as subsets_lib
from hemijax.models import METHODS, get_method

SHAPE = (24, 24, 8)
SPACING = 2.0


def _affine():
  affine = np.diag([SPACING, SPACING, SPACING, 1.0])
  affine[:3, 3] = (-20.0, 12.0, 4.0)  # a translation, so the output's affine is checked for real
  return affine


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, _affine()), str(path))
  return path


def _case(seed, num_modalities, num_classes=2):
  """(images (M, *SHAPE) with background 0 outside a brain ellipsoid, label 0..C-1): a lesion
  blob whose classes each have their own intensity in every modality."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in SHAPE], indexing="ij"))
  brain = np.sum((grid / (np.array(SHAPE)[:, None, None, None] / 2.2)) ** 2, axis=0) <= 1
  centre = rng.uniform(-3, 3, 3) * np.array([1, 1, 0.3])
  radius = np.sqrt(np.sum((grid - centre[:, None, None, None]) ** 2, axis=0))
  label = np.zeros(SHAPE, np.uint8)
  for c in range(1, num_classes):
    label[(radius <= 5.5 - 1.5 * c) & brain] = c
  contrast = np.random.default_rng(1).uniform(60, 200, (num_classes, num_modalities))
  images = contrast[label].transpose(3, 0, 1, 2) + rng.normal(0, 5, (num_modalities,) + SHAPE)
  images = np.where(brain, images, 0).astype(np.float32)
  return images, label


def nnunet_t2_pd(root, n=6):
  """nnU-Net raw layout: channels T2 and PD, labels background/lesion."""
  meta = {"name": "Dataset042_T2PD", "channel_names": {"0": "T2", "1": "PD"},
          "labels": {"background": 0, "lesion": 1}, "numTraining": n, "file_ending": ".nii.gz"}
  root.mkdir(parents=True)
  (root / "dataset.json").write_text(json.dumps(meta))
  for i in range(n):
    images, label = _case(i, 2)
    for c in range(2):
      _save(root / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz", images[c])
    _save(root / "labelsTr" / f"case{i:02d}.nii.gz", label)
  return root


FIVE = ("T1", "T1Gd", "T2", "FLAIR", "PD")  # MSSEG's modalities, in their spellings


def brats_five(root, n=6):
  """BraTS-style folders with five modalities and a hemijax_task.json naming them."""
  for i in range(n):
    images, label = _case(100 + i, len(FIVE), num_classes=3)
    for name, image in zip(FIVE, images):
      _save(root / f"ms{i:02d}" / f"ms{i:02d}_{name.lower()}.nii.gz", image)
    _save(root / f"ms{i:02d}" / f"ms{i:02d}_seg.nii.gz", label)
  (root / "hemijax_task.json").write_text(json.dumps({
      "name": "ms", "modalities": list(FIVE),
      "labels": {"background": 0, "lesion": 1, "core": 2},
      "regions": {"lesion": [1, 2], "core": [2]}}))
  return root


def auto_config(root, workdir_cache):
  config = hemis_config.get_config("smoke")
  config.model.conv_impl = "xla"  # the fastest to compile
  config.task = "auto"
  config.data.root = str(root)
  config.data.cache_dir = str(workdir_cache)
  config.data.patch_size = (16, 16)
  config.train.num_steps = 2
  return config


def train(config, workdir):
  """What train.py --config.task=auto does: the task read from the data, then the run."""
  from hemijax.training import loop
  datasets.resolve_task(config)
  loop.train(config, workdir, progress=False)


# ----------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name,expected", [
    ("FLAIR", "flair"), ("flair", "flair"), ("T2-FLAIR", "flair"), ("T2 FLAIR", "flair"),
    ("T1Gd", "t1ce"), ("T1c", "t1ce"), ("T1-Gd", "t1ce"), ("t1ce", "t1ce"), ("t1_ce", "t1ce"),
    ("T2w", "t2"), ("T1w", "t1"), ("T1", "t1"), ("PD", "pd"), ("PDw", "pd"), ("DWI", "dwi"),
    ("ADC", "adc"), ("CT", "ct"), ("PET", "pet"), (" T2star ", "t2star"), ("b-1000", "b-1000")])
def test_normaliser_maps_the_listed_spellings(name, expected):
  assert normalise_modality(name) == expected


@pytest.mark.parametrize("name", ["T2*", "t1+t2", "a/b", "", "  ", "T2 star", "dwi.b1000", "seg",
                                  "Label", "case_id", "x" * 40, "ü"])
def test_odd_modality_names_are_one_line_errors(name):
  with pytest.raises(ValueError, match="--input: ") as e:
    normalise_modality(name, option="--input")
  assert "\n" not in str(e.value)


def test_modality_sets_empty_or_duplicate_are_refused():
  with pytest.raises(ValueError, match="modalities: the modality set is empty"):
    tasks.check_modalities(())
  with pytest.raises(ValueError, match="duplicate"):
    tasks.check_modalities(("T1Gd", "t1ce"))
  assert tasks.check_modalities(("T2", "PD")) == ("t2", "pd")
  with pytest.raises(ValueError, match=r"unknown modality name\(s\) \['pd'\]"):
    tasks.check_modalities(("pd",), allowed=("t1", "t2"))


# ----------------------------------------------------------------------------------------------
# Tasks as data


def test_task_round_trips_through_plain_data_and_a_saved_config():
  task = Task("ms", ("t2", "pd"), (0, 1, 2), ("background", "lesion", "core"),
              {"whole lesion": (1, 2), "core": (2,)})
  assert Task.from_dict(task.to_dict()) == task
  config = ml_collections.ConfigDict(dict(task="auto", task_spec=task.to_dict()))
  saved = json.loads(json.dumps(config.to_dict()))
  back = task_from_config(ml_collections.ConfigDict(saved))
  assert back == task and list(back.regions) == ["whole lesion", "core"]  # order kept
  assert Task.from_dict(dict(task.to_dict(), regions={"core": [2]})).regions == {"core": (2,)}
  for name, builtin in tasks.TASKS.items():  # the presets are valid tasks, as data too
    assert task_from_config(ml_collections.ConfigDict(dict(task=name))) is builtin
    tasks.check_task(builtin, name)
    assert Task.from_dict(builtin.to_dict()) == builtin


@pytest.mark.parametrize("change,match", [
    (dict(label_values=[1, 2, 0]), "must start with the background 0"),
    (dict(label_values=[0]), "at least one other class"),
    (dict(class_names=["background"]), "class_names"),
    (dict(regions={}), "no evaluation region"),
    (dict(regions={"x": [0, 1]}), "region 'x'"),
    (dict(regions={"x": [7]}), "region 'x'"),
    (dict(modalities=[]), "modality set is empty"),
    (dict(modalities=["T2", "t2"]), "duplicate"),
    (dict(label_values=[0, "1"]), "not an integer"),
])
def test_task_data_that_makes_no_task_is_a_one_line_error(change, match):
  data = dict(Task("x", ("t2",), (0, 1), ("background", "lesion"), {"lesion": (1,)}).to_dict(),
              **change)
  with pytest.raises(ValueError, match=match) as e:
    Task.from_dict(data, where="config.task_spec")
  assert str(e.value).startswith("config.task_spec: ") and "\n" not in str(e.value)


def test_auto_config_without_a_task_read_yet_is_a_one_line_error():
  config = common.base_config("hemis", "auto", "smoke")
  assert config.modalities == () and config.task_spec is None
  with pytest.raises(ValueError, match="config.task=auto: the task has not been read"):
    task_from_config(config)
  with pytest.raises(ValueError, match="config.data.root, which is not set"):
    datasets.resolve_task(config)
  config.task = "tumour"
  with pytest.raises(ValueError, match="config.task: unknown task 'tumour'.*'auto'"):
    task_from_config(config)


def test_nnunet_plain_labels_are_classes_and_each_its_own_region():
  declared = labels_lib.parse_declaration({"background": 0, "edema": 2, "necrosis": 1}, "d.json")
  task = labels_lib.task_from_declaration("t", ("t2",), declared, None, "d.json")
  assert task.label_values == (0, 1, 2) and task.class_names == ("background", "necrosis", "edema")
  assert task.regions == {"edema": (2,), "necrosis": (1,)}


def test_nnunet_v2_region_labels_are_evaluation_regions():
  declared = labels_lib.parse_declaration(
      {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
      "d.json")
  task = labels_lib.task_from_declaration("brats", ("flair",), declared, None, "d.json")
  assert task.label_values == (0, 1, 2, 3)
  assert task.class_names == ("background", "label_1", "label_2", "enhancing tumor")
  assert task.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3),
                          "enhancing tumor": (3,)}
  # Read back against the same declaration, the dataset's values are the task's.
  assert labels_lib.mapping_from_declaration(task, declared, "d.json").identity


def test_declared_regions_replace_the_classes_own(tmp_path):
  root = brats_five(tmp_path / "ms", n=1)
  task = layouts.dataset_task(root)
  assert task.name == "ms" and task.modalities == ("t1", "t1ce", "t2", "flair", "pd")
  assert task.label_values == (0, 1, 2) and task.class_names == ("background", "lesion", "core")
  assert task.regions == {"lesion": (1, 2), "core": (2,)}


# ----------------------------------------------------------------------------------------------
# Layouts: tasks from data, one-line errors


def test_verify_nnunet_with_t2_and_pd(tmp_path, capsys):
  root = nnunet_t2_pd(tmp_path / "Dataset042_T2PD", n=2)
  assert data_cli(["verify", "--data", str(root), "--layout", "nnunet"]) == 0
  out = capsys.readouterr().out
  assert "OK: 2 case(s) in the nnunet layout, 0 missing modality file(s)" in out
  assert data_cli(["verify", "--data", str(root), "--task", "auto"]) == 0
  out = capsys.readouterr().out
  assert ("task: Dataset042_T2PD: modalities t2, pd; classes 0=background, 1=lesion; "
          "regions lesion=1") in out
  assert data_cli(["verify", "--data", str(root), "--modalities", "PD"]) == 0


def test_manifest_header_gives_modalities_and_labels_come_from_a_task_file(tmp_path):
  src = nnunet_t2_pd(tmp_path / "nn", n=2)
  data = tmp_path / "data"
  data.mkdir()
  rows = ["case_id,DWI,ADC,label"] + [
      f"c{i},{src}/imagesTr/case{i:02d}_0000.nii.gz,{src}/imagesTr/case{i:02d}_0001.nii.gz,"
      f"{src}/labelsTr/case{i:02d}.nii.gz" for i in range(2)]
  (data / "manifest.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(DataError, match="no labels declared for task=auto") as e:
    layouts.dataset_task(data)
  assert str(data / "hemijax_task.json") in str(e.value)
  (data / "hemijax_task.json").write_text(json.dumps({"labels": {"background": 0, "stroke": 1}}))
  task = layouts.dataset_task(data)
  assert task.modalities == ("dwi", "adc") and task.regions == {"stroke": (1,)}
  assert task.name == "data"
  (data / "hemijax_task.json").write_text(json.dumps({"modalities": ["ADC", "T2"],
                                                      "labels": {"background": 0, "stroke": 1}}))
  with pytest.raises(DataError, match=r"modalities \['t2'\] are not among the manifest's columns"):
    layouts.dataset_task(data)


@pytest.mark.parametrize("content,match", [
    ("{", "cannot read JSON"),
    (json.dumps({"modalities": ["t2"], "labels": {"background": 0, "lesion": 1}, "classes": []}),
     r"unknown key\(s\) \['classes'\]"),
    (json.dumps({"modalities": ["T2*"], "labels": {"background": 0, "lesion": 1}}),
     "'T2\\*' is not a modality name"),
    (json.dumps({"modalities": ["t2", "T2w"], "labels": {"background": 0, "lesion": 1}}),
     "duplicate"),
    (json.dumps({"modalities": "t2", "labels": {"background": 0, "lesion": 1}}),
     "'modalities' must be a list"),
    (json.dumps({"modalities": ["t2"], "labels": {"background": 0}}), "at least one other class"),
    (json.dumps({"modalities": ["t2"], "labels": {"background": 0, "lesion": "x"}}),
     "not an integer"),
    (json.dumps({"modalities": ["t2"], "labels": {"background": 0, "lesion": 1},
                 "regions": {"all": [0, 1]}}), "holds the background value 0"),
    (json.dumps({"modalities": ["t2"], "labels": {"background": 0, "lesion": 1},
                 "regions": {"x": [2]}}), r"value\(s\) \[2\] are not among the labels"),
    (json.dumps({"labels": {"background": 0, "lesion": 1}}), "needs one naming its modalities"),
])
def test_task_file_mistakes_are_one_line_errors_naming_it(tmp_path, content, match):
  root = tmp_path / "data"
  images, label = _case(0, 1)
  _save(root / "c0" / "c0_t2.nii.gz", images[0])
  _save(root / "c0" / "c0_seg.nii.gz", label)
  (root / "hemijax_task.json").write_text(content)
  with pytest.raises(DataError, match=match) as e:
    layouts.dataset_task(root, "brats")
  assert str(e.value).startswith(str(root / "hemijax_task.json")) and "\n" not in str(e.value)


def test_brats_folder_without_a_task_file_needs_one_for_auto(tmp_path):
  root = tmp_path / "data"
  images, label = _case(0, 1)
  _save(root / "c0" / "c0_t2.nii.gz", images[0])
  _save(root / "c0" / "c0_seg.nii.gz", label)
  with pytest.raises(DataError, match="hemijax_task.json: not found"):
    layouts.dataset_task(root)


# ----------------------------------------------------------------------------------------------
# Every method with any number of modalities


def _method_config(name, modalities):
  """A method's smoke config with a task of `modalities` (as task=auto records it)."""
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  config.model.conv_impl = "xla"
  task = Task("own", tuple(modalities), (0, 1), ("background", "lesion"), {"lesion": (1,)})
  if name == "joint":  # trains in the tissue task's label space, on two phantom sets
    config.modalities = tuple(modalities)
    for which in ("tissue_set", "lesion_set"):
      config.data[which].modalities = tuple(modalities[:1])
    return config
  with config.unlocked():
    config.task, config.task_spec, config.modalities = "auto", task.to_dict(), task.modalities
  if name == "urn":  # its healthy pre-training data must come in the task's modalities
    config.pretrain.healthy_modalities = tuple(modalities[:1])
  return config


@pytest.mark.parametrize("num_modalities", [1, 2, 5])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_with_m_modalities(name, num_modalities):
  """Init, every subset's logits and the segmentation loss, traced (shapes, not numbers)."""
  modalities = ("x0", "pd", "dwi", "ct", "pet")[:num_modalities]
  config = _method_config(name, modalities)
  if name == "mlp_impute" and num_modalities == 1:  # nothing is ever missing to impute
    with pytest.raises(ValueError, match="at least two modalities"):
      get_method(config)
    return
  method = get_method(config)
  assert method.modalities == modalities
  spatial = (8,) * method.spatial_dims if method.spatial_dims == 3 else (16, 16)
  masks = np.array([[m in s for m in modalities]
                    for s in subsets_lib.all_subsets(modalities)])
  image = jnp.zeros((len(masks),) + spatial + (num_modalities,), jnp.float32)
  variables = jax.eval_shape(method.init, jax.random.key(0), image, masks)
  logits = jax.eval_shape(method.apply, variables, image, masks)
  assert logits.shape == image.shape[:-1] + (method.num_classes,)
  if name != "joint":
    assert method.num_classes == 2
    batch = {"image": image, "modality_mask": masks,
             "label": jnp.zeros(image.shape[:-1], jnp.int32),
             "valid": jnp.ones(image.shape[:-1], bool)}
    params = variables.pop("params")
    loss, _ = jax.eval_shape(method.loss_fn, params, variables, batch, jax.random.key(0),
                             jnp.zeros((), jnp.int32))
    assert loss.shape == ()


def test_default_subsets_are_all_up_to_the_cap_then_sizes_1_2_m_minus_1_and_m():
  five = ("a", "b", "c", "d", "e")
  assert subsets_lib.default_subsets(five) == subsets_lib.all_subsets(five)
  assert len(subsets_lib.default_subsets(five)) == 31
  six = five + ("f",)
  assert len(subsets_lib.default_subsets(six)) == 63
  eight = tuple("abcdefgh")
  chosen = subsets_lib.default_subsets(eight)
  assert len(chosen) == 8 + 28 + 8 + 1
  assert {len(s) for s in chosen} == {1, 2, 7, 8}
  order = subsets_lib.all_subsets(eight)
  assert chosen == sorted(chosen, key=order.index)


# ----------------------------------------------------------------------------------------------
# End to end: train with task=auto, evaluate, predict


@pytest.fixture(scope="module")
def t2_pd_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("own")
  root = nnunet_t2_pd(base / "Dataset042_T2PD")
  config = auto_config(root, base / "cache")
  workdir = base / "run"
  train(config, workdir)
  return root, workdir


def test_t2_pd_run_records_the_task_read_from_dataset_json(t2_pd_run):
  _, workdir = t2_pd_run
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["task"] == "auto" and saved["modalities"] == ["t2", "pd"]
  assert saved["task_spec"] == {"name": "Dataset042_T2PD", "modalities": ["t2", "pd"],
                                "label_values": [0, 1], "class_names": ["background", "lesion"],
                                "regions": [["lesion", [1]]]}


def test_t2_pd_run_evaluates_its_three_subsets(t2_pd_run, tmp_path):
  from hemijax.evaluation.evaluate import evaluate_workdir
  _, workdir = t2_pd_run
  summary = evaluate_workdir(workdir, split="test", out=tmp_path / "eval", progress=False)
  assert list(summary["subsets"]) == ["t2", "pd", "t2+pd"]
  assert summary["modalities"] == ["t2", "pd"] and summary["regions"] == ["lesion"]
  assert all(entry["n_cases"] == 1 for entry in summary["subsets"].values())


def run_predict(monkeypatch, capsys, *args):
  """predict.py in this process (its `main`, as the command line runs it) -> (exit code, stderr)."""
  import predict
  monkeypatch.setattr(sys, "argv", ["predict.py"] + [str(a) for a in args])
  try:
    predict.main()
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def test_t2_pd_run_predicts_a_label_file_with_the_input_s_affine(t2_pd_run, tmp_path,
                                                                  monkeypatch, capsys):
  root, workdir = t2_pd_run
  t2, pd_ = (root / "imagesTr" / f"case00_{c:04d}.nii.gz" for c in range(2))
  output = tmp_path / "seg.nii.gz"
  code, err = run_predict(monkeypatch, capsys, "--workdir", workdir, "--input", f"T2={t2}",
                          "--input", f"PD={pd_}", "--output", output)
  assert code == 0, err
  written, source = nib.load(str(output)), nib.load(str(t2))
  np.testing.assert_array_equal(written.affine, source.affine)
  assert written.shape == source.shape
  assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1}
  # A modality the run does not have, and a name that is none, are one-line errors.
  for name, needle in (("FLAIR", "--input: unknown modality name(s) ['flair']; known: ['t2', 'pd']"),
                       ("T2*", "--input: 'T2*' is not a modality name")):
    code, err = run_predict(monkeypatch, capsys, "--workdir", workdir, "--input", f"{name}={t2}",
                            "--output", tmp_path / "x.nii.gz")
    assert code == 1 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_five_modalities_are_prepared_in_the_task_file_s_order(tmp_path):
  """The fast sibling of the next test: the task recorded, five channels loaded, 31 subsets."""
  root = brats_five(tmp_path / "ms")
  config = auto_config(root, tmp_path / "cache")
  (tmp_path / "run").mkdir()
  datasets.prepare_run(config, tmp_path / "run")
  assert config.modalities == ("t1", "t1ce", "t2", "flair", "pd")
  assert task_from_config(config).regions == {"lesion": (1, 2), "core": (2,)}
  volume = datasets.load_split(config, "val")[0]
  assert volume.image.shape[-1] == 5 and volume.available.tolist() == [True] * 5
  assert set(np.unique(volume.label).tolist()) == {0, 1, 2}  # class ids
  assert len(subsets_lib.default_subsets(config.modalities)) == 31


@pytest.mark.slow  # ~40 s on 2 cores (compiling); the test above and the T2 + PD run cover CI
def test_five_modalities_train_and_evaluate_31_subsets(tmp_path):
  from hemijax.evaluation.evaluate import evaluate_workdir
  root = brats_five(tmp_path / "ms")
  config = auto_config(root, tmp_path / "cache")
  train(config, tmp_path / "run")
  assert tuple(config.modalities) == ("t1", "t1ce", "t2", "flair", "pd")
  summary = evaluate_workdir(tmp_path / "run", split="test", out=tmp_path / "eval",
                             progress=False)
  assert len(summary["subsets"]) == 31
  assert list(summary["subsets"])[-1] == "t1+t1ce+t2+flair+pd"
  assert summary["regions"] == ["lesion", "core"]
  assert set(summary["subsets"]["pd"]["mean"]) == {"lesion", "core"}
