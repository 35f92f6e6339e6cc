r"""The robustness study: every method x modality subset x metric, several seeds, one report.

  python study.py --config configs/study.py:demo --workdir runs/study --archive docs/study/runs
  python study.py --config configs/study.py:smoke --workdir runs/study_smoke   # minutes, CI

Trains every run x seed not finished yet (an interrupted one resumes from its checkpoints, a
finished one is skipped), evaluates them all on the same cases at the same checkpoint policy, and
writes WORKDIR/report/ (report.md, report.json, Dice-by-present-modalities PNGs); a finished study
re-renders its report in seconds. `--render_only` renders from the finished runs alone.
`--archive docs/study/runs` keeps each finished run's results there (no checkpoints; the demo
study's are in the repository) and restores them into a new workdir, so the study resumes on
another machine and its report renders from the archive alone.

Presets: `demo` (default: the methods of docs/results.md at their demo presets, 3 seeds for the
2D tumour methods, 2 for the others, each scored on 30 unseen phantom subjects; on top, the
settings of `DEMO_BUDGETS`: disentanglement 2000 steps with windows overlapping by 0.25, PIMMS
at twice its segmentation steps, PIMMS and joint (and the MLP imputation) validated every 100;
diagnosis runs of ours: after the URN runs, both URN rows with a 64-channel representation and at
twice the segmentation steps, and the pooled row with its encoders fine-tuned; the joint model at
twice its steps; HeMIS in 3D on the disentanglement model's patches, and that model with HeMIS'
class-balanced sampling and at twice the budget), `paper` (the same runs at their paper
presets), `smoke` (HeMIS and the U-Net at their smoke presets, 3 steps, 2 seeds: the whole
pipeline in a few minutes on 2 cores).

Fields: `runs` (name, method config file, preset, config `overrides` as dotted field -> value,
optional `seeds`), `seeds`, `reference` (run names: each group of runs evaluated on the same data
is compared against the first of these it contains, else its first run), `evaluations` (name,
split, `data` folder or None for each run's own data, `data_overrides`, optional `runs`), `step`
(the checkpoint every evaluation uses), `overrides` (for every run; a value "run:NAME" is run NAME's
folder at the same seed), `metrics`, `metric_options`
(HD95 convention, empty-mask penalty, ET post-processing; written into the report), and `claims` (the
papers' claims as computed checks; kinds in hemijax/evaluation/claims.py; a claim whose runs are not
in the study is reported as "not run").
"""
import ml_collections

from configs import disentangle as disentangle_config
from configs import joint as joint_config
from configs import pimms as pimms_config
from configs import urn as urn_config

PRESETS = ("paper", "demo", "smoke")
TUMOUR_2D_SEEDS = (0, 1, 2)
UNSEEN_SEED, UNSEEN_SUBJECTS = 1000, 30  # the evaluation phantom (never trained on)
OTHER_SEEDS = (0, 1)



def _urn_claim(run: str, what: str, same_seeds: bool = False) -> dict:
  """The URN paper's claim for one of its rows (or a diagnosis run of ours): `what` ≥ U-Net + MD
  on WT in at least 14 of the 15 subsets."""
  return dict(kind="beats_in_subsets", run=run, baseline="unet_dropout", region="WT",
              min_subsets=14, strict=False, same_seeds=same_seeds,
              text=f"{what} ≥ U-Net + MD on WT in ≥ 14 of 15 subsets" + (
                  " (U-Net + MD at the same seed)" if same_seeds else ""))


def _diagnosis(run: str, row: str, what: str) -> list[dict]:
  """A one-seed diagnosis run of ours: the claim of its row, against U-Net + MD at that seed, and
  whether the change helps, against its row at that seed (mean WT over the 15 subsets)."""
  return [_urn_claim(run, f"Diagnosis (ours): {what}", same_seeds=True),
          dict(kind="better_on_average", run=run, baseline=row, region="WT", same_seeds=True,
               text=f"Diagnosis (ours): {what} beats its row ({row}) at the same seed "
                    "(mean WT over the subsets)")]


