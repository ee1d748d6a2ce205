"""The command line: input errors are one line and a non-zero exit; help; ~ in paths; processes."""

import os
import pathlib
import shutil
import subprocess
import sys
import time

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
    # Both used to divide by zero at step 1, after the whole compile.
    (
      ['--config=configs/demo.py', '--config.train.checkpoint_every_steps=0'],
      'error: ConfigError: config.train.checkpoint_every_steps=0: must be an integer >= 1',
    ),
    (
      ['--config=configs/demo.py', '--config.model.dtype=float16', '--mode=eval'],
      "config.model.dtype='float16': not supported",
    ),
  ],
)
def test_input_errors_are_one_line(tmp_path, args, needle):
  result = _run(*args, f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if needle in line]
  assert errors, result.stderr[-2000:]


def test_bad_values_stop_before_anything_is_compiled(tmp_path):
  start = time.perf_counter()
  result = _run(
    '--config=configs/demo.py', '--config.train.log_every_steps=0', f'--workdir={tmp_path}'
  )
  seconds = time.perf_counter() - start
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    'error: ConfigError: config.train.log_every_steps=0: must be an integer >= 1'
  ], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert list(tmp_path.iterdir()) == []  # nothing made: the run never started
  assert seconds < 60  # a compile of the tiny model alone takes longer on 2 cores


def _help_text(command: list[str]) -> str:
  result = subprocess.run(
    [*command, '--help'], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  return result.stdout


def test_console_script_help_is_the_module_help():
  """`mirnet-jax --help` once listed no flag, only 'Try --helpfull'."""
  script = pathlib.Path(sys.executable).with_name('mirnet-jax')
  if not script.is_file():
    script = shutil.which('mirnet-jax')
  # Without an installed script, what the generated one runs (the `[project.scripts]` entry).
  wrapper = (
    [str(script)]
    if script
    else [sys.executable, '-c', 'import sys; from mirnet_jax.main import run_main; run_main()']
  )
  as_module = _help_text([sys.executable, '-m', 'mirnet_jax.main'])
  as_script = _help_text(wrapper)
  for text in (as_module, as_script):
    assert text.startswith('Command line: ``python -m mirnet_jax.main --config='), text[:500]
    for flag in ('--config', '--workdir', '--mode', '--input', '--output', '--overwrite'):
      assert f'  {flag}' in text or f'  --[no]{flag[2:]}' in text, (flag, text)

  def body(text):  # the module heading above the flags names the program: drop it
    return [line for line in text.splitlines() if not line.endswith(':') or line.startswith(' ')]

  assert body(as_script) == body(as_module)


def test_tilde_is_expanded_in_every_path_key(monkeypatch, tmp_path):
  import tiny

  monkeypatch.setenv('HOME', str(tmp_path))
  cfg = tiny.config()
  for key in main._PATH_KEYS:
    section, name = key.split('.')
    cfg[section][name] = f'~/{name}'
  cfg.eval.checkpoint = 'best'  # a name, not a path: left alone
  cfg.data.data_dir = 'gs://bucket/~/tfds'  # remote: left alone
  main._prepare_config(cfg)
  assert cfg.data.folder == f'{tmp_path}/folder'
  assert cfg.data.validation_folder == f'{tmp_path}/validation_folder'
  assert cfg.train.init_from == f'{tmp_path}/init_from'
  assert cfg.eval.output_dir == f'{tmp_path}/output_dir'
  assert cfg.predict.checkpoint == f'{tmp_path}/checkpoint'
  assert cfg.eval.checkpoint == 'best'
  assert cfg.data.data_dir == 'gs://bucket/~/tfds'
  assert main._expand('~/run') == f'{tmp_path}/run'
  assert main._expand(None) is None


def test_tilde_workdir_is_expanded(tmp_path):
  """--workdir=~/w (the shell leaves ~ after '=') is the home folder's w, not ./~/w."""
  env = {**os.environ, 'HOME': str(tmp_path / 'home')}
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'mirnet_jax.main',
      f'--config={REPO}/configs/demo.py',
      '--mode=eval',
      '--workdir=~/w',
    ],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  # The checkpoint is looked for in the home folder (there is none), never in ./~/w.
  assert f'error: CheckpointNotFoundError: {tmp_path}/home/w: no such directory' in result.stderr
  assert list(cwd.iterdir()) == []


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
