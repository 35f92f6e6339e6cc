r"""MLP imputation baseline (HeMIS paper) on the built-in tumour phantom, 2D slices.

The two baselines of the HeMIS paper share one segmentation network: train the mean-filling
(zero-filling) U-Net once, then the MLPs that impute into it.

  python train.py --config configs/unet.py --workdir runs/unet                # the U-Net
  python train.py --config configs/mlp_impute.py --workdir runs/mlp_impute    # MLPs into it
  python evaluate.py --workdir runs/mlp_impute --compare runs/unet

`impute.segmenter_from` names the `unet` run whose U-Net (its best checkpoint, as evaluation picks
it; parameters and batch statistics) this run uses, frozen: only the MLPs train. It must share
this config's task, modalities and `model` section (`configs/unet.py`'s preset of the same name
does). Presets: `demo` (default; minutes on 2 CPU cores) reads `runs/unet`, `paper` reads
`runs/unet_paper` (`python train.py --config configs/unet.py:paper --workdir runs/unet_paper`),
`smoke` (seconds, for tests) none. With `--config.impute.segmenter_from=None` the run trains a
U-Net of its own first, as before: (1) the U-Net of configs/unet.py on full data, no dropout
(`train.num_steps`), then (2) the MLPs. With a source, `train.num_steps` is not used.

The MLPs: one voxel-wise MLP per pattern of missing modalities (2 hidden layers of 100 units,
MSE), all 14 trained together in one vmapped program (`impute.num_steps`); with
`impute.per_modality` (the `paper` preset) one single-output MLP per missing modality per pattern,
28 for 4 modalities, as the paper.
"""
import ml_collections

from configs import common
from configs import unet as unet_config

# The workdir of the `unet` run each preset's U-Net comes from (the commands above).
SEGMENTER_FROM = {"paper": "runs/unet_paper", "demo": "runs/unet", "smoke": None}


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  config = unet_config.preset_config(preset)   # no modality dropout: the U-Net sees full data
  config.method = "mlp_impute"
  config.impute = ml_collections.ConfigDict(dict(
      # A trained `unet` run whose U-Net this run imputes into (relative to the current
      # directory); None: train one first (stage 1).
      segmenter_from=ml_collections.FieldReference(SEGMENTER_FROM[preset], field_type=str),
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