def _disentangle_diagnosis(run: str, change: str, seed: int) -> list[dict]:
  """A one-seed diagnosis run of ours for the disentanglement claim: with `change`, does it beat
  HeMIS at that seed in 15 of 15 subsets, and does `change` help, against the disentanglement run
  at that seed (mean Dice of WT, TC and ET)."""
  regions = ("WT", "TC", "ET")
  return [dict(kind="beats_in_subsets", run=run, baseline="hemis", region=regions,
               min_subsets=15, same_seeds=True,
               text=f"Diagnosis (ours): with {change} (seed {seed}), disentangled + gated fusion "
                    "beats HeMIS (at the same seed) in 15 of 15 subsets (WT, TC and ET)"),
          dict(kind="better_on_average", run=run, baseline="disentangle", region=regions,
               same_seeds=True,
               text=f"Diagnosis (ours): {change} helps the disentangled + gated model "
                    f"(seed {seed}, mean Dice)")]


# The papers' relative claims (HeMIS, modality dropout, URN, disentanglement, PIMMS, joint model).
CLAIMS = (
    # Normalised images have mean 0, so the zero-filled U-Net is the HeMIS paper's mean-filling.
    dict(kind="beats_in_subsets", run="hemis", baseline="unet", region="WT", min_subsets=10,
         text="HeMIS beats mean-filling (U-Net, missing modalities zero = mean) on WT in ≥ 10 of "
              "15 subsets"),
    dict(kind="better_on_average", run="unet_dropout", baseline="unet", region="WT",
         missing=("flair",),
         text="Modality dropout rescues the U-Net without FLAIR (mean WT over the subsets lacking "
              "FLAIR)"),
    _urn_claim("urn_md", "URN + MD (no pre-training)"),
    _urn_claim("urn_pooled", "URN + MD (pooled pre-training data)"),
    # Ours, not a paper's: is the unified representation's width (the paper's 16 channels), the
    # segmentation budget, or (pooled row) the frozen encoders what holds the URN rows back? One
    # seed each, so each is compared with the other runs at its seed.
    *_diagnosis("urn_md_wide", "urn_md", "URN + MD with a 64-channel representation (seed 0)"),
    *_diagnosis("urn_pooled_wide", "urn_pooled", "URN + MD (pooled pre-training data) with a "
                                                 "64-channel representation (seed 0)"),
    *_diagnosis("urn_md_long", "urn_md", "URN + MD with twice the segmentation steps (seed 0)"),
    *_diagnosis("urn_pooled_long", "urn_pooled", "URN + MD (pooled pre-training data) with "
                                                 "twice the segmentation steps (seed 1)"),
    *_diagnosis("urn_pooled_finetuned", "urn_pooled", "URN + MD (pooled pre-training data), "
                                                      "encoders fine-tuned in segmentation (seed 0)"),
    dict(kind="beats_in_subsets", run="disentangle", baseline="hemis", region=("WT", "TC", "ET"),
         min_subsets=15,
         text="Disentangled + gated fusion beats HeMIS in 15 of 15 subsets (WT, TC and ET)"),
    # Ours, not a paper's: the study's HeMIS sees 2D slices, the disentanglement model 3D patches;
    # HeMIS trained and evaluated on the same 3D patches and windows tells the method from that.
    dict(kind="beats_in_subsets", run="disentangle", baseline="hemis_3d", region=("WT", "TC", "ET"),
         min_subsets=15,
         text="Diagnosis (ours): disentangled + gated fusion beats HeMIS in 3D (3x3x3 kernels, the "
              "same patches and windows) in 15 of 15 subsets (WT, TC and ET)"),
    # Ours: is the budget what holds it back? One seed, so compared with the others at that seed.
    *_disentangle_diagnosis("disentangle_long", "twice the training budget", seed=1),
    # Ours: the disentanglement model samples patches uniformly (its paper's 80^3 patches mostly
    # hold tumour; the demo's 32^3 often do not), HeMIS (and HeMIS in 3D) class-balanced centres
    # for half its steps. Seed 0, whose disentanglement run hardly segmented the tumour core.
    *_disentangle_diagnosis("disentangle_balanced", "HeMIS' class-balanced patch sampling", seed=0),
    dict(kind="better_on_average", run="disentangle_mean_dis", baseline="disentangle_mean",
         region=("WT", "TC", "ET"),
         text="Disentanglement helps (average fusion: with vs without disentanglement, mean Dice)"),
    dict(kind="better_on_average", run="disentangle", baseline="disentangle_mean_dis",
         region=("WT", "TC", "ET"),
         text="Gated fusion helps (disentangled: gated vs average fusion, mean Dice)"),
    # Exactly, in labels: no voxel changes its label when the scans come in another order (every
    # order of the first 2 evaluation cases' scans, hemijax.models.pimms.unnamed_inputs).
    dict(kind="measure_at_most", run="pimms_soft", evaluation="unseen30",
         measure="permutation_invariance.voxels_label_changed", value=0,
         text="PIMMS (soft mapping) is permutation invariant: no voxel changes its label when the "
              "scans come in another order"),
    # "Within reach": our reading is at most 5 Dice points below, on the mean over subsets.
    dict(kind="within_points", run="pimms_soft", baseline="pimms_hemis", region="lesion", points=5,
         text="PIMMS (soft mapping) is within reach of HeMIS given the modalities' names "
              "(≤ 5 Dice points below, mean over the 7 subsets)"),
    # On the subsets with T1: the tissue-only model's input (it is fed T1 alone; without T1 it has
    # nothing to segment from).
    dict(kind="within_points", run="joint", baseline="joint_tissue_only",
         region=("csf", "gm", "wm"), points=2, present=("t1",),
         text="The joint model is within 2 Dice points of the tissue-only model (mean over the "
              "subsets with T1, that model's input)"),
    dict(kind="within_points", run="joint", baseline="joint_lesion_only", region="lesion", points=2,
         text="The joint model is within 2 Dice points of the lesion-only model"),
    # The paper scores each task's model on its dataset's modalities; the tissue claim above reads
    # T1 (the tissue set's). This is the lesion claim on the lesion set's T1 + FLAIR.
    dict(kind="within_points", run="joint", baseline="joint_lesion_only", region="lesion", points=2,
         present=("t1", "flair"),
         text="The joint model is within 2 Dice points of the lesion-only model on that model's "
              "input (T1 + FLAIR)"),
    # Ours: does a longer schedule close the gaps (seed 0 against the task models at seed 0)?
    dict(kind="within_points", run="joint_long", baseline="joint_tissue_only",
         region=("csf", "gm", "wm"), points=2, present=("t1",), same_seeds=True,
         text="Diagnosis (ours): with twice the steps (seed 0), the joint model is within 2 Dice "
              "points of the tissue-only model (subsets with T1)"),
    dict(kind="within_points", run="joint_long", baseline="joint_lesion_only", region="lesion",
         points=2, same_seeds=True,
         text="Diagnosis (ours): with twice the steps (seed 0), the joint model is within 2 Dice "
              "points of the lesion-only model"),
)


