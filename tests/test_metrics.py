"""Metrics against hand-computed values, scikit-image, and the two published protocol bugs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from mirnet_jax import metrics

# Jitted once per shape: eager dispatch compiles every small op and is several times slower.
compute_metrics = jax.jit(metrics.compute_metrics, static_argnames='gt_mean')
ssim = jax.jit(metrics.ssim)
psnr = jax.jit(metrics.psnr)
mse = jax.jit(metrics.mse)
mae = jax.jit(metrics.mae)
gt_mean_correct = jax.jit(metrics.gt_mean_correct)

SKIMAGE_SSIM = dict(
  channel_axis=-1,
  gaussian_weights=True,
  sigma=1.5,
  use_sample_covariance=False,
  data_range=255,
)


# Hand value of _pair_255: 10 * log10(255**2 / (20 / 363)).
PSNR_PAIR = 60.71956990240042


def _skimage_ssim(pred255: np.ndarray, target255: np.ndarray) -> np.ndarray:
  return np.array(
    [structural_similarity(p, t, **SKIMAGE_SSIM) for p, t in zip(pred255, target255, strict=True)]
  )


def _pair_255() -> tuple[np.ndarray, np.ndarray]:
  """One 11x11 RGB image pair (SSIM's smallest) differing by +4 and -2 in two of 363 values."""
  target = np.full((1, 11, 11, 3), 10.0, np.float32)
  pred = target.copy()
  pred[0, 0, 0, 0] = 14.0
  pred[0, 1, 1, 2] = 8.0
  return pred, target


def test_quantize_clamps_and_rounds():
  x = jnp.array([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 0.2, 1.0, 1.3])
  np.testing.assert_array_equal(metrics.quantize(x), [0, 0, 0, 1, 51, 255, 255])


def test_quantize_round_trips_uint8_targets():
  levels = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(metrics.quantize(levels / 255.0), levels)


def test_mse_mae_psnr_by_hand():
  pred, target = _pair_255()
  # Squared errors 16 and 4 over 363 values; absolute errors 4 and 2.
  np.testing.assert_allclose(mse(pred, target), [20 / 363], rtol=1e-7)
  np.testing.assert_allclose(mae(pred, target), [6 / 363], rtol=1e-7)
  # 10 * log10(255**2 / (20 / 363)) = 10 * log10(1180203.75).
  np.testing.assert_allclose(psnr(pred, target), [PSNR_PAIR], atol=1e-5)


def test_metrics_are_per_image():
  pred, target = _pair_255()
  batch_pred = np.concatenate([pred, target, 255.0 - target])
  batch_target = np.concatenate([target] * 3)
  np.testing.assert_allclose(mse(batch_pred, batch_target), [20 / 363, 0.0, 235.0**2])
  np.testing.assert_allclose(mae(batch_pred, batch_target), [6 / 363, 0.0, 235.0])


def test_psnr_of_identical_images_is_inf_and_one_count_off_is_finite():
  target = np.full((1, 2, 2, 3), 7.0, np.float32)
  assert psnr(target, target)[0] == np.inf
  pred = target.copy()
  pred[0, 0, 1, 1] += 1
  # MSE = 1/12, the smallest non-zero error of 8-bit images of this size.
  np.testing.assert_allclose(psnr(pred, target), [10 * math.log10(65025 * 12)], atol=1e-5)


def test_psnr_of_non_finite_images_is_nan_never_inf():
  """`err > 0` is False for NaN: an all-NaN output once scored +inf, the best possible."""
  pred, target = _pair_255()
  nan_pred = np.full_like(pred, np.nan)
  one_nan = pred.copy()
  one_nan[0, 5, 5, 1] = np.nan
  inf_pred = pred.copy()
  inf_pred[0, 3, 3, 0] = np.inf
  batch = np.concatenate([nan_pred, one_nan, inf_pred, -inf_pred, pred, target])
  out = np.asarray(psnr(batch, np.concatenate([target] * 6)))
  assert np.isnan(out[:4]).all(), out
  # The finite images beside them keep their hand values.
  np.testing.assert_allclose(out[4], PSNR_PAIR, atol=1e-5)
  assert out[5] == np.inf
  # A NaN target is as unmeasurable as a NaN output.
  assert np.isnan(psnr(target, nan_pred)[0])


def test_non_finite_outputs_score_nan_on_every_key_and_never_rank():
  pred255, target255 = _pair_255()
  pred, target = pred255 / 255.0, target255 / 255.0
  broken = [np.full_like(pred, np.nan), pred.copy(), pred.copy()]
  broken[1][0, 2, 2, 2] = np.inf  # clamping would have made this a plausible 255
  broken[2][0, 4, 4, 0] = -np.inf
  batch = np.concatenate([*broken, pred, pred])
  mask = np.array([True, True, True, True, False])
  out = compute_metrics(batch, np.concatenate([target] * 5), mask, gt_mean=True)
  for key in ('psnr', 'ssim', 'mae', 'mse', 'psnr_gt_mean', 'mse_gt_mean'):
    values = np.asarray(out[key])
    assert np.isnan(values[:3]).all(), (key, values)
    assert np.isfinite(values[3]) and values[4] == 0.0, (key, values)  # real image; padding
  np.testing.assert_allclose(out['psnr'][3], PSNR_PAIR, atol=1e-5)
  np.testing.assert_allclose(out['mse'][3], 20 / 363, rtol=1e-6)
  summary = metrics.summarize(out)
  assert np.isnan(summary['psnr']) and summary['count'] == 4
  # Without the broken images the mean is the hand value.
  good = metrics.summarize({k: np.asarray(v)[3:] for k, v in out.items()})
  assert good['psnr'] == pytest.approx(PSNR_PAIR, abs=1e-5)


def test_peak_value_bug_cannot_happen():
  """Published bug 1: PSNR with peak 255 on [0, 1] images adds 20 * log10(255) = 48.13 dB."""
  pred255, target255 = _pair_255()
  pred, target = pred255 / 255.0, target255 / 255.0
  out = compute_metrics(pred, target)
  np.testing.assert_allclose(out['psnr'], [PSNR_PAIR], atol=1e-5)
  mse_01 = np.mean((pred.astype(np.float64) - target) ** 2)
  buggy = 10 * math.log10(255**2 / mse_01)
  assert buggy - float(out['psnr'][0]) == pytest.approx(20 * math.log10(255), abs=1e-4)
  assert 20 * math.log10(255) == pytest.approx(48.13, abs=5e-3)


def test_uint8_wraparound_bug_cannot_happen():
  """Published bug 2: uint8 subtraction wraps around (3 - 5 = 254), so MSE saturates."""
  target = np.full((1, 11, 11, 3), 5, np.uint8)
  pred = np.full((1, 11, 11, 3), 3, np.uint8)
  assert np.mean((pred - target).astype(np.float64) ** 2) == 254.0**2  # the trap
  np.testing.assert_allclose(mse(pred, target), [4.0])
  np.testing.assert_allclose(mae(pred, target), [2.0])
  np.testing.assert_allclose(psnr(pred, target), [10 * math.log10(65025 / 4)], atol=1e-5)
  # compute_metrics works on uint8 / 255, the same images.
  out = compute_metrics(pred / 255.0, target / 255.0)
  np.testing.assert_allclose(out['mse'], [4.0])


def test_ssim_of_identical_images_is_one():
  x = np.random.default_rng(0).integers(0, 256, (2, 16, 20, 3)).astype(np.float32)
  np.testing.assert_allclose(ssim(x, x), [1.0, 1.0], atol=1e-6)


def test_ssim_of_constant_images_by_hand():
  # Variances vanish, so SSIM = (2 * 100 * 120 + C1) / (100**2 + 120**2 + C1), C1 = 2.55**2.
  x = np.full((1, 11, 11, 3), 100.0, np.float32)
  y = np.full((1, 11, 11, 3), 120.0, np.float32)
  np.testing.assert_allclose(ssim(x, y), [24006.5025 / 24406.5025], rtol=1e-6)


def test_ssim_matches_skimage_on_random_images():
  rng = np.random.default_rng(1)
  target = rng.integers(0, 256, (3, 13, 17, 3)).astype(np.uint8)
  noise = rng.integers(-40, 41, target.shape)
  pred = np.clip(target.astype(int) + noise, 0, 255).astype(np.uint8)
  np.testing.assert_allclose(ssim(pred, target), _skimage_ssim(pred, target), atol=1e-6)


def test_ssim_rejects_images_smaller_than_the_window():
  x = np.zeros((1, 10, 32, 3), np.float32)
  with pytest.raises(ValueError, match='at least 11x11'):
    ssim(x, x)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='one shape'):
    mse(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 3, 3)))


