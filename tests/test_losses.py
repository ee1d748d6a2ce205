"""Losses against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from mirnet_jax import losses

PRED = np.array([0.0, 0.5, 1.0, 0.25], np.float32).reshape(1, 2, 2, 1)
TARGET = np.array([0.0, 0.25, 0.5, 1.0], np.float32).reshape(1, 2, 2, 1)
# Differences 0, 0.25, 0.5, -0.75.


def test_l1_mse_rmse():
  assert float(losses.l1(PRED, TARGET)) == pytest.approx(1.5 / 4)
  assert float(losses.mse(PRED, TARGET)) == pytest.approx((0.0625 + 0.25 + 0.5625) / 4)
  assert float(losses.rmse(PRED, TARGET)) == pytest.approx(np.sqrt(0.875 / 4))


def test_charbonnier():
  eps = 1e-3
  want = np.mean(np.sqrt(np.array([0.0, 0.0625, 0.25, 0.5625]) + eps**2))
  assert float(losses.charbonnier(PRED, TARGET, eps)) == pytest.approx(want, rel=1e-6)
  # Zero error costs eps, not zero (the square root is smooth there).
  assert float(losses.charbonnier(TARGET, TARGET, eps)) == pytest.approx(eps, rel=1e-6)


def test_float32_result_from_bfloat16_inputs():
  out = losses.l1(jnp.asarray(PRED, jnp.bfloat16), TARGET)
  assert out.dtype == jnp.float32


def test_create_loss():
  fn = losses.create_loss({'name': 'charbonnier', 'charbonnier_eps': 0.5})
  assert float(fn(TARGET, TARGET)) == pytest.approx(0.5)
  assert losses.create_loss({'name': 'mse', 'charbonnier_eps': 1e-3}) is losses.mse
  with pytest.raises(ValueError, match='config.loss.name'):
    losses.create_loss({'name': 'ssim', 'charbonnier_eps': 1e-3})
  with pytest.raises(ValueError, match='shape'):
    losses.l1(PRED, TARGET[:, :1])
