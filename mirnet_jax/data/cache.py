"""`config.data.cache`: every record of a split decoded once and kept in host memory.

Decoding a 600x400 PNG pair costs far more than cutting a training crop out of it, so a source
that decodes on every access (a folder of files, TFDS array_record) caps the training pipeline
at about a hundred crops per second on a few cores. `CachedSource` decodes each record once,
when it is created, and then serves the same records (numpy arrays, read-only, so no transform
can change the cache) from memory. The training pipeline reads it in-process with threads:
grain's worker processes exist to decode in parallel, and would each need their own copy of the
records.

Before decoding, the cache estimates its size from the first record (records of one dataset
mostly share a size) and refuses, naming the key, when that would exceed
`MEMORY_FRACTION` of the memory available now; it checks the real total again as it goes, for
datasets of mixed sizes.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any

import numpy as np
from absl import logging

MEMORY_FRACTION = 0.8  # share of the memory available at start that a cache may take
_DECODE_THREADS = 4  # decoding (PIL, TFDS) releases the GIL


class CacheTooLargeError(ValueError):
  """The decoded records would not fit in the memory available."""


def available_memory_bytes() -> int:
  """Memory this process can still take: MemAvailable, or the cgroup's limit if lower."""
  available = 0
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if not available:
    try:
      available = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
    except (ValueError, OSError, AttributeError):
      return 0
  try:  # a container's limit (cgroup v2), which MemAvailable does not show
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      used = int(f.read().strip())
    if limit != 'max':
      available = min(available, int(limit) - used)
  except (OSError, ValueError):
    pass
  return max(available, 0)


def _nbytes(record: dict[str, Any]) -> int:
  return sum(v.nbytes for v in record.values() if isinstance(v, np.ndarray))


def _frozen(record: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in record.items():
    if isinstance(value, np.ndarray):
      value = np.ascontiguousarray(value)
      value.setflags(write=False)
    out[key] = value
  return out


def _size(n: float) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def _describe(source: Any) -> str:
  text = repr(source)  # the sources of this package say what they read, briefly
  return text if len(text) <= 120 else type(source).__name__


class CachedSource:
  """All records of a source, decoded once, served from memory (same records, same order).

  Args:
    source: a random-access source (`sources.Source`).
    what: the split, for messages ('train', 'validation', ...).
    available_bytes: memory available (default: `available_memory_bytes()`); a test hook.

  Raises:
    CacheTooLargeError: the records would take more than `MEMORY_FRACTION` of the available
      memory; the message names `config.data.cache` and both sizes.
  """

  in_memory = True  # read by the pipeline: batches are made in-process, no worker processes
  nbytes = 0  # bytes of the decoded arrays

  def __init__(self, source: Any, *, what: str = '', available_bytes: int | None = None):
    start = time.perf_counter()
    count = len(source)
    self._repr = f'CachedSource({_describe(source)})'
    if available_bytes is None:
      available_bytes = available_memory_bytes()
    budget = MEMORY_FRACTION * available_bytes
    label = f'{count} records of {_describe(source)}'
    label = f'{what} split ({label})' if what else label
    self._records: list[dict[str, Any]] = []
    if not count:
      return
    first = _frozen(source[0])
    estimate = _nbytes(first) * count

    def refuse(needed: float, how: str) -> CacheTooLargeError:
      return CacheTooLargeError(
        f'config.data.cache=True: the {label} needs {how} {_size(needed)} decoded, more than '
        f'{MEMORY_FRACTION:.0%} of the {_size(available_bytes)} of memory available; set '
        'config.data.cache=False (records are then decoded on every read) or free memory'
      )

    if estimate > budget:
      raise refuse(estimate, 'about')
    total = _nbytes(first)
    self._records.append(first)
    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
      for record in pool.map(source.__getitem__, range(1, count)):
        total += _nbytes(record)
        if total > budget:
          pool.shutdown(cancel_futures=True)
          raise refuse(total, 'at least')
        self._records.append(_frozen(record))
    self.nbytes = total
    logging.info(
      'config.data.cache: %s decoded into %s of memory in %.1f s',
      label, _size(total), time.perf_counter() - start,
    )  # fmt: skip

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[int(index)]

  @property
  def names(self) -> list[str]:
    """Record names in source order."""
    return [str(r.get('name', '')) for r in self._records]

  def __getstate__(self) -> None:
    # Pickling would copy every decoded record into the other process; the pipeline reads a
    # cache in-process instead.
    raise TypeError(f'{self!r} stays in its process (config.data.cache): do not pickle it')

  def __repr__(self) -> str:
    return self._repr