def _run(name, config, preset, seeds, **overrides):
  return dict(name=name, config=f"configs/{config}.py", preset=preset, seeds=seeds,
              overrides=overrides)


# Budgets the demo presets do not give: the disentanglement demo's 600 steps (sized for a 15-minute
# first run) leave its validation score at about 0.2 (seed 0: 0.09, 0.22, 0.20 at steps 200, 400,
# 600) where the 2D tumour runs reach 0.6-0.75, so the study trains it 2000 steps, validating every
# 200. PIMMS and the joint model keep their budgets but validate every 100 steps (instead of 250 and
# 200), so that the report can tell whether their validation levelled off. PIMMS trains its
# segmenter twice the demo's 800 steps: at 800 the soft variant's validation was still climbing
# (seed 0: 0.32 at step 300 of segmentation to 0.47 at 800, a fitted rise of +0.10 over the last
# quarter), and the online variant's γ is scaled to the longer run as the demo scales it to its own.
#
# The 3D runs' windows (validation and evaluation) overlap by 0.25 (MONAI's default) instead of the
# demo preset's 0.5: about half the windows (80 against 150 of 32^3 on a 91 x 109 x 91 volume),
# which makes 3D evaluations of 30 cases x 15 subsets fit the machine's sessions.
PIMMS_DEMO_STEPS = pimms_config.get_config("demo").train.num_steps
DEMO_BUDGETS = {
    "disentangle": {"train.num_steps": 2000, "eval.overlap": 0.25},
    "pimms": {"train.eval_every": 100, "train.checkpoint_every": 100,
              "train.num_steps": 2 * PIMMS_DEMO_STEPS,
              "loss.class_weight_decay": 5.0 / (2 * PIMMS_DEMO_STEPS)},
    # Its 500 MLP steps validated every 250 give too few points to tell whether they levelled off.
    "mlp_impute": {"train.eval_every": 100, "train.checkpoint_every": 100},
    "joint": {"train.eval_every": 100, "train.checkpoint_every": 100},
}


