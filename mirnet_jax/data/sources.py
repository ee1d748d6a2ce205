"""Random-access sources of image pairs: TFDS (lol, sice), a folder of pairs, synthetic pairs.

A source is a sequence (grain's `RandomAccessDataSource` protocol: `__len__`, `__getitem__`)
of records `{'low': uint8[H, W, 3], 'high': uint8[H, W, 3], 'name': str}`, in a deterministic
order (natural sort of `name`), so evaluation visits images in the same order on every run.

Kinds, by `config.data.name`:

* 'lol', 'sice': the TFDS builders of this package, read from `config.data.data_dir` as
  array_record (never downloaded or built here). Array_record keeps records in hash order;
  the source re-sorts them by name.
* 'folder': `config.data.folder` holds low/ and high/, pairs matched by file stem (so
  low/x.jpg pairs with high/x.png); `name` is the low file's name. Validation (and 'test') is
  `config.data.validation_folder` when set; otherwise `config.data.validation_percent` % of the
  pairs, chosen by the SHA-256 of their names: the held-out set depends only on the names, and
  adding files moves few pairs between splits. A folder has no separate test split: 'test'
  gives the validation pairs.
* 'synthetic': `mirnet_jax.data.synthetic`; train, validation and test come from disjoint
  photographs and random streams.

With `config.data.cache`, any kind is decoded once into memory (`cache.CachedSource`).

Prediction's inputs (a file, a folder or a glob of low-light images only) are listed by
`input_files`.

tensorflow_datasets is imported only for the TFDS kinds (its import takes seconds).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mirnet_jax.data import cache, images, synthetic

SPLITS = ('train', 'validation', 'test')
TFDS_NAMES = ('lol', 'sice')
Record = dict[str, Any]


class Source(Protocol):
  """A random-access sequence of records (grain's `RandomAccessDataSource`)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Record: ...


_DIGIT_RUNS = re.compile(r'(\d+)')


def natural_key(name: str) -> tuple:
  """Sort key ordering '2.png' before '10.png' (digit runs compare as numbers)."""
  parts = [p for p in _DIGIT_RUNS.split(name) if p]
  # Tagged tuples: a number and a string never get compared with each other; the name itself
  # breaks ties such as '01' vs '1'.
  return tuple((0, int(p), '') if p.isdigit() else (1, 0, p) for p in parts), name


class TfdsSource:
  """A split of a TFDS builder of this package (array_record), sorted by name."""

  def __init__(self, name: str, split: str, data_dir: str = ''):
    """Opens a prepared TFDS dataset; never downloads or builds it.

    Args:
      name: 'lol' or 'sice'.
      split: 'train', 'validation' or 'test'.
      data_dir: TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets).

    Raises:
      FileNotFoundError: the dataset is not prepared in `data_dir`.
      ValueError: unknown name or split.
    """
    import tensorflow_datasets as tfds  # Lazy: slow import, needed only for these kinds.

    if name not in TFDS_NAMES:
      raise ValueError(f'config.data.name={name!r} is not a TFDS dataset; known: {TFDS_NAMES}')
    importlib.import_module(f'mirnet_jax.data.{name}')  # Registers the builder.
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir} '
        f'(config.data.data_dir={data_dir!r}); build it first with '
        f'`python -m mirnet_jax.data.build {name} ...`'
      )
    if split not in builder.info.splits:
      raise ValueError(f'{name}: no split {split!r}; it has {sorted(builder.info.splits)}')
    self._name = name
    self._split = split
    self._source = builder.as_data_source(split=split)
    # Skipping image decoding makes reading every name cheap (bytes only).
    skip = tfds.decode.SkipDecoding()
    names_source = builder.as_data_source(split=split, decoders={'low': skip, 'high': skip})
    names = [_to_str(names_source[i]['name']) for i in range(len(names_source))]
    self._order = sorted(range(len(names)), key=lambda i: natural_key(names[i]))
    self._names = [names[i] for i in self._order]

  def __len__(self) -> int:
    return len(self._order)

  def __getitem__(self, index: int) -> Record:
    example = self._source[self._order[int(index)]]
    return {
      'low': np.asarray(example['low'], np.uint8),
      'high': np.asarray(example['high'], np.uint8),
      'name': _to_str(example['name']),
    }

  @property
  def names(self) -> list[str]:
    """Record names in source order."""
    return list(self._names)

  def __repr__(self) -> str:
    return f'TfdsSource({self._name!r}, split={self._split!r}, records={len(self)})'


