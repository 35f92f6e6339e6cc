r"""U-Net baseline (stacked modalities, zero-filling) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/unet.py --workdir runs/unet                       # no dropout
  python train.py --config configs/unet.py:demo_dropout --workdir runs/unet_dropout  # dropout
  python evaluate.py --workdir runs/unet --compare runs/unet_dropout

Presets: `paper`, `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests) train
without modality dropout (a missing modality is zero-filled only at test time); `paper_dropout`,
`demo_dropout`, `smoke_dropout` add modality dropout during training (truncated geometric number of
dropped modalities, theta = 0.5, as the modality-dropout paper for segmentation).
3D patches: `--config.data.patch_size='(64,64,64)'`.
"""
import ml_collections

from configs import common

DROPOUT_SUFFIX = "_dropout"


def split_preset(preset: str) -> tuple[str, bool]:
  """"demo_dropout" -> ("demo", True); "demo" -> ("demo", False)."""
  with_dropout = preset.endswith(DROPOUT_SUFFIX)
  base = preset[:-len(DROPOUT_SUFFIX)] if with_dropout else preset
  if base not in common.PRESETS:
    choices = [p + s for p in common.PRESETS for s in ("", DROPOUT_SUFFIX)]
    raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(choices)}")
  return base, with_dropout


def modality_dropout(theta: float, min_kept: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="truncated_geometric", theta=theta, min_kept=min_kept))


def unet_model(preset: str) -> ml_collections.ConfigDict:
  """The U-Net's hyper-parameters (shared with the MLP-imputation and URN configs)."""
  model = ml_collections.ConfigDict(dict(
      features=(32, 64, 128, 256, 512), kernel_size=3, negative_slope=0.01, bn_momentum=0.9,
      conv_impl="auto"))
  if preset == "demo":
    model.features = (8, 16, 32, 64)
  elif preset == "smoke":
    model.features = (4, 8)
  return model


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  base, with_dropout = split_preset(preset)
  config = common.base_config(method="unet", task="tumor", preset=base)
  common.add_augment(config, base)
  config.preset = preset
  config.model = unet_model(base)
  # Batch statistics live in model_state; training mode updates them.
  config.loss = ml_collections.ConfigDict(dict(ce_weight=1.0, dice_weight=1.0, class_weights=None,
                                               mutable=("batch_stats",)))
  config.dropout = modality_dropout(0.5) if with_dropout else ml_collections.ConfigDict(
      dict(name="none"))
  # Adam, lr 1e-4, batch size 4 (the URN paper's segmentation setting).
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, weight_decay=0.0, schedule="constant", warmup_steps=0))
  config.data.patch_size = (128, 128)
  config.data.batch_size = 4
  config.data.sampling = "balanced"     # class-balanced patch centres, first half of training
  config.data.balanced_fraction = 0.5
  config.train.num_steps = 20000   # step counts and level widths: ours, not the papers'

  if base == "demo":
    config.data.patch_size = (64, 64)
    config.data.batch_size = 8
    config.optimizer.update(learning_rate=2e-3, schedule="cosine", warmup_steps=50)
    config.train.num_steps = 2000
  elif base == "smoke":
    config.data.patch_size = (32, 32)
    config.data.batch_size = 2
    config.optimizer.update(learning_rate=1e-3)
    config.train.num_steps = 6
  return config
