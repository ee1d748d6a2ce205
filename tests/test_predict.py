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


def _direct(export: pathlib.Path, image: np.ndarray, context: int, bucket: int) -> np.ndarray:
  """The model applied by hand: reflect `context` px on every side, then up to the bucket."""
  model_config, params = checkpoints.load_export(export)
  h, w = image.shape[:2]
  ph, pw = (-(-(n + 2 * context) // bucket) * bucket - n - context for n in (h, w))
  x = np.pad(image / np.float32(255), ((context, ph), (context, pw), (0, 0)), mode='reflect')
  y = jax.jit(create_model(model_config).apply)({'params': params}, x[None].astype(np.float32))
  return np.asarray(y)[0, context : context + h, context : context + w]


def test_sizes_modes_formats_and_skip(tmp_path, micro_export, capsys):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  images.write_image(inputs / 'odd.png', _photo(17, 23))
  images.write_image(inputs / 'wide.png', _photo(199, 301))
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
  config = _config(micro_export)
  code = predict.run(config, None, str(inputs), str(out))
  assert code == 0
  expected = {'odd': (17, 23), 'wide': (199, 301), 'gray': (40, 30), 'deep': (30, 20)}
  for name, shape in {**expected, 'turned': (50, 30)}.items():
    assert images.read_image(out / f'{name}.png').shape == shape + (3,)
  # The pixels are the model's: a direct call on the reflect-padded input, clamped and rounded.
  context, bucket = config.predict.tile_overlap // 2, config.predict.bucket
  for name in ('odd', 'deep'):
    direct = _direct(micro_export, images.read_image(inputs / f'{name}.png'), context, bucket)
    want = np.round(np.clip(direct, 0, 1) * 255).astype(int)
    diff = np.abs(images.read_image(out / f'{name}.png').astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())
  assert np.abs(want - images.read_image(inputs / 'deep.png')).mean() > 2  # it did change them
  assert (out / 'alpha.png').read_bytes() == b'keep me'
  assert '1 skipped' in capsys.readouterr().out
  # --overwrite replaces it; JPEG output with the same names (a glob input this time).
  code = predict.run(config, None, str(inputs / 'a*.png'), str(out), overwrite=True)
  assert code == 0 and images.read_image(out / 'alpha.png').shape == (30, 40, 3)
  config.predict.format = 'jpeg'
  assert predict.run(config, None, str(inputs / 'odd.png'), str(out)) == 0
  assert images.read_image(out / 'odd.jpg').shape == (17, 23, 3)


def test_tiles_agree_with_the_whole_image_and_borders_do_not_depend_on_them(micro_export):
  """Every border pixel gets the same reflected context, tiled or not (the convolutions' zero
  padding used to darken or brighten the outer pixels of some layouts only)."""
  image = _photo(128, 192, seed=1)  # multiples of the bucket: untiled, nothing was padded
  kw = dict(tile_overlap=32, bucket=64)
  untiled = _enhancer(micro_export, tile_size=0, **kw).enhance_float(image)
  whole = _enhancer(micro_export, tile_size=256, **kw).enhance_float(image)
  np.testing.assert_array_equal(untiled, whole)  # a tile at least the canvas: the same path
  tiled = _enhancer(micro_export, tile_size=96, **kw)
  assert tiled.num_tiles(128, 192) == 2 * 3
  diff = np.abs(tiled.enhance_float(image) - untiled)
  # Tiles see less context than the whole image (MIRNet's attention pools globally); the blend
  # keeps the seams small: measured mean 4e-6, max 2e-4 (the residual itself averages 0.03).
  assert diff.mean() < 1e-4 and diff.max() < 2e-3, (diff.mean(), diff.max())
  ring = np.ones((128, 192), bool)
  ring[3:-3, 3:-3] = False  # the outermost 3 pixels on all four sides
  # Measured 2e-4; before (zero padding at the top/left, reflection up to the bucket at the
  # bottom/right of each tile only), 0.078 = 20/255 at the borders of this layout.
  assert diff[ring].max() < 2e-3, diff[ring].max()


def test_multi_device_same_pixels_order_and_counts(micro_export):
  assert jax.device_count() == 4
  big, small = _photo(128, 192, seed=3), _photo(40, 50, seed=4)
  stream = [('a', big), ('b', small), ('c', big[::-1].copy()), ('d', big[:, ::-1].copy())]
  kw = dict(tile_size=96, tile_overlap=32, bucket=64)
  one = _enhancer(micro_export, devices=jax.devices()[:1], **kw)
  four = _enhancer(micro_export, **kw)
  assert four.num_tiles(128, 192) == 6 and four.num_tiles(40, 50) == 1
  got_one, got_four = list(one.enhance_many(stream)), list(four.enhance_many(stream))
  assert [k for k, _ in got_four] == [k for k, _ in got_one] == ['a', 'b', 'c', 'd']
  for (_, y1), (_, y4), (_, x) in zip(got_one, got_four, stream, strict=True):
    assert y4.shape == x.shape
    np.testing.assert_allclose(y4, y1, atol=1e-5)
  # 19 tiles: a's 6 in two calls (4 + 2 padded), b's one (a new shape: padded, counted once),
  # then c's and d's 12 in three full calls.
  assert four.tiles_per_device() == [6, 5, 4, 4]
  assert one.tiles_per_device() == [19]


def test_glob_and_folder_inputs_mirror_the_tree_and_match_any_case(tmp_path, micro_export):
  trip = tmp_path / 'trip'
  for rel in ('a/x.jpg', 'a/b/x.JPG', 'c.Jpg', 'a/b/y.png'):
    (trip / rel).parent.mkdir(parents=True, exist_ok=True)
    images.write_image(trip / rel, _photo(12, 16))
  out = tmp_path / 'out'
  config = _config(micro_export)
  assert predict.run(config, None, str(trip / '**' / '*.jpg'), str(out)) == 0
  written = sorted(str(p.relative_to(out)) for p in out.rglob('*.png'))
  assert written == ['a/b/x.png', 'a/x.png', 'c.png']
  assert predict.run(config, None, str(trip / 'a'), str(tmp_path / 'flat')) == 0  # not recursive
  assert sorted(p.name for p in (tmp_path / 'flat').rglob('*')) == ['x.png']


def test_huge_image_keeps_its_size(tmp_path, micro_export):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  photo = _photo(3000, 4000)
  images.write_image(inputs / 'big.png', photo)
  config = _config(micro_export, tile_size=2048, tile_overlap=64, max_tile_megapixels=0.0)
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
