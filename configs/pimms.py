r"""PIMMS (Varsavsky et al. 2018) on the built-in WMH phantom (T1, T2, FLAIR), 2D slices.

  python train.py --config configs/pimms.py:demo_soft --workdir runs/pimms_soft
  python evaluate.py --workdir runs/pimms_soft --compare runs/pimms_hemis   # + classifier accuracy

Presets: `paper` (36-layer residual classifier; HeMIS 48 maps, 5x5 kernels, 21x21 final conv;
Adam 3e-4, weight decay 1e-4; binary Dice loss; γ = 1e-4), `demo` (default; minutes on 2 CPU
cores), `smoke` (seconds, for tests). The variant (hemis | soft | hard | online, default soft)
is `config.model.variant`: append it to the preset (`:demo_hard`, `:smoke_online`) or override
it (`--config.model.variant=hard`).
"""
import ml_collections

from configs import common

VARIANTS = ("hemis", "soft", "hard", "online")


def _split_preset(preset: str) -> tuple[str, str]:
  """'demo' -> ('demo', 'soft'); 'demo_hard' -> ('demo', 'hard')."""
  name, _, variant = preset.partition("_")
  variant = variant or "soft"
  if variant not in VARIANTS:
    raise ValueError(f"unknown PIMMS variant {variant!r} in preset {preset!r}; "
                     f"choose one of {VARIANTS}")
  return name, variant


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  preset, variant = _split_preset(preset)
  config = common.base_config(method="pimms", task="wmh", preset=preset)
  common.add_augment(config, preset)
  config.model = ml_collections.ConfigDict(dict(
      variant=variant,
      max_scans=6,   # inputs are padded to this many scans: one compiled function for any N
      # The paper's 36-layer residual classifier: 1 stem + 2 x 17 blocks + 1 dense layer.
      classifier_features=(64, 128, 256, 512), classifier_blocks=(3, 4, 6, 4), classifier_kernel=3,
      backend_features=(48, 48), backend_kernel=5, pool_window=2,
      frontend_features=(16,), frontend_kernel=5, final_kernel=21, conv_impl="auto"))
  # Binary Dice loss; λ(i) = class_weight * exp(-class_weight_decay * i) weighs L_class (online).
  config.loss = ml_collections.ConfigDict(dict(
      dice_weight=1.0, ce_weight=0.0, class_weights=None, class_weight=1.0,
      class_weight_decay=1e-4))
  config.dropout = ml_collections.ConfigDict(dict(
      name="curriculum", warmup_steps=2000, drop_count_probs=(0.5, 0.3, 0.2)))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=3e-4, weight_decay=1e-4, schedule="constant", warmup_steps=0))
  # The offline classifier stage (variants soft and hard).
  config.classifier = ml_collections.ConfigDict(dict(
      num_steps=5000,
      optimizer=dict(name="adam", learning_rate=3e-4, weight_decay=1e-4, schedule="constant",
                     warmup_steps=0)))
  config.data.patch_size = (64, 64)
  config.data.sampling = "balanced"
  config.data.balanced_fraction = 0.5
  config.train.num_steps = 20000

  if preset == "demo":
    # Sized for a shared 2-core CPU: narrow layers, 3x3 kernels, 48x48 slices, batch 4.
    config.model.update(classifier_features=(8, 16, 32), classifier_blocks=(1, 1, 1),
                        backend_features=(12, 12), backend_kernel=3, frontend_features=(16,),
                        frontend_kernel=3, final_kernel=3)
    config.loss.ce_weight = 1.0   # Dice alone starts slowly on small lesions in short runs
    # Short runs: all modalities for 100 steps, then single modalities in 40 % of batches.
    config.dropout.update(warmup_steps=100, drop_count_probs=(0.3, 0.3, 0.4))
    config.optimizer.update(learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.classifier.num_steps = 1000
    config.classifier.optimizer.update(learning_rate=2e-3)
    config.data.patch_size = (48, 48)
    config.data.batch_size = 4
    config.train.num_steps = 800
  elif preset == "smoke":
    config.model.update(max_scans=4, classifier_features=(4, 8), classifier_blocks=(1, 1),
                        backend_features=(4, 4), backend_kernel=3, frontend_features=(4,),
                        frontend_kernel=3, final_kernel=3)
    config.dropout.warmup_steps = 2
    config.optimizer.update(learning_rate=1e-3)
    config.classifier.num_steps = 3
    config.data.patch_size = (32, 32)
    config.train.num_steps = 6
  return config
