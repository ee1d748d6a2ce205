"""Tests of the synthetic low-light pairs (mirnet_jax/data/synthetic.py)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mirnet_jax.data import images, synthetic, synthetic_folder


def _pairs(split='train', seed=0, n=8, size=64):
  source = synthetic.create_synthetic_source(split, num_pairs=n, size=size, seed=seed)
  return [source[i] for i in range(len(source))]


def test_pairs_shapes_and_darkness():
  for record in _pairs(n=8, size=64):
    low, high = record['low'], record['high']
    assert low.shape == high.shape == (64, 64, 3)
    assert low.dtype == high.dtype == np.uint8
    assert isinstance(record['name'], str)
    # The model's ranges keep low's mean at about 0.07-0.45 of high's.
    assert low.mean() < 0.5 * high.mean(), record['name']
    assert low.mean() > 0.02 * high.mean(), record['name']


def test_reproducible_for_a_seed_and_different_for_another():
  a, b, c = _pairs(seed=0), _pairs(seed=0), _pairs(seed=1)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
    np.testing.assert_array_equal(x['high'], y['high'])
    assert x['name'] == y['name']
  assert any(not np.array_equal(x['low'], z['low']) for x, z in zip(a, c, strict=True))
  assert any(not np.array_equal(x['high'], z['high']) for x, z in zip(a, c, strict=True))


def test_random_access_matches_sequential():
  source = synthetic.create_synthetic_source('train', num_pairs=6, size=32, seed=3)
  forward = [source[i]['low'] for i in range(6)]
  for i in reversed(range(6)):
    np.testing.assert_array_equal(source[i]['low'], forward[i])
  with pytest.raises(IndexError):
    source[6]


def test_splits_use_every_photograph_with_disjoint_names():
  splits = ('train', 'validation', 'test')
  pairs = {split: _pairs(split, n=6, size=32) for split in splits}
  for split in splits:
    assert {r['name'].split('_')[1] for r in pairs[split]} == {
      pathlib.Path(p).stem for p in synthetic.PHOTOS
    }
    assert all(r['name'].endswith(f'_{split}') for r in pairs[split])
  names = [r['name'] for split in splits for r in pairs[split]]
  assert len(set(names)) == len(names)
  with pytest.raises(ValueError, match='unknown split'):
    synthetic.create_synthetic_source('dev', num_pairs=1, size=32, seed=0)
  # chelsea.png (451x300) cannot hold three bands of 151 pixels.
  synthetic.create_synthetic_source('test', num_pairs=1, size=150, seed=0)
  with pytest.raises(ValueError, match=r'chelsea.png is 451x300: its bands .* size=151'):
    synthetic.create_synthetic_source('test', num_pairs=1, size=151, seed=0)


def test_split_regions_partition_each_photograph():
  for height, width, size in ((512, 512, 96), (427, 640, 128), (451, 300, 150), (300, 451, 32)):
    covered = np.zeros((height, width), int)
    for split in ('validation', 'train', 'test'):
      top, left, h, w = synthetic.split_region(height, width, size, split)
      assert min(h, w) >= size
      covered[top : top + h, left : left + w] += 1
    np.testing.assert_array_equal(covered, 1)  # disjoint and together the whole photograph
  # Bands run across the longer side; each held-out band is 20% of it, or `size` if wider.
  assert synthetic.split_region(400, 600, 64, 'validation') == (0, 0, 400, 120)
  assert synthetic.split_region(400, 600, 64, 'train') == (0, 120, 400, 360)
  assert synthetic.split_region(600, 400, 128, 'test') == (472, 0, 128, 400)


def test_split_pairs_come_from_their_own_band(tmp_path):
  # Pixel value = column index, so every pixel of 'high' says where it was cropped from (bicubic
  # resizing reproduces a linear ramp, so resized windows keep the values in range).
  columns = np.broadcast_to(np.arange(250, dtype=np.uint8)[None, :, None], (100, 250, 3))
  images.write_image(tmp_path / 'ramp.png', np.ascontiguousarray(columns))
  bands = {'validation': (0, 50), 'train': (50, 200), 'test': (200, 250)}
  for split, (start, stop) in bands.items():
    source = synthetic.SyntheticSource(
      [tmp_path / 'ramp.png'], num_pairs=12, size=20, seed=0, split=split
    )
    for i in range(len(source)):
      high = source[i]['high']
      assert high.shape == (20, 20, 3)
      assert start <= high.min() and high.max() < stop, (split, i, high.min(), high.max())


def test_darken_with_is_the_documented_model():
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  rng = np.random.default_rng(0)
  noiseless = dict(gain_r=1.0, gain_b=1.0, shot_noise=0.0, read_noise=0.0, gamma=2.2)
  # Linearise with 2.2, encode with 2.2: the identity up to rounding.
  same = synthetic.darken_with(x, rng, exposure=1.0, **noiseless)
  assert np.abs(same.astype(int) - x).max() <= 1
  # Exposure e in linear light scales the encoded values by e ** (1 / 2.2).
  dark = synthetic.darken_with(x, rng, exposure=0.05, **noiseless)
  expected = np.rint(x * 0.05 ** (1 / 2.2))
  assert np.abs(dark - expected).max() <= 1
  # Gains act on the red and blue channels only.
  cast = synthetic.darken_with(x, rng, **{**noiseless, 'exposure': 0.05, 'gain_r': 1.2})
  assert (cast[..., 0] >= dark[..., 0]).all() and (cast[..., 0] > dark[..., 0]).any()
  np.testing.assert_array_equal(cast[..., 1:], dark[..., 1:])


def test_noise_is_poisson_gaussian_scale():
  flat = np.full((64, 64, 3), 128, np.uint8)
  params = dict(exposure=0.1, gain_r=1.0, gain_b=1.0, gamma=2.2)
  rng = np.random.default_rng(0)
  quiet = synthetic.darken_with(flat, rng, shot_noise=1e-6, read_noise=1e-5, **params)
  loud = synthetic.darken_with(flat, rng, shot_noise=1e-4, read_noise=1e-3, **params)
  assert quiet.std() < loud.std()
  assert abs(float(quiet.mean()) - float(loud.mean())) < 3  # noise is zero-mean in linear light


def test_synthesize_folder_and_cli(tmp_path):
  photos = tmp_path / 'photos'
  photos.mkdir()
  source = synthetic.create_synthetic_source('test', num_pairs=2, size=40, seed=0)
  images.write_image(photos / 'a.png', source[0]['high'])
  images.write_image(photos / 'b.jpg', source[1]['high'])
  stems = synthetic_folder.synthesize_folder(photos, tmp_path / 'out', seed=0)
  assert stems == ['a', 'b']
  for stem, original in (('a', photos / 'a.png'), ('b', photos / 'b.jpg')):
    low = images.read_image(tmp_path / 'out' / 'low' / f'{stem}.png')
    high = images.read_image(tmp_path / 'out' / 'high' / f'{stem}.png')
    np.testing.assert_array_equal(high, images.read_image(original))
    assert low.shape == high.shape and low.mean() < 0.5 * high.mean()
  synthetic_folder.main(['--input', str(photos), '--output', str(tmp_path / 'cli'), '--seed', '0'])
  for sub in ('low', 'high'):
    for stem in stems:
      np.testing.assert_array_equal(
        images.read_image(tmp_path / 'cli' / sub / f'{stem}.png'),
        images.read_image(tmp_path / 'out' / sub / f'{stem}.png'),
      )
  synthetic_folder.main(
    ['--input', str(photos), '--output', str(tmp_path / 'seed1'), '--seed', '1']
  )
  assert not np.array_equal(
    images.read_image(tmp_path / 'seed1' / 'low' / 'a.png'),
    images.read_image(tmp_path / 'out' / 'low' / 'a.png'),
  )


def test_synthesize_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='no images'):
    synthetic_folder.synthesize_folder(tmp_path, tmp_path / 'out')
  x = np.zeros((8, 8, 3), np.uint8)
  images.write_image(tmp_path / 'a.png', x)
  images.write_image(tmp_path / 'a.jpg', x)
  with pytest.raises(ValueError, match='a.jpg and a.png share a stem'):
    synthetic_folder.synthesize_folder(tmp_path, tmp_path / 'out')


def _photos(tmp_path, names=('a.png', 'b.png', 'c.png')) -> pathlib.Path:
  photos = tmp_path / 'photos'
  photos.mkdir()
  source = synthetic.create_synthetic_source('test', num_pairs=len(names), size=24, seed=0)
  for i, name in enumerate(names):
    images.write_image(photos / name, source[i]['high'])
  return photos


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
  return {os.fspath(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*.png')}


def test_cli_one_unreadable_photo_names_it_and_writes_nothing(tmp_path, capsys):
  photos = _photos(tmp_path)
  good = (photos / 'b.png').read_bytes()
  (photos / 'b.png').write_bytes(good[: len(good) // 2])  # truncated: a.png is written before it
  out = tmp_path / 'pairs'
  assert synthetic_folder.main(['--input', str(photos), '--output', str(out)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {photos / "b.png"}: cannot decode image') and '\n' not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['photos']  # no pairs/, no hidden set
  # An earlier complete set survives a failed --overwrite run untouched.
  (photos / 'b.png').write_bytes(good)
  assert synthetic_folder.main(['--input', str(photos), '--output', str(out)]) == 0
  before = _tree(out)
  assert sorted(before) == [f'{s}/{n}.png' for s in ('high', 'low') for n in 'abc']
  (photos / 'c.png').write_bytes(b'not a png')
  assert synthetic_folder.main(['--input', str(photos), '--output', str(out), '--overwrite']) == 1
  assert 'c.png: not an image' in capsys.readouterr().err
  assert _tree(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['pairs', 'photos']


def test_cli_never_overwrites_without_the_flag(tmp_path, capsys):
  photos = _photos(tmp_path, ('a.png', 'b.png'))
  out = tmp_path / 'pairs'
  out.mkdir()  # an empty folder is fine
  assert synthetic_folder.main(['--input', str(photos), '--output', str(out), '--seed', '0']) == 0
  assert f'wrote 2 pairs to {out}/low and {out}/high' in capsys.readouterr().out
  seed0 = _tree(out)
  assert synthetic_folder.main(['--input', str(photos), '--output', str(out), '--seed', '1']) == 1
  assert capsys.readouterr().err.strip() == (
    f'error: {out}: exists and is not empty; pass --overwrite to replace it'
  )
  assert _tree(out) == seed0
  argv = ['--input', str(photos), '--output', str(out), '--seed', '1', '--overwrite']
  assert synthetic_folder.main(argv) == 0
  seed1 = _tree(out)
  assert sorted(seed1) == sorted(seed0) and seed1['low/a.png'] != seed0['low/a.png']
  assert seed1['high/a.png'] == seed0['high/a.png']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['pairs', 'photos']


def test_cli_outputs_get_the_umask_mode(tmp_path):
  """The documented command, in a subprocess under umask 022: files 0644, folders 0755."""
  photos = _photos(tmp_path, ('a.png',))
  out = tmp_path / 'pairs'
  command = [sys.executable, '-m', 'mirnet_jax.data.synthetic', '--input', photos, '--output', out]
  # The shell sets the umask: a preexec_fn would fork a process that runs JAX's threads.
  result = subprocess.run(
    ['sh', '-c', 'umask 022 && exec "$@"', 'sh', *map(str, command)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  modes = {os.fspath(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob('*')}
  assert modes == {
    'low': 0o755,
    'high': 0o755,
    'low/a.png': 0o644,
    'high/a.png': 0o644,
  }
  assert out.stat().st_mode & 0o777 == 0o755
