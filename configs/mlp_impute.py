r"""MLP imputation baseline (HeMIS paper) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/mlp_impute.py --workdir runs/mlp_impute
  python evaluate.py --workdir runs/mlp_impute

One command trains two stages: (1) the U-Net of configs/unet.py on full data, no dropout
(`train.num_steps`); (2) one voxel-wise MLP per pattern of missing modalities (2 hidden layers of
100 units, MSE), all 14 trained together in one vmapped program (`impute.num_steps`).
Presets: `paper`, `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests).
"""
import ml_collections

from configs import common
from configs import unet as unet_config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  if preset not in common.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {common.PRESETS}")
  config = unet_config.get_config(preset)
  config.method = "mlp_impute"
  config.dropout = ml_collections.ConfigDict(dict(name="none"))  # the U-Net sees full data
  config.impute = ml_collections.ConfigDict(dict(
      hidden=(100, 100),
      num_steps=5000,   # ours, not the paper's
      voxels_per_step=2048,
      optimizer=dict(name="adam", learning_rate=1e-3, weight_decay=0.0, schedule="constant",
                     warmup_steps=0),
  ))
  if preset == "demo":
    config.impute.num_steps = 500
  elif preset == "smoke":
    config.impute.update(hidden=(8, 8), num_steps=3, voxels_per_step=64)
  return config
