"""Tests for the TFDS builders `lol` and `sice` and the `mirnet_jax.data.build` command line."""

import hashlib
import io
import os
import pathlib
import random
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mirnet_jax.data import build, images
from mirnet_jax.data.lol import lol_dataset_builder
from mirnet_jax.data.sice import sice_dataset_builder

RNG_PIXELS = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
LOL_DUMMY = pathlib.Path(lol_dataset_builder.__file__).parent / 'dummy_data'
SICE_DUMMY = pathlib.Path(sice_dataset_builder.__file__).parent / 'dummy_data'


class _DataSourceChecks:
  """DatasetBuilderTestCase reads splits with `as_dataset`, which array_record does not support.

  This replaces that one step with the random-access path the project uses (`as_data_source`),
  checking the same things: example counts, no example shared between splits, and the decoded
  feature shapes and dtypes. Everything else (registration, info, download_and_prepare with the
  dummy data as manual_dir, reload, os/open not used by the builder) is the stock test.
  """

  def _assertAsDataset(self, builder):  # noqa: N802 (overrides the TFDS name)
    assert builder.info.file_format.value == 'array_record'
    seen = {}
    for split, expected in self.SPLITS.items():
      source = builder.as_data_source(split=split)
      examples = [source[i] for i in range(len(source))]
      self.assertLen(examples, expected)
      for ex in examples:
        for key in ('low', 'high'):
          assert ex[key].dtype == np.uint8 and ex[key].ndim == 3 and ex[key].shape[2] == 3
        assert ex['low'].shape == ex['high'].shape
        assert isinstance(ex['name'], bytes)
      seen[split] = {hashlib.sha256(ex['low'].tobytes()).hexdigest() for ex in examples}
    splits = list(seen)
    for i, a in enumerate(splits):
      for b in splits[i + 1 :]:
        assert not seen[a] & seen[b], f'splits {a} and {b} share examples'


