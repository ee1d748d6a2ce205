"""Mesh, global batches, and the train step on 1 device vs 4 devices."""

import jax
import numpy as np
import pytest
import tiny
from jax.sharding import PartitionSpec

from mirnet_jax import losses, sharding, train


def test_global_batch_is_sharded_over_data():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count() == 4
  local = {
    'low': np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
    'mask': np.ones(8, bool),
    'name': np.array(['a'] * 8),
  }
  out = sharding.global_batch(local, mesh)
  assert set(out) == {'low', 'mask'}  # names stay on the host
  assert out['low'].sharding.spec == PartitionSpec('data')
  assert len(out['low'].addressable_shards) == 4
  assert out['low'].addressable_shards[1].data.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(np.asarray(out['low']), local['low'])


def test_check_batch_size_names_the_key():
  mesh = sharding.create_mesh()
  assert sharding.check_batch_size(8, mesh, 'config.train.batch_size') == 8
  with pytest.raises(ValueError, match=r'config.train.batch_size=6 .* device count \(4\)'):
    sharding.check_batch_size(6, mesh, 'config.train.batch_size')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  return tiny.compilation_cache_dir(tmp_path_factory)


def test_one_and_four_devices_give_the_same_step():
  config = tiny.config()
  config.optim.warmup_steps = 0
  model = tiny.model(config)
  rng = np.random.default_rng(0)
  shape = (8, config.data.crop_size, config.data.crop_size, 3)
  batches = [
    {'low': rng.random(shape, np.float32) * 0.2, 'high': rng.random(shape, np.float32)}
    for _ in range(2)
  ]
  results = {}
  for n in (1, 4):
    mesh = sharding.create_mesh(jax.devices()[:n])
    tx = train.create_optimizer(config.optim, train.create_learning_rate_schedule(config.optim, 10))
    state = train.create_train_state(config, model, tx, mesh, jax.random.key(0))
    step = train.make_train_step(mesh, losses.create_loss(config.loss))
    losses_seen = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      losses_seen.append(float(metrics['loss']))
    results[n] = (losses_seen, jax.device_get(state.params))
  np.testing.assert_allclose(results[1][0], results[4][0], rtol=1e-5)
  assert results[1][0][1] < results[1][0][0]  # the second step sees updated parameters
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    *[results[n][1] for n in (1, 4)],
  )
