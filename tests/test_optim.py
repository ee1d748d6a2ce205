"""The optimiser (Adam/AdamW after global-norm clipping) and the learning-rate schedule."""

import jax
import numpy as np
import optax
import pytest
import tiny

from mirnet_jax import train


def _adam_reference(params, grads, lr, weight_decay, clip):
  """Hand-written AdamW(0.9, 0.999, eps 1e-8) after global-norm clipping (0 = off)."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads, 1):
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
    scale = min(1.0, clip / norm) if clip else 1.0
    for k in p:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk**2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p[k])
  return p


@pytest.mark.parametrize('weight_decay, clip', [(0.0, 0.0), (0.1, 0.0), (0.0, 1.0), (0.1, 1.0)])
def test_optimizer_matches_hand_written_adamw_with_clipping(weight_decay, clip):
  optim = tiny.config(optim__weight_decay=weight_decay, optim__grad_clip_norm=clip).optim
  lr = 0.1
  tx = train.create_optimizer(optim, optax.constant_schedule(lr))
  params = {'a': np.array([1.0, -2.0, 3.0], np.float32), 'b': np.array([[0.5]], np.float32)}
  # Global norms 10 (clipped to 1 when clip=1) then 0.5 (never clipped): the second step mixes
  # both in Adam's moments, so clipping changes the result although Adam is scale invariant.
  grads = [
    {'a': np.array([6.0, 0.0, -8.0], np.float32), 'b': np.array([[0.0]], np.float32)},
    {'a': np.array([0.3, 0.0, 0.0], np.float32), 'b': np.array([[0.4]], np.float32)},
  ]
  state, p = tx.init(params), params
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    if i == 0:
      # Adam's first moment after one step is (1 - beta1) * the (clipped) gradient.
      mu_norm = optax.tree.norm(optax.tree.get(state, 'mu')) / (1 - optim.beta1)
      np.testing.assert_allclose(mu_norm, clip or 10.0, rtol=1e-6)
  want = _adam_reference(params, grads, lr, weight_decay, clip)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, want)
  # The reference itself tells the four cases apart.
  others = [_adam_reference(params, grads, lr, w, c) for w in (0.0, 0.1) for c in (0.0, 1.0)]
  assert sum(all(np.allclose(o[k], want[k]) for k in want) for o in others) == 1


def test_weight_decay_shrinks_parameters_under_zero_gradient():
  params = {'w': np.array([1.0, -2.0, 4.0], np.float32)}
  zero = {'w': np.zeros(3, np.float32)}
  for weight_decay, factor in ((0.0, 1.0), (0.01, 1 - 0.1 * 0.01)):
    optim = tiny.config(optim__weight_decay=weight_decay).optim
    tx = train.create_optimizer(optim, optax.constant_schedule(0.1))
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)['w'], factor * params['w'])


def test_learning_rate_schedule_warms_up_then_decays_to_the_end_value():
  # The paper recipe: 2e-4 peak after 72 warm-up steps, cosine to 1e-6 at step 100,000.
  optim = tiny.config(
    optim__learning_rate=2e-4, optim__end_learning_rate=1e-6, optim__warmup_steps=72
  ).optim
  schedule = train.create_learning_rate_schedule(optim, 100_000)
  want = {
    0: 0.0,
    36: 1e-4,
    72: 2e-4,
    72 + 99_928 // 2: (2e-4 + 1e-6) / 2,
    72 + 99_928 // 4: 1e-6 + (2e-4 - 1e-6) * (1 + np.cos(np.pi / 4)) / 2,
    100_000: 1e-6,
  }
  for step, value in want.items():
    np.testing.assert_allclose(schedule(step), value, rtol=1e-5, err_msg=f'step {step}')
  # A 6-step run with 2 warm-up steps: optax counts 0..5 drive its updates, cosine over 4 steps.
  optim = tiny.config(optim__warmup_steps=2).optim  # peak 2e-3, end 1e-6
  schedule = train.create_learning_rate_schedule(optim, 6)
  cosine = lambda f: 1e-6 + (2e-3 - 1e-6) * (1 + np.cos(np.pi * f)) / 2
  want = [0.0, 1e-3, 2e-3, cosine(1 / 4), cosine(1 / 2), cosine(3 / 4), 1e-6]
  np.testing.assert_allclose([schedule(s) for s in range(7)], want, rtol=1e-5)
