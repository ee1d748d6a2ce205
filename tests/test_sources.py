"""Tests of the data sources (mirnet_jax/data/sources.py)."""

import pathlib
import random

import ml_collections
import numpy as np
import pytest

from mirnet_jax.data import cache, images, sources

LOL_DUMMY = pathlib.Path(__file__).resolve().parents[1] / 'mirnet_jax/data/lol/dummy_data'


def _data_config(**overrides):
  config = ml_collections.ConfigDict(
    {
      'name': 'folder',
      'data_dir': '',
      'folder': '',
      'validation_folder': '',
      'validation_percent': 20.0,
      'synthetic_pairs': 6,
      'synthetic_eval_pairs': 3,
      'synthetic_size': 32,
      'synthetic_seed': 0,
      'cache': False,
    }
  )
  config.update(overrides)
  return config


def _pair_folder(root: pathlib.Path, names, size=(6, 8)) -> pathlib.Path:
  for sub in ('low', 'high'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    low = np.full((*size, 3), i, np.uint8)
    images.write_image(root / 'low' / name, low)
    images.write_image(root / 'high' / name, 255 - low)
  return root


def test_folder_split_is_deterministic_disjoint_and_complete(tmp_path):
  names = [f'{i}.png' for i in range(20)]
  folder = _pair_folder(tmp_path / 'pairs', names)
  config = _data_config(folder=str(folder), validation_percent=20.0)
  train = sources.create_source(config, 'train')
  validation = sources.create_source(config, 'validation')
  assert len(validation) == 4 and len(train) == 16
  assert set(train.names).isdisjoint(validation.names)
  assert set(train.names) | set(validation.names) == set(names)
  assert sources.create_source(config, 'validation').names == validation.names
  assert sources.create_source(config, 'test').names == validation.names
  # Natural order: '2.png' before '10.png'.
  keys = [int(n.split('.')[0]) for n in train.names]
  assert keys == sorted(keys)
  record = validation[0]
  assert record['low'].shape == record['high'].shape == (6, 8, 3)
  assert record['low'].dtype == np.uint8 and isinstance(record['name'], str)
  np.testing.assert_array_equal(record['high'], 255 - record['low'])


def test_split_by_percent_depends_only_on_names():
  names = [f'img_{i:03d}.jpg' for i in range(50)]
  train, held_out = sources.split_by_percent(names, 10.0)
  assert len(held_out) == 5 and sorted(train + held_out) == list(range(50))
  shuffled = names[:]
  random.Random(0).shuffle(shuffled)
  _, held_out2 = sources.split_by_percent(shuffled, 10.0)
  assert {names[i] for i in held_out} == {shuffled[i] for i in held_out2}
  assert len(sources.split_by_percent(names[:3], 1.0)[1]) == 1  # a positive percent holds out one
  with pytest.raises(ValueError, match='leaves no train pair'):
    sources.split_by_percent(names[:1], 50.0)
  with pytest.raises(ValueError, match='not in'):
    sources.split_by_percent(names, 100.0)


def test_validation_folder(tmp_path):
  folder = _pair_folder(tmp_path / 'train', ['a.png', 'b.png'])
  val = _pair_folder(tmp_path / 'val', ['c.png'])
  config = _data_config(folder=str(folder), validation_folder=str(val))
  assert sources.create_source(config, 'train').names == ['a.png', 'b.png']
  assert sources.create_source(config, 'validation').names == ['c.png']
  assert sources.create_source(config, 'test').names == ['c.png']
  no_val = _data_config(folder=str(folder), validation_percent=0.0)
  assert len(sources.create_source(no_val, 'train')) == 2
  with pytest.raises(ValueError, match='validation_percent is 0'):
    sources.create_source(no_val, 'validation')


def test_folder_mismatch_names_the_files(tmp_path):
  folder = _pair_folder(tmp_path / 'pairs', ['1.png', '2.png'])
  images.write_image(folder / 'low' / 'extra.png', np.zeros((4, 4, 3), np.uint8))
  images.write_image(folder / 'high' / 'lonely.jpg', np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match='unmatched') as e:
    sources.create_source(_data_config(folder=str(folder)), 'train')
  assert 'low/extra.png has no match in high/' in str(e.value)
  assert 'high/lonely.jpg has no match in low/' in str(e.value)


def test_folder_pairs_match_by_stem_and_sizes_are_checked(tmp_path):
  folder = _pair_folder(tmp_path / 'pairs', ['1.png'])
  images.write_image(folder / 'low' / '2.jpg', np.zeros((6, 8, 3), np.uint8))
  images.write_image(folder / 'high' / '2.png', np.zeros((6, 9, 3), np.uint8))
  source = sources.create_folder_source(str(folder), 'train', validation_percent=0.0)
  assert source.names == ['1.png', '2.jpg']
  with pytest.raises(ValueError, match=r'2\.jpg is 8x6 but .*2\.png is 9x6'):
    source[1]


def test_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(ValueError, match='config.data.folder is empty'):
    sources.create_source(_data_config(), 'train')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    sources.create_source(_data_config(folder=str(tmp_path / 'nowhere')), 'train')
  (tmp_path / 'only_low' / 'low').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='only_low/high'):
    sources.create_source(_data_config(folder=str(tmp_path / 'only_low')), 'train')
  (tmp_path / 'only_low' / 'high').mkdir()
  with pytest.raises(ValueError, match='only_low/low: no images'):
    sources.create_source(_data_config(folder=str(tmp_path / 'only_low')), 'train')
  with pytest.raises(ValueError, match='unknown split'):
    sources.create_source(_data_config(), 'dev')
  with pytest.raises(ValueError, match="name='imagenet' unknown"):
    sources.create_source(_data_config(name='imagenet'), 'train')


