"""--mode=eval: the protocol table for the baselines, a converted model's outputs, errors."""

import csv
import json
import pathlib

import numpy as np
import pytest

from configs import lol
from mirnet_jax import convert, evaluate, metrics
from mirnet_jax.data import images

# ../shared/docs/protocol.md, LoL eval15: (PSNR dB, SSIM, MAE, MSE).
PROTOCOL_TABLE = {
  'identity': (7.7733, 0.1952, 99.799, 12613.62),
  'autocontrast': (11.2416, 0.3787, 71.044, 7084.97),
  'equalize': (14.8112, 0.3770, 39.921, 2538.51),
}


def _folder_config(folder: pathlib.Path, out: pathlib.Path):
  config = lol.get_config()
  config.data.name = 'folder'
  # A folder's 'test' split is its validation folder: here all of it.
  config.data.folder = config.data.validation_folder = str(folder)
  config.eval.output_dir = str(out)
  config.eval.num_grids = 1
  return config


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _check_protocol_outputs(out: pathlib.Path, method: str, eval15_dir: pathlib.Path) -> dict:
  """summary.json holds the protocol table's row; metrics.csv and one grid agree with it."""
  summary = json.loads((out / 'summary.json').read_text())
  psnr, ssim, mae, mse = PROTOCOL_TABLE[method]
  assert summary['psnr'] == pytest.approx(psnr, abs=1e-3)
  assert summary['ssim'] == pytest.approx(ssim, abs=2e-3)
  assert summary['mae'] == pytest.approx(mae, abs=1e-3)
  assert summary['mse'] == pytest.approx(mse, abs=1e-2)
  assert summary['num_images'] == 15 and summary['method'] == method and summary['step'] == 0
  assert 'protocol' in summary and 'psnr_gt_mean' not in summary
  rows = _read_csv(out / 'metrics.csv')
  assert list(rows[0]) == ['name', 'psnr', 'ssim', 'mae', 'mse']
  assert sorted(r['name'] for r in rows) == sorted(p.name for p in (eval15_dir / 'low').iterdir())
  for key in metrics.METRIC_KEYS:
    mean = np.mean([float(r[key]) for r in rows])
    assert mean == pytest.approx(summary[key], rel=1e-6)
  grids = list((out / 'grids').iterdir())
  assert len(grids) == 1 and images.read_image(grids[0]).shape == (400, 1800, 3)
  return summary


@pytest.mark.parametrize('method', sorted(PROTOCOL_TABLE))
def test_baselines_reproduce_the_protocol_table_on_lol(method, lol_data_dir, eval15_dir, tmp_path):
  # The TFDS path of --mode=eval: LoL 'test', built (conftest) from the shared eval15 pairs.
  config = lol.get_config()
  config.data.name = 'lol'
  config.data.data_dir = str(lol_data_dir)
  config.eval.split = 'test'
  config.eval.method = method
  config.eval.num_grids = 1
  assert evaluate.run(config, str(tmp_path)) == 0  # main.py's exit code
  # The default output directory is named after the split and the method.
  summary = _check_protocol_outputs(tmp_path / 'eval' / 'test' / method, method, eval15_dir)
  assert summary['data'] == 'lol' and summary['split'] == 'test'


def test_folder_baseline_reproduces_the_protocol_table(eval15_dir, tmp_path):
  # The folder path gives the same numbers (one method: the LoL test covers all three).
  config = _folder_config(eval15_dir, tmp_path)
  config.eval.method = 'identity'
  assert evaluate.run(config, None) == 0
  summary = _check_protocol_outputs(tmp_path, 'identity', eval15_dir)
  assert summary['data'] == 'folder'


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory, fixtures_dir) -> pathlib.Path:
  out = tmp_path_factory.mktemp('weights') / 'tiny'
  source = fixtures_dir / 'tiny' / 'state_dict.npz'
  assert convert.main(['--source', str(source), '--output', str(out)]) == 0
  return out


