"""The training crops' augmentation, per record and per batch (numpy; `pipeline` runs them).

* `RandomCropDihedral` (a grain random map on records): one random ``crop_size`` square window,
  the same for low and high, then one of the 8 dihedral transforms (`dihedral`), the same for
  both; images smaller than the crop are reflect-padded at the bottom/right first, as the
  official MIRNet loader does.
* `MixUpToFloat` (a grain map on batch k = train step k): uint8 -> float32 [0, 1], and from
  ``start_step`` on MixUp, row i -> ``lam_i * row_i + (1 - lam_i) * row_perm(i)`` with
  ``lam_i ~ Beta(alpha, alpha)`` and ``perm`` seeded by (seed, step).

Both avoid numpy's slow paths (`_transformed`, `_mix`): the crop's copy and the mix are most
of a training crop's cost once the images are decoded.
"""

from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
  """One of the 8 symmetries of the square on the first two axes of x.

  Args:
    x: array [H, W, ...].
    k: 0-3 rotate by k * 90 degrees counter-clockwise; 4-7 flip left-right, then rotate by
      (k - 4) * 90 degrees.

  Returns:
    The transformed array (a view).
  """
  if not 0 <= k < 8:
    raise ValueError(f'dihedral: k={k} not in [0, 8)')
  if k >= 4:
    x = x[:, ::-1]
  return np.rot90(x, k % 4)


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  pad_h, pad_w = max(size - x.shape[0], 0), max(size - x.shape[1], 0)
  if pad_h == pad_w == 0:
    return x
  return np.pad(x, ((0, pad_h), (0, pad_w), (0, 0)), mode='reflect')


def _transformed(window: np.ndarray, k: int) -> np.ndarray:
  """A contiguous copy of `dihedral(window, k)` for window [h, w, C].

  Copied one channel at a time: numpy's strided copy of a rotated or flipped [h, w, 3] view
  runs an inner loop of 3 elements per pixel, about 3x slower than three [h, w] planes with
  inner loops of a full row. This copy is most of the cost of a training crop.
  """
  view = dihedral(window, k)
  if view.strides[-2:] == (view.shape[-1] * view.itemsize, view.itemsize):
    return np.ascontiguousarray(view)  # pixels stay whole (k = 0, 6): one row-wise copy
  out = np.empty(view.shape, window.dtype)
  for channel in range(view.shape[-1]):
    out[..., channel] = view[..., channel]
  return out


class RandomCropDihedral:
  """grain random map: the same random crop and dihedral transform for low and high."""

  def __init__(self, crop_size: int):
    if crop_size < 1:
      raise ValueError(f'crop_size must be positive, got {crop_size}')
    self.crop_size = int(crop_size)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> Batch:
    low, high = np.asarray(record['low']), np.asarray(record['high'])
    if low.shape != high.shape or low.ndim != 3 or low.shape[-1] != 3:
      raise ValueError(
        f'record {record.get("name", "?")!r}: low {low.shape} and high {high.shape} must be '
        'equal [H, W, 3]'
      )
    c = self.crop_size
    low, high = _pad_to(low, c), _pad_to(high, c)
    top = int(rng.integers(0, low.shape[0] - c + 1))
    left = int(rng.integers(0, low.shape[1] - c + 1))
    k = int(rng.integers(0, 8))

    return {
      'low': _transformed(low[top : top + c, left : left + c], k),
      'high': _transformed(high[top : top + c, left : left + c], k),
    }


class MixUpToFloat:
  """grain map_with_index on batches: uint8 -> float32 [0, 1], MixUp from a given step on."""

  def __init__(self, *, mixup: bool, alpha: float, start_step: int, seed: int):
    if mixup and alpha <= 0:
      raise ValueError(f'mixup_alpha must be positive, got {alpha}')
    self.mixup = bool(mixup)
    self.alpha = float(alpha)
    self.start_step = int(start_step)
    self.seed = int(seed)

  def __call__(self, step: int, batch: Batch) -> Batch:
    low, high = batch['low'], batch['high']
    b = low.shape[0]
    if self.mixup and step >= self.start_step:
      rng = np.random.default_rng([self.seed, step])
      lam = rng.beta(self.alpha, self.alpha, size=(b, 1, 1, 1)).astype(np.float32)
      perm = rng.permutation(b)
      # lam * x / 255 + (1 - lam) * x[perm] / 255 with the scale folded into the weights: two
      # passes over the uint8 batch instead of five over float copies.
      own, other = lam / np.float32(255), (1 - lam) / np.float32(255)
      low, high = (_mix(x, perm, own, other) for x in (low, high))
    else:
      low, high = (x.astype(np.float32) / np.float32(255) for x in (low, high))
    return {'low': low, 'high': high, 'mask': np.ones((b,), bool)}


def _mix(x: np.ndarray, perm: np.ndarray, own: np.ndarray, other: np.ndarray) -> np.ndarray:
  """own * x + other * x[perm] in float32 for uint8 x [B, ...], weights [B, 1, ...].

  Row by row, so the one temporary stays in the CPU cache (a batch-sized temporary made this
  memory-bound on a busy machine).
  """
  out = np.empty(x.shape, np.float32)
  tmp = np.empty(x.shape[1:], np.float32)
  for i, j in enumerate(perm):
    np.multiply(x[i], own[i], out=out[i])
    np.multiply(x[j], other[i], out=tmp)
    out[i] += tmp
  return out
