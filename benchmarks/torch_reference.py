r"""The benchmark's HeMIS-3D network in PyTorch, for `bench_conv.py --torch` (never imported by hemijax).

  pip install -e ".[bench]"      # torch==2.13.0, the CPU build (a file on this workplace's disk)

The same network as `bench_conv.py` builds in JAX: per modality two 3x3x3 convolutions 1 -> 48 ->
48 with ReLU and a 2x2x2 max-pool with stride 1 and TensorFlow's SAME padding (one -inf row after
each spatial axis), fusion by the mean and the variance over the modalities (the (n - 1) variance,
as `hemijax.nn.fusion.moments`), then convolutions 96 -> 16 (ReLU) -> 4. Channels-first NCDHW as
PyTorch prefers; the modality axis is folded into the batch for the back ends, which is what a
PyTorch user would write (one shared Conv3d per modality would be slower: 4 separate modules are
applied to the 4 modality slices). A training step is cross-entropy, backward and an SGD update,
as `bench_conv.make_train_step`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODALITIES, CLASSES = 4, 4
BACKEND, FRONTEND, KERNEL = (48, 48), (16,), 3


class Backend(torch.nn.Module):
  def __init__(self):
    super().__init__()
    widths = (1,) + BACKEND
    self.convs = torch.nn.ModuleList(
        torch.nn.Conv3d(cin, cout, KERNEL, padding=KERNEL // 2)
        for cin, cout in zip(widths[:-1], widths[1:]))

  def forward(self, x):
    for conv in self.convs:
      x = F.relu(conv(x))
    # SAME padding of a window-2 stride-1 pool: nothing before, one -inf plane after each axis.
    return F.max_pool3d(F.pad(x, (0, 1, 0, 1, 0, 1), value=float("-inf")), 2, stride=1)


class TorchHeMIS(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.backends = torch.nn.ModuleList(Backend() for _ in range(MODALITIES))
    widths = (2 * BACKEND[-1],) + FRONTEND
    self.frontend = torch.nn.ModuleList(
        torch.nn.Conv3d(cin, cout, KERNEL, padding=KERNEL // 2)
        for cin, cout in zip(widths[:-1], widths[1:]))
    self.final = torch.nn.Conv3d(widths[-1], CLASSES, KERNEL, padding=KERNEL // 2)

  def forward(self, image, modality_mask):
    """image (B, M, D, H, W), modality_mask (B, M) bool -> logits (B, classes, D, H, W)."""
    features = torch.stack([backend(image[:, m:m + 1]) for m, backend in enumerate(self.backends)],
                           dim=1)                                      # (B, M, C, D, H, W)
    weights = modality_mask.to(features.dtype)[:, :, None, None, None, None]
    count = weights.sum(1)
    mean = (features * weights).sum(1) / count.clamp(min=1.0)
    # (n - 1) as `hemijax.nn.fusion.masked_variance`; with one modality the sum is 0.
    variance = (((features - mean[:, None]) ** 2) * weights).sum(1) / (count - 1).clamp(min=1.0)
    x = torch.cat([mean, variance], dim=1)
    for conv in self.frontend:
      x = F.relu(conv(x))
    return self.final(x)


def make_cases(train_shape, infer_shape, seed: int = 0, compile_modes=("eager", "compile")):
  """{"torch <mode>": (callable, args)} for the train step and for inference, the same inputs'
  shapes as bench_conv's: train_shape = (B, D, H, W), infer_shape likewise."""
  torch.manual_seed(seed)
  model = TorchHeMIS()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
  batch = train_shape[0]
  train_image = torch.randn(batch, MODALITIES, *train_shape[1:])
  train_labels = torch.randint(0, CLASSES, (batch, *train_shape[1:]))
  train_mask = torch.ones(batch, MODALITIES, dtype=torch.bool)
  infer_image = torch.randn(infer_shape[0], MODALITIES, *infer_shape[1:])
  infer_mask = torch.ones(infer_shape[0], MODALITIES, dtype=torch.bool)

  def forward_fn(mode):
    return torch.compile(model) if mode == "compile" else model

  train, infer = {}, {}
  for mode in compile_modes:
    forward = forward_fn(mode)

    def train_step(image, mask, labels, forward=forward):
      optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(forward(image, mask), labels)
      loss.backward()
      optimizer.step()
      return loss.detach()

    def inference(image, mask, forward=forward):
      with torch.inference_mode():
        return forward(image, mask)

    train[f"torch {mode}"] = (train_step, (train_image, train_mask, train_labels))
    infer[f"torch {mode}"] = (inference, (infer_image, infer_mask))
  return train, infer


def num_parameters(model=None) -> int:
  model = model or TorchHeMIS()
  return sum(p.numel() for p in model.parameters())
