"""Test setup: CPU with four fake devices, before JAX is imported anywhere."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pathlib  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
FIXTURES = SHARED / 'fixtures' / 'mirnet_official'
EVAL15 = SHARED / 'data' / 'lol' / 'eval15'
LOL_OUR485 = 485  # pairs in LoL's our485 folder (train + validation splits)


@pytest.fixture(scope='session')
def eval15_dir() -> pathlib.Path:
  if not EVAL15.is_dir():
    pytest.fail(f'missing {EVAL15}: the tests need ../shared beside the checkout')
  return EVAL15


@pytest.fixture(scope='session')
def lol_manual_dir(eval15_dir, tmp_path_factory) -> pathlib.Path:
  """A full-size LoL manual download, read-only: eval15 itself, our485 as renamed links.

  eval15 links to the shared eval15 folder; our485/{low,high}/<1000 + i>.png (i < 485) link to
  the eval15 pair i % 15 (names in sorted order). Tests that need another layout make their own.
  """
  manual = tmp_path_factory.mktemp('lol_manual')
  (manual / 'eval15').symlink_to(eval15_dir)
  names = sorted(p.name for p in (eval15_dir / 'low').iterdir())
  for part in ('low', 'high'):
    folder = manual / 'our485' / part
    folder.mkdir(parents=True)
    for i in range(LOL_OUR485):
      (folder / f'{1000 + i}.png').symlink_to(eval15_dir / part / names[i % len(names)])
  return manual


@pytest.fixture(scope='session')
def lol_data_dir(lol_manual_dir, tmp_path_factory) -> Iterator[pathlib.Path]:
  """A TFDS data_dir holding 'lol' built once per session from `lol_manual_dir`.

  Splits: train 385, validation 100, test 15 (the eval15 pairs, byte for byte). Read-only;
  removed at the end of the session (350 MB of array_record files).
  """
  from mirnet_jax.data import build

  data_dir = tmp_path_factory.mktemp('lol_data')
  build.build('lol', os.fspath(lol_manual_dir), os.fspath(data_dir))
  yield data_dir
  shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f'missing {FIXTURES}: the tests need ../shared beside the checkout')
  return FIXTURES


@pytest.fixture(scope='session')
def eval15_pairs(eval15_dir):
  """The 15 eval15 pairs as uint8 [15, 400, 600, 3] arrays (low, high), in name order."""
  import numpy as np
  from PIL import Image

  names = sorted(p.name for p in (eval15_dir / 'low').glob('*.png'))
  assert len(names) == 15

  def read(split):
    return np.stack([np.asarray(Image.open(eval15_dir / split / n).convert('RGB')) for n in names])

  return read('low'), read('high')
