"""Profiling, the compilation cache and remat, as the training loop and main.py use them.

Tiny MIRNet on synthetic data (tests/tiny.py), 4 fake CPU devices. The in-process runs share the
session's compilation cache; the cache test runs main.py twice in new processes (jax's in-memory
cache would hide the persistent one) with its own, empty cache directory.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny

from mirnet_jax import checkpoints, train
from mirnet_jax.models import ops


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tiny.compilation_cache_dir(tmp_path_factory)


def _losses(workdir) -> list[float]:
  records = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  return [r['loss'] for r in records if 'loss' in r]


@pytest.fixture(scope='module')
def plain(tmp_path_factory, cache_dir):
  """2 steps, remat='none', profile_steps=0 (the defaults)."""
  del cache_dir
  workdir = tmp_path_factory.mktemp('plain')
  train.train_and_evaluate(tiny.config(train__num_steps=2), str(workdir))
  return workdir


def test_profile_steps_write_a_trace_where_tensorboard_reads_it(tmp_path, plain):
  config = tiny.config(train__num_steps=3, train__profile_steps=2, train__profile_start_step=1)
  train.train_and_evaluate(config, str(tmp_path))
  # TensorBoard's profile plugin reads <logdir>/plugins/profile/<run>/*.xplane.pb; the logdir is
  # the workdir, where the run's events are.
  traces = list((tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1, traces
  assert list(tmp_path.glob('events.out.tfevents.*'))
  data = traces[0].read_bytes()
  assert len(data) > 1000
  assert b'jit_train_step' in data  # the traced steps ran the train step's program
  assert not (plain / 'plugins').exists()  # profile_steps=0: no trace


def test_remat_gives_the_same_losses_and_a_run_resumes_under_another_remat(
  tmp_path, plain, caplog, monkeypatch
):
  # The same two runs check config.train.conv_kernel_grad='auto' (train_state.
  # measured_kernel_grad; its decisions alone: tests/test_auto_kernel_grad.py): the fresh rrg
  # run measures and traces XLA's rule, the resumed one keeps its checkpoint's taps. The traced
  # tap GEMMs tell which form a step has (``ops.kernel_grad`` is the taps' backward only).
  traced = []
  taps_grad = ops.kernel_grad
  monkeypatch.setattr(ops, 'kernel_grad', lambda *a: traced.append(1) or taps_grad(*a))
  monkeypatch.setattr(ops, 'time_kernel_grads', lambda shapes: {'taps': 3.0, 'xla': 1.0})
  rrg = tmp_path / 'rrg'
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(
      tiny.config(train__num_steps=2, train__remat='rrg', train__conv_kernel_grad='auto'),
      str(rrg),
    )
  assert 'config.train.conv_kernel_grad=auto: xla on this CPU' in caplog.text
  assert traced == []
  assert _stored_kernel_grad(rrg, 2) == 'xla'
  reference = _losses(plain)
  assert len(reference) == 2
  np.testing.assert_allclose(_losses(rrg), reference, rtol=1e-5, atol=1e-7)

  # Remat is not architecture: the 'none' run resumes under 'mrb' and continues to step 3,
  # with the taps it was trained with (tests/tiny.py pins them) although 'auto' would measure
  # XLA's rule faster now.
  resumed = tmp_path / 'resumed'
  shutil.copytree(plain, resumed)
  monkeypatch.setattr(ops, 'time_kernel_grads', _no_measuring)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    state = train.train_and_evaluate(
      tiny.config(train__num_steps=3, train__remat='mrb', train__conv_kernel_grad='auto'),
      str(resumed),
    )
  assert f'Resumed from {resumed}/checkpoints/2' in caplog.text
  assert 'config.train.conv_kernel_grad=auto: taps, as the run so far' in caplog.text
  assert traced  # the tap GEMMs of the resumed step
  assert _stored_kernel_grad(resumed, 3) == 'taps'
  assert int(state.step) == 3
  losses = _losses(resumed)
  assert losses[:2] == reference and len(losses) == 3 and np.isfinite(losses[2])


def _no_measuring(*args, **kwargs):
  pytest.fail('time_kernel_grads ran on a resume')


def _stored_kernel_grad(workdir, step: int) -> str:
  manager = checkpoints.create_manager(workdir, 2)
  return checkpoints.stored_config(manager, step)['train']['conv_kernel_grad']


def test_compilation_cache_fills_and_a_second_run_loads_from_it(tmp_path):
  cache = tmp_path / 'cache'
  env = {**os.environ, 'PYTHONPATH': str(tiny.REPO)}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)

  def run(name):
    command = [sys.executable, '-m', 'mirnet_jax.main', *tiny.flags(train__num_steps=2)]
    command += [f'--workdir={tmp_path / name}', f'--config.jax_compilation_cache_dir={cache}']
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = re.search(r'Compilation cache \S+: (\d+) of (\d+) programs loaded', result.stderr)
    assert f'Compilation cache: {cache}' in result.stderr and loaded, result.stderr[-3000:]
    return int(loaded[1]), sorted(p.name for p in cache.iterdir())

  hits, first = run('first')
  assert hits == 0
  # The programs that take long to compile are cached, the train and eval steps among them.
  assert any(f.startswith('jit_train_step-') for f in first), first
  assert any(f.startswith('jit_eval_step-') for f in first), first
  hits, second = run('second')
  # Every cached program was loaded, none recompiled. A small program (a parameter
  # initialiser) may newly cross the 0.5 s minimum compile time on a loaded machine and be
  # added; the steps must not be.
  assert set(first) <= set(second), (first, second)
  new = set(second) - set(first)
  assert not any(f.startswith(('jit_train_step-', 'jit_eval_step-')) for f in new), new
  assert hits >= len(first)
