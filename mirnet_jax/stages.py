"""Progressive training's data side: one train iterator per stage behind one global position.

MIRNet-v2's recipe (BasicSR progressive training) changes the crop size and the global batch at
stage boundaries (``schedules.progressive_stages``). ``StagedTrainIterator`` opens the stage's
``pipeline.create_train_iterator`` when the run enters it and closes the previous one; its
checkpointed state stays ``{'step': k}`` with k the global train step, so the stage and the
position inside it follow from k alone (a rerun resumes inside any stage, and checkpoints of
runs without stages restore unchanged: one stage, position k).

Stage 0 uses ``config.seed`` itself (a run without stages sees exactly today's batches); later
stages get seeds derived from (seed, stage), so they do not replay stage 0's shuffle order.

``BatchMixUp`` is BasicSR's ``Mixing_Augment(mixup_beta, use_identity=True)``
(``data.mixup_mode='batch_or_identity'``): per batch, with probability 1/2 nothing, else one
``lam ~ Beta(alpha, alpha)`` and one permutation for the whole batch,
``x <- lam * x + (1 - lam) * x[perm]`` on low and high alike. The pipeline's own MixUp
(``'per_image'``) draws one lam per image on every batch; this one is applied here, on the
host, to float batches the pipeline made without MixUp, drawn from (seed, process, global
step) so it resumes exactly too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from mirnet_jax.data import pipeline
from mirnet_jax.schedules import Stage, stage_at

MIXUP_MODES = ('per_image', 'batch_or_identity')


def stage_seed(seed: int, index: int) -> int:
  """The data seed of stage ``index``: ``seed`` for stage 0, derived from (seed, index) after."""
  if index == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), 2, int(index)]).generate_state(1)[0])


class BatchMixUp:
  """BasicSR's batch-level MixUp with identity (see the module docstring)."""

  def __init__(self, *, alpha: float, start_step: int, seed: int, process_index: int):
    if alpha <= 0:
      raise ValueError(f'config.data.mixup_alpha must be positive, got {alpha}')
    self.alpha, self.start_step = float(alpha), int(start_step)
    self.seed, self.process_index = int(seed), int(process_index)

  def __call__(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batch ``step`` (global train step) mixed, or unchanged (identity or before start)."""
    if step < self.start_step:
      return batch
    rng = np.random.default_rng([self.seed, 3, self.process_index, int(step)])
    if rng.integers(0, 2):  # random.randint(0, len(augments)) == len(augments): identity
      return batch
    lam = np.float32(rng.beta(self.alpha, self.alpha))
    perm = rng.permutation(batch['low'].shape[0])
    mixed = dict(batch)
    for key in ('low', 'high'):
      x = batch[key]
      mixed[key] = lam * x + (np.float32(1) - lam) * x[perm]
    return mixed


class StagedTrainIterator(grain.DatasetIterator):
  """Training batches of the stage of each global step; state ``{'step': k}`` (global).

  Args:
    stages: ``schedules.progressive_stages`` of the run.
    make: ``stage, position -> iterator`` for a stage's batches; it yields the stage's
      batch ``position`` (counted from the stage's start) first.
    mix: optional ``(global step, batch) -> batch`` applied to every batch.
  """

  def __init__(
    self,
    stages: Sequence[Stage],
    make: Callable[[Stage], Any],
    mix: Callable[[int, dict], dict] | None = None,
  ):
    super().__init__()
    self._stages = tuple(stages)
    self._make = make
    self._mix = mix
    self._step = 0
    self._stage: Stage | None = None
    self._iterator: Any = None

  @property
  def stage(self) -> Stage:
    """The stage of the next batch."""
    return stage_at(self._stages, self._step)

  def _current(self) -> Any:
    stage = self.stage
    if self._iterator is None or stage != self._stage:
      self._stop()
      self._iterator = self._make(stage)
      self._iterator.set_state({'step': self._step - stage.start})
      self._stage = stage
      logging.info(
        'Stage %d/%d from step %d: %dx%d crops, global batch %d',
        stage.index + 1,
        len(self._stages),
        self._step,
        stage.crop_size,
        stage.crop_size,
        stage.batch_size,
      )
    return self._iterator

  def _stop(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
      self._stage = None

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._current())
    if self._mix is not None:
      batch = self._mix(self._step, batch)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """The global train step of the next batch."""
    return {'step': self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to global step ``state['step']`` (its stage's iterator opens at the next batch)."""
    step = int(state['step'])
    if step < 0:
      raise ValueError(f'train iterator state: step {step} is negative')
    if step != self._step:
      self._stop()
      self._step = step

  def start_prefetch(self) -> None:
    """Opens the current stage's iterator (and its workers) now rather than at ``next``."""
    self._current().start_prefetch()

  def close(self) -> None:
    """Stops the open stage's workers and threads; idempotent."""
    self._stop()
    super().close()

  def __str__(self) -> str:
    return f'StagedTrainIterator(step={self._step}, stages={len(self._stages)})'


def create_staged_iterator(
  config: Any,
  source: Any,
  stages: Sequence[Stage],
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> StagedTrainIterator:
  """The run's training iterator: the stages of ``stages`` with ``config.data``'s MixUp mode.

  Raises:
    ValueError: unknown ``config.data.mixup_mode`` (named).
  """
  d = config.data
  mode = d.get('mixup_mode', 'per_image')
  if mode not in MIXUP_MODES:
    raise ValueError(f'config.data.mixup_mode={mode!r}: must be one of {", ".join(MIXUP_MODES)}')
  per_image = d.mixup and mode == 'per_image'

  def make(stage: Stage) -> Any:
    return pipeline.create_train_iterator(
      source,
      crop_size=stage.crop_size,
      global_batch_size=stage.batch_size,
      seed=stage_seed(config.seed, stage.index),
      mixup=per_image,
      mixup_alpha=d.mixup_alpha,
      # The pipeline counts its own batches from the stage's start.
      mixup_start_step=max(0, d.mixup_start_step - stage.start),
      num_workers=d.num_workers,
      process_index=process_index,
      process_count=process_count,
    )

  mix = None
  if d.mixup and mode == 'batch_or_identity':
    mix = BatchMixUp(
      alpha=d.mixup_alpha,
      start_step=d.mixup_start_step,
      seed=config.seed,
      process_index=process_index,
    )
  return StagedTrainIterator(stages, make, mix)
