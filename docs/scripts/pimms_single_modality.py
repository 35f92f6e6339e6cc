"""PIMMS single-modality diagnosis: what the training batches hold and what a trained model does.

  python docs/scripts/pimms_single_modality.py WORKDIR [STEP]
"""
import sys
import jax, jax.numpy as jnp, numpy as np
from hemijax.data import datasets, sampling
import pathlib, ml_collections
from hemijax.training import checkpoints
from hemijax.models import get_method
from hemijax.inference import sliding_window as inference


def load_run(workdir, step):
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(checkpoints.load_config_dict(workdir))
  method = get_method(config)
  manager = checkpoints.make_manager(workdir, keep=config.train.keep_checkpoints)
  step = manager.latest_step()
  m = len(method.modalities)
  image = jax.ShapeDtypeStruct((1,) + tuple(config.data.patch_size) + (m,), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, m), jnp.bool_)
  abstract = jax.eval_shape(method.init, jax.random.key(0), image, mask)
  variables = checkpoints.restore_variables(manager, int(step), abstract)
  manager.close()
  return config, method, variables
from hemijax.nn import modality_dropout as dropout_lib, losses

workdir = sys.argv[1]
step = sys.argv[2] if len(sys.argv) > 2 else "latest"
config, method, variables = load_run(workdir, step)
vols = datasets.load_split(config, "train")
make_batch = sampling.make_patch_batches(config, vols)
sampler = jax.jit(dropout_lib.make_sampler(config.dropout))
n = config.train.num_steps
# 1. What the batches hold.
rows = {"balanced": [], "uniform": []}
half = int(config.data.balanced_fraction * n)
single_with_lesion = {"balanced": 0, "uniform": 0}
single_total = {"balanced": 0, "uniform": 0}
for s in range(0, n):
  b = make_batch(s)
  kept = np.asarray(sampler(jax.random.fold_in(jax.random.key(config.seed), s), b["modality_mask"], s))
  phase = "balanced" if s < half else "uniform"
  lesion_vox = (b["label"] == 1).reshape(len(b["label"]), -1).sum(1)
  rows[phase].append(lesion_vox)
  if s >= config.dropout.warmup_steps:
    single = kept.sum(1) == 1
    single_total[phase] += int(single.sum())
    single_with_lesion[phase] += int((single & (lesion_vox > 0)).sum())
for phase, r in rows.items():
  r = np.concatenate(r)
  print(f"{phase}: {len(r)} patches, with lesion {np.mean(r > 0):.3f}, lesion voxels/patch mean "
        f"{r.mean():.1f} (of {np.prod(config.data.patch_size)}); single-modality examples after warm-up "
        f"{single_total[phase]}, with a lesion {single_with_lesion[phase]}")
# (note: the jitted sampler key is not the training step's key; proportions only)

# 2. The trained model on balanced training patches that hold lesions.
bal = sampling.Sampler(vols, patch_size=tuple(config.data.patch_size), strategy="balanced")
b = bal.sample(np.random.default_rng(123), 64)
keep = (b["label"] == 1).reshape(64, -1).sum(1) > 0
b = {k: v[keep] for k, v in b.items()}
print("eval patches with lesions:", int(keep.sum()))
params = variables["params"]
apply = jax.jit(lambda x, m: method.model.apply(variables, x, m))
names = list(config.modalities)
for subset in [(0,), (1,), (2,), (0, 1, 2)]:
  mask = np.zeros(b["modality_mask"].shape, bool); mask[:, list(subset)] = True
  logits = np.asarray(apply(jnp.asarray(b["image"]), jnp.asarray(mask)))
  probs = jax.nn.softmax(logits, -1)[..., 1]
  les = b["label"] == 1
  margin = logits[..., 1] - logits[..., 0]
  print(f"{'+'.join(names[i] for i in subset):14s} lesion prob at lesions: median {np.median(probs[les]):.2e} "
        f"p90 {np.quantile(probs[les], .9):.2e}; at background p99 {np.quantile(probs[~les], .99):.2e}; "
        f"margin at lesions median {np.median(margin[les]):.1f}; predicted lesion voxels {(probs > .5).sum()} "
        f"(true {les.sum()})")
  # ranking: does the margin put lesions above background within the brain (AUC)?
  brain = b["valid"].astype(bool) & (np.abs(b["image"]).sum(-1) > 0)
  pos, neg = margin[les], margin[brain & ~les]
  ranks = np.argsort(np.argsort(np.concatenate([pos, neg])))
  auc = (ranks[:len(pos)].sum() - len(pos) * (len(pos) - 1) / 2) / (len(pos) * len(neg))
  print(f"{'':14s} background margin median {np.median(neg):.1f}, lesion-vs-brain AUC {auc:.3f}")

# 3. Val Dice per subset (whole volumes, sliding window), mean over cases.
val = datasets.load_split(config, "val")
settings = inference.WindowSettings.from_config(config)
forward = inference.make_window_forward(method, variables)
subsets = [(0,), (1,), (2,), (0, 1, 2)]
masks = np.zeros((len(subsets), len(names)), bool)
for i, s in enumerate(subsets):
  masks[i, list(s)] = True
dice = np.zeros((len(val), len(subsets)))
for c, vol in enumerate(val):
  probs = inference.predict_probabilities(method, variables, vol.image, masks, settings, forward=forward)
  truth = vol.label == 1
  for i, p in enumerate(probs):
    pred = np.argmax(p, -1) == 1
    dice[c, i] = 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
print("val Dice (mean of", len(val), "cases):", {"+".join(names[j] for j in s): round(float(d), 3) for s, d in zip(subsets, dice.mean(0))})
