"""launch/tpu_vm.sh: Cloud TPU VM and pod slices, dry runs and real runs on fake workers (the
fakes: fake_launchers.py). Each real run must execute exactly the commands its dry run printed.
"""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
from fake_launchers import (
  FLAGS,
  LAUNCH,
  METADATA,
  POD,
  REPO,
  TPU_TRAIN,
  commands,
  make_launcher,
  shellcheck_binary,
)


@pytest.fixture
def launcher(tmp_path):
  return make_launcher(tmp_path)


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
