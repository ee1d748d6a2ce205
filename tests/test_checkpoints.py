"""Checkpoints restore on another device topology than the one that saved them."""

import os
import subprocess
import sys

import jax
import numpy as np

from mirnet_jax import checkpoints
from mirnet_jax.data import pipeline, synthetic
from mirnet_jax.models import MIRNet, param_shapes

MODEL = dict(num_features=8, num_rrg=1, num_mrb=1, height=2, width=2)

RESTORE = """
import json, sys
import numpy as np
from mirnet_jax import checkpoints
config, params, step = checkpoints.restore_params(sys.argv[1], 'latest')
flat = {'/'.join(str(k.key) for k in p): np.asarray(v) for p, v in
        __import__('jax').tree_util.tree_flatten_with_path(params)[0]}
np.savez(sys.argv[2], **flat)
print(json.dumps({'step': step, 'devices': len(__import__('jax').devices())}))
"""


def test_params_saved_on_four_devices_restore_on_one(tmp_path):
  assert len(jax.devices()) == 4  # tests/conftest.py: four fake CPU devices
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = param_shapes(MIRNet(**MODEL))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: jax.device_put(rng.standard_normal(s.shape).astype(np.float32), replicated), shapes
  )
  source = synthetic.create_synthetic_source('train', num_pairs=2, size=32, seed=0)
  it = pipeline.create_train_iterator(source, crop_size=16, global_batch_size=2, seed=0)
  with checkpoints.create_manager(tmp_path) as manager:
    checkpoints.save(manager, 3, params, {'step': np.int32(3)}, it, {'model': MODEL})
    manager.wait_until_finished()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = subprocess.run(
    [sys.executable, '-c', RESTORE, str(tmp_path), str(tmp_path / 'p.npz')],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"step": 3, "devices": 1' in out.stdout
  with np.load(tmp_path / 'p.npz') as restored:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(restored.files) == len(flat)
    for path, value in flat:
      np.testing.assert_array_equal(restored['/'.join(str(k.key) for k in path)], value)