def test_ssim_matches_skimage_on_eval15(eval15_pairs):
  low, high = eval15_pairs
  ours = ssim(low, high)
  np.testing.assert_allclose(ours, _skimage_ssim(low, high), atol=1e-5)


def test_mask_excludes_padding_images():
  rng = np.random.default_rng(2)
  target = rng.integers(0, 256, (3, 12, 12, 3)) / 255.0
  pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
  # The last image is batch padding: a copy of the target, whose PSNR would be inf.
  pred[2] = target[2]
  mask = np.array([True, True, False])
  out = jax.device_get(compute_metrics(pred, target, mask))
  for key in metrics.METRIC_KEYS:
    assert out[key][2] == 0.0
    assert np.all(np.isfinite(out[key]))
  np.testing.assert_array_equal(out['mask'], mask)
  summary = metrics.summarize(out)
  assert summary['count'] == 2
  alone = metrics.summarize(compute_metrics(pred[:2], target[:2]))
  for key in metrics.METRIC_KEYS:
    assert summary[key] == pytest.approx(alone[key], rel=1e-6)


def test_summarize_over_batches_weights_images_not_batches():
  batches = [
    {'psnr': np.array([10.0, 20.0]), 'mask': np.array([True, True])},
    {'psnr': np.array([40.0, 0.0]), 'mask': np.array([True, False])},
  ]
  assert metrics.summarize(batches) == {'psnr': pytest.approx(70 / 3), 'count': 3}
  with pytest.raises(ValueError, match='no image'):
    metrics.summarize([{'psnr': np.zeros(2), 'mask': np.zeros(2, bool)}])


