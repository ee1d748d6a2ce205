"""Grain input pipelines: random training crops, full-resolution evaluation batches.

Batch schema (numpy, host-local: each process holds its `B = global_batch_size //
process_count` rows of every global batch):

  'low':  float32 [B, H, W, 3] in [0, 1]   low-light input
  'high': float32 [B, H, W, 3] in [0, 1]   well-exposed target
  'mask': bool [B]                         False for padding rows (always True in training)
  'name': str [B] (evaluation only)        record names; '' for padding rows

Training (`create_train_iterator`): the records are shuffled, reshuffled every epoch (each
epoch is a permutation seeded by (seed, epoch)) and repeated without end, epochs back to back
(a batch may straddle two epochs; nothing is dropped). Each record gives one `crop_size` square
window, the same for low and high, then one of the 8 dihedral transforms (4 rotations x
optional flip), the same for both. Images smaller than the crop are reflect-padded at the
bottom/right first, as the official MIRNet loader does. Optional MixUp (the official MIRNet
recipe): from batch `mixup_start_step` on, row i becomes
`lam_i * row_i + (1 - lam_i) * row_perm(i)` with `lam_i ~ Beta(alpha, alpha)` and `perm` a
random permutation of the process's batch; the same `lam_i` and partner for low and high.
Batch k of the iterator is train step k, so MixUp starts at the same step after a resume.
The crop, the transforms and MixUp are `augment`'s; this module shuffles, shards and batches.

Determinism and sharding: randomness comes from the seed and the position in the stream only
(grain's `random_map` draws from (seed, index)), so batches do not depend on the number of
worker processes. The crops and transforms of the global stream are the same on every
process count; process p takes elements p, p + P, p + 2P, ... of it (P = process_count), so the
processes' shards are disjoint and together make the global batch. MixUp partners come from the
same process's rows. The returned `TrainIterator` (a `grain.DatasetIterator`) has a
worker-independent state `{'step': k}` (`get_state()` / `set_state()`), and works with
`grain.checkpoint.CheckpointSave/CheckpointRestore` in orbax.

Speed: a source in memory (`config.data.cache`, `cache.CachedSource`) is read in-process by
threads, with no worker processes; the crops, the float conversion and MixUp are written to
avoid numpy's slow paths (`augment`, `_keep_freed_memory`), so that decoding is
the only cost that grows with the image size.

Evaluation (`create_eval_iterator`): records in source order, full resolution. A batch holds
consecutive records of one image size: a size change closes the batch early. Short batches are
padded to the global batch size by repeating their last record with `mask` False. Every process
reads all records of a global batch (their sizes decide the batching, which all processes must
agree on) and returns its rows. For datasets of mixed sizes (SICE) use a small eval batch.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import numpy as np
from absl import logging

from mirnet_jax.data import augment

Batch = augment.Batch

_READ_THREADS = 2  # threads per process computing batches (decoding releases the GIL)
_PREFETCH_BATCHES = 2  # batches buffered per process
_EVAL_READ_THREADS = 4  # threads decoding eval records ahead of the batcher
_ENDLESS = sys.maxsize  # length of the training stream (what grain's endless repeat uses)


class _EpochShuffled:
  """grain map from a position in the endless stream to its record: epoch after epoch, each a
  permutation of the source seeded by (seed, epoch).

  Replaces grain's `MapDataset.shuffle`, whose index shuffle took 1.5 ms per record here (more
  than cropping and MixUp together); one numpy permutation per epoch costs microseconds.
  """

  def __init__(self, source: Any, seed: int):
    self._source = source
    self._size = len(source)
    self._seed = int(seed)
    self._order = functools.lru_cache(maxsize=4)(self._permutation)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._size)

  def __call__(self, position: int) -> Any:
    epoch, offset = divmod(int(position), self._size)
    return self._source[int(self._order(epoch)[offset])]

  def __getstate__(self) -> dict[str, Any]:  # grain workers get a copy; caches do not pickle
    return {'source': self._source, 'seed': self._seed}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state['source'], state['seed'])


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f'global batch size {global_batch_size} must be a positive multiple of the process count '
      f'{process_count}'
    )
  return global_batch_size // process_count


def _seeds(seed: int, process_index: int) -> tuple[int, int, int]:
  """Independent 32-bit seeds: (shuffle, augmentation, MixUp of this process)."""
  shuffle_seed, augment_seed = np.random.SeedSequence([seed, 0]).generate_state(2)
  (mixup_seed,) = np.random.SeedSequence([seed, 1, process_index]).generate_state(1)
  return int(shuffle_seed), int(augment_seed), int(mixup_seed)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


@functools.cache
def _keep_freed_memory() -> None:
  """Lets glibc reuse freed batch buffers rather than hand them back to the kernel.

  Batches are a few MB. By default glibc serves such blocks with mmap (or trims them off the
  heap) and unmaps them when freed, so every new batch pays a page fault per 4 KiB page:
  measured here, MixUp of one batch took 9 ms that way and 0.65 ms with these thresholds.
  The training process then keeps up to 256 MiB of freed memory for reuse. A no-op where libc
  is not glibc.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # the largest value glibc accepts
    libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20)
  except (OSError, AttributeError):
    pass