def test_model_eval_writes_every_output(eval15_dir, tiny_export, tmp_path, capsys):
  # Three pairs cropped to 67x101: not a multiple of the model's 4, so padding is exercised,
  # and a 4-device mesh with eval batch 4 pads the batch (mask) too.
  data = tmp_path / 'data'
  for sub in ('low', 'high'):
    (data / sub).mkdir(parents=True)
    for name in ('1.png', '22.png', '23.png'):
      images.write_image(data / sub / name, images.read_image(eval15_dir / sub / name)[:67, :101])
  out = tmp_path / 'out'
  config = _folder_config(data, out)
  config.eval.checkpoint = str(tiny_export)
  config.eval.save_images = True
  config.eval.gt_mean = True
  config.eval.num_grids = -1
  summary = evaluate.write_evaluation(config, None)
  assert summary['num_images'] == 3 and summary['method'] == 'model'
  assert summary['model']['num_features'] == 8
  for key in metrics.METRIC_KEYS:
    assert np.isfinite(summary[key]) and np.isfinite(summary[key + '_gt_mean'])
  rows = _read_csv(out / 'metrics.csv')
  assert [r['name'] for r in rows] == ['1.png', '22.png', '23.png']
  assert 'psnr_gt_mean' in rows[0]
  for row in rows:
    # The saved PNG scores exactly what the evaluation reported (quantised like a PNG).
    enhanced = images.read_image(out / 'images' / row['name'])
    high = images.read_image(data / 'high' / row['name'])
    assert enhanced.shape == (67, 101, 3)
    again = metrics.compute_metrics(enhanced[None] / 255.0, high[None] / 255.0)
    assert float(again['psnr'][0]) == pytest.approx(float(row['psnr']), abs=1e-5)
    low = images.read_image(data / 'low' / row['name'])
    grid = images.read_image(out / 'grids' / row['name'])
    np.testing.assert_array_equal(grid, np.concatenate([low, enhanced, high], 1))
  assert 'mean' in capsys.readouterr().out


def test_eval_without_checkpoint_is_a_clear_error(eval15_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _folder_config(eval15_dir, tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='checkpoint') as info:
    evaluate.run(config, str(workdir))
  assert str(workdir) in str(info.value) and 'method=identity' in str(info.value)
  assert not (tmp_path / 'out').exists()


def test_default_output_dirs_never_overwrite_each_other(eval15_dir, tmp_path):
  workdir = tmp_path / 'run'
  assert evaluate.default_output_dir(workdir, 'test', 'model', 'best', 6, 2.2) == (
    workdir / 'eval' / 'test' / 'step_6'
  )
  assert evaluate.default_output_dir(workdir, 'test', 'model', '/w/tiny', 0, 2.2).name == (
    'export_tiny'
  )
  assert evaluate.default_output_dir(workdir, 'val', 'gamma', 'best', 0, 0.45).name == 'gamma_0.45'
  # Two baselines into one workdir: two directories; a rerun of one is refused, then allowed.
  config = _folder_config(eval15_dir, tmp_path / 'unused')
  config.eval.output_dir = ''
  config.eval.num_grids = 0
  for method in ('identity', 'autocontrast'):
    config.eval.method = method
    assert evaluate.run(config, str(workdir)) == 0
  summaries = {
    p.parent.name: json.loads(p.read_text()) for p in (workdir / 'eval').rglob('summary.json')
  }
  assert {k: v['method'] for k, v in summaries.items()} == {
    'identity': 'identity',
    'autocontrast': 'autocontrast',
  }
  before = (workdir / 'eval' / 'test' / 'autocontrast' / 'metrics.csv').read_text()
  with pytest.raises(FileExistsError, match='--overwrite') as error:
    evaluate.run(config, str(workdir))
  assert str(workdir / 'eval' / 'test' / 'autocontrast') in str(error.value)
  assert (workdir / 'eval' / 'test' / 'autocontrast' / 'metrics.csv').read_text() == before
  assert evaluate.run(config, str(workdir), overwrite=True) == 0
