"""Checkpoints: another device topology, the best policy, unreadable ones, iterator state."""

import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

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


# ---------------------------------------------------------------------------------------------
# The best policy, unreadable checkpoints, the iterator state of earlier versions.


def _small_params(seed: int):
  rng = np.random.default_rng(seed)
  return {'conv': {'kernel': rng.standard_normal((3, 3, 2, 2)).astype(np.float32)}}


def _save_steps(workdir, psnrs, it=None):
  """Saves steps 1..n with the given validation PSNRs (None: no metrics)."""
  it = it or iter(grain.MapDataset.range(8).to_iter_dataset())
  with checkpoints.create_manager(workdir, keep=len(psnrs)) as manager:
    for step, psnr in enumerate(psnrs, 1):
      metrics = None if psnr is None else {'psnr': psnr}
      opt = {'step': np.int32(step)}
      checkpoints.save(manager, step, _small_params(step), opt, it, {'model': MODEL}, metrics)
    manager.wait_until_finished()


def test_a_nan_model_never_becomes_the_best(tmp_path):
  _save_steps(tmp_path, [30.0, float('nan'), 25.0])
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    assert manager.best_step() == 1
    assert checkpoints.resolve_step(manager, 'best', 'w') == 1
  # Keeping only one checkpoint besides the best: the NaN one is not it.
  _save_steps(tmp_path / 'b', [float('nan'), 20.0])
  with checkpoints.create_manager(tmp_path / 'b', read_only=True) as manager:
    assert manager.best_step() == 2


def _truncate_arrays(step_dir):
  """What a copy cut short leaves: every array data file of the step emptied."""
  files = [p for p in (step_dir / checkpoints.PARAMS).rglob('*') if p.is_file()]
  data = [p for p in files if 'd' in p.parts[-2:-1] or p.parent.name == 'd']
  assert data, files
  for p in data:
    p.write_bytes(b'')


def test_an_unreadable_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, caplog):
  _save_steps(tmp_path, [None, None])
  # A template that fits no checkpoint is the caller's error: raised, nothing moved.
  it = iter(grain.MapDataset.range(8).to_iter_dataset())
  with checkpoints.create_manager(tmp_path) as manager:
    with pytest.raises(checkpoints.UnreadableCheckpointError, match='nor any older'):
      checkpoints.restore_latest(manager, {'other': np.zeros(3, np.float32)}, {}, it)
    assert manager.all_steps() == [1, 2]
  _truncate_arrays(tmp_path / 'checkpoints' / '2')
  # eval and predict (restore_params) name it in one line.
  with pytest.raises(checkpoints.UnreadableCheckpointError) as error:
    checkpoints.restore_params(tmp_path, 'latest')
  message = str(error.value)
  assert f'{tmp_path}/checkpoints/2: checkpoint cannot be read' in message, message
  assert '\n' not in message and 'choose another step (1)' in message
  # Training: the newest readable checkpoint, one warning, the bad one kept aside.
  it = iter(grain.MapDataset.range(8).to_iter_dataset())
  params = jax.tree.map(np.zeros_like, _small_params(0))
  with checkpoints.create_manager(tmp_path) as manager:
    with caplog.at_level('WARNING'):
      step, restored, opt = checkpoints.restore_latest(
        manager, params, {'step': np.zeros((), np.int32)}, it
      )
    assert manager.all_steps() == [1]
  assert step == 1 and int(opt['step']) == 1
  np.testing.assert_array_equal(restored['conv']['kernel'], _small_params(1)['conv']['kernel'])
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and str(tmp_path / 'checkpoints' / '2') in warnings[0], warnings
  aside = tmp_path / checkpoints.UNREADABLE_DIR / '2'
  assert aside.is_dir() and (aside / checkpoints.PARAMS).is_dir()
  assert not (tmp_path / 'checkpoints' / '2').exists()


def test_iterator_state_is_one_json_item_and_grain_files_still_restore(tmp_path):
  import grain.checkpoint
  import orbax.checkpoint as ocp

  source = synthetic.create_synthetic_source('train', num_pairs=4, size=32, seed=0)
  make = lambda: pipeline.create_train_iterator(source, crop_size=16, global_batch_size=2, seed=0)
  it = make()
  for _ in range(3):
    next(it)
  params, opt = _small_params(1), {'step': np.asarray(3, np.int32)}
  _save_steps(tmp_path / 'new', [None], it=it)
  step_dir = tmp_path / 'new' / 'checkpoints' / '1'
  assert not (step_dir / checkpoints.DATA).exists()
  # A checkpoint of an earlier version: grain's per-process files under 'data'.
  with checkpoints.create_manager(tmp_path / 'old') as manager:
    args = {
      checkpoints.PARAMS: ocp.args.StandardSave(params),
      checkpoints.OPT: ocp.args.StandardSave(opt),
      checkpoints.DATA: grain.checkpoint.CheckpointSave(it),
      checkpoints.CONFIG: ocp.args.JsonSave({'model': MODEL}),
    }
    manager.save(1, args=ocp.args.Composite(**args))
    manager.wait_until_finished()
  assert (tmp_path / 'old' / 'checkpoints' / '1' / checkpoints.DATA).is_dir()
  want = next(it)
  for name in ('new', 'old'):
    fresh = make()
    with checkpoints.create_manager(tmp_path / name) as manager:
      checkpoints.restore(manager, 1, params, opt, fresh)
    assert fresh.get_state() == {'step': 3}, name
    np.testing.assert_array_equal(next(fresh)['low'], want['low'])
