"""predict: exact sizes, tiles and blending, the output policy, failures that name the file."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import lol
from mirnet_jax import checkpoints, convert, predict
from mirnet_jax.data import images
from mirnet_jax.models import create_model, param_shapes

# The smallest valid MIRNet: one stream pair, one DAU column; cheap enough for 4000x3000.
MICRO = {'num_features': 4, 'num_rrg': 1, 'num_mrb': 1, 'height': 2, 'width': 1, 'reduction': 2}


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory, fixtures_dir) -> pathlib.Path:
  """The official tiny model (8 features, height 3), converted."""
  out = tmp_path_factory.mktemp('weights') / 'tiny'
  assert (
    convert.main(['--source', str(fixtures_dir / 'tiny' / 'state_dict.npz'), '--output', str(out)])
    == 0
  )
  return out


@pytest.fixture(scope='module')
def micro_export(tmp_path_factory) -> pathlib.Path:
  """Random weights for MICRO (from the shapes: initialising eagerly is slow on CPU)."""
  rng = np.random.default_rng(0)
  shapes = param_shapes(create_model(MICRO))
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
  out = tmp_path_factory.mktemp('weights') / 'micro'
  checkpoints.export_params(out, params, MICRO)
  return out


def _config(weights: pathlib.Path, **predict_overrides):
  config = lol.get_config()
  config.predict.checkpoint = str(weights)
  for key, value in predict_overrides.items():
    config.predict[key] = value
  return config


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth dark image (compresses well, unlike noise) with a little texture."""
  yy, xx = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  base = np.stack([xx * 60 // max(w, 1), yy * 60 // max(h, 1), (xx + yy) % 40], -1)
  return (base + rng.integers(0, 8, (h, w, 3))).astype(np.uint8)


def _enhancer(export: pathlib.Path, **kw) -> predict.Enhancer:
  model_config, params = checkpoints.load_export(export)
  return predict.Enhancer(create_model(model_config), params, **kw)


def test_tile_layout_and_weights_partition_unity():
  assert predict.tile_starts(100, 128, 16) == [0]
  starts = predict.tile_starts(3000, 1024, 64)
  assert starts[0] == 0 and starts[-1] == 3000 - 1024
  assert all(b - a <= 1024 - 64 for a, b in zip(starts, starts[1:], strict=False))
  weights = predict.ramp(1024, starts)
  total = np.zeros(3000)
  for s, w in zip(starts, weights, strict=True):
    total[s : s + 1024] += w
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  assert weights.min() > 0


def test_sizes_modes_formats_and_skip(tmp_path, tiny_export, capsys):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  images.write_image(inputs / 'odd.png', _photo(17, 23))
  images.write_image(inputs / 'wide.png', _photo(399, 601))
  Image.fromarray(_photo(40, 30)[..., 0]).save(inputs / 'gray.png')  # 'L'
  rgba = np.concatenate([_photo(30, 40), np.full((30, 40, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba).save(inputs / 'alpha.png')
  Image.fromarray(_photo(30, 20)[..., 1].astype(np.uint16) * 257).save(inputs / 'deep.png')
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise when shown: 30x50 stored, 50x30 upright
  Image.fromarray(_photo(30, 50)).save(inputs / 'turned.jpg', exif=exif)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'alpha.png').write_bytes(b'keep me')  # an existing output: never replaced by default
  config = _config(tiny_export)
  code = predict.run(config, None, str(inputs), str(out))
  assert code == 0
  expected = {'odd': (17, 23), 'wide': (399, 601), 'gray': (40, 30), 'deep': (30, 20)}
  for name, shape in {**expected, 'turned': (50, 30)}.items():
    assert images.read_image(out / f'{name}.png').shape == shape + (3,)
  assert (out / 'alpha.png').read_bytes() == b'keep me'
  assert '1 skipped' in capsys.readouterr().out
  # --overwrite replaces it; JPEG output with the same names (a glob input this time).
  code = predict.run(config, None, str(inputs / 'a*.png'), str(out), overwrite=True)
  assert code == 0 and images.read_image(out / 'alpha.png').shape == (30, 40, 3)
  config.predict.format = 'jpeg'
  assert predict.run(config, None, str(inputs / 'odd.png'), str(out)) == 0
  assert images.read_image(out / 'odd.jpg').shape == (17, 23, 3)


def test_tile_at_least_image_is_identical_and_overlap_is_close(tiny_export):
  image = _photo(120, 200, seed=1)
  untiled = _enhancer(tiny_export, tile_size=0, tile_overlap=0, bucket=64).enhance_float(image)
  whole = _enhancer(tiny_export, tile_size=200, tile_overlap=16, bucket=64).enhance_float(image)
  np.testing.assert_array_equal(untiled, whole)
  tiled = _enhancer(tiny_export, tile_size=96, tile_overlap=32, bucket=64)
  assert tiled.num_tiles(120, 200) == 2 * 3
  diff = np.abs(tiled.enhance_float(image) - untiled)
  # Tiles see less context than the whole image (MIRNet's attention pools globally); the blend
  # keeps the seams small: measured mean 5e-6, max 1.3e-4 (the residual itself averages 0.04).
  assert diff.mean() < 1e-4 and diff.max() < 5e-3, (diff.mean(), diff.max())


def test_huge_image_keeps_its_size(tmp_path, micro_export):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  photo = _photo(3000, 4000)
  images.write_image(inputs / 'big.png', photo)
  config = _config(micro_export, tile_size=2048, tile_overlap=64)
  assert predict.run(config, None, str(inputs / 'big.png'), str(tmp_path / 'out')) == 0
  out = images.read_image(tmp_path / 'out' / 'big.png')
  assert out.shape == (3000, 4000, 3)


def test_corrupt_file_is_named_and_others_are_written(tmp_path, tiny_export, capsys):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  images.write_image(inputs / 'a.png', _photo(20, 20))
  (inputs / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  images.write_image(inputs / 'c.jpg', _photo(20, 24))
  out = tmp_path / 'out'
  code = predict.run(_config(tiny_export), None, str(inputs), str(out))
  assert code != 0
  assert (out / 'a.png').is_file() and (out / 'c.png').is_file()
  assert not (out / 'b.png').exists()
  printed = capsys.readouterr().out
  assert '1 failed' in printed and str(inputs / 'b.png') in printed
  # One input may go to a named output file; several may not.
  assert predict.run(_config(tiny_export), None, str(inputs / 'a.png'), str(out / 'one.jpg')) == 0
  assert images.read_image(out / 'one.jpg').shape == (20, 20, 3)
  assert predict.run(_config(tiny_export), None, str(inputs), str(out / 'two.png')) == 2


def test_missing_inputs_or_weights_exit_nonzero(tmp_path, tiny_export):
  config = _config(tiny_export)
  assert predict.run(config, None, str(tmp_path / 'nothing.png'), str(tmp_path / 'o')) == 2
  (tmp_path / 'x.png').write_bytes(b'')
  config.predict.checkpoint = 'best'
  assert predict.run(config, str(tmp_path / 'empty_run'), str(tmp_path / 'x.png'), 'o') == 2
