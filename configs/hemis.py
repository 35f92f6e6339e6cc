r"""HeMIS (Havaei et al. 2016) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/hemis.py --workdir runs/hemis
  python evaluate.py --workdir runs/hemis

Presets: `paper` (48 maps, 5x5 kernels, 21x21 final conv), `demo` (default; minutes on 2 CPU cores),
`smoke` (seconds, for tests): `--config configs/hemis.py:smoke`.
"""
import ml_collections

from configs import common


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  config = common.base_config(method="hemis", task="tumor", preset=preset)
  common.add_augment(config, preset)
  config.model = ml_collections.ConfigDict(dict(
      backend_features=(48, 48), backend_kernel=5, pool_window=2,
      frontend_features=(16,), frontend_kernel=5, final_kernel=21, conv_impl="auto"))
  config.loss = ml_collections.ConfigDict(dict(ce_weight=1.0, dice_weight=0.0, class_weights=None))
  # Pseudo-curriculum: all modalities first, then drop k with P(k) favouring 0 and 1.
  config.dropout = ml_collections.ConfigDict(dict(
      name="curriculum", warmup_steps=2000, drop_count_probs=(0.5, 0.3, 0.15, 0.05)))
  # SGD with Nesterov momentum 0.9, lr 1e-3, decay 1e-4 (the paper).
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4,
      schedule="constant", warmup_steps=0))
  config.data.patch_size = (64, 64)
  config.data.sampling = "balanced"       # HeMIS two-phase training: balanced, then true distribution
  config.data.balanced_fraction = 0.5     # fraction of steps sampled class-balanced
  config.train.num_steps = 20000

  if preset == "demo":
    config.model.backend_features = (24, 24)
    config.model.backend_kernel = 3
    config.model.final_kernel = 5
    config.dropout.warmup_steps = 300
    config.optimizer.update(name="adam", learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.loss.dice_weight = 1.0
    config.train.num_steps = 2000
  elif preset == "smoke":
    config.model.update(backend_features=(4, 4), backend_kernel=3, frontend_features=(4,),
                        frontend_kernel=3, final_kernel=3)
    config.dropout.warmup_steps = 2
    config.optimizer.update(name="adam", learning_rate=1e-3)
    config.data.patch_size = (32, 32)
    config.train.num_steps = 6
  return config
