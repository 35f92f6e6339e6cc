"""Fine-tuning (config.train.init_from): per-modality variables matched by modality name, shared
parts carried when they fit, one-line errors naming what does not fit, init_reset, the record, and
a resumed run that never reads its source again."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hemis as hemis_config
from configs import unet as unet_config
from hemijax.models import get_method
from hemijax.training import checkpoints, init_from
from model_helpers import metrics_records, quick_init, smoke_training_config, write_run

FOUR = ("flair", "t1", "t1ce", "t2")
THREE = ("flair", "t1", "t2")
BACKEND = ("params", "backends", "backend", "Conv_0", "kernel")


def hemis_smoke(modalities=FOUR, **train):
  config = smoke_training_config(hemis_config)
  config.modalities = tuple(modalities)
  config.train.update(train)
  return config


def initial_variables(config, seed):
  """A model's variables drawn with NumPy (no compilation), as `Method.init` shapes them."""
  method = get_method(config)
  m = len(config.modalities)
  image = jnp.zeros((1,) + tuple(config.data.patch_size) + (m,))
  return method, quick_init(method.model, image, jnp.ones((1, m), bool), train=False, seed=seed)


def leaf(variables, path):
  for key in path:
    variables = variables[key]
  return np.asarray(variables)


def flat(variables):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


@pytest.fixture(scope="module")
def four_modality_run(tmp_path_factory):
  config = hemis_smoke(FOUR)
  _, variables = initial_variables(config, seed=0)
  return write_run(tmp_path_factory.mktemp("runs") / "hemis4", config, variables), variables


def test_four_to_three_modalities_keeps_the_shared_backends_and_every_shared_part(
    four_modality_run):
  source, trained = four_modality_run
  config = hemis_smoke(THREE, init_from=str(source))
  method, fresh = initial_variables(config, seed=1)
  got, (record,) = init_from.start_variables(config, method, fresh)
  backends = leaf(got, BACKEND)
  assert backends.shape[0] == 3
  for here, name in enumerate(THREE):   # by name: t2 is slot 3 there, slot 2 here
    np.testing.assert_array_equal(backends[here], leaf(trained, BACKEND)[FOUR.index(name)])
  # Everything that is not per modality is the source's, bit for bit.
  for path in ("classifier", "frontend_0"):
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(leaf(got, ("params", path, name)),
                                    leaf(trained, ("params", path, name)))
  assert record["modalities"] == {"carried": list(THREE), "new": [], "not_used": ["t1ce"]}
  assert record["source"] == str(source) and record["step"] == 5 and record["method"] == "hemis"
  assert record["fresh_variables"] == [] and record["reset"] == []


def test_a_new_modality_starts_fresh_and_the_others_keep_their_backends(tmp_path):
  three = hemis_smoke(THREE)
  _, trained = initial_variables(three, seed=0)
  source = write_run(tmp_path / "hemis3", three, trained)
  config = hemis_smoke(FOUR, init_from=str(source))
  method, fresh = initial_variables(config, seed=1)
  got, (record,) = init_from.start_variables(config, method, fresh)
  for path in jax.tree_util.tree_flatten_with_path(got["params"]["backends"])[0]:
    keys = ("params", "backends") + tuple(k.key for k in path[0])
    for here, name in enumerate(FOUR):
      want = (leaf(fresh, keys)[here] if name == "t1ce"
              else leaf(trained, keys)[THREE.index(name)])
      np.testing.assert_array_equal(leaf(got, keys)[here], want, err_msg=f"{keys} {name}")
  assert record["modalities"] == {"carried": ["flair", "t1", "t2"], "new": ["t1ce"],
                                  "not_used": []}


def test_unet_input_channels_are_matched_by_modality_name(tmp_path):
  """A U-Net has no stacked back ends: its modality axis is the first convolution's input."""
  source_config = smoke_training_config(unet_config)
  _, trained = initial_variables(source_config, seed=0)
  source = write_run(tmp_path / "unet4", source_config, trained)
  config = smoke_training_config(unet_config)
  config.modalities = ("t2", "flair", "t1")
  config.train.init_from = str(source)
  method, fresh = initial_variables(config, seed=1)
  got, _ = init_from.start_variables(config, method, fresh)
  first = ("params", "unet", "down_0", "Conv_0", "kernel")
  assert leaf(got, first).shape[-2] == 3
  for here, name in enumerate(config.modalities):
    np.testing.assert_array_equal(leaf(got, first)[..., here, :],
                                  leaf(trained, first)[..., FOUR.index(name), :])
  deeper = ("params", "unet", "down_1", "Conv_0", "kernel")
  np.testing.assert_array_equal(leaf(got, deeper), leaf(trained, deeper))
  stats = ("batch_stats", "unet", "down_0", "BatchNorm_0", "mean")
  np.testing.assert_array_equal(leaf(got, stats), leaf(trained, stats))


def wmh_config(source, reset=()):
  """Two classes (the wmh task) instead of the tumour's four: the classifier does not fit."""
  config = hemis_smoke(("t1", "t2", "flair"), init_from=str(source), init_reset=reset)
  config.task = "wmh"
  return config


