r"""MLP imputation baseline (HeMIS paper) on the built-in tumour phantom, 2D slices.

  python train.py --config configs/mlp_impute.py --workdir runs/mlp_impute
  python evaluate.py --workdir runs/mlp_impute

One command trains two stages: (1) the U-Net of configs/unet.py on full data, no dropout
(`train.num_steps`); (2) one voxel-wise MLP per pattern of missing modalities (2 hidden layers of
100 units, MSE), all 14 trained together in one vmapped program (`impute.num_steps`); with
`impute.per_modality` (the `paper` preset) one single-output MLP per missing modality per pattern,
28 for 4 modalities, as the paper.
Presets: `paper`, `demo` (default; minutes on 2 CPU cores), `smoke` (seconds, for tests).
"""
import ml_collections

from configs import common
from configs import unet as unet_config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  config = unet_config.preset_config(preset)   # no modality dropout: the U-Net sees full data
  config.method = "mlp_impute"
  config.impute = ml_collections.ConfigDict(dict(
      hidden=(100, 100),
      # The paper: one single-output MLP per missing modality per pattern (28 for 4 modalities);
      # False: one M-output MLP per pattern (14), the demo's (cheaper, what the demo results used).
      per_modality=preset == "paper",
      num_steps=5000,   # ours, not the paper's
      voxels_per_step=2048,
      optimizer=common.optimizer("adam", 1e-3).to_dict(),
  ))
  if preset == "demo":
    config.impute.num_steps = 500
  elif preset == "smoke":
    config.impute.update(hidden=(8, 8), num_steps=3, voxels_per_step=64)
  return config
