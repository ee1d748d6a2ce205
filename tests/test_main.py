"""The command line: input errors are one line and a non-zero exit; multi-process detection."""

import os
import subprocess
import sys

import pytest

from mirnet_jax import main

REPO = main.__file__.rsplit(os.sep, 2)[0]


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'mirnet_jax.main', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  'args, needle',
  [
    (['--config=configs/demo.py', '--config.train.bogus=1'], 'bogus'),
    (['--config=configs/lol.py:nonsense'], 'nonsense'),
    (['--config=configs/missing.py'], 'configs/missing.py'),
    (
      ['--config=configs/demo.py', '--config.data.name=folder', '--config.data.folder=/no/such'],
      '/no/such',
    ),
    (['--config=configs/demo.py', '--config.train.batch_size=6'], 'config.train.batch_size'),
  ],
)
def test_input_errors_are_one_line(tmp_path, args, needle):
  result = _run(*args, f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if needle in line]
  assert errors, result.stderr[-2000:]


def test_predict_needs_input_and_output(tmp_path):
  result = _run('--config=configs/demo.py', '--mode=predict', f'--workdir={tmp_path}')
  assert result.returncode == 1
  assert 'error: ValueError: --mode=predict needs --input and --output' in result.stderr


@pytest.mark.parametrize(
  'env, expected',
  [
    ({}, None),
    (
      {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2'},
      {'num_processes': 4, 'process_id': 2},
    ),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, {}),  # jax asks the cluster for the rest
    ({'SLURM_NTASKS': '1'}, None),
    ({'SLURM_NTASKS': '8'}, {}),  # jax reads the SLURM_* variables itself
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1'}, {}),
  ],
)
def test_multiprocess_detection(monkeypatch, env, expected):
  """What main() hands to jax.distributed.initialize (None: it is not called)."""
  import jax

  from mirnet_jax import distributed

  for key in (
    'JAX_COORDINATOR_ADDRESS',
    'JAX_NUM_PROCESSES',
    'JAX_PROCESS_ID',
    'SLURM_NTASKS',
    'TPU_WORKER_HOSTNAMES',
  ):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  started = []
  monkeypatch.setattr(distributed.PeerWatchdog, 'start', lambda self: started.append(self))
  monkeypatch.setattr(distributed, '_watchdog', None)
  distributed.initialize()
  if expected is None:
    assert calls == [] and started == []
    return
  # A heartbeat timeout above the watchdog's, so a lost peer is named before jax aborts.
  want = {**expected, 'heartbeat_timeout_seconds': distributed.JAX_HEARTBEAT_TIMEOUT_S}
  assert calls == [want]
  assert distributed.JAX_HEARTBEAT_TIMEOUT_S > distributed.PEER_TIMEOUT_S
  assert len(started) == 1
