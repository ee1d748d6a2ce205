"""Test setup: CPU with four fake devices, before JAX is imported anywhere."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
FIXTURES = SHARED / 'fixtures' / 'mirnet_official'
EVAL15 = SHARED / 'data' / 'lol' / 'eval15'


@pytest.fixture(scope='session')
def eval15_dir() -> pathlib.Path:
  if not EVAL15.is_dir():
    pytest.fail(f'missing {EVAL15}: the tests need ../shared beside the checkout')
  return EVAL15


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
