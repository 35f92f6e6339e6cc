r"""PIMMS (Varsavsky et al. 2018) on the built-in WMH phantom (T1, T2, FLAIR), 2D slices.

  python train.py --config configs/pimms.py:demo_soft --workdir runs/pimms_soft
  python evaluate.py --workdir runs/pimms_soft --compare runs/pimms_hemis   # + classifier accuracy

Presets: `paper` (36-layer residual classifier trained on batches of 64; HeMIS 48 maps, 5x5
kernels, 21x21 final conv; 100x100 patches; Adam 3e-4, weight decay 1e-4; binary Dice loss;
γ = 1e-4), `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests).

Dice per example (`config.loss.dice_reduction="example"`, every preset): each example's Dice is
computed on its own and the batch averages them. Pooled over the batch ("batch"), the Dice loss
pushes an example that does not yet find its lesions towards predicting nothing whenever the rest
of the batch is segmented well; where one scan fills one slot (variance channel 0: the hemis and
hard variants) single-modality examples learned to predict nothing (Dice 0.000 on every
single-modality subset). docs/methods.md (PIMMS) has the diagnosis and its numbers.

Online variant: λ(i) = λ0 exp(-γ i) (`config.loss.class_weight`, `config.loss.class_weight_decay`).
The paper's γ = 1e-4 is sized for its long runs: over the demo's 800 steps λ would never fall below
exp(-0.08), so the demo scales γ to its run length, γ = 5 / train.num_steps (λ falls to exp(-5)
by the end); set `--config.loss.class_weight_decay` again if you change the demo's num_steps.

Soft variant: every slot gets its weighted sum of the scans (Eq. 1) and is available to the
segmenter (`config.model.soft_availability="all"`); "argmax" (a slot is available only if some
scan's argmax points to it) is kept as an option. The variant (hemis | soft | hard | online, default soft)
is `config.variant`: append it to the preset (`:demo_hard`, `:smoke_online`) or override it
(`--config.variant=hard`).
"""
import ml_collections

from configs import common
from configs import hemis as hemis_config

VARIANTS = common.recorded_variants("hemis", "soft", "hard", "online")


def preset_config(preset: str) -> ml_collections.ConfigDict:
  """A base preset's config (the variant is applied on top)."""
  config = common.base_config(method="pimms", task="wmh", preset=preset)
  common.add_augment(config, preset)
  # The segmenter's settings are HeMIS' (demo: narrower, below).
  config.model = hemis_config.hemis_model(preset)
  config.model.update(dict(
      max_scans=6,   # inputs are padded to this many scans: one compiled function for any N
      # The paper's 36-layer residual classifier: 1 stem + 2 x 17 blocks + 1 dense layer.
      classifier_features=(64, 128, 256, 512), classifier_blocks=(3, 4, 6, 4),
      classifier_kernel=3,
      soft_availability="all"))   # soft mapping: every slot feeds the segmenter (Eq. 1)
  # Binary Dice loss; λ(i) = class_weight * exp(-class_weight_decay * i) weighs L_class (online).
  # dice_reduction "example": one Dice per example, averaged over the batch (how NiftyNet reduces
  # a segmentation loss); "batch" pools the batch, under which single-modality examples learned
  # nothing (module docstring).
  config.loss = ml_collections.ConfigDict(dict(
      dice_weight=1.0, ce_weight=0.0, class_weights=None, class_weight=1.0,
      class_weight_decay=1e-4, dice_reduction="example"))
  config.dropout = common.curriculum_dropout(2000, (0.5, 0.3, 0.2))
  config.optimizer = common.optimizer("adam", 3e-4, weight_decay=1e-4)
  # The offline classifier stage (variants soft and hard).
  # batch_size None: config.data.batch_size.
  config.classifier = ml_collections.ConfigDict(dict(
      num_steps=5000, optimizer=common.optimizer("adam", 3e-4, weight_decay=1e-4).to_dict(),
      batch_size=ml_collections.FieldReference(64, field_type=int)))
  config.data.patch_size = (100, 100)
  config.data.sampling = "balanced"
  config.data.balanced_fraction = 0.5
  config.train.num_steps = 20000

  if preset == "demo":
    # Sized for a shared 2-core CPU: narrow layers, 3x3 kernels, 48x48 slices, batch 4.
    config.model.update(classifier_features=(8, 16, 32), classifier_blocks=(1, 1, 1),
                        backend_features=(12, 12), frontend_kernel=3, final_kernel=3)
    config.loss.ce_weight = 1.0   # Dice alone starts slowly on small lesions in short runs
    # Short runs: all modalities for 100 steps, then single modalities in 40 % of batches.
    config.dropout.update(warmup_steps=100, drop_count_probs=(0.3, 0.3, 0.4))
    config.optimizer.update(learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.classifier.num_steps = 1000
    config.classifier.optimizer.update(learning_rate=2e-3)
    config.classifier.batch_size = None
    config.data.patch_size = (48, 48)
    config.data.batch_size = 4
    config.train.num_steps = 800
    # γ scaled to the run length (the paper's 1e-4 keeps λ above 0.92 over 800 steps).
    config.loss.class_weight_decay = 5.0 / config.train.num_steps
  elif preset == "smoke":
    config.model.update(max_scans=4, classifier_features=(4, 8), classifier_blocks=(1, 1))
    config.dropout.warmup_steps = 2
    config.optimizer.update(learning_rate=1e-3)
    config.classifier.num_steps = 3
    config.classifier.batch_size = None
    config.data.patch_size = (32, 32)
    config.train.num_steps = 6
  return config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  return common.config_with_variant(preset, "configs/pimms.py", preset_config, VARIANTS, "soft")