def test_real_pairs_folder(eval15_dir):
  source = sources.create_folder_source(str(eval15_dir), 'validation', validation_percent=20.0)
  assert len(source) == 3
  record = source[0]
  assert record['low'].shape == record['high'].shape == (400, 600, 3)
  assert record['low'].mean() < record['high'].mean()


def test_cache_holds_the_same_records_read_only(tmp_path):
  folder = _pair_folder(tmp_path / 'pairs', [f'{i}.png' for i in range(5)], size=(6, 8))
  plain = sources.create_source(_data_config(folder=str(folder), validation_percent=0), 'train')
  cached = sources.create_source(
    _data_config(folder=str(folder), validation_percent=0, cache=True), 'train'
  )
  assert isinstance(cached, cache.CachedSource) and len(cached) == len(plain) == 5
  assert cached.names == plain.names and cached.nbytes == 5 * 2 * 6 * 8 * 3
  for i in range(5):
    for key in ('low', 'high'):
      np.testing.assert_array_equal(cached[i][key], plain[i][key])
      assert not cached[i][key].flags.writeable  # no transform can change the cache
    assert cached[i]['name'] == plain[i]['name']
  # Decoded once: the files are no longer read.
  for path in (folder / 'low').iterdir():
    path.unlink()
  np.testing.assert_array_equal(cached[4]['low'], np.full((6, 8, 3), 4, np.uint8))


def test_cache_refuses_what_would_not_fit_naming_the_key():
  uniform = [{'low': np.zeros((10, 10, 3), np.uint8), 'name': str(i)} for i in range(10)]
  with pytest.raises(cache.CacheTooLargeError, match=r'config\.data\.cache=True.*about'):
    cache.CachedSource(uniform, what='train', available_bytes=2000)  # 3000 B needed > 1600
  assert len(cache.CachedSource(uniform, available_bytes=4000)) == 10
  # A later, larger record is caught as it is decoded.
  mixed = uniform[:2] + [{'low': np.zeros((40, 40, 3), np.uint8), 'name': 'big'}]
  with pytest.raises(cache.CacheTooLargeError, match='at least'):
    cache.CachedSource(mixed, available_bytes=4000)
  assert cache.available_memory_bytes() > 2**20


def test_synthetic_kind():
  config = _data_config(name='synthetic')
  train = sources.create_source(config, 'train')
  validation = sources.create_source(config, 'validation')
  assert len(train) == 6 and len(validation) == 3
  assert train[0]['low'].shape == (32, 32, 3)
  assert train[0]['name'] != validation[0]['name']


def test_natural_key():
  names = ['10.png', '2.png', '1.png', 'b.png', 'a10.png', 'a9.png', '01.png']
  assert sorted(names, key=sources.natural_key) == [
    '01.png',
    '1.png',
    '2.png',
    '10.png',
    'a9.png',
    'a10.png',
    'b.png',
  ]


def test_tfds_lol_sorted_by_name(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from mirnet_jax.data import lol

  builder = lol.Builder(data_dir=str(tmp_path))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(LOL_DUMMY))
  )
  config = _data_config(name='lol', data_dir=str(tmp_path))
  seen = []
  for split in sources.SPLITS:
    source = sources.create_source(config, split)
    names = [source[i]['name'] for i in range(len(source))]
    assert names == sorted(names, key=sources.natural_key) == source.names
    assert all(isinstance(n, str) for n in names)
    record = source[0]
    assert record['low'].dtype == np.uint8 and record['low'].shape == record['high'].shape
    seen += names
  assert len(seen) == len(set(seen)) > 0
  with pytest.raises(FileNotFoundError, match='not prepared'):
    sources.create_source(_data_config(name='lol', data_dir=str(tmp_path / 'none')), 'train')
