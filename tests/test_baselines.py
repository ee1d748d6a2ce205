"""Classical baselines, and the protocol's reference table on LoL eval15."""

import math

import jax
import numpy as np
import pytest

from mirnet_jax import baselines, metrics

# ../shared/docs/protocol.md: PSNR (dB), SSIM, MAE, MSE on LoL eval15, as printed there.
REFERENCE = {
  'identity': (7.7733, 0.1952, 99.799, 12613.62),
  'autocontrast': (11.2416, 0.3787, 71.044, 7084.97),
  'equalize': (14.8112, 0.3770, 39.921, 2538.51),
}
# Half a unit of the last printed digit: the reproduced values round to the printed ones.
# This is tighter than the 1e-3 dB and 2e-3 SSIM the protocol allows.
TOLERANCE = (5e-5, 5e-5, 5e-4, 5e-3)


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_reproduces_protocol_table(name, eval15_pairs):
  low, high = eval15_pairs
  enhance = baselines.get_baseline(name)
  pred = np.stack([enhance(image) for image in low])
  # The model's path: [0, 1] floats in, quantised inside compute_metrics.
  per_image = jax.jit(metrics.compute_metrics)(pred / 255.0, high / 255.0)
  summary = metrics.summarize(jax.device_get(per_image))
  assert summary['count'] == 15
  for key, expected, tol in zip(metrics.METRIC_KEYS, REFERENCE[name], TOLERANCE, strict=True):
    assert summary[key] == pytest.approx(expected, abs=tol), key


def test_identity_returns_an_equal_copy():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  out = baselines.identity(image)
  np.testing.assert_array_equal(out, image)
  assert out is not image and not np.shares_memory(out, image)


def test_autocontrast_stretches_each_channel():
  image = np.zeros((4, 4, 3), np.uint8)
  image[..., 0] = np.linspace(50, 150, 16).reshape(4, 4)
  image[..., 1] = np.linspace(10, 30, 16).reshape(4, 4)
  image[..., 2] = np.linspace(0, 255, 16).reshape(4, 4)
  out = baselines.autocontrast(image)
  assert out.dtype == np.uint8 and out.shape == image.shape
  np.testing.assert_array_equal(out.reshape(-1, 3).min(0), [0, 0, 0])
  np.testing.assert_array_equal(out.reshape(-1, 3).max(0), [255, 255, 255])


def test_equalize_spreads_a_dark_histogram():
  # Levels 0..15, 64 pixels each. PIL: step = (1024 - 64) // 255 = 3, and level k maps to
  # (step // 2 + 64 * k) // step, clipped to 255.
  levels = np.repeat(np.arange(16, dtype=np.uint8), 64).reshape(32, 32, 1)
  out = baselines.equalize(np.repeat(levels, 3, axis=-1))
  assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
  expected = np.minimum((1 + 64 * levels.astype(int)) // 3, 255)
  np.testing.assert_array_equal(out, np.repeat(expected, 3, axis=-1))
  assert sorted({int(v) for v in expected.reshape(-1)})[:3] == [0, 21, 43]


def test_gamma_by_hand():
  image = np.array([[[0, 64, 255]]], np.uint8)
  out = baselines.gamma(image, gamma=1 / 2.2)
  # round(255 * (64 / 255) ** (1 / 2.2)) = round(136.0...) = 136.
  np.testing.assert_array_equal(out, [[[0, 136, 255]]])
  assert round(255 * (64 / 255) ** (1 / 2.2)) == 136
  np.testing.assert_array_equal(baselines.gamma(image, gamma=1.0), image)
  np.testing.assert_array_equal(baselines.get_baseline('gamma', gamma=2.0)(image), [[[0, 16, 255]]])
  assert math.isclose(255 * (64 / 255) ** 2, 16.06, abs_tol=1e-2)
  with pytest.raises(ValueError, match='positive'):
    baselines.gamma(image, gamma=0.0)


def test_get_baseline_errors_list_the_choices():
  assert set(baselines.BASELINES) == {'identity', 'autocontrast', 'equalize', 'gamma'}
  with pytest.raises(ValueError, match='identity, autocontrast, equalize, gamma'):
    baselines.get_baseline('retinex')
  with pytest.raises(ValueError, match='takes no parameter gamma'):
    baselines.get_baseline('equalize', gamma=0.5)
  with pytest.raises(ValueError, match='its parameters: gamma'):
    baselines.get_baseline('gamma', gama=0.5)


@pytest.mark.parametrize('name', ['identity', 'autocontrast', 'equalize', 'gamma'])
def test_baselines_reject_non_uint8_rgb(name):
  enhance = baselines.get_baseline(name)
  with pytest.raises(ValueError, match='uint8'):
    enhance(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match='uint8'):
    enhance(np.zeros((4, 4), np.uint8))
