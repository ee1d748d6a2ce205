"""MIRNet-v2's training schedules (BasicSR, as swz30/MIRNetv2 trains): the cyclic cosine
learning rate and the progressive crop/batch stages.

``cosine_restart_cyclic`` is BasicSR's ``CosineAnnealingRestartCyclicLR`` as an optax schedule;
``progressive_stages``/``stage_at`` are the stage table of BasicSR's progressive training
(``mini_batch_sizes``, ``iters``, ``gt_sizes`` of the option file).

Step convention: optax calls a schedule with the number of updates already made, 0 for the
first. BasicSR's first update also uses the scheduler at ``last_epoch`` 0 (it steps the
scheduler only from ``current_iter`` 2 on), so ``schedule(k)`` is BasicSR's rate for its
update k + 1, and train step k (0-based) belongs to BasicSR iteration k + 1.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax


def cosine_restart_cyclic(
  base_lr: float,
  periods: Sequence[int],
  restart_weights: Sequence[float],
  eta_mins: Sequence[float],
) -> optax.Schedule:
  """BasicSR's ``CosineAnnealingRestartCyclicLR`` (no warm-up) as an optax schedule.

  At count t in cycle i (the first i with t <= end_i, end_i = periods[0] + ... + periods[i];
  start_i = end_{i-1}, start_0 = 0):

      lr(t) = eta_i + w_i * (base_lr - eta_i) * (1 + cos(pi * (t - start_i) / periods[i])) / 2

  so a count on a boundary still belongs to the ending cycle (it reaches eta_i there) and the
  next cycle starts at offset 1. Nothing clamps ``base_lr`` to the minima: with a base rate
  below a cycle's minimum (MIRNet-v2 on LoL: 2e-4 under 3e-4) the rate *rises* from base_lr
  to eta_i over that cycle. Past the last cycle, where BasicSR fails, the rate stays at the
  last minimum.

  Written by hand because optax's ``join_schedules`` switches at count >= boundary and
  restarts each piece at offset 0, which is one step off BasicSR at every restart.

  Args:
    base_lr: the optimiser's rate (BasicSR ``optim_g.lr``).
    periods: length of each cycle (updates).
    restart_weights: scale of each cycle's cosine.
    eta_mins: minimum of each cycle.

  Returns:
    ``count -> learning rate`` (jit-traceable).
  """
  if not (len(periods) == len(restart_weights) == len(eta_mins) >= 1):
    raise ValueError(
      'config.optim.restart_periods, restart_weights and restart_eta_mins must have the same '
      f'length >= 1; got {len(periods)}, {len(restart_weights)}, {len(eta_mins)}'
    )
  if any(int(p) != p or p <= 0 for p in periods):
    raise ValueError(f'config.optim.restart_periods must be positive integers; got {periods}')
  period = np.asarray(periods, np.float32)
  ends = np.cumsum(np.asarray(periods, np.int64))
  starts = (ends - np.asarray(periods, np.int64)).astype(np.float32)
  weight, eta = np.asarray(restart_weights, np.float32), np.asarray(eta_mins, np.float32)

  def schedule(count: Any) -> jnp.ndarray:
    t = jnp.minimum(jnp.asarray(count), int(ends[-1]))
    i = jnp.searchsorted(jnp.asarray(ends), t, side='left')  # first i with t <= end_i
    offset = (t - jnp.asarray(starts)[i]) / jnp.asarray(period)[i]
    e, w = jnp.asarray(eta)[i], jnp.asarray(weight)[i]
    return e + w * 0.5 * (base_lr - e) * (1 + jnp.cos(jnp.pi * offset))

  return schedule


def cosine_restart_cyclic_from_config(optim: Any) -> optax.Schedule:
  """``cosine_restart_cyclic`` from ``config.optim`` (learning_rate, restart_*)."""
  return cosine_restart_cyclic(
    optim.learning_rate, optim.restart_periods, optim.restart_weights, optim.restart_eta_mins
  )


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of progressive training: steps [start, end) with one crop size and batch."""

  index: int
  start: int  # first train step of the stage (0-based, inclusive)
  end: int  # one past its last train step
  crop_size: int  # training crop side (pixels)
  batch_size: int  # global images per step


def progressive_stages(config: Any, num_steps: int, batch_multiple: int = 1) -> tuple[Stage, ...]:
  """The stage table of a run of ``num_steps`` train steps.

  Empty ``config.train.stage_steps`` means one stage of ``config.data.crop_size`` and
  ``config.train.batch_size``. Otherwise stage j covers BasicSR iterations up to
  stage_steps[0] + ... + stage_steps[j]; the last stage runs to ``num_steps`` (longer or
  shorter than its nominal length, as BasicSR keeps the last stage past the table), and
  stages that would start at or after ``num_steps`` are dropped.

  Args:
    config: the full config (``train.stage_*``, ``train.batch_size``, ``data.crop_size``).
    num_steps: train steps of the run.
    batch_multiple: every stage's batch must be a multiple of this (the device count).

  Returns:
    The stages in order, contiguous from step 0 to ``num_steps``.
  """
  if num_steps < 1:
    raise ValueError(f'a run needs at least one train step; got {num_steps}')
  t = config.train
  steps, crops, batches = (
    tuple(t.stage_steps),
    tuple(t.stage_crop_sizes),
    tuple(t.stage_batch_sizes),
  )
  if not steps:
    if crops or batches:
      raise ValueError(
        'config.train.stage_crop_sizes/stage_batch_sizes need config.train.stage_steps'
      )
    steps, crops, batches = (num_steps,), (config.data.crop_size,), (t.batch_size,)
  if not len(steps) == len(crops) == len(batches):
    raise ValueError(
      'config.train.stage_steps, stage_crop_sizes and stage_batch_sizes must have the same '
      f'length; got {len(steps)}, {len(crops)}, {len(batches)}'
    )
  for key, values in (('stage_steps', steps), ('stage_crop_sizes', crops)):
    if any(int(v) != v or v <= 0 for v in values):
      raise ValueError(f'config.train.{key} must be positive integers; got {values}')
  if any(int(b) != b or b <= 0 or b % batch_multiple for b in batches):
    raise ValueError(
      f'config.train.stage_batch_sizes must be positive multiples of {batch_multiple} (the '
      f'device count); got {batches}'
    )
  stages, start = [], 0
  for j, (length, crop, batch) in enumerate(zip(steps, crops, batches, strict=True)):
    if start >= num_steps:
      break
    end = num_steps if j == len(steps) - 1 else min(start + int(length), num_steps)
    stages.append(Stage(j, start, end, int(crop), int(batch)))
    start = end
  return tuple(stages)


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
  """The stage that train step ``step`` (0-based) belongs to."""
  for stage in stages:
    if step < stage.end:
      return stage
  return stages[-1]
