"""Two processes x two CPU devices as one jax.distributed run (tests/multihost.py) vs one x four.

Each scenario is one multi-process run of the tiny model (tests/tiny.py); the compilation cache
is shared with the subprocesses, so only the first run of a step compiles it.
"""

import csv
import json
import pathlib
import shutil
import signal
import time

import jax
import multihost
import numpy as np
import pytest
import tiny

from mirnet_jax import checkpoints, distributed, train


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tiny.compilation_cache_dir(tmp_path_factory)


# A peer silent this long is lost, in the killed-peer run (the default, 20 s, is for loaded
# hosts; the heartbeat is 1 s, so 10 s still leaves a loaded 2-core machine a wide margin).
PEER_TIMEOUT_S = 10


def _env(cache_dir: pathlib.Path) -> dict:
  return {'JAX_COMPILATION_CACHE_DIR': str(cache_dir)}


def _main(workdir: pathlib.Path, *args: str, **overrides) -> list[str]:
  return ['-m', 'mirnet_jax.main', f'--workdir={workdir}', *tiny.flags(**overrides), *args]


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _params(workdir: pathlib.Path, which='latest'):
  _, params, step = checkpoints.restore_params(workdir, which)
  return jax.device_get(params), step


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, cache_dir):
  """The reference: 6 steps on one process with four devices (this pytest process)."""
  del cache_dir
  workdir = tmp_path_factory.mktemp('one_process')
  train.train_and_evaluate(tiny.config(), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, cache_dir):
  """The same run on two processes with two devices each."""
  workdir = tmp_path_factory.mktemp('two_processes')
  start = time.monotonic()
  results = multihost.run(
    _main(workdir), log_dir=workdir.parent / 'two_processes_logs', env=_env(cache_dir), timeout=400
  )
  assert [r.returncode for r in results] == [0, 0], multihost.tails(results)
  return workdir, results, time.monotonic() - start