class LolDummyDataTest(_DataSourceChecks, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = lol_dataset_builder.Builder
  SPLITS = {'train': 4, 'validation': 1, 'test': 2}


class SiceDummyDataTest(_DataSourceChecks, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = sice_dataset_builder.Builder
  SPLITS = {'train': 8, 'validation': 1, 'test': 1}


def _prepare(name, manual_dir, data_dir, pixels=('train', 'validation', 'test')):
  """Builds; returns {split: [examples sorted by name]}, only names outside `pixels` splits."""
  return _read(build.build(name, os.fspath(manual_dir), os.fspath(data_dir)), pixels)


def _read(builder, pixels):
  """{split: [examples sorted by name]} of a prepared builder; only names outside `pixels`."""
  skip = tfds.decode.SkipDecoding()
  out = {}
  for split in builder.info.splits:
    if split in pixels:
      source = builder.as_data_source(split=split)
      examples = [source[i] for i in range(len(source))]
    else:  # Names only: keeps 500 decoded LOL pairs (720 MB) out of memory.
      source = builder.as_data_source(split=split, decoders={'low': skip, 'high': skip})
      examples = [{'name': source[i]['name']} for i in range(len(source))]
    out[split] = sorted(examples, key=lambda ex: ex['name'])
  return out


@pytest.fixture(scope='module')
def lol_485(lol_data_dir):
  """conftest's full-size LoL (eval15, and our485 as 485 renamed links), built once a session."""
  return _read(lol_dataset_builder.Builder(data_dir=os.fspath(lol_data_dir)), pixels=('test',))


def test_lol_full_size_splits_and_pixels(lol_485, eval15_dir):
  data = lol_485
  assert {k: len(v) for k, v in data.items()} == {'train': 385, 'validation': 100, 'test': 15}
  test_names = [ex['name'].decode() for ex in data['test']]
  assert sorted(test_names) == sorted(p.name for p in (eval15_dir / 'low').iterdir())
  for ex in data['test']:
    name = ex['name'].decode()
    for part in ('low', 'high'):
      with Image.open(eval15_dir / part / name) as img:
        np.testing.assert_array_equal(ex[part], np.asarray(img.convert('RGB')))
  validation = {ex['name'].decode() for ex in data['validation']}
  train = {ex['name'].decode() for ex in data['train']}
  assert not validation & train and len(validation | train) == 485
  assert validation == lol_dataset_builder.validation_names(sorted(validation | train))


def test_lol_validation_independent_of_file_order(lol_485, lol_manual_dir, tmp_path):
  """Same names, other bytes (tiny images), files created and zipped in a shuffled order."""
  manual, data = lol_manual_dir, lol_485
  entries = [f'{part}/{side}/{p.name}' for part in ('our485', 'eval15') for side in ('low', 'high')
             for p in (manual / part / side).iterdir()]  # fmt: skip
  random.Random(7).shuffle(entries)
  assert entries != sorted(entries)
  pixels = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
  (tmp_path / 'manual').mkdir()
  with zipfile.ZipFile(tmp_path / 'manual' / 'LOLdataset.zip', 'w') as zf:
    for entry in entries:  # The archive lists files in exactly this order.
      zf.writestr(f'LOLdataset/{entry}', images.encode_image(pixels))
  again = _prepare('lol', tmp_path / 'manual', tmp_path / 'data', pixels=())
  for split in ('train', 'validation', 'test'):
    assert [ex['name'] for ex in again[split]] == [ex['name'] for ex in data[split]], split


def _tiny_lol(root: pathlib.Path) -> pathlib.Path:
  shutil.copytree(LOL_DUMMY, root)
  return root


def test_lol_reports_every_problem_at_once(tmp_path, capsys):
  manual = _tiny_lol(tmp_path / 'manual')
  (manual / 'our485' / 'high' / '5.png').unlink()
  images.write_image(manual / 'our485' / 'low' / '10.png', np.zeros((7, 9, 3), np.uint8))
  data = (manual / 'eval15' / 'low' / '1.png').read_bytes()
  (manual / 'eval15' / 'low' / '1.png').write_bytes(data[: len(data) - 30])
  with pytest.raises(ValueError) as error:
    build.build('lol', os.fspath(manual), os.fspath(tmp_path / 'data'))
  message = str(error.value)
  assert '3 problem(s)' in message
  assert 'our485/high/5.png: missing' in message
  assert 'our485/low/10.png: size 9x7 != high 8x6' in message
  assert 'eval15/low/1.png: cannot decode image' in message
  assert not list((tmp_path / 'data').glob('lol/1.0.0/*.array_record*'))
  # The command line prints the same message, no traceback, and fails.
  assert build.main(['lol', f'--manual_dir={manual}', f'--data_dir={tmp_path / "data"}']) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: lol: 3 problem(s)') and 'Traceback' not in err
  assert 'our485/high/5.png: missing' in err


def test_lol_layouts_and_conversion(tmp_path):
  """LOLdataset/ subfolder; a palette and a grayscale file are converted, and stored as PNG."""
  manual = tmp_path / 'manual'
  root = _tiny_lol(manual / 'LOLdataset')
  high = root / 'eval15' / 'high' / '22.png'
  rgb = images.read_image(high)
  Image.fromarray(rgb).convert('P').save(high)  # Quantised: compare with what read_image gives.
  expected_high = images.read_image(high)
  low = root / 'eval15' / 'low' / '22.png'
  Image.fromarray(images.read_image(low)[..., 0]).save(low)
  expected_low = images.read_image(low)
  data = _prepare('lol', manual, tmp_path / 'data')
  ex = next(ex for ex in data['test'] if ex['name'] == b'22.png')
  np.testing.assert_array_equal(ex['high'], expected_high)
  np.testing.assert_array_equal(ex['low'], expected_low)


def test_cli_errors(tmp_path, capsys):
  assert build.main(['lol', f'--manual_dir={tmp_path / "nope"}']) == 1
  assert 'not a directory' in capsys.readouterr().err
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'x.txt').write_text('')
  assert build.main(['sice', f'--manual_dir={tmp_path / "empty"}']) == 1
  err = capsys.readouterr().err
  assert 'no dataset found' in err and 'Traceback' not in err


def test_cli_builds(tmp_path, capsys):
  assert build.main(['sice', f'--manual_dir={SICE_DUMMY}', f'--data_dir={tmp_path}']) == 0
  assert f'sice: built in {tmp_path}/sice/1.0.0 (' in capsys.readouterr().out


def test_cli_expands_tilde_and_prints_absolute_paths(tmp_path, capsys, monkeypatch):
  """The README's `--data_dir=~/tensorflow_datasets`: the shell leaves that '~' alone.

  It once built into a folder literally named '~' in the current directory.
  """
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  shutil.copytree(SICE_DUMMY, home / 'downloads' / 'sice')
  cwd.mkdir()
  monkeypatch.setenv('HOME', os.fspath(home))
  monkeypatch.chdir(cwd)
  assert build.main(['sice', '--manual_dir=~/downloads/sice', '--data_dir=~/tfds']) == 0
  assert f'sice: built in {home}/tfds/sice/1.0.0 (' in capsys.readouterr().out
  assert list(cwd.iterdir()) == []
  # A relative data_dir is printed (and usable from anywhere) as an absolute path.
  (cwd / 'manual').symlink_to(home / 'downloads' / 'sice')
  assert build.main(['sice', '--manual_dir=manual', '--data_dir=rel']) == 0
  assert f'sice: built in {cwd}/rel/sice/1.0.0 (' in capsys.readouterr().out
  assert build.resolve('gs://bucket/tfds') == build.epath.Path('gs://bucket/tfds')


def test_sice_pairs_darkest_exposure_with_label(tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(SICE_DUMMY / 'Dataset_Part1', manual)  # Layout without the wrapping folder.
  data = _prepare('sice', manual, tmp_path / 'data')
  splits = sice_dataset_builder.split_ids([str(i) for i in range(1, 11)])
  for split, examples in data.items():
    assert sorted(ex['name'].decode() for ex in examples) == sorted(
      f'{i}.JPG' for i in splits[split]
    )
    for ex in examples:
      seq = ex['name'].decode().split('.')[0]
      np.testing.assert_array_equal(ex['low'], images.read_image(manual / seq / '1.JPG'))
      np.testing.assert_array_equal(ex['high'], images.read_image(manual / 'Label' / f'{seq}.JPG'))


def test_sice_problems_and_skipped_mismatch(tmp_path, caplog):
  manual = tmp_path / 'manual'
  shutil.copytree(SICE_DUMMY, manual)
  root = manual / 'Dataset_Part1'
  images.write_image(root / '4' / '1.JPG', np.zeros((3, 3, 3), np.uint8))  # Size mismatch.
  data = _prepare('sice', manual, tmp_path / 'data')
  assert sum(len(v) for v in data.values()) == 9
  assert '4/1.JPG: size 3x3 != high 8x6' in caplog.text
  (root / 'Label' / '2.JPG').unlink()
  (root / '3' / '1.JPG').write_bytes(b'garbage')
  images.write_image(root / 'Label' / '77.jpg', np.zeros((6, 8, 3), np.uint8))
  with pytest.raises(ValueError) as error:
    build.build('sice', os.fspath(manual), os.fspath(tmp_path / 'data2'))
  message = str(error.value)
  assert 'Label/2.JPG: missing' in message and 'Label/77.jpg: no sequence folder 77/' in message
  # Decoding problems are found after the layout ones are fixed; both are listed per file.
  shutil.rmtree(root / '2')
  (root / 'Label' / '77.jpg').unlink()
  with pytest.raises(ValueError, match=r'3/1.JPG: not an image'):
    build.build('sice', os.fspath(manual), os.fspath(tmp_path / 'data3'))


def test_split_rules_are_name_only():
  names = [f'{i}.png' for i in range(1, 486)]
  chosen = lol_dataset_builder.validation_names(names)
  assert len(chosen) == 100
  assert chosen == lol_dataset_builder.validation_names(list(reversed(names)))
  digest = {n: hashlib.sha256(n.encode()).hexdigest() for n in names}
  assert max(digest[n] for n in chosen) < min(digest[n] for n in set(names) - chosen)
  sice = sice_dataset_builder.split_ids([str(i) for i in range(1, 361)])
  assert {k: len(v) for k, v in sice.items()} == {'test': 36, 'validation': 36, 'train': 288}


def test_stored_bytes_pass_through(tmp_path):
  path = tmp_path / 'a.jpg'
  images.write_image(path, RNG_PIXELS)
  info = images.image_info(path)
  assert build.stored_bytes(path, info, ('JPEG', 'PNG')) == path.read_bytes()
  converted = build.stored_bytes(path, info, ('PNG',))  # Not kept: decoded, stored as PNG.
  assert Image.open(io.BytesIO(converted)).format == 'PNG'
  np.testing.assert_array_equal(images.decode_image(converted), images.read_image(path))


_WITHOUT_TENSORFLOW = """
import sys


class _Hide:
  # Wraps every import finder so that tensorflow looks uninstalled.
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return None
    return self.finder.find_spec(name, path, target)

  def __getattr__(self, attr):
    return getattr(self.finder, attr)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
from mirnet_jax.data import build

assert build.main(['lol', '--manual_dir=' + sys.argv[1], '--data_dir=' + sys.argv[2]]) == 0
import tensorflow_datasets as tfds

source = tfds.data_source('lol', split='test', data_dir=sys.argv[2])
assert source[0]['low'].shape == (6, 8, 3)
assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow']
print('ok', len(source))
"""


def test_build_and_read_without_tensorflow(tmp_path):
  result = subprocess.run(
    [sys.executable, '-c', _WITHOUT_TENSORFLOW, os.fspath(LOL_DUMMY), os.fspath(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=pathlib.Path(__file__).parents[1],
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok 2')
