"""The training loop end to end on a tiny MIRNet and synthetic data (4 fake CPU devices)."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from mirnet_jax import bench_xla, checkpoints, convert, losses, sharding, train, train_state
from mirnet_jax.models import param_shapes

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


def test_the_step_compiler_options_keep_the_recomputation_of_checkpointed_blocks():
  # With XLA:CPU's defaults this toy's recomputation is merged back into the forward pass
  # (the same FLOPs with and without jax.checkpoint): train_state.CPU_COMPILER_OPTIONS.
  w, x = jnp.full((64, 64), 0.01), jnp.ones((32, 64))

  def block(x, w):
    for _ in range(3):
      x = jnp.tanh(x @ w)
    return x

  def step_flops(remat):
    f = jax.checkpoint(block) if remat else block
    grad = jax.grad(lambda w, x: jnp.sum(f(f(x, w), w)))
    return bench_xla.flops(
      jax.jit(grad, compiler_options=train_state.compiler_options()).lower(w, x).compile()
    )

  assert jax.default_backend() == 'cpu'
  assert step_flops(True) > 1.1 * step_flops(False)  # the recomputed matmuls are there


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


def test_resume_checks_the_architecture_and_fills_missing_keys(monkeypatch):
  # A checkpoint written before config.model.arch existed (no 'arch' key) is a MIRNet one.
  config = tiny.config()
  stored = {k: v for k, v in config.model.to_dict().items() if k != 'arch'}

  class Manager:
    directory = 'W/checkpoints'

  monkeypatch.setattr(checkpoints, 'stored_config', lambda manager, step: {'model': stored})
  train._check_model(Manager(), 4, config)  # same model: no error
  v2 = tiny.config(model__arch='mirnet_v2')
  with pytest.raises(train.ModelMismatchError, match=r"holds a 'mirnet' model but config.model"):
    train._check_model(Manager(), 4, v2)


def test_init_from_weights_of_the_other_architecture_names_it(monkeypatch):
  config = tiny.config(train__init_from='weights/v2_lol')
  monkeypatch.setattr(
    checkpoints, 'restore_params', lambda where, which: ({'arch': 'mirnet_v2'}, {}, 0)
  )
  model = train.create_model(config.model)
  with pytest.raises(train.ModelMismatchError, match=r"init_from='weights/v2_lol'.*'mirnet_v2'"):
    train.create_train_state(config, model, optax.sgd(0.1), None, jax.random.key(0))


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path, cache_dir, caplog):
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
  # The rerun in this process, which compiled the same step for `uninterrupted` (one process
  # start saved); main's CLI resumes the same way in tests/test_gcs.py and test_multihost.py.
  with caplog.at_level(logging.INFO, logger='absl'):
    train.train_and_evaluate(tiny.config(), str(tmp_path))
  assert f'Resumed from {tmp_path}/checkpoints/4' in caplog.text
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


def _poison_the_fifth_batch(monkeypatch, key: str, value: float) -> None:
  """Train batches (no 'name'): the 5th, i.e. step 5, gets ``value`` at one pixel of ``key``."""
  to_global = sharding.global_batch
  seen = []

  def poisoned(local, mesh):
    if 'name' not in local:
      seen.append(1)
      if len(seen) == 5:
        local = {**local, key: local[key].copy()}
        local[key][0, 0, 0, 0] = value
    return to_global(local, mesh)

  monkeypatch.setattr(sharding, 'global_batch', poisoned)


@jax.custom_vjp
def _infinite_gradient_if(x, on):
  return x


def _infinite_gradient_fwd(x, on):
  return x, on


def _infinite_gradient_bwd(on, g):
  return g * jnp.where(on > 0, jnp.inf, 1.0), jnp.zeros_like(on)


_infinite_gradient_if.defvjp(_infinite_gradient_fwd, _infinite_gradient_bwd)


def _nan_updates_at(count: int) -> optax.GradientTransformation:
  """Adds NaN to the parameter updates of optimiser step ``count`` (0-based): finite loss and
  gradient norm, non-finite updated parameters."""

  def update(updates, state, params=None):
    del params
    poison = jnp.where(state == count, jnp.nan, 0.0)
    return jax.tree.map(lambda u: u + poison, updates), state + 1

  return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.mark.parametrize('what', ['loss', 'grad_norm', 'parameters'])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch, what):
  del cache_dir
  if what == 'loss':
    _poison_the_fifth_batch(monkeypatch, 'low', np.nan)  # NaN output, NaN loss
    match = 'loss is nan.* at step 5'
  elif what == 'grad_norm':
    # A target marked out of range at step 5: the loss stays finite, its gradient is infinite.
    _poison_the_fifth_batch(monkeypatch, 'high', 2.0)
    create_loss = losses.create_loss

    def create_blowing_loss(loss_config):
      loss_fn = create_loss(loss_config)

      def loss(pred, target):
        on = (jnp.max(target) > 1.5).astype(jnp.float32)
        return loss_fn(_infinite_gradient_if(pred, on), target)

      return loss

    monkeypatch.setattr(losses, 'create_loss', create_blowing_loss)
    match = r'grad_norm is (inf|nan).* at step 5'
  else:
    create_optimizer = train.create_optimizer
    monkeypatch.setattr(
      train,
      'create_optimizer',
      lambda optim, schedule: optax.chain(create_optimizer(optim, schedule), _nan_updates_at(4)),
    )
    match = 'the updated parameters are not finite at step 5'
  with pytest.raises(train.NonFiniteLossError, match=match) as error:
    train.train_and_evaluate(tiny.config(), str(tmp_path))
  assert 'The last good checkpoint, step 4, is kept in' in str(error.value)
  assert 'loss is' not in str(error.value) or what == 'loss'
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 4]
  params, _ = _params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path, cache_dir, monkeypatch):
  del cache_dir
  _poison_the_fifth_batch(monkeypatch, 'low', np.nan)
  config = tiny.config(train__checkpoint_every_steps=100)
  with pytest.raises(train.NonFiniteLossError, match='No checkpoint was written yet'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not list((tmp_path / 'checkpoints').iterdir())


# ---------------------------------------------------------------------------------------------
# init_from and bfloat16 compute (the optimiser and the schedule: tests/test_optim.py).


def _initial_state(config, num_steps=6):
  """What train_and_evaluate starts from (before any resume) for ``config``."""
  schedule = train.create_learning_rate_schedule(config.optim, num_steps)
  tx = train.create_optimizer(config.optim, schedule)
  return train.create_train_state(
    config, tiny.model(config), tx, sharding.create_mesh(), jax.random.key(0)
  )


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope='module')
def official_export(tmp_path_factory, fixtures_dir):
  """The official tiny model (8 features, height 3, reduction 8), converted."""
  out = tmp_path_factory.mktemp('weights') / 'tiny'
  source = fixtures_dir / 'tiny' / 'state_dict.npz'
  assert convert.main(['--source', str(source), '--output', str(out)]) == 0
  return out


def test_init_from_converted_weights(official_export):
  fields = json.loads((official_export / checkpoints.MODEL_JSON).read_text())
  model = {f'model__{k}': v for k, v in fields.items()}
  # model.json holds every model field (reduction included since exports carry the full config).
  config = tiny.config(train__init_from=str(official_export), **{'model__reduction': 8, **model})
  state = _initial_state(config)
  _, want = checkpoints.load_export(official_export)
  _assert_trees_equal(state.params, want)
  assert int(state.step) == 0
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
  mu = optax.tree.get(state.opt_state, 'mu')
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(mu))


def test_init_from_another_run_takes_its_best_checkpoint(tmp_path):
  import grain

  config = tiny.config()
  shapes = param_shapes(tiny.model(config))
  rng = np.random.default_rng(0)
  params = [
    jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes) for _ in range(2)
  ]
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  with checkpoints.create_manager(tmp_path) as manager:
    # Step 1 is the best by validation PSNR; step 2, the latest, is worse.
    for step, psnr in ((1, 30.0), (2, 20.0)):
      opt = {'step': np.int32(step)}
      checkpoints.save(manager, step, params[step - 1], opt, data, config.to_dict(), {'psnr': psnr})
    manager.wait_until_finished()
  state = _initial_state(tiny.config(train__init_from=str(tmp_path)))
  _assert_trees_equal(state.params, params[0])
  assert int(state.step) == 0  # fine-tuning starts a new run: only the weights are taken


def test_init_from_another_architecture_names_the_keys(official_export):
  # The tiny training model has height 2 and reduction 4; the export height 3 and reduction 8.
  config = tiny.config(train__init_from=str(official_export))
  with pytest.raises(train.ModelMismatchError) as error:
    _initial_state(config)
  message = str(error.value)
  assert f'init_from={str(official_export)!r}' in message
  key = 'rrg_0/mrb_0/dau_0/channel_attention/squeeze/kernel'
  assert f'{key}: weights (1, 1, 8, 1), config.model (1, 1, 8, 2)' in message, message
  assert 'rrg_0/mrb_0/dau_2/conv_0/kernel (only in the weights)' in message, message


def test_bfloat16_compute_trains_with_float32_parameters(uninterrupted):
  # Fine-tunes the float32 run in bfloat16: init_from needs no eager init (slow on CPU).
  config = tiny.config(model__dtype='bfloat16', train__init_from=str(uninterrupted))
  state = _initial_state(config)
  model = tiny.model(config)
  image = jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32)
  assert jax.eval_shape(model.apply, {'params': state.params}, image).dtype == jnp.bfloat16
  mesh = sharding.create_mesh()
  high = np.random.default_rng(0).uniform(0.2, 0.8, (4, 16, 16, 3)).astype(np.float32)
  batch = sharding.global_batch({'low': 0.3 * high, 'high': high}, mesh)
  step = train.make_train_step(mesh, losses.create_loss(config.loss))
  before = jax.device_get(state.params)
  loss = []
  for _ in range(3):
    state, metrics = step(state, batch)
    loss.append(float(metrics['loss']))
  assert np.isfinite(loss).all() and loss[-1] < loss[0], loss
  for tree in (state.params, optax.tree.get(state.opt_state, 'mu')):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype('float32')}
  # The steps moved the weights (a PReLU slope on all-positive inputs may get no gradient).
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state.params)
  assert np.mean(jax.tree.leaves(changed)) > 0.9