class TrainIterator(grain.DatasetIterator):
  """Training batches with a small state, `{'step': k}`: the index of the next batch.

  Every batch is a pure function of (source, arguments, k), so the state does not depend on the
  number of worker processes (grain's own multi-worker states do): a run may resume with a
  different `num_workers`, or at any step with `set_state({'step': k})`.
  """

  def __init__(self, batches: grain.MapDataset, *, num_workers: int):
    """Wraps an index-addressable dataset of batches (batch k = train step k)."""
    super().__init__()
    self._batches = batches
    self._num_workers = int(num_workers)
    self._step = 0
    self._iterator: grain.DatasetIterator | None = None

  def _started(self) -> grain.DatasetIterator:
    if self._iterator is None:
      ds = self._batches[self._step :].to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
      )
      if self._num_workers > 0:
        ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(
            num_workers=self._num_workers, per_worker_buffer_size=_PREFETCH_BATCHES
          )
        )
      self._iterator = iter(ds)
    return self._iterator

  def _stop(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __next__(self) -> Batch:
    self._assert_not_closed()
    batch = next(self._started())
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """The index of the next batch (= the train step it feeds)."""
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to batch `state['step']`; prefetched batches are dropped."""
    step = int(state['step'])
    if step < 0:
      raise ValueError(f'train iterator state: step {step} is negative')
    if step != self._step:
      self._stop()
      self._step = step

  def start_prefetch(self) -> None:
    """Starts the worker processes (and their prefetching) now rather than at `next`."""
    self._assert_not_closed()
    self._started()

  def close(self) -> None:
    """Stops worker processes and threads; idempotent."""
    self._stop()
    super().close()

  def __str__(self) -> str:
    return f'TrainIterator(step={self._step}, num_workers={self._num_workers})'


def create_train_iterator(
  source: Any,
  *,
  crop_size: int,
  global_batch_size: int,
  seed: int,
  mixup: bool = False,
  mixup_alpha: float = 1.2,
  mixup_start_step: int = 0,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> TrainIterator:
  """An endless iterator of training batches (see the module docstring).

  Args:
    source: random-access records `{'low', 'high', ...}` of uint8 [H, W, 3] (`sources.py`).
    crop_size: side of the square crops (pixels).
    global_batch_size: images per step over all processes.
    seed: non-negative integer; the same on every process (shards come from slicing).
    mixup: apply MixUp from `mixup_start_step` on.
    mixup_alpha: Beta(alpha, alpha) parameter of the MixUp weight.
    mixup_start_step: first batch (train step, counted from 0) that is mixed.
    num_workers: grain worker processes (0 = compute batches in this process).
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    A `TrainIterator` (a `grain.DatasetIterator`) of batches `{'low', 'high', 'mask'}` with
    `global_batch_size // process_count` rows, starting at step 0; checkpointable with
    get_state/set_state and `grain.checkpoint.CheckpointSave/CheckpointRestore`. Call
    `close()` when done to stop its worker processes.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if len(source) == 0:
    raise ValueError(f'training source {source!r} is empty')
  if num_workers < 0:
    raise ValueError(f'num_workers must be >= 0, got {num_workers}')
  if num_workers and getattr(source, 'in_memory', False):
    # Workers decode in parallel; decoded records in memory need none (and each would need
    # its own copy of them).
    logging.info('Training batches from memory, in-process (num_workers=%d unused)', num_workers)
    num_workers = 0
  _keep_freed_memory()
  shuffle_seed, augment_seed, mixup_seed = _seeds(seed, process_index)
  ds = grain.MapDataset.range(_ENDLESS).map(_EpochShuffled(source, shuffle_seed))
  # Augment before sharding: a crop depends on its global position, not on process_count.
  ds = ds.random_map(augment.RandomCropDihedral(crop_size), seed=augment_seed)
  ds = ds[process_index::process_count]
  ds = ds.batch(local_batch_size, drop_remainder=True)
  # Indexed before any slicing, so the index MixUp sees is the train step.
  mix = augment.MixUpToFloat(
    mixup=mixup, alpha=mixup_alpha, start_step=mixup_start_step, seed=mixup_seed
  )
  ds = ds.map_with_index(mix)
  return TrainIterator(ds, num_workers=num_workers)


def _eval_batch(
  run: list[dict[str, Any]], global_batch_size: int, process_index: int, local_batch_size: int
) -> Batch:
  """Pads a run of same-size records to a global batch; returns this process's rows."""
  real = len(run)
  rows = run + [run[-1]] * (global_batch_size - real)
  start = process_index * local_batch_size
  rows = rows[start : start + local_batch_size]
  mask = np.arange(start, start + local_batch_size) < real
  return {
    'low': np.stack([r['low'] for r in rows]).astype(np.float32) / np.float32(255),
    'high': np.stack([r['high'] for r in rows]).astype(np.float32) / np.float32(255),
    'mask': mask,
    'name': np.array(
      [str(r['name']) if m else '' for r, m in zip(rows, mask, strict=True)], dtype=str
    ),
  }


def _runs(records: Iterable[dict[str, Any]], max_len: int) -> Iterator[list[dict[str, Any]]]:
  """Groups consecutive records of one image size, at most max_len per group."""
  run: list[dict[str, Any]] = []
  for record in records:
    shape = np.shape(record['low'])
    if np.shape(record['high']) != shape:
      raise ValueError(
        f'record {record.get("name", "?")!r}: low {shape} and high '
        f'{np.shape(record["high"])} differ'
      )
    if run and shape != np.shape(run[0]['low']):
      yield run
      run = []
    run.append(record)
    if len(run) == max_len:
      yield run
      run = []
  if run:
    yield run


def create_eval_iterator(
  source: Any,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """A single pass over a source in full-resolution batches (see the module docstring).

  Args:
    source: random-access records `{'low', 'high', 'name'}` of uint8 [H, W, 3].
    global_batch_size: images per batch over all processes.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    An iterator of batches `{'low', 'high', 'mask', 'name'}` with
    `global_batch_size // process_count` rows; make a new one for every evaluation.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if len(source) == 0:
    raise ValueError(f'evaluation source {source!r} is empty')
  records = grain.MapDataset.source(source).to_iter_dataset(
    grain.ReadOptions(num_threads=_EVAL_READ_THREADS, prefetch_buffer_size=2 * global_batch_size)
  )
  # A generator expression, so the checks above run now rather than at the first batch.
  return (
    _eval_batch(run, global_batch_size, process_index, local_batch_size)
    for run in _runs(records, global_batch_size)
  )
