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
    ({}, False),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
    ({'SLURM_NTASKS': '1'}, False),
    ({'SLURM_NTASKS': '8'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1'}, True),
  ],
)
def test_multiprocess_detection(monkeypatch, env, expected):
  for key in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert main._is_multiprocess() is expected
