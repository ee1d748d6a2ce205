"""Tests of the synthetic low-light pairs (mirnet_jax/data/synthetic.py)."""

import numpy as np
import pytest

from mirnet_jax.data import images, synthetic


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


def test_splits_use_disjoint_photographs():
  photos = {
    split: {r['name'].split('_', 1)[1] for r in _pairs(split, n=4, size=32)}
    for split in ('train', 'validation', 'test')
  }
  assert photos['train'] == {'astronaut', 'coffee', 'retina', 'ihc'}
  assert photos['validation'] == {'rocket'}
  assert photos['test'] == {'chelsea'}
  with pytest.raises(ValueError, match='unknown split'):
    synthetic.create_synthetic_source('dev', num_pairs=1, size=32, seed=0)
  with pytest.raises(ValueError, match=r'chelsea.png is 451x300, smaller than size=301'):
    synthetic.create_synthetic_source('test', num_pairs=1, size=301, seed=0)


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
  stems = synthetic.synthesize_folder(photos, tmp_path / 'out', seed=0)
  assert stems == ['a', 'b']
  for stem, original in (('a', photos / 'a.png'), ('b', photos / 'b.jpg')):
    low = images.read_image(tmp_path / 'out' / 'low' / f'{stem}.png')
    high = images.read_image(tmp_path / 'out' / 'high' / f'{stem}.png')
    np.testing.assert_array_equal(high, images.read_image(original))
    assert low.shape == high.shape and low.mean() < 0.5 * high.mean()
  synthetic.main(['--input', str(photos), '--output', str(tmp_path / 'cli'), '--seed', '0'])
  for sub in ('low', 'high'):
    for stem in stems:
      np.testing.assert_array_equal(
        images.read_image(tmp_path / 'cli' / sub / f'{stem}.png'),
        images.read_image(tmp_path / 'out' / sub / f'{stem}.png'),
      )
  synthetic.main(['--input', str(photos), '--output', str(tmp_path / 'seed1'), '--seed', '1'])
  assert not np.array_equal(
    images.read_image(tmp_path / 'seed1' / 'low' / 'a.png'),
    images.read_image(tmp_path / 'out' / 'low' / 'a.png'),
  )


def test_synthesize_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='no images'):
    synthetic.synthesize_folder(tmp_path, tmp_path / 'out')
  x = np.zeros((8, 8, 3), np.uint8)
  images.write_image(tmp_path / 'a.png', x)
  images.write_image(tmp_path / 'a.jpg', x)
  with pytest.raises(ValueError, match='a.jpg and a.png share a stem'):
    synthetic.synthesize_folder(tmp_path, tmp_path / 'out')
