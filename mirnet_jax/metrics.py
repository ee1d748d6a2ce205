"""Image-quality metrics under the project's evaluation protocol (../shared/docs/protocol.md).

The protocol, in short: clamp the model output to [0, 1], quantise it to 8 bits as a saved PNG
would, and compare with the 8-bit ground truth on the 0-255 scale; PSNR, SSIM, MAE and MSE are
computed per image and averaged over the images of a dataset.

Use `compute_metrics` on model outputs: it takes [0, 1] floats and quantises both sides itself,
so the two bugs seen in published MIRNet code cannot happen through it (a peak of 255 on [0, 1]
images, which adds 48.13 dB, and uint8 subtraction wrapping around). The lower-level `psnr`,
`ssim`, `mae` and `mse` take [B, H, W, C] arrays on the 0-255 scale, of any real dtype; they
convert to float32 before subtracting.

Numerics. Everything runs in float32, so it jits on every backend (TPUs have no float64) and
needs no `jax_enable_x64`, yet matches the protocol's float64 values:
- Means are pairwise (tree) sums. On quantised inputs the squared and absolute errors are
  integers below 2**16, so every partial sum is exact until it passes 2**24; only the last few
  levels of the tree round, and the per-image MSE is within a few float32 ulps (~3e-7 relative)
  of the float64 value.
- SSIM filters each image channel after subtracting its rounded mean: variances and
  covariances do not change under a shift, and the smaller magnitudes make `E[x^2] - E[x]^2`
  lose far less to cancellation. The per-image SSIM is within ~1e-6 of scikit-image's.
Dataset means are taken on the host in float64 by `summarize`.
"""

from collections.abc import Iterable, Mapping

import clu.metrics
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PEAK = 255.0
METRIC_KEYS = ('psnr', 'ssim', 'mae', 'mse')
GT_MEAN_SUFFIX = '_gt_mean'

# Wang et al. 2004, as scikit-image implements it with gaussian_weights=True: an 11-tap
# Gaussian (sigma 1.5, truncated at 3.5 sigma, normalised to sum 1) and population covariances.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# ITU-R BT.601 luma, the weights of OpenCV's BGR2GRAY used by the GT-mean papers.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def quantize(x: jax.Array) -> jax.Array:
  """Quantises a [0, 1] image to 8 bits as a saved PNG would be.

  Args:
    x: float array, nominally in [0, 1] (a raw model output may lie outside).

  Returns:
    float32 array of the same shape holding integers 0..255 (round half to even, as numpy).
  """
  return jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * PEAK)