def test_clu_collection_agrees_with_summarize():
  rng = np.random.default_rng(3)
  target = rng.integers(0, 256, (4, 12, 12, 3)) / 255.0
  pred = target * 0.8
  out = compute_metrics(pred, target, np.array([True, True, True, False]))
  collected = metrics.EvalMetrics.single_from_model_output(**out).compute()
  summary = metrics.summarize(out)
  for key in metrics.METRIC_KEYS:
    assert float(collected[key]) == pytest.approx(summary[key], rel=1e-6)


def test_gt_mean_correction_restores_a_global_scale():
  rng = np.random.default_rng(4)
  target = rng.integers(0, 256, (2, 12, 12, 3)) / 255.0
  pred = 0.5 * target
  corrected = np.asarray(gt_mean_correct(pred, target))
  np.testing.assert_allclose(corrected, target, atol=1e-6)
  # An all-black output has no grey mean to scale: it stays black instead of turning nan.
  black = np.asarray(gt_mean_correct(np.zeros_like(target), target))
  np.testing.assert_array_equal(black, 0.0)


def test_gt_mean_keys_are_separate():
  rng = np.random.default_rng(5)
  target = rng.integers(0, 256, (2, 12, 12, 3)) / 255.0
  pred = 0.5 * target
  plain = compute_metrics(pred, target)
  both = compute_metrics(pred, target, gt_mean=True)
  for key in metrics.METRIC_KEYS:
    np.testing.assert_array_equal(both[key], plain[key])
  assert set(both) == set(plain) | {k + metrics.GT_MEAN_SUFFIX for k in metrics.METRIC_KEYS}
  # 0.5 * target quantised differs from target / 2 by rounding only: far better after correction.
  assert np.all(both['psnr_gt_mean'] > plain['psnr'] + 20)


def test_sharded_batch_gives_the_same_values():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip('needs several devices (conftest asks for 4 fake CPU devices)')
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(6)
  target = rng.integers(0, 256, (len(devices), 12, 12, 3)) / 255.0
  pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
  mask = np.arange(len(devices)) < len(devices) - 1
  want = compute_metrics(pred, target, mask)
  got = compute_metrics(
    jax.device_put(pred.astype(np.float32), sharding),
    jax.device_put(target.astype(np.float32), sharding),
    jax.device_put(mask, sharding),
  )
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6)
