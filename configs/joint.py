r"""Joint lesion and tissue segmentation (Dorent et al., MIDL 2019) on the built-in phantoms, 3D.

  python train.py --config configs/joint.py --workdir runs/joint
  python evaluate.py --workdir runs/joint --step latest

Training uses two task-specific phantom sets (`config.data.tissue_set`: the joint label space
`config.task`, T1 only, no lesions; `config.data.lesion_set`: the wmh task, T1 + FLAIR, lesion
labels only). The run's own data (validation, and evaluate.py's default) is a third, fully
annotated set (`config.task` with lesions, T1 + FLAIR) never used in training, so evaluate.py
reports Dice per class on its test split (`--step latest`: its val split then only monitors
training, it does not pick the checkpoint).

Label space (`config.task`): `tissue` (background, csf, gm, wm, lesion; `demo`, `smoke`) or the
paper's `tissue6` (`paper`): white matter, grey matter, basal ganglia, ventricles, cerebellum,
brainstem and lesion, with the CSF outside the ventricles as background; the phantom draws the
deep structures from the MNI152 tissue maps and position (hemijax.data.phantom.anatomy.structures:
a coarse mapping, not an atlas). The demo in the paper's label space:

  python train.py --config configs/joint.py --workdir runs/joint6 --config.task=tissue6

Variants (the same network):

  ... --config.loss.consistency_weight=0                        # joint, no consistency term R^t_1
  ... --config.loss.consistency_stop_gradient=True            # R^t_1 with h(T1) a constant target
  ... --config.variant=tissue_only                              # tissue set only (tissue classes)
  ... --config.variant=lesion_only                              # lesion set only (lesion vs not)

(or as presets: `--config configs/joint.py:demo_tissue_only`, `:demo_lesion_only`).

The tissue_only baseline reads T1 only (its network ignores FLAIR at training and evaluation), so a
T1 + FLAIR input gives its T1-only prediction. The loss is Eq. 6 of the paper for every term
(`config.loss.jaccard_form`, `config.loss.consistency_form`).

Presets: `paper` (the `tissue6` label space, ω = 1/16 per tissue class, 1/8 for the background, 1/2
for the lesion; HighResNet 16/32/64 features, 3 blocks per stage, Adam lr 5e-3, consistency term
from step 5000, 120 x 120 x 40 patches, one image from each training set per step), `demo`
(default; sized for 2 CPU cores: the `tissue` label space, 4 mm phantoms, a small network, 24^3
patches, 2 per set, Adam lr 1e-3 with cosine decay, 800 steps), `smoke` (seconds, for tests):
`--config configs/joint.py:smoke`.
"""
import ml_collections

from configs import common

VARIANTS = common.recorded_variants("joint", "tissue_only", "lesion_only")


def preset_config(preset: str) -> ml_collections.ConfigDict:
  """A base preset's config (the variant is applied on top)."""
  # The paper's label space in `paper`; the demo keeps the coarser one its recorded results used.
  config = common.base_config(method="joint", task="tissue6" if preset == "paper" else "tissue",
                              preset=preset)
  common.add_augment(config, preset)
  config.model = ml_collections.ConfigDict(dict(
      features=(16, 32, 64), dilations=(1, 2, 4), blocks_per_stage=3,
      modality_stages=1,     # leading stages run per modality, then the masked mean
      head_features=80, kernel_size=3, norm="instance", conv_impl="auto",
      space_to_batch=True))  # dilated convolutions as dilation-1 ones on sub-grids (same numbers)
  # consistency_stop_gradient: no gradient through the target h(T1) of R^t_1 (not in the issue; the
  # literal term, False, can also lower it by shrinking a small class in both predictions).
  # jaccard_form (lesion and tissue terms) and consistency_form (R^t_1): "eq6" is the paper's Eq. 6,
  # sum g p / sum (g^2 + p^2 - g p); "soft_union" (sum g p / sum (g + p - g p)) and "min_max"
  # (sum min / sum max) are the other readings (hemijax.nn.losses.probabilistic_jaccard).
  # class_weights: ω_c of Eq. 6, one per class of config.task (normalised to sum 1); None: 1/2
  # for the lesion, the other half shared equally by the other classes (background included).
  config.loss = ml_collections.ConfigDict(dict(consistency_weight=1.0, consistency_start=5000,
                                               consistency_stop_gradient=False,
                                               jaccard_form="eq6", consistency_form="eq6",
                                               class_weights=None))
  if preset == "paper":
    # ω = 1/16 for each of the six tissue classes and 1/2 for the lesion, with Σ ω = 1 (the paper):
    # that leaves 1/8 for the background (CSF and outside the brain). Reading the background as a
    # seventh 1/16 class would need renormalising (1/15 and 8/15): pass that list to try it.
    config.loss.class_weights = (1 / 8,) + (1 / 16,) * 6 + (1 / 2,)
  config.optimizer = common.optimizer("adam", 5e-3)
  # The run's data: the fully annotated evaluation set (validation and evaluate.py use it).
  config.data.phantom_lesions = True   # the evaluation set: tissues and lesions
  # The paper's 120 x 120 x 40 patches, one image from each training set per step; the step count
  # is our choice.
  config.data.patch_size = (120, 120, 40)
  config.data.batch_size = 1          # per training set: each step takes one batch from each
  # The task-specific training sets (phantoms; `root` takes a user's folder instead).
  subjects = config.data.phantom_subjects
  config.data.tissue_set = ml_collections.ConfigDict(dict(
      root=ml_collections.FieldReference(None, field_type=str), subjects=subjects, seed=1,
      modalities=("t1",)))
  config.data.lesion_set = ml_collections.ConfigDict(dict(
      root=ml_collections.FieldReference(None, field_type=str), subjects=subjects, seed=2,
      modalities=("t1", "flair")))
  config.data.lesion_dilation = 3      # lesion patches are centred in the dilated lesion maps
  config.data.lesion_fraction = 1.0    # fraction of lesion patches centred there (else anywhere)
  config.train.num_steps = 30000

  if preset == "demo":
    config.data.phantom_spacing = 4.0
    config.data.patch_size = (24, 24, 24)
    config.data.batch_size = 2
    config.model.update(features=(8, 16, 16), blocks_per_stage=1, head_features=16)
    config.loss.consistency_start = 200
    # At 5e-3 this small network's csf channel collapses early (softmax saturates) and never recovers.
    config.optimizer.update(learning_rate=1e-3, schedule="cosine", warmup_steps=25)
    config.train.update(num_steps=800, eval_every=200, checkpoint_every=200)
  elif preset == "smoke":
    config.data.patch_size = (12, 12, 12)
    config.data.batch_size = 2
    config.model.update(features=(4, 4, 4), blocks_per_stage=1, head_features=4)
    config.loss.consistency_start = 2
    config.train.num_steps = 4
  return config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  return common.config_with_variant(preset, "configs/joint.py", preset_config, VARIANTS, "joint")