def test_another_number_of_classes_is_one_line_naming_the_parameter(four_modality_run):
  source, _ = four_modality_run
  config = wmh_config(source)
  method, fresh = initial_variables(config, seed=1)
  # Refused from the shapes alone before a run writes anything, and again when loading.
  for attempt in (lambda: init_from.check(config, method),
                  lambda: init_from.start_variables(config, method, fresh)):
    with pytest.raises(init_from.InitFromError) as error:
      attempt()
    message = str(error.value)
    assert "\n" not in message
    assert "classifier/" in message and "config.train.init_reset" in message
    assert f"config.train.init_from={source}" in message


def test_init_reset_starts_the_named_parts_fresh_and_loads_the_rest(four_modality_run):
  source, trained = four_modality_run
  config = wmh_config(source, reset=("classifier",))
  method, fresh = initial_variables(config, seed=1)
  got, (record,) = init_from.start_variables(config, method, fresh)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(leaf(got, ("params", "classifier", name)),
                                  leaf(fresh, ("params", "classifier", name)))
  np.testing.assert_array_equal(leaf(got, ("params", "frontend_0", "kernel")),
                                leaf(trained, ("params", "frontend_0", "kernel")))
  np.testing.assert_array_equal(leaf(got, BACKEND)[0], leaf(trained, BACKEND)[FOUR.index("t1")])
  assert record["reset"] == ["classifier"]
  assert record["fresh_variables"] == ["classifier/bias", "classifier/kernel"]
  config.train.init_reset = ("clasifier",)
  with pytest.raises(init_from.InitFromError, match="'clasifier' names no parameter.*classifier"):
    init_from.start_variables(config, method, fresh)


def test_same_config_and_source_give_the_same_numbers(four_modality_run):
  source, _ = four_modality_run
  config = hemis_smoke(THREE, init_from=str(source))
  method, fresh = initial_variables(config, seed=1)
  first, _ = init_from.start_variables(config, method, fresh)
  second, _ = init_from.start_variables(config, method, fresh)
  jax.tree.map(np.testing.assert_array_equal, first, second)


def test_bad_sources_are_one_line_errors(four_modality_run, tmp_path):
  source, _ = four_modality_run
  empty = tmp_path / "empty"
  empty.mkdir()
  unet_run = tmp_path / "unet"
  checkpoints.save_config(unet_run.mkdir() or unet_run, smoke_training_config(unet_config))
  no_checkpoint = tmp_path / "nockpt"
  checkpoints.save_config(no_checkpoint.mkdir() or no_checkpoint, hemis_smoke())
  cases = [
      (tmp_path / "missing", {}, "no such run folder"),
      (empty, {}, "no config.json"),
      (unet_run, {}, "a 'unet' run; this needs a 'hemis' run"),
      (no_checkpoint, {}, "no checkpoint in"),
      (source, {"init_step": "7"}, "no checkpoint at step 7"),
      (source, {"init_step": "bset"}, "config.train.init_step 'bset'"),
  ]
  for workdir, extra, needle in cases:
    config = hemis_smoke(THREE, init_from=str(workdir), **extra)
    with pytest.raises(ValueError) as error:
      init_from.check(config, get_method(config))
    assert needle in str(error.value) and "\n" not in str(error.value), (needle, error.value)
  config = hemis_smoke(THREE, init_from=str(source))
  config.data.patch_size = (16, 16, 16)
  with pytest.raises(ValueError, match="trained on 2D patches, this run on 3D"):
    init_from.check(config, get_method(config))
  config = hemis_smoke(THREE, init_reset=("classifier",))
  with pytest.raises(ValueError, match="init_reset.*without config.train.init_from"):
    init_from.check(config, get_method(config))


