"""Pixel losses for image restoration; ``create_loss(config.loss)`` picks one by name.

Every loss takes ``pred`` and ``target`` of one shape (any float dtype) and returns a float32
scalar: the mean over all pixels, channels and images of the batch. Computing in float32
keeps a bfloat16 forward pass from rounding the loss itself.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _diff(pred: jax.Array, target: jax.Array) -> jax.Array:
  if pred.shape != target.shape:
    raise ValueError(f'loss: pred {pred.shape} and target {target.shape} differ in shape')
  return pred.astype(jnp.float32) - target.astype(jnp.float32)


def charbonnier(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
  """Charbonnier loss ``mean(sqrt(d**2 + eps**2))`` (the official MIRNet ``CharbonnierLoss``).

  Args:
    pred: model output, [B, H, W, C].
    target: ground truth, same shape.
    eps: smoothing constant in image units ([0, 1] images); the paper uses 1e-3.

  Returns:
    float32 scalar.
  """
  d = _diff(pred, target)
  return jnp.mean(jnp.sqrt(d * d + eps * eps))


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error, float32 scalar."""
  return jnp.mean(jnp.abs(_diff(pred, target)))


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error, float32 scalar."""
  return jnp.mean(jnp.square(_diff(pred, target)))


def rmse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Root of the batch mean squared error (not a mean of per-image roots), float32 scalar."""
  return jnp.sqrt(mse(pred, target))


LOSSES = ('charbonnier', 'l1', 'mse', 'rmse')


def create_loss(loss_config: Mapping[str, Any]) -> LossFn:
  """Builds the loss named by ``config.loss.name``.

  Args:
    loss_config: the ``config.loss`` section: ``name`` and ``charbonnier_eps``.

  Returns:
    ``fn(pred, target) -> float32 scalar``.

  Raises:
    ValueError: unknown name (the message names the config key).
  """
  name = loss_config['name']
  if name == 'charbonnier':
    eps = float(loss_config['charbonnier_eps'])
    if eps <= 0:
      raise ValueError(f'config.loss.charbonnier_eps must be > 0, got {eps}')
    return lambda pred, target: charbonnier(pred, target, eps)
  if name in LOSSES:
    return {'l1': l1, 'mse': mse, 'rmse': rmse}[name]
  raise ValueError(f'config.loss.name: unknown loss {name!r}; known: {", ".join(LOSSES)}')
