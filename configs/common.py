"""Fields every method's config shares; each method file fills in model, loss, dropout, optimiser.

Presets: `get_config("demo")` is a base preset (paper | demo | smoke); a method with variants
applies one on top, named after an underscore (`demo_dropout`, `smoke_hard`): `config_with_variant`.
"""
import functools
from typing import Callable

import ml_collections

from hemijax.data.tasks import AUTO, get_task
from hemijax.nn import augment

PRESETS = ("paper", "demo", "smoke")


def base_config(method: str, task: str, preset: str) -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  config.method = method
  config.preset = preset
  config.seed = 0
  # A built-in task, or "auto": the dataset's own (modalities, classes, regions), read from
  # config.data.root when the run starts and recorded in task_spec and modalities.
  config.task = task
  config.task_spec = None
  config.modalities = () if task == AUTO else get_task(task).modalities   # model slots, in order

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
      # None: $HEMIJAX_CACHE, else ~/.cache/hemijax; made absolute and recorded when a run starts.
      cache_dir=ml_collections.FieldReference(None, field_type=str),
      # None: the dataset's splits.json, else a seeded split written to WORKDIR/splits.json.
      splits_file=ml_collections.FieldReference(None, field_type=str),
      target_spacing=ml_collections.FieldReference(None, field_type=float),
      patch_size=(64, 64),
      batch_size={"paper": 32, "demo": 8, "smoke": 2}[preset],
      sampling="uniform",
      balanced_fraction=0.0,
      # The batch is drawn as this many independently keyed shares (hemijax.training.sharding);
      # None: one per process, recorded when the run starts.
      batch_shares=ml_collections.FieldReference(None, field_type=int),
  ))
  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      log_every={"paper": 100, "demo": 50, "smoke": 1}[preset],
      eval_every={"paper": 1000, "demo": 250, "smoke": 3}[preset],
      checkpoint_every={"paper": 1000, "demo": 250, "smoke": 3}[preset],
      keep_checkpoints=2,
      patience=ml_collections.FieldReference(None, field_type=int),  # early stopping, in evals
      val_cases={"paper": 10, "demo": 4, "smoke": 1}[preset],
      # Fine-tuning (hemijax.training.init_from): a new run starts from the variables of the run
      # in this workdir (same method; per-modality parts matched by modality name, a new
      # modality starts fresh); None: from scratch. Read when the run starts, never on resume.
      init_from=ml_collections.FieldReference(None, field_type=str),
      init_step="best",   # that run's checkpoint: best (as evaluation picks it), latest, or N
      # Parameters or modules (top-level names, or paths like "frontend_0/kernel") that start
      # fresh instead of being loaded, e.g. ("classifier",) for another number of classes.
      init_reset=(),
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


# A named variant: edits applied on top of a base preset's config.
Variant = Callable[[ml_collections.ConfigDict], None]


def config_with_variant(preset: str, config_file: str,
                        preset_config: Callable[[str], ml_collections.ConfigDict],
                        variants: dict[str, Variant], default: str) -> ml_collections.ConfigDict:
  """`preset_config(base)` with the named variant applied on top: "demo" is the demo preset with
  the `default` variant, "demo_hard" the demo preset with variant "hard"."""
  base, _, variant = preset.partition("_")
  variant = variant or default
  if base not in PRESETS or variant not in variants:
    choices = [p if name == default else f"{p}_{name}" for p in PRESETS for name in variants]
    raise ValueError(f"{config_file}: unknown preset {preset!r}; choose one of {choices}")
  config = preset_config(base)
  variants[variant](config)
  config.preset = preset
  return config


def recorded_variants(*names: str) -> dict[str, Variant]:
  """Variants that set `config.variant` alone: the method's build() reads it."""
  return {name: functools.partial(_set_variant, name) for name in names}


def _set_variant(name: str, config: ml_collections.ConfigDict) -> None:
  config.variant = name


def optimizer(name: str, learning_rate: float, *, weight_decay: float = 0.0,
              schedule: str = "constant", warmup_steps: int = 0,
              **extra) -> ml_collections.ConfigDict:
  """An optimiser section (hemijax.training.optim); `extra`: momentum, nesterov, power."""
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate, weight_decay=weight_decay, schedule=schedule,
      warmup_steps=warmup_steps, **extra))


def truncated_geometric_dropout(theta: float, min_kept: int = 1) -> ml_collections.ConfigDict:
  """Modality dropout that drops a truncated geometric number of modalities (U-Net, URN)."""
  return ml_collections.ConfigDict(dict(name="truncated_geometric", theta=theta,
                                        min_kept=min_kept))


def curriculum_dropout(warmup_steps: int, drop_count_probs) -> ml_collections.ConfigDict:
  """All modalities for `warmup_steps`, then k dropped with P(k) = drop_count_probs[k] (HeMIS,
  PIMMS)."""
  return ml_collections.ConfigDict(dict(name="curriculum", warmup_steps=warmup_steps,
                                        drop_count_probs=tuple(drop_count_probs)))
