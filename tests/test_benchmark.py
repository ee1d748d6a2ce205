"""benchmark.py's data and predict modes on tiny configs: what they report, not how fast."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = {
  'model.num_features': 4,
  'model.num_rrg': 1,
  'model.num_mrb': 1,
  'model.height': 2,
  'model.width': 1,
  'model.reduction': 2,
}


def _bench(*args: str) -> list[dict]:
  done = subprocess.run(
    [sys.executable, '-m', 'mirnet_jax.benchmark', '--config=configs/demo.py', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


def test_data_mode_reports_crops_per_second_of_the_cached_pipeline():
  lines = _bench(
    '--mode=data',
    '--steps=5',
    '--config.data.synthetic_pairs=16',
    '--config.data.synthetic_size=48',
    '--config.data.crop_size=32',
    '--config.data.cache=True',
    '--config.train.batch_size=8',
  )
  assert [line['event'] for line in lines] == ['ready', 'summary']
  summary = lines[-1]
  assert summary['records'] == 16 and summary['cache'] is True
  assert summary['batch'] == 8 and summary['crop_size'] == 32 and summary['batches'] == 5
  assert summary['images_per_s'] == pytest.approx(8 * summary['batches_per_s'], rel=0.01)
  assert summary['images_per_s'] > 0 and summary['peak_rss_gib'] > 0


def test_predict_mode_spreads_the_tiles_over_the_devices():
  overrides = {
    **MICRO,
    'predict.tile_size': 96,
    'predict.tile_overlap': 32,
    'predict.bucket': 64,
  }
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  lines = _bench('--mode=predict', '--batch=4', '--size=128,192', *flags)
  assert [line['event'] for line in lines] == ['compile', 'summary']
  summary = lines[-1]
  assert summary['devices'].startswith('4 x ')  # conftest's 4 fake CPU devices
  assert summary['tiles_per_image'] == 6 and summary['tile_shape'] == [96, 96]
  # 4 images x 6 tiles, one tile per device per call: a quarter each.
  assert summary['tiles_per_device'] == [6, 6, 6, 6]
  assert summary['processed_over_image_pixels'] == pytest.approx(6 * 96 * 96 / (128 * 192))
  assert summary['megapixels_per_s'] > 0 and summary['peak_rss_gib'] > 0
