r"""HeMIS (Havaei et al. 2016) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/hemis.py --workdir runs/hemis
  python evaluate.py --workdir runs/hemis

Presets: `paper` (48 maps, 5x5 kernels, 21x21 final conv; SGD with Nesterov momentum 0.9, lr 1e-3
decayed as lr / (1 + 1e-4 t); two-phase training), `demo` (default; minutes on 2 CPU cores: 24
maps, 3x3 back-end kernels, 5x5 front-end and final kernels; one phase, Adam), `smoke` (seconds, for
tests): `--config configs/hemis.py:smoke`.
Two-phase training (`train.final_layer_steps` > 0): `train.num_steps` of every layer on
class-balanced patches with a class-balanced loss, then `train.final_layer_steps` of the final
layer alone on uniform patches with the plain loss (hemijax.models.hemis).
"""
import ml_collections

from configs import common


def hemis_model(preset: str) -> ml_collections.ConfigDict:
  """HeMIS' settings (`hemijax.models.hemis.HeMISSettings`), shared with the PIMMS config."""
  model = ml_collections.ConfigDict(dict(
      backend_features=(48, 48), backend_kernel=5, pool_window=2,
      frontend_features=(16,), frontend_kernel=5, final_kernel=21, conv_impl="auto"))
  if preset == "demo":
    model.update(backend_features=(24, 24), backend_kernel=3, final_kernel=5)
  elif preset == "smoke":
    model.update(backend_features=(4, 4), backend_kernel=3, frontend_features=(4,),
                 frontend_kernel=3, final_kernel=3)
  return model


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  config = common.base_config(method="hemis", task="tumor", preset=preset)
  common.add_augment(config, preset)
  config.model = hemis_model(preset)
  config.loss = ml_collections.ConfigDict(dict(ce_weight=1.0, dice_weight=0.0, class_weights=None))
  # Pseudo-curriculum: all modalities first, then drop k with P(k) favouring 0 and 1.
  config.dropout = common.curriculum_dropout(2000, (0.5, 0.3, 0.15, 0.05))
  # SGD with Nesterov momentum 0.9, lr 1e-3, "decay constant" 1e-4 (the paper): Keras' SGD decay,
  # lr_t = lr / (1 + 1e-4 t), a learning-rate decay, not a weight decay.
  config.optimizer = common.optimizer("sgd", 1e-3, momentum=0.9, nesterov=True,
                                      schedule="inverse_time", decay_rate=1e-4)
  config.data.patch_size = (64, 64)
  # Used by one-phase training (final_layer_steps = 0): class-balanced patch centres for the first
  # balanced_fraction of the steps, then uniform ones, every layer training throughout.
  config.data.sampling = "balanced"
  config.data.balanced_fraction = 0.5
  config.train.num_steps = 20000          # phase 1 (ours, not the paper's)
  # Phase 2, the final layer alone on the true class distribution (ours, not the paper's); 0: one
  # phase.
  config.train.final_layer_steps = 5000

  if preset == "demo":
    config.dropout.warmup_steps = 300
    config.optimizer.update(name="adam", learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.loss.dice_weight = 1.0
    config.train.num_steps = 2000
    # One phase (the balanced-then-uniform sampling above): two-phase training is untested at the
    # demo's length.
    config.train.final_layer_steps = 0
  elif preset == "smoke":
    config.dropout.warmup_steps = 2
    config.optimizer.update(name="adam", learning_rate=1e-3)
    config.data.patch_size = (32, 32)
    config.train.num_steps = 6
    config.train.final_layer_steps = 0
  return config
