r"""U-Net baseline (stacked modalities, zero-filling) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/unet.py --workdir runs/unet                       # no dropout
  python train.py --config configs/unet.py:demo_dropout --workdir runs/unet_dropout  # dropout
  python evaluate.py --workdir runs/unet --compare runs/unet_dropout

Presets: `paper`, `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests) train
without modality dropout (a missing modality is zero-filled only at test time); the variant
`dropout` (`paper_dropout`, `demo_dropout`, `smoke_dropout`) adds modality dropout during training
(truncated geometric number of dropped modalities, theta = 0.5, as the modality-dropout paper for
segmentation).
3D patches: `--config.data.patch_size='(64,64,64)'`.
"""
import ml_collections

from configs import common


def unet_model(preset: str) -> ml_collections.ConfigDict:
  """The U-Net's settings (`hemijax.models.unet.UNetSettings` and `conv_impl`), shared with the
  MLP-imputation and URN configs."""
  model = ml_collections.ConfigDict(dict(
      features=(32, 64, 128, 256, 512), kernel_size=3, negative_slope=0.01, bn_momentum=0.9,
      conv_impl="auto"))
  if preset == "demo":
    model.features = (8, 16, 32, 64)
  elif preset == "smoke":
    model.features = (4, 8)
  return model


def preset_config(preset: str) -> ml_collections.ConfigDict:
  """A base preset's config, without modality dropout (the MLP-imputation and URN configs start
  from it)."""
  config = common.base_config(method="unet", task="tumor", preset=preset)
  common.add_augment(config, preset)
  config.model = unet_model(preset)
  # Batch statistics live in model_state; training mode updates them. The paper's segmentation
  # loss is cross-entropy alone; demo and smoke add soft Dice (ours: short runs on small lesions).
  config.loss = ml_collections.ConfigDict(dict(
      ce_weight=1.0, dice_weight=0.0 if preset == "paper" else 1.0, class_weights=None,
      mutable=("batch_stats",)))
  config.dropout = ml_collections.ConfigDict(dict(name="none"))
  # Adam, lr 1e-4, batch size 4 (the URN paper's segmentation setting).
  config.optimizer = common.optimizer("adam", 1e-4)
  config.data.patch_size = (128, 128)
  config.data.batch_size = 4
  config.data.sampling = "balanced"     # class-balanced patch centres, first half of training
  config.data.balanced_fraction = 0.5
  config.train.num_steps = 20000   # step counts and level widths: ours, not the papers'

  if preset == "demo":
    config.data.patch_size = (64, 64)
    config.data.batch_size = 8
    config.optimizer.update(learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.train.num_steps = 2000
  elif preset == "smoke":
    config.data.patch_size = (32, 32)
    config.data.batch_size = 2
    config.optimizer.update(learning_rate=1e-3)
    config.train.num_steps = 6
  return config


def with_dropout(config: ml_collections.ConfigDict) -> None:
  """Modality dropout in training: theta = 0.5, at least one modality kept."""
  config.dropout = common.truncated_geometric_dropout(0.5)


VARIANTS = {"none": lambda config: None, "dropout": with_dropout}


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  return common.config_with_variant(preset, "configs/unet.py", preset_config, VARIANTS, "none")