def test_the_training_loop_starts_from_the_source_and_records_it(four_modality_run, tmp_path):
  """One step at learning rate 0: the checkpoint holds the state the run started from."""
  from hemijax.inference.predictor import load_run
  from hemijax.training import loop
  source, trained = four_modality_run
  config = hemis_smoke(THREE, init_from=str(source), num_steps=1, val_cases=0)
  config.optimizer.learning_rate = 0.0
  workdir = tmp_path / "fine_tuned"
  loop.train(config, workdir, progress=False)
  _, _, variables = load_run(workdir, step=1)
  for here, name in enumerate(THREE):
    np.testing.assert_array_equal(leaf(variables, BACKEND)[here],
                                  leaf(trained, BACKEND)[FOUR.index(name)])
  np.testing.assert_array_equal(leaf(variables, ("params", "classifier", "kernel")),
                                leaf(trained, ("params", "classifier", "kernel")))
  (record,) = init_from.read_record(workdir)["sources"]
  assert record["source"] == str(source) and record["step"] == 5
  assert record["modalities"]["not_used"] == ["t1ce"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["train"]["init_from"] == str(source)


def resumable_copy(workdir, to):
  """A copy of a finished two-step run as if killed right after step 1's checkpoint."""
  shutil.copytree(workdir, to)
  shutil.rmtree(to / "checkpoints" / "2")
  return to


@pytest.fixture
def source_moved_away(four_modality_run):
  """The source run renamed for the duration of a test: a run that read it would fail."""
  source, _ = four_modality_run
  moved = source.with_name("moved_away")
  source.rename(moved)
  yield
  moved.rename(source)


def test_a_new_run_checks_its_source_first_and_a_resumed_one_does_not(
    four_modality_run, tmp_path, monkeypatch, source_moved_away):
  """The fast sibling of the slow test below: the training itself is stubbed out."""
  from hemijax.training import loop
  source, _ = four_modality_run
  config = hemis_smoke(THREE, init_from=str(source), num_steps=2)
  started = []
  monkeypatch.setattr(loop, "_train", lambda *args: started.append(args[1]) or {})
  fresh = tmp_path / "fresh"
  with pytest.raises(init_from.InitFromError, match="no such run folder"):
    loop.train(config, fresh, progress=False)
  assert not fresh.exists() and not started   # refused before anything is written
  _, variables = initial_variables(config, seed=1)
  resumed = write_run(tmp_path / "resumed", config, variables, step=1)  # stopped after step 1
  loop.train(config, resumed, progress=False)
  assert started == [resumed]


@pytest.mark.slow
def test_a_resumed_run_does_not_read_its_source_again(four_modality_run, tmp_path):
  """Killed after step 1 of 2 (and the source moved away): resuming gives the numbers of the
  uninterrupted run, without reading the source."""
  from hemijax.inference.predictor import load_run
  from hemijax.training import loop
  source, _ = four_modality_run
  config = hemis_smoke(THREE, init_from=str(source), num_steps=2, checkpoint_every=1,
                       val_cases=0, keep_checkpoints=4)
  workdir = tmp_path / "uninterrupted"
  loop.train(config, workdir, progress=False)
  resumed = resumable_copy(workdir, tmp_path / "resumed")
  moved = source.with_name("moved_away")
  source.rename(moved)
  try:
    loop.train(config, resumed, progress=False)
  finally:
    moved.rename(source)
  assert [r["loss"] for r in metrics_records(resumed) if r["split"] == "train"] == [
      r["loss"] for r in metrics_records(workdir) if r["split"] == "train"]
  got, want = flat(load_run(resumed, step=2)[2]), flat(load_run(workdir, step=2)[2])
  _, _, start = load_run(workdir, step=1)
  assert any(not np.array_equal(want[k], v) for k, v in flat(start).items())   # it trained
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


METHOD_CONFIGS = ("hemis", "unet", "mlp_impute", "urn", "pimms", "disentangle", "joint")


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_every_method_matches_its_modalities_by_name(name, tmp_path):
  """Without knowing the method: a run on the modalities in reverse order from one in the config's
  order takes each modality's weights from the slot of the same name, and back again gives the
  original bit for bit. Variables that depend on the modalities otherwise (MLP imputation's one
  MLP per pattern of modalities) are refused by name unless reset."""
  import importlib
  original = smoke_training_config(importlib.import_module(f"configs.{name}"))
  modalities = tuple(original.modalities)
  _, trained = initial_variables(original, seed=0)
  source = write_run(tmp_path / "source", original, trained)
  reverse = smoke_training_config(importlib.import_module(f"configs.{name}"))
  reverse.modalities = modalities[::-1]
  reverse.train.init_from = str(source)
  method, fresh = initial_variables(reverse, seed=1)
  resets = ()
  try:
    init_from.start_variables(reverse, method, fresh)
  except init_from.InitFromError as e:
    assert name == "mlp_impute" and "imputer/" in str(e) and "their order" in str(e), e
    resets = ("imputer",)
    reverse.train.init_reset = resets
  reversed_variables, _ = init_from.start_variables(reverse, method, fresh)
  axes = init_from.modality_axes(reverse, method)
  stacked = [p for p, a in axes.items() if a == ((0, 1),) and p[1] not in resets]
  assert stacked or name in ("unet", "mlp_impute")   # theirs: one input channel per modality
  for path in stacked:
    got, want = leaf(reversed_variables, path), leaf(trained, path)
    for here, modality in enumerate(reverse.modalities):
      np.testing.assert_array_equal(got[here], want[modalities.index(modality)], err_msg=path)
  moved = [p for p, a in axes.items() if a and p[1] not in resets]
  assert any(not np.array_equal(leaf(reversed_variables, p), leaf(trained, p)) for p in moved)

  middle = write_run(tmp_path / "reversed", reverse, reversed_variables)
  back = smoke_training_config(importlib.import_module(f"configs.{name}"))
  back.train.update(init_from=str(middle), init_reset=resets)
  method, fresh = initial_variables(back, seed=2)
  restored, _ = init_from.start_variables(back, method, fresh)
  for key, value in flat(trained).items():
    if not any(f"'{r}'" in key for r in resets):
      np.testing.assert_array_equal(flat(restored)[key], value, err_msg=key)