def _to_str(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class FolderSource:
  """Pairs of image files, read on demand with `images.read_image`."""

  def __init__(self, pairs: Sequence[tuple[pathlib.Path, pathlib.Path]]):
    """Initialises the source.

    Args:
      pairs: (low path, high path) per record; the record name is the low file's name.
    """
    self._pairs = [(pathlib.Path(lo), pathlib.Path(hi)) for lo, hi in pairs]

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> Record:
    low_path, high_path = self._pairs[int(index)]
    low = images.read_image(low_path)
    high = images.read_image(high_path)
    if low.shape != high.shape:
      raise ValueError(
        f'{low_path} is {low.shape[1]}x{low.shape[0]} but {high_path} is '
        f'{high.shape[1]}x{high.shape[0]} (width x height); a pair must match'
      )
    return {'low': low, 'high': high, 'name': low_path.name}

  @property
  def names(self) -> list[str]:
    """Record names in source order."""
    return [lo.name for lo, _ in self._pairs]

  def __repr__(self) -> str:
    return f'FolderSource(records={len(self)})'


def _by_stem(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  files: dict[str, pathlib.Path] = {}
  for path in images.list_images(directory):
    if path.stem in files:
      raise ValueError(f'{directory}: {files[path.stem].name} and {path.name} share a stem')
    files[path.stem] = path
  return files


def match_pairs(folder: str | os.PathLike[str]) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Matches `folder/low/*` with `folder/high/*` by file stem, sorted by name.

  Args:
    folder: a directory holding low/ and high/.

  Returns:
    (low path, high path) pairs in natural order of the low file names.

  Raises:
    FileNotFoundError: `folder`, low/ or high/ is missing.
    ValueError: low/ is empty, or some files have no partner (named in the message).
  """
  folder = pathlib.Path(folder)
  for sub in (folder, folder / 'low', folder / 'high'):
    if not sub.is_dir():
      raise FileNotFoundError(f'{sub}: no such directory (a pair folder holds low/ and high/)')
  low, high = _by_stem(folder / 'low'), _by_stem(folder / 'high')
  if not low:
    raise ValueError(f'{folder / "low"}: no images (suffixes {images.IMAGE_SUFFIXES})')
  problems = [f'{folder / "low" / low[s].name} has no match in high/' for s in low.keys() - high]
  problems += [f'{folder / "high" / high[s].name} has no match in low/' for s in high.keys() - low]
  if problems:
    shown = '; '.join(sorted(problems)[:10])
    more = f' (and {len(problems) - 10} more)' if len(problems) > 10 else ''
    raise ValueError(f'{folder}: unmatched low/high files (matched by stem): {shown}{more}')
  pairs = [(low[s], high[s]) for s in low]
  return sorted(pairs, key=lambda pair: natural_key(pair[0].name))


def _name_hash(name: str) -> bytes:
  return hashlib.sha256(name.encode('utf-8')).digest()


def split_by_percent(
  names: Sequence[str], validation_percent: float
) -> tuple[list[int], list[int]]:
  """Splits records into train and validation by the SHA-256 of their names.

  The `round(n * percent / 100)` names with the smallest hashes (at least one when the percent
  is positive) are held out. The split depends only on the names, not on their order.

  Args:
    names: record names (unique).
    validation_percent: percent of records held out, in [0, 100).

  Returns:
    (train indices, validation indices), each ascending.

  Raises:
    ValueError: the percent is out of range or leaves no training record.
  """
  if not 0 <= validation_percent < 100:
    raise ValueError(f'config.data.validation_percent={validation_percent} not in [0, 100)')
  n = len(names)
  k = round(n * validation_percent / 100)
  if validation_percent > 0:
    k = max(k, 1)
  if k >= n:
    raise ValueError(
      f'config.data.validation_percent={validation_percent} of {n} pairs leaves no train pair'
    )
  ranked = sorted(range(n), key=lambda i: _name_hash(names[i]))
  held_out = set(ranked[:k])
  train = [i for i in range(n) if i not in held_out]
  return train, sorted(held_out)


def create_folder_source(
  folder: str, split: str, *, validation_folder: str = '', validation_percent: float = 10.0
) -> FolderSource:
  """A split of a folder of pairs (see the module docstring for the split rule).

  Args:
    folder: directory holding low/ and high/.
    split: 'train', 'validation' or 'test' ('test' = 'validation').
    validation_folder: separate validation directory ('' = hold out a percentage).
    validation_percent: percent of `folder` held out when `validation_folder` is ''.

  Returns:
    A `FolderSource`.
  """
  if not folder:
    raise ValueError("config.data.folder is empty: name='folder' needs a directory")
  if split != 'train' and validation_folder:
    return FolderSource(match_pairs(validation_folder))
  pairs = match_pairs(folder)
  if split == 'train' and validation_folder:
    return FolderSource(pairs)
  if split != 'train' and validation_percent == 0:
    raise ValueError(
      f'{folder}: no {split} pairs: config.data.validation_folder is empty and '
      'config.data.validation_percent is 0'
    )
  train, held_out = split_by_percent([lo.name for lo, _ in pairs], validation_percent)
  return FolderSource([pairs[i] for i in (train if split == 'train' else held_out)])


def create_source(data_config: Any, split: str) -> Source:
  """The source of one split, chosen by `data_config.name`.

  Args:
    data_config: `config.data` (keys: name, data_dir, folder, validation_folder,
      validation_percent, synthetic_pairs, synthetic_eval_pairs, synthetic_size,
      synthetic_seed, cache).
    split: 'train', 'validation' or 'test'.

  Returns:
    A random-access source of `{'low', 'high', 'name'}` records in deterministic order; with
    `cache`, a `cache.CachedSource` holding them all decoded in memory.

  Raises:
    cache.CacheTooLargeError: `cache` is set and the split would not fit in memory.
  """
  source = _create_uncached_source(data_config, split)
  if data_config.cache:
    return cache.CachedSource(source, what=split)
  return source


def _create_uncached_source(data_config: Any, split: str) -> Source:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {SPLITS}')
  name = data_config.name
  if name in TFDS_NAMES:
    return TfdsSource(name, split, data_config.data_dir)
  if name == 'folder':
    return create_folder_source(
      data_config.folder,
      split,
      validation_folder=data_config.validation_folder,
      validation_percent=data_config.validation_percent,
    )
  if name == 'synthetic':
    pairs = data_config.synthetic_pairs if split == 'train' else data_config.synthetic_eval_pairs
    return synthetic.create_synthetic_source(
      split, num_pairs=pairs, size=data_config.synthetic_size, seed=data_config.synthetic_seed
    )
  raise ValueError(
    f'config.data.name={name!r} unknown; known: {TFDS_NAMES + ("folder", "synthetic")}'
  )
