"""The training loop end to end on a tiny MIRNet and synthetic data (4 fake CPU devices)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny

from mirnet_jax import checkpoints, sharding, train

REPO = tiny.REPO
SCALARS = {
  'train/loss',
  'train/learning_rate',
  'train/grad_norm',
  'train/steps_per_sec',
  'train/images_per_sec',
  'eval/psnr',
  'eval/ssim',
  'eval/mae',
  'eval/mse',
}


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tiny.compilation_cache_dir(tmp_path_factory)


def _env(cache_dir: pathlib.Path) -> dict:
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache_dir), 'PYTHONPATH': str(REPO)}


def _event_tags(workdir: pathlib.Path) -> set[str]:
  import tensorflow as tf

  tags = set()
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  return tags


def _params(workdir: pathlib.Path, which='latest'):
  _, params, step = checkpoints.restore_params(workdir, which)
  return params, step


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir):
  """A 6-step run with validation at the end: the reference for the other tests."""
  del cache_dir
  workdir = tmp_path_factory.mktemp('uninterrupted')
  train.train_and_evaluate(tiny.config(), str(workdir))
  return workdir


def test_run_writes_summaries_checkpoints_and_lowers_the_loss(uninterrupted):
  tags = _event_tags(uninterrupted)
  assert SCALARS <= tags, SCALARS - tags
  assert any(t.startswith('eval/images/') for t in tags)
  assert any('hparams' in t for t in tags)
  # Latest 2 kept (4, 6); 6 is also the best (the only validated one).
  steps = sorted(int(p.name) for p in (uninterrupted / 'checkpoints').iterdir())
  assert steps == [4, 6]
  model_config, params, step = checkpoints.restore_params(uninterrupted, 'best')
  assert step == 6 and model_config['num_features'] == 8
  losses = [json.loads(line) for line in (uninterrupted / 'history.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in losses if 'loss' in r]
  assert len(losses) == 6
  assert np.mean(losses[-2:]) < np.mean(losses[:2])
  final = json.loads((uninterrupted / 'final_metrics.json').read_text())
  assert set(final) == {'step', 'validation', 'dark_input'}
  assert (uninterrupted / 'curves.png').stat().st_size > 0


def test_restore_params_errors(uninterrupted, tmp_path):
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='available steps: 4, 6'):
    checkpoints.restore_params(uninterrupted, 3)
  with pytest.raises(checkpoints.CheckpointNotFoundError, match='no checkpoints'):
    checkpoints.restore_params(tmp_path)


def test_model_change_on_resume_fails_clearly(uninterrupted):
  config = tiny.config(model__num_features=16)
  with pytest.raises(train.ModelMismatchError, match=r'num_features: 8 -> 16'):
    train.train_and_evaluate(config, str(uninterrupted))


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path, cache_dir):
  # The first process kills itself with SIGKILL as soon as the checkpoint of step 4 is on disk.
  crash = f"""
import os, signal, sys
from absl import app
from mirnet_jax import checkpoints, main
save = checkpoints.save
def save_then_die(manager, step, *args, **kwargs):
  save(manager, step, *args, **kwargs)
  if step == 4:
    manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.save = save_then_die
sys.argv = ['main'] + {tiny.flags()!r} + ['--workdir={tmp_path}']
app.run(main.main)
"""
  env = _env(cache_dir)
  killed = subprocess.run([sys.executable, '-c', crash], env=env, capture_output=True, text=True)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 4]
  resumed = subprocess.run(
    [sys.executable, '-m', 'mirnet_jax.main', f'--workdir={tmp_path}', *tiny.flags()],
    env=env,
    capture_output=True,
    text=True,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stderr
  want, want_step = _params(uninterrupted)
  got, got_step = _params(tmp_path)
  assert got_step == want_step == 6
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_dir):
  flags = tiny.flags(train__num_steps=10_000, train__checkpoint_every_steps=10_000)
  proc = subprocess.Popen(
    [sys.executable, '-m', 'mirnet_jax.main', f'--workdir={tmp_path}', *flags],
    env=_env(cache_dir),
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 300
  for line in proc.stderr:
    if 'step 3/10000' in line or time.monotonic() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir()]
  assert len(steps) == 1 and 3 <= steps[0] < 10_000
  assert 'SIGTERM' in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
  del cache_dir
  to_global = sharding.global_batch
  seen = []

  def poisoned(local, mesh):
    """Train batches (no 'name'): the 5th, i.e. step 5, gets a NaN input pixel."""
    if 'name' not in local:
      seen.append(1)
      if len(seen) == 5:
        local = {**local, 'low': local['low'].copy()}
        local['low'][0, 0, 0, 0] = np.nan
    return to_global(local, mesh)

  monkeypatch.setattr(sharding, 'global_batch', poisoned)
  with pytest.raises(train.NonFiniteLossError, match='at step 5'):
    train.train_and_evaluate(tiny.config(), str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 4]
  params, _ = _params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
