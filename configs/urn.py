r"""Unified representation network (URN) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/urn.py --workdir runs/urn
  python evaluate.py --workdir runs/urn          # Dice by subset, and the synthesis PSNR table

One command runs both stages: pre-training by cross-modality synthesis (`pretrain.num_steps`,
encoders + synthesis decoders, dropout theta = 0.8, pooled tumour + healthy T1/T2 phantoms), then
segmentation (`train.num_steps`, the segmentation decoder on the frozen encoders, theta = 0.5).
Variants: the default `md_pooled` ("URN + MD with pooled healthy data", the two stages above) and
`md` ("URN + MD": `paper_md`, `demo_md`, `smoke_md`; no pre-training, encoders trained end to end
on segmentation). Whether the paper's pooled row freezes the pre-trained encoders is not settled;
`md_pooled` (and so `paper`) freezes them, `md_pooled_finetuned` (`paper_md_pooled_finetuned`,
`demo_md_pooled_finetuned`, ...) trains them with the segmentation decoder after pre-training.
Presets: `paper` (the paper's settings: 16-channel representation, variance weight 1e-4, Adam with
lr 3e-5 for pre-training and 1e-4 for segmentation, batch size 4, cross-entropy alone for
segmentation), `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests).
f = exp instead of the arithmetic mean:
`--config.model.f_mean=exp`; no variance term: `--config.pretrain.variance_weight=0
--config.pretrain.dropout.min_kept=1`.
"""
import ml_collections

from configs import common
from configs import unet as unet_config


def preset_config(preset: str) -> ml_collections.ConfigDict:
  """A base preset's config: the "md_pooled" variant's settings."""
  # Data, segmentation loss, optimiser and model settings of the baseline U-Net: `features` etc.
  # are the segmentation decoder's.
  config = unet_config.preset_config(preset)
  config.method = "urn"
  config.model.update(dict(encoder_features=tuple(config.model.features),
                           representation_channels=16, synthesis_blocks=2, f_mean="identity"))
  config.dropout = common.truncated_geometric_dropout(0.5)          # segmentation fine-tuning
  config.pretrain = ml_collections.ConfigDict(dict(
      num_steps=20000,   # ours, not the paper's
      batch_size=4,
      variance_weight=1e-4,   # of the voxel-wise variance across the encoders' outputs
      dropout=common.truncated_geometric_dropout(0.8, min_kept=2).to_dict(),
      optimizer=common.optimizer("adam", 3e-5).to_dict(),
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


def without_pretraining(config: ml_collections.ConfigDict) -> None:
  """"URN + MD": no pre-training stage; encoders trained end to end on segmentation."""
  config.variant = "md"
  config.pretrain.num_steps = 0


VARIANTS = {**common.recorded_variants("md_pooled", "md_pooled_finetuned"),
            "md": without_pretraining}


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  return common.config_with_variant(preset, "configs/urn.py", preset_config, VARIANTS,
                                    "md_pooled")
