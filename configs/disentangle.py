r"""Feature disentanglement with gated fusion (Chen et al. 2019) on the built-in tumour phantom, 3D.

  python train.py --config configs/disentangle.py --workdir runs/disentangle
  python evaluate.py --workdir runs/disentangle --compare runs/hemis

The comparison with HeMIS at one resolution: both demos train and predict on the tumour phantom at
its 2 mm grid (HeMIS on 2D slices, this model on 3D patches), the same 30 subjects and the same
6 test cases:

  python train.py --config configs/hemis.py --workdir runs/hemis
  python train.py --config configs/disentangle.py --workdir runs/disentangle
  python evaluate.py --workdir runs/hemis
  python evaluate.py --workdir runs/disentangle --compare runs/hemis

Presets: `paper` (16 channels first, 80^3 patches, batch 1, Adam 1e-4, the paper's reconstruction
decoder: 4 residual blocks then upsampling + conv layers), `demo` (default; 8 channels first, 32^3
patches of the 2 mm phantom, batch 2, Adam 1e-3, 600 steps, the lighter conv + AdaIN
reconstruction decoder), `smoke` (seconds, for tests). A training step costs what it did when the
demo ran at 4 mm (`--config.data.target_spacing=4.0` gives that run back, which was compared with
HeMIS at 2 mm); a 2 mm volume to validate has 8 times the voxels of a 4 mm one. Measured on the
shared 2-core machine (load about 5, /tmp/h3/dis_time.py): 70 s to compile, 1.5 s a step (600
steps: 15 min), 12 s per validation case (4 cases at 3 validations: 2.4 min): about 19 min in
all, over the ~15 min aimed at; `--config.train.num_steps=450` would fit it. L_rec and L_KL are sums over the modalities
(Eqs. 1 and 3; `--config.loss.modality_reduction=mean` averages them): `--config configs/disentangle.py:smoke`.

Ablation (the paper's Fig. 3a), three config overrides of the same preset:

  # average fusion, no disentanglement (no appearance encoders, reconstruction or KL)
  python train.py --config configs/disentangle.py --workdir runs/disentangle_mean \
      --config.model.fusion=mean --config.model.disentangle=False
  # + disentanglement
  python train.py --config configs/disentangle.py --workdir runs/disentangle_mean_dis \
      --config.model.fusion=mean
  # + gated fusion: the full method, the command at the top
"""
import ml_collections

from configs import common


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  config = common.base_config(method="disentangle", task="tumor", preset=preset)
  common.add_augment(config, preset)
  config.model = ml_collections.ConfigDict(dict(
      content_features=(16, 32, 64, 128),   # 4 residual blocks; channels double as size halves
      fusion="gated",                       # "gated" | "mean" (ablation baseline)
      gate_kernel=3,
      disentangle=True,                     # False: segmentation only (ablation baseline)
      appearance_features=(16, 32, 64, 64, 64),  # 5 convolutions, then pooling and a dense layer
      appearance_strides=(1, 2, 2, 2, 2),
      appearance_size=8,                    # the Gaussian appearance code
      negative_slope=0.01,
      # D^r: "residual" (the paper's: 4 residual blocks, then upsampling + conv layers, AdaIN) or
      # "conv" (conv + AdaIN per scale; lighter, the demo's and smoke's).
      reconstruction_decoder="residual", reconstruction_blocks=4,
      conv_impl="auto"))
  # L = Dice + CE (per-batch weights 1 - n_c / n) + 0.1 L_rec + 0.1 L_KL; L_rec and L_KL are sums
  # over the modalities as in the paper's Eqs. 1 and 3 (modality_reduction="mean": averages).
  config.loss = ml_collections.ConfigDict(dict(
      dice_weight=1.0, ce_weight=1.0, reconstruction_weight=0.1, kl_weight=0.1,
      modality_reduction="sum"))
  # Each available modality's content is dropped with probability 0.5, at least one kept.
  config.dropout = ml_collections.ConfigDict(dict(name="bernoulli", p=0.5))
  # Adam 1e-4 with (1 - t / T) ** 0.9; the paper decays per epoch, here t counts steps.
  config.optimizer = common.optimizer("adam", 1e-4, schedule="poly", power=0.9)
  config.data.patch_size = (80, 80, 80)
  config.data.batch_size = 1
  config.data.sampling = "uniform"          # random patches in the brain
  config.eval.roi_size = (80, 80, 80)
  config.train.num_steps = 50000

  if preset == "demo":
    config.model.update(content_features=(8, 16, 32, 64), appearance_features=(8, 16, 16, 16, 16),
                        reconstruction_decoder="conv")
    # The phantom's own 2 mm grid, as the HeMIS demo (one resolution for the comparison): a
    # 32^3 patch is 64 mm and a training step costs what it did at 4 mm; windows at validation
    # and evaluation are the training patch size (instance normalisation sees the same extent).
    config.data.patch_size = (32, 32, 32)
    config.data.batch_size = 2
    config.eval.roi_size = (32, 32, 32)
    config.optimizer.learning_rate = 1e-3   # few steps on CPU
    config.train.num_steps = 600
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
  elif preset == "smoke":
    # Two scales, two appearance convolutions and XLA's convolution: at these sizes the run is
    # all compilation.
    config.model.update(content_features=(2, 4), appearance_features=(2, 2),
                        appearance_strides=(1, 2), appearance_size=2, conv_impl="xla",
                        reconstruction_decoder="conv")
    config.optimizer.learning_rate = 1e-3
    config.data.patch_size = (16, 16, 16)
    config.data.batch_size = 2
    config.eval.roi_size = (16, 16, 16)
    config.train.num_steps = 3
  return config
