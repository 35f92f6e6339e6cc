"""The docs montage (docs/phantom_montage.png): axial slices of a few phantom subjects."""
from __future__ import annotations

import io

import numpy as np

from hemijax import atomic
from hemijax.data.phantom.subject import generate_subject


def render_montage(path, seed=0, spacing=2.0):
  """PNG of axial slices through the tumour; columns = FLAIR, T1, T1ce, T2, labels over FLAIR.

  Rows: subject 1 (enhancing), subject 2 (no enhancing part), subject 3 (random), then subject 1
  again acquired with the 'heldout' protocol: same anatomy, another scanner.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  rows = [(0, "default", True), (1, "default", False), (2, "default", None), (0, "heldout", True)]
  cols = ["flair", "t1", "t1ce", "t2"]
  fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(2.2 * (len(cols) + 1), 2.5 * len(rows)),
                           facecolor="black")
  # BraTS colours: necrotic/non-enhancing red, oedema green, enhancing yellow.
  cmap = ListedColormap([(0, 0, 0, 0), (1, 0.15, 0.15, 0.8), (0.2, 0.9, 0.2, 0.55),
                         (0, 0, 0, 0), (1, 0.95, 0.1, 0.85)])
  for r, (i, protocol, enhancing) in enumerate(rows):
    subject = generate_subject("tumor", np.random.default_rng([seed, i]), spacing, protocol,
                               enhancing=enhancing)
    label = subject["label"]
    z = int(np.argmax((label > 0).sum((0, 1)) + 0.5 * np.isin(label, (1, 4)).sum((0, 1))))
    for c, m in enumerate(cols + ["label"]):
      ax = axes[r, c]
      img = subject["images"]["flair" if m == "label" else m][:, :, z]
      vals = img[img > 0]
      lo, hi = np.percentile(vals, (1.0, 99.5)) if vals.size else (0.0, 1.0)
      ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
      if m == "label":
        ax.imshow(label[:, :, z].T, origin="lower", cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for s in ax.spines.values():
        s.set_visible(False)
      if r == 0:
        ax.set_title({"label": "labels (1/2/4)"}.get(m, m.upper().replace("CE", "ce")),
                     color="white", fontsize=11)
    kind = subject["meta"]["tumor"]["kind"]
    axes[r, 0].set_ylabel(f"subject {i + 1}\n{protocol}, {kind}", color="white", fontsize=9)
  fig.suptitle(f"hemijax phantom, task tumor, seed {seed}, {spacing:g} mm", color="white", fontsize=11)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80, facecolor="black", metadata={"Software": None})
  plt.close(fig)
  atomic.write_bytes(path, buf.getvalue())
