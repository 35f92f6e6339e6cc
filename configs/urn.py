r"""Unified representation network (URN) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/urn.py --workdir runs/urn
  python evaluate.py --workdir runs/urn          # Dice by subset, and the synthesis PSNR table

One command runs both stages: pre-training by cross-modality synthesis (`pretrain.num_steps`,
encoders + synthesis decoders, dropout theta = 0.8, pooled tumour + healthy T1/T2 phantoms), then
segmentation (`train.num_steps`, the segmentation decoder on the frozen encoders, theta = 0.5).
Presets: `paper` (the paper's settings: 16-channel representation, variance weight 1e-4, Adam with
lr 3e-5 for pre-training and 1e-4 for segmentation, batch size 4), `demo` (default; minutes on 2 CPU
cores), `smoke` (seconds, for tests). f = exp instead of the arithmetic mean:
`--config.model.f_mean=exp`; no variance term: `--config.pretrain.variance_weight=0
--config.pretrain.dropout.min_kept=1`.
"""
import ml_collections

from configs import common
from configs import unet as unet_config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  if preset not in common.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {common.PRESETS}")
  config = unet_config.get_config(preset)   # data, segmentation loss and optimiser of the baseline
  config.method = "urn"
  # `features` etc.: the segmentation decoder, the baseline U-Net.
  config.model = unet_config.unet_model(preset)
  config.model.update(dict(encoder_features=tuple(config.model.features),
                           representation_channels=16, synthesis_blocks=2, f_mean="identity"))
  config.dropout = unet_config.modality_dropout(0.5)                 # segmentation fine-tuning
  config.pretrain = ml_collections.ConfigDict(dict(
      num_steps=20000,   # ours, not the paper's
      batch_size=4,
      variance_weight=1e-4,   # of the voxel-wise variance across the encoders' outputs
      dropout=unet_config.modality_dropout(0.8, min_kept=2).to_dict(),
      optimizer=dict(name="adam", learning_rate=3e-5, weight_decay=0.0, schedule="constant",
                     warmup_steps=0),
      # The healthy phantom pooled with the task's training volumes for pre-training.
      healthy_subjects=30,
      healthy_modalities=("t1", "t2"),
  ))

  if preset == "demo":
    config.model.encoder_features = (8, 16, 32)
    config.pretrain.update(num_steps=800, batch_size=4, healthy_subjects=12)
    config.pretrain.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=50)
  elif preset == "smoke":
    config.model.update(features=(4, 8), encoder_features=(4, 8), representation_channels=4)
    config.pretrain.update(num_steps=3, batch_size=2, healthy_subjects=2)
    config.pretrain.optimizer.update(learning_rate=1e-3)
  return config