def test_two_processes_match_one_process_and_only_process_0_writes(one_process, two_processes):
  workdir, results, _ = two_processes
  want = json.loads((one_process / 'final_metrics.json').read_text())
  got = json.loads((workdir / 'final_metrics.json').read_text())
  assert got['step'] == want['step'] == 6
  assert got['validation']['num_images'] == want['validation']['num_images'] == 4
  # Same data order and the same global batches: the same model, up to summation order.
  assert abs(got['validation']['psnr'] - want['validation']['psnr']) < 0.05, (got, want)
  assert got['dark_input'] == pytest.approx(want['dark_input'], abs=1e-6)
  # Process 0 alone wrote the history (6 losses, not 12), one event file, the curves.
  history = [json.loads(line) for line in (workdir / 'history.jsonl').read_text().splitlines()]
  assert [r['step'] for r in history if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1
  assert (workdir / 'curves.png').stat().st_size > 0
  # The iterator position is one JSON item, not grain's process_<i>-of-<n> files.
  step_dir = workdir / 'checkpoints' / '6'
  assert json.loads((step_dir / checkpoints.ITERATOR / 'metadata').read_text()) == {'step': 6}
  assert not (step_dir / checkpoints.DATA).exists()
  assert 'JAX process 1/2' in results[1].output
  # The same losses step by step.
  ref = [json.loads(line) for line in (one_process / 'history.jsonl').read_text().splitlines()]
  np.testing.assert_allclose(
    [r['loss'] for r in history if 'loss' in r], [r['loss'] for r in ref if 'loss' in r], rtol=1e-4
  )


def test_resume_on_another_process_count(two_processes, tmp_path):
  # Step 4 of the two-process run, resumed on this one process (four devices), reaches the
  # two-process step 6 exactly (up to summation order).
  workdir, _, _ = two_processes
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir / 'checkpoints', resumed / 'checkpoints')
  shutil.rmtree(resumed / 'checkpoints' / '6')
  train.train_and_evaluate(tiny.config(), str(resumed))
  assert _steps(resumed) == [4, 6]
  got, got_step = _params(resumed)
  want, want_step = _params(workdir)
  assert got_step == want_step == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_eval_on_two_processes_writes_every_image_once(two_processes, cache_dir, tmp_path):
  workdir, _, _ = two_processes
  out = tmp_path / 'eval'
  # Eval batch 2 on 4 devices: rounded up to 4 (masked padding), with a log line.
  args = _main(
    workdir,
    '--mode=eval',
    '--config.eval.split=validation',
    '--config.eval.save_images=true',
    '--config.eval.num_grids=-1',
    f'--config.eval.output_dir={out}',
    data__eval_batch_size=2,
  )
  results = multihost.run(args, log_dir=tmp_path / 'logs', env=_env(cache_dir), timeout=300)
  assert [r.returncode for r in results] == [0, 0], multihost.tails(results)
  assert 'config.data.eval_batch_size=2 rounded up to 4' in results[0].output
  with open(out / 'metrics.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  names = [r['name'] for r in rows]
  assert len(names) == 4 and len(set(names)) == 4, names
  assert sorted(p.name for p in (out / 'grids').iterdir()) == sorted(f'{n}.png' for n in names)
  assert sorted(p.name for p in (out / 'images').iterdir()) == sorted(f'{n}.png' for n in names)
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['num_images'] == 4
  assert np.mean([float(r['psnr']) for r in rows]) == pytest.approx(summary['psnr'], abs=1e-5)
  # The table is printed once, by process 0, with every image.
  assert sum(r.output.count('\nmean ') for r in results) == 1
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert summary['psnr'] == pytest.approx(final['validation']['psnr'], abs=1e-4)


def test_a_killed_peer_ends_the_survivor_then_a_rerun_resumes_and_sigterm_saves_one_step(
  tmp_path, cache_dir
):
  # One workdir, two two-process runs: the first loses process 1 to SIGKILL, the second (every
  # process rerun, as the survivor's error line says) resumes and is stopped by SIGTERM.
  workdir = tmp_path / 'run'
  procs = multihost.start(
    _main(workdir, train__num_steps=10_000, train__checkpoint_every_steps=2),
    log_dir=tmp_path / 'killed_logs',
    env={**_env(cache_dir), 'MIRNET_PEER_TIMEOUT_S': str(PEER_TIMEOUT_S)},
  )
  try:
    multihost.wait_for(procs, r'step 5/10000', timeout=300, every=False)
    killed = time.monotonic()
    procs[1].signal(signal.SIGKILL)
    results = multihost.wait(procs, timeout=PEER_TIMEOUT_S + 60)
  finally:
    multihost.kill(procs)
  survivor = results[0]
  ended_after = time.monotonic() - killed
  assert results[1].returncode == -signal.SIGKILL
  assert survivor.returncode == distributed.LOST_PEER_EXIT, multihost.tails(results)
  assert ended_after < PEER_TIMEOUT_S + 30, ended_after
  lines = [line for line in survivor.output.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'lost process 1 of 2' in lines[0], multihost.tails(results)
  assert f'no heartbeat for {PEER_TIMEOUT_S} s' in lines[0], lines  # MIRNET_PEER_TIMEOUT_S
  assert 'Traceback' not in survivor.output
  # What the kill left: complete checkpoints, perhaps orbax's temporary directory of the step
  # being written (never restored). A rerun resumes from the newest complete checkpoint.
  complete = _steps(workdir)
  assert complete and all(s % 2 == 0 for s in complete), complete
  last = complete[-1]

  # The rerun, with no periodic checkpoints: SIGTERM on both processes saves one step (the
  # same on both) and both exit 0 within a minute.
  procs = multihost.start(
    _main(workdir, train__num_steps=10_000, train__checkpoint_every_steps=10_000),
    log_dir=tmp_path / 'rerun_logs',
    env=_env(cache_dir),
  )
  try:
    multihost.wait_for(procs, rf'step {last + 2}/10000', timeout=300, every=False)
    sent = time.monotonic()
    for p in procs:
      p.signal(signal.SIGTERM)
    results = multihost.wait(procs, timeout=120)
  finally:
    multihost.kill(procs)
  assert [r.returncode for r in results] == [0, 0], multihost.tails(results)
  assert time.monotonic() - sent < 60
  assert f'Resumed from {workdir}/checkpoints/{last}' in results[0].output, multihost.tails(results)
  steps = _steps(workdir)
  new = [s for s in steps if s > last]
  assert len(new) == 1 and last + 2 <= new[0] < 10_000, (last, steps)
  for r in results:
    assert f'SIGTERM: saved step {new[0]}' in r.output, multihost.tails(results)