def _pairwise_sum(x: jax.Array) -> jax.Array:
  """Sums the last axis as a balanced binary tree: error grows with log2(n), not n."""
  n = x.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def _per_image_mean(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first, [B, ...] -> [B]."""
  flat = x.reshape(x.shape[0], -1)
  return _pairwise_sum(flat) / flat.shape[1]


def _check_pair(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  if pred.shape != target.shape or pred.ndim != 4:
    raise ValueError(
      f'expected two [B, H, W, C] arrays of one shape, got {pred.shape} and {target.shape}'
    )
  # Cast before subtracting: uint8 differences wrap around (the second protocol bug).
  return pred.astype(jnp.float32), target.astype(jnp.float32)


def mse(pred255: jax.Array, target255: jax.Array) -> jax.Array:
  """Mean squared error per image over all pixels and channels, on the 0-255 scale.

  Args:
    pred255: [B, H, W, C] output on the 0-255 scale (any real dtype).
    target255: [B, H, W, C] ground truth on the 0-255 scale.

  Returns:
    float32 [B].
  """
  pred255, target255 = _check_pair(pred255, target255)
  return _per_image_mean(jnp.square(pred255 - target255))


def mae(pred255: jax.Array, target255: jax.Array) -> jax.Array:
  """Mean absolute error per image over all pixels and channels, on the 0-255 scale.

  Args:
    pred255: [B, H, W, C] output on the 0-255 scale (any real dtype).
    target255: [B, H, W, C] ground truth on the 0-255 scale.

  Returns:
    float32 [B].
  """
  pred255, target255 = _check_pair(pred255, target255)
  return _per_image_mean(jnp.abs(pred255 - target255))


def psnr(pred255: jax.Array, target255: jax.Array) -> jax.Array:
  """PSNR per image, `10 * log10(255**2 / MSE)`, with MSE over all pixels and channels.

  Identical images (MSE 0) give +inf, as scikit-image does: a cap would be an arbitrary number
  that averages as if it were a measurement. Quantised images that differ in one value of one
  pixel already have a finite PSNR, so inf means exactly equal. A non-finite MSE (NaN or Inf
  anywhere in either image) gives NaN, never +inf: a broken output must not look perfect, and
  NaN never wins a comparison (a best-checkpoint policy ranks it last).

  Args:
    pred255: [B, H, W, C] output on the 0-255 scale (any real dtype).
    target255: [B, H, W, C] ground truth on the 0-255 scale.

  Returns:
    float32 [B], in dB.
  """
  err = mse(pred255, target255)
  # `err > 0` alone is False for NaN, which would score a NaN image as +inf (identical).
  measured = jnp.isfinite(err) & (err > 0)
  safe = jnp.where(measured, err, 1.0)
  value = jnp.where(err == 0, jnp.inf, jnp.nan)
  return jnp.where(measured, 10.0 * jnp.log10(PEAK**2 / safe), value)


def _gaussian_taps() -> np.ndarray:
  """scipy.ndimage's Gaussian kernel, built in float64 like scikit-image's."""
  x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
  return taps / taps.sum()


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable Gaussian filter over axes 1 and 2 of [B, H, W, C], 'valid' positions only.

  scikit-image filters with mode 'reflect' and then drops a border of `radius` pixels before
  averaging the SSIM map; the windows that remain never reach the reflected padding, so the
  valid positions alone give its result exactly. Shifted slices rather than a convolution keep
  this cheap and identical on every backend.
  """
  k = len(taps)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(float(t) * x[:, i : i + h] for i, t in enumerate(taps))
  return sum(float(t) * x[:, :, i : i + w] for i, t in enumerate(taps))


def ssim(pred255: jax.Array, target255: jax.Array) -> jax.Array:
  """SSIM per image (Wang et al. 2004), averaged over channels, on the 0-255 scale.

  Equals scikit-image's `structural_similarity(pred, target, channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)` per image:
  11x11 Gaussian window with sigma 1.5, K1 0.01, K2 0.03, population covariances, and the mean
  of the SSIM map over the positions whose window lies inside the image (scikit-image's crop of
  5 pixels per side). The evaluated image itself is not cropped or resized.

  Args:
    pred255: [B, H, W, C] output on the 0-255 scale (any real dtype); H, W >= 11.
    target255: [B, H, W, C] ground truth on the 0-255 scale.

  Returns:
    float32 [B].
  """
  x, y = _check_pair(pred255, target255)
  win = 2 * SSIM_RADIUS + 1
  if x.shape[1] < win or x.shape[2] < win:
    raise ValueError(f'SSIM needs images of at least {win}x{win}, got {x.shape[1:3]}')
  taps = _gaussian_taps()
  # Shift each channel by its rounded mean: exact on integer data, and it keeps the second
  # moments small so that float32 loses little in E[x^2] - E[x]^2.
  sx = jnp.round(jnp.mean(x, axis=(1, 2), keepdims=True))
  sy = jnp.round(jnp.mean(y, axis=(1, 2), keepdims=True))
  x, y = x - sx, y - sy
  mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
  vx = _filter_valid(x * x, taps) - mx * mx
  vy = _filter_valid(y * y, taps) - my * my
  vxy = _filter_valid(x * y, taps) - mx * my
  ux, uy = mx + sx, my + sy
  c1 = (SSIM_K1 * PEAK) ** 2
  c2 = (SSIM_K2 * PEAK) ** 2
  num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
  den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
  # Equal counts per channel, so the mean over all of them is the mean of channel means.
  return _per_image_mean(num / den)


def gt_mean_correct(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Scales each output so that its grey mean equals the ground truth's (GT-mean correction).

  The convention of KinD/LLFlow-style evaluations: `pred * mean(gray(target)) /
  mean(gray(pred))`, clamped, with BT.601 grey. It hides global brightness errors, so the
  protocol reports it only under separate keys. An all-black output is left as it is.

  Args:
    pred: [B, H, W, 3] output in [0, 1] (clamped here before the means are taken).
    target: [B, H, W, 3] ground truth in [0, 1].

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  pred, target = _check_pair(pred, target)
  pred = jnp.clip(pred, 0.0, 1.0)
  weights = jnp.asarray(GRAY_WEIGHTS, jnp.float32)
  # Multiply-add rather than `@`: TPU matmuls default to bfloat16 passes.
  gray_pred = _per_image_mean(jnp.sum(pred * weights, axis=-1))
  gray_target = _per_image_mean(jnp.sum(target * weights, axis=-1))
  scale = jnp.where(gray_pred > 0, gray_target / jnp.where(gray_pred > 0, gray_pred, 1.0), 1.0)
  return jnp.clip(pred * scale[:, None, None, None], 0.0, 1.0)


def _metrics_255(pred255: jax.Array, target255: jax.Array) -> dict[str, jax.Array]:
  return {
    'psnr': psnr(pred255, target255),
    'ssim': ssim(pred255, target255),
    'mae': mae(pred255, target255),
    'mse': mse(pred255, target255),
  }


def compute_metrics(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array | None = None,
  *,
  gt_mean: bool = False,
) -> dict[str, jax.Array]:
  """Per-image protocol metrics of raw model outputs; jittable.

  Both sides are clamped and quantised here (`quantize`), so callers pass [0, 1] floats and
  never choose a peak value: a target read as uint8 / 255 comes back exactly.

  Args:
    pred: [B, H, W, 3] raw model output, nominally [0, 1], unclamped.
    target: [B, H, W, 3] ground truth in [0, 1] (uint8 / 255).
    mask: bool [B], True for real images, False for batch padding; None means all real.
    gt_mean: also report the metrics of `gt_mean_correct(pred, target)` under keys ending in
      `GT_MEAN_SUFFIX` ('psnr_gt_mean', ...).

  Returns:
    {'psnr', 'ssim', 'mae', 'mse'} -> float32 [B] (0 where mask is False, so padding never
    shows up as inf or nan; NaN for every key of an image whose raw output holds a NaN or Inf),
    plus 'mask' -> bool [B]. Feed a list of these to `summarize`, or the dict to
    `EvalMetrics.single_from_model_output(**out)`.
  """
  if mask is None:
    mask = jnp.ones(pred.shape[:1], bool)
  mask = jnp.asarray(mask, bool)
  # Clamping would turn +Inf into a plausible 255 and hide a diverged model: such an image
  # scores NaN on every key, so its dataset mean is NaN and it never ranks.
  finite = jnp.all(jnp.isfinite(pred.reshape(pred.shape[0], -1)), axis=1)
  target255 = quantize(target)
  out = _metrics_255(quantize(pred), target255)
  if gt_mean:
    corrected = quantize(gt_mean_correct(pred, target))
    for key, value in _metrics_255(corrected, target255).items():
      out[key + GT_MEAN_SUFFIX] = value
  out = {key: jnp.where(mask, jnp.where(finite, value, jnp.nan), 0.0) for key, value in out.items()}
  out['mask'] = mask
  return out


def summarize(per_image: Mapping[str, object] | Iterable[Mapping[str, object]]) -> dict:
  """Dataset means over the real images of one or more `compute_metrics` outputs.

  Runs on the host in float64, so the result is exact whatever the batch size, padding or
  device count.

  Args:
    per_image: one output of `compute_metrics` or an iterable of them (arrays or numpy);
      each must hold 'mask'.

  Returns:
    {key: float mean over images with mask True, ..., 'count': int}. One NaN image (a
    non-finite output, see `compute_metrics`) makes its keys' means NaN: a broken model is
    never averaged into a plausible figure.

  Raises:
    ValueError: if no image has mask True.
  """
  batches = [per_image] if isinstance(per_image, Mapping) else list(per_image)
  mask = np.concatenate([np.asarray(b['mask'], bool).reshape(-1) for b in batches])
  count = int(mask.sum())
  if count == 0:
    raise ValueError('summarize: no image has mask True')
  keys = [k for k in batches[0] if k != 'mask']
  means = {}
  for key in keys:
    values = np.concatenate([np.asarray(b[key], np.float64).reshape(-1) for b in batches])
    means[key] = float(values[mask].mean())
  means['count'] = count
  return means


@flax.struct.dataclass
class EvalMetrics(clu.metrics.Collection):
  """clu collection of the protocol metrics, masked by the model output 'mask'.

  `EvalMetrics.single_from_model_output(**compute_metrics(...))`. clu accumulates in float32
  on device: fine for logging; `summarize` is the exact path for reported numbers.
  """

  psnr: clu.metrics.Average.from_output('psnr')
  ssim: clu.metrics.Average.from_output('ssim')
  mae: clu.metrics.Average.from_output('mae')
  mse: clu.metrics.Average.from_output('mse')
