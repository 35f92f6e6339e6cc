"""Fields every method's config shares; each method file fills in model, loss, dropout, optimiser."""
import ml_collections

from hemijax.data.tasks import get_task
from hemijax.nn import augment

PRESETS = ("paper", "demo", "smoke")


def base_config(method: str, task: str, preset: str) -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  config.method = method
  config.preset = preset
  config.seed = 0
  config.task = task
  config.modalities = get_task(task).modalities   # model slots, in this order

  config.data = ml_collections.ConfigDict(dict(
      root=ml_collections.FieldReference(None, field_type=str),  # None: the built-in phantom
      layout="auto",
      # Built-in phantom (used when root is None): generated once into cache_dir.
      phantom_subjects={"paper": 60, "demo": 30, "smoke": 6}[preset],
      phantom_seed=0,
      phantom_spacing=2.0 if preset != "smoke" else 4.0,
      phantom_missing_rate=0.0,
      phantom_protocol="default",
      # A test split acquired with another protocol (e.g. "heldout"), as PIMMS evaluates.
      phantom_test_protocol=ml_collections.FieldReference(None, field_type=str),
      phantom_lesions=False,      # tissue task: also label lesions (class 4)
      phantom_modalities=ml_collections.FieldReference(None, field_type=tuple),  # None: all
      cache_dir=".cache/hemijax",
      target_spacing=ml_collections.FieldReference(None, field_type=float),
      patch_size=(64, 64),
      batch_size={"paper": 32, "demo": 8, "smoke": 2}[preset],
      sampling="uniform",
      balanced_fraction=0.0,
  ))
  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      log_every={"paper": 100, "demo": 50, "smoke": 1}[preset],
      eval_every={"paper": 1000, "demo": 250, "smoke": 3}[preset],
      checkpoint_every={"paper": 1000, "demo": 250, "smoke": 3}[preset],
      keep_checkpoints=2,
      patience=ml_collections.FieldReference(None, field_type=int),  # early stopping, in evals
      val_cases={"paper": 10, "demo": 4, "smoke": 1}[preset],
  ))
  config.eval = ml_collections.ConfigDict(dict(
      roi_size=ml_collections.FieldReference(None, field_type=tuple),  # None: whole slice/volume
      overlap=0.5, sw_batch_size=4, blend="gaussian",
  ))
  return config


def add_augment(config: ml_collections.ConfigDict, preset: str) -> None:
  """`config.augment` (hemijax.nn.augment): on in `paper` and `demo`, off in `smoke` (tests)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  config.augment = augment.default_config(enabled=preset != "smoke")
