"""Acceptance: `make demo`'s command end to end, as a user runs it (a few minutes on a CPU).

The one test runs the real demo config, unmodified, in a fresh process: the same model, data and
step count a user gets. It checks what the demo promises (the enhanced validation images are
clearly better than the dark inputs) and that the run left its checkpoints and TensorBoard
events behind. It does not check the wall time: that depends on the machine and its load.
"""

import json
import os
import pathlib
import subprocess
import sys

from mirnet_jax import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
MARGIN_DB = 3.0  # the demo's promise: validation PSNR at least this far above the dark input's


def test_demo_beats_the_dark_input(tmp_path):
  workdir = tmp_path / 'demo'
  # A user's environment: one CPU device and no compilation cache, not the tests' fake devices.
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  env['JAX_PLATFORMS'] = 'cpu'
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'mirnet_jax.main',
      '--config=configs/demo.py',
      f'--workdir={workdir}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,  # a hang guard only, far above the demo's few minutes
  )
  assert run.returncode == 0, run.stderr[-5000:]

  final = json.loads((workdir / 'final_metrics.json').read_text())
  model, dark = final['validation']['psnr'], final['dark_input']['psnr']
  assert model >= dark + MARGIN_DB, f'validation PSNR {model:.2f} dB, dark input {dark:.2f} dB'
  assert final['validation']['ssim'] > final['dark_input']['ssim']
  assert f'Final validation PSNR {model:.3f} dB' in run.stderr

  # Checkpoints that restore: the last step, and the best by validation PSNR.
  _, _, latest = checkpoints.restore_params(workdir, 'latest')
  _, _, best = checkpoints.restore_params(workdir, 'best')
  assert latest == final['step'] and best <= latest
  # TensorBoard events holding the training and validation curves.
  import tensorflow as tf  # Lazy: slow to import, needed only for this check.

  tags = set()
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  assert {'train/loss', 'eval/psnr', 'eval/ssim'} <= tags, tags