def _disentangle_in_study(preset: str) -> ml_collections.ConfigDict:
  """The disentanglement config as this preset's study trains it."""
  config = disentangle_config.get_config(preset)
  for dotted, value in (DEMO_BUDGETS["disentangle"].items() if preset == "demo" else ()):
    section, field = dotted.split(".")
    config[section][field] = value
  return config


def _hemis_3d(preset: str) -> dict:
  """Overrides that make HeMIS a 3D model on the disentanglement runs' patch size, batch size
  and validation/evaluation windows, with 3x3x3 kernels throughout (the 2D demo's 5x5 front end
  and final layer would take 125 taps each in 3D, and an evaluation of 15 subsets runs them once
  per subset). Its patch sampling stays HeMIS' (class-balanced centres for half the steps);
  `disentangle_balanced` gives the disentanglement model the same."""
  config = _disentangle_in_study(preset)
  return {"data.patch_size": tuple(config.data.patch_size),
          "data.batch_size": config.data.batch_size,
          "eval.roi_size": tuple(config.eval.roi_size), "eval.overlap": config.eval.overlap,
          "model.backend_kernel": 3, "model.frontend_kernel": 3, "model.final_kernel": 3}


def study_runs(preset: str) -> list[dict]:
  """The issue's list: tumour (2D and 3D), PIMMS on WMH, joint lesion + tissue."""
  tumour, other = TUMOUR_2D_SEEDS, OTHER_SEEDS
  urn_steps = urn_config.get_config(preset).train.num_steps
  runs = [
      _run("hemis", "hemis", preset, tumour),
      _run("unet", "unet", preset, tumour),
      _run("unet_dropout", "unet", f"{preset}_dropout", tumour),
      # The HeMIS paper's two baselines share one network: the MLPs impute into this seed's U-Net.
      _run("mlp_impute", "mlp_impute", preset, tumour, **{"impute.segmenter_from": "run:unet"}),
      # The URN paper's two rows: "URN + MD" (no pre-training, encoders trained end to end) and
      # "URN + MD with pooled healthy data" (synthesis pre-training on tumour + healthy volumes,
      # then segmentation on the frozen encoders); and, between them, pre-training on the task's
      # own training volumes only.
      _run("urn_md", "urn", f"{preset}_md", tumour),
      _run("urn_pooled", "urn", preset, tumour),
      _run("urn_taskdata", "urn", preset, tumour, **{"pretrain.healthy_subjects": 0}),
      # Diagnoses of ours (see CLAIMS), one seed each: both URN rows with a 64-channel unified
      # representation instead of the paper's 16.
      _run("urn_md_wide", "urn", f"{preset}_md", (0,), **{"model.representation_channels": 64}),
      _run("urn_pooled_wide", "urn", preset, (0,), **{"model.representation_channels": 64}),
      # And each URN row at twice the segmentation steps, on the seed whose validation score was
      # still rising at the end of the study's budget.
      _run("urn_md_long", "urn", f"{preset}_md", (0,), **{"train.num_steps": 2 * urn_steps}),
      _run("urn_pooled_long", "urn", preset, (1,), **{"train.num_steps": 2 * urn_steps}),
      # The other reading of the pooled row (the paper does not say whether the pre-trained
      # encoders stay frozen): the same pre-training, then encoders trained with the decoder.
      _run("urn_pooled_finetuned", "urn", f"{preset}_md_pooled_finetuned", (0,)),
      # PIMMS and the joint model before the 3D runs, the longest (a worker takes runs in order).
      _run("pimms_hemis", "pimms", f"{preset}_hemis", other),
      _run("pimms_soft", "pimms", f"{preset}_soft", other),
      _run("pimms_hard", "pimms", f"{preset}_hard", other),
      _run("pimms_online", "pimms", f"{preset}_online", other),
      _run("joint", "joint", preset, other),
      _run("joint_noconsistency", "joint", preset, other, **{"loss.consistency_weight": 0.0}),
      _run("joint_tissue_only", "joint", preset, other, variant="tissue_only"),
      _run("joint_lesion_only", "joint", preset, other, variant="lesion_only"),
      # A diagnosis of ours (see CLAIMS): the joint model at twice its steps.
      _run("joint_long", "joint", preset, (0,),
           **{"train.num_steps": 2 * joint_config.get_config(preset).train.num_steps}),
      _run("disentangle", "disentangle", preset, other),
      # A diagnosis of ours (see CLAIMS), right after the run it is compared with: HeMIS in 3D
      # on the disentanglement preset's patches, batch and windows.
      _run("hemis_3d", "hemis", preset, other, **_hemis_3d(preset)),
      _run("disentangle_mean", "disentangle", preset, other,
           **{"model.fusion": "mean", "model.disentangle": False}),
      _run("disentangle_mean_dis", "disentangle", preset, other, **{"model.fusion": "mean"}),
      # A diagnosis of ours (see CLAIMS): the disentanglement model sampling patches as HeMIS
      # does (class-balanced centres for the first half of the steps, then uniform).
      _run("disentangle_balanced", "disentangle", preset, (0,),
           **{"data.sampling": "balanced", "data.balanced_fraction": 0.5}),
      # A diagnosis of ours (see CLAIMS): the disentanglement model with twice the study's
      # budget, one seed: seed 1, whose best validation score rose most in the last quarter of
      # its 2000 steps (0.394 by step 1400, 0.458 at 1800; seed 0: 0.257, then 0.295-0.298 at
      # 1600-2000). The longest run of the study, so it comes last: the claims' own runs first.
      _run("disentangle_long", "disentangle", preset, (1,),
           **{"train.num_steps": 2 * _disentangle_in_study(preset).train.num_steps}),
  ]
  if preset == "demo":
    for run in runs:
      method = run["config"].removeprefix("configs/").removesuffix(".py")
      run["overrides"] = {**DEMO_BUDGETS.get(method, {}), **run["overrides"]}
  return runs


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"configs/study.py: unknown preset {preset!r}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  config.title = f"hemijax robustness study ({preset})"
  config.seeds = TUMOUR_2D_SEEDS
  # Each group of runs on the same data is compared against the first of these it holds.
  config.reference = ("hemis", "pimms_hemis", "joint")
  # Every run is scored on 30 subjects it never saw: its task's built-in phantom generated with
  # another seed (the training phantom's own test split holds 6 cases, too few for paired tests).
  config.evaluations = [dict(name="unseen30", split="all", data=None,
                             data_overrides={"data.phantom_seed": UNSEEN_SEED,
                                             "data.phantom_subjects": UNSEEN_SUBJECTS})]
  config.step = "best"
  config.overrides = ml_collections.ConfigDict()  # nested: overrides.train.num_steps
  config.metrics = ("dice", "hd95", "assd")
  # BraTS conventions (hemijax.evaluation.metrics): the directed-maximum HD95 and the 373.13 mm
  # penalty for an empty prediction; no post-processing. The RFNet/mmFormer one counts a predicted
  # ET under 500 mm^3 as empty: min_region_volume_mm3={"ET": 500.0} (runs without ET ignore it).
  config.metric_options = ml_collections.ConfigDict(dict(
      hd95_convention="directed_max", empty_penalty="brats",
      min_region_volume_mm3=ml_collections.ConfigDict()))
  config.claims = list(CLAIMS)
  if preset == "smoke":
    config.seeds = (0, 1)
    config.runs = [_run("hemis", "hemis", "smoke", None), _run("unet", "unet", "smoke", None)]
    config.overrides.train = dict(num_steps=3)
    config.evaluations = [dict(name="test", split="test", data=None)]
  else:
    config.runs = study_runs(preset)
  return config
