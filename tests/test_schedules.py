"""MIRNet-v2's schedules against hand-computed values of BasicSR's definitions."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mirnet_jax import schedules

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lol_v2(arg=''):
  spec = importlib.util.spec_from_file_location('lol_v2', REPO / 'configs' / 'lol_v2.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _basicsr_rates(base, periods, weights, eta_mins, num_updates):
  """The rate of each update as BasicSR's loop sets it: the scheduler is built at last_epoch
  0 and stepped before every update from current_iter 2 on; get_lr picks the first cycle
  whose cumulative end is >= last_epoch."""
  ends = np.cumsum(periods)
  rates = []
  for current_iter in range(1, num_updates + 1):
    last_epoch = current_iter - 1
    i = next(j for j, end in enumerate(ends) if last_epoch <= end)
    restart = 0 if i == 0 else ends[i - 1]
    cos = math.cos(math.pi * (last_epoch - restart) / periods[i])
    rates.append(eta_mins[i] + weights[i] * 0.5 * (base - eta_mins[i]) * (1 + cos))
  return np.array(rates)


def test_lol_schedule_at_its_boundaries():
  optim = _lol_v2().optim
  lr = jax.jit(schedules.cosine_restart_cyclic_from_config(optim))
  # Base 2e-4 below the first minimum 3e-4: the first cycle rises from 2e-4 to 3e-4.
  first = 3e-4 - 0.5e-4 * (1 + math.cos(math.pi * 1 / 46_000))
  second_start = 1e-6 + 0.5 * 1.99e-4 * (1 + math.cos(math.pi * 1 / 104_000))
  last = 1e-6 + 0.5 * 1.99e-4 * (1 + math.cos(math.pi * 103_999 / 104_000))
  expected = {
    0: 2e-4,  # the first update uses the base rate
    1: first,
    23_000: 2.5e-4,  # mid-cycle: cos = 0
    45_999: 3e-4 - 0.5e-4 * (1 + math.cos(math.pi * 45_999 / 46_000)),
    46_000: 3e-4,  # the boundary still belongs to cycle 0: its minimum
    46_001: second_start,  # cycle 1 starts at offset 1, just under the base rate
    98_000: 1e-6 + 0.5 * 1.99e-4,  # mid-cycle 1
    149_999: last,  # the last update of a 150k run
    150_000: 1e-6,
    200_000: 1e-6,  # past the table (BasicSR fails there): the last minimum
  }
  for count, want in expected.items():
    np.testing.assert_allclose(float(lr(jnp.int32(count))), want, rtol=2e-6, err_msg=str(count))
  assert second_start < 2e-4 < first < 3e-4


def test_schedule_matches_basicsr_loop_with_restart_weights():
  # Base above the minima and restart weights != 1, step by step through two restarts.
  periods, weights, eta_mins = (10, 7, 5), (1.0, 0.5, 0.25), (1e-7, 1e-6, 1e-5)
  lr = schedules.cosine_restart_cyclic(1e-3, periods, weights, eta_mins)
  got = np.asarray(jax.vmap(lr)(jnp.arange(22)))
  np.testing.assert_allclose(got, _basicsr_rates(1e-3, periods, weights, eta_mins, 22), rtol=1e-5)
  np.testing.assert_allclose(got[[0, 10, 11, 17, 18]], [
    1e-3,  # base
    1e-7,  # end of cycle 0
    1e-6 + 0.5 * 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi / 7)),  # restart at half weight
    1e-6,  # end of cycle 1
    1e-5 + 0.25 * 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 5)),
  ], rtol=1e-5)  # fmt: skip


def test_schedule_rejects_mismatched_cycles():
  with pytest.raises(ValueError, match='restart_periods, restart_weights and restart_eta_mins'):
    schedules.cosine_restart_cyclic(1e-3, (10, 10), (1.0,), (0.0, 0.0))
  with pytest.raises(ValueError, match='restart_periods must be positive integers'):
    schedules.cosine_restart_cyclic(1e-3, (10, 0), (1.0, 1.0), (0.0, 0.0))


def test_lol_progressive_stages():
  config = _lol_v2()
  stages = schedules.progressive_stages(config, config.train.num_steps, batch_multiple=8)
  assert [(s.start, s.end, s.crop_size, s.batch_size) for s in stages] == [
    (0, 46_000, 128, 64),
    (46_000, 78_000, 160, 40),
    (78_000, 102_000, 192, 32),
    (102_000, 120_000, 256, 16),
    (120_000, 138_000, 320, 8),
    (138_000, 150_000, 384, 8),
  ]
  # BasicSR iteration 46000 (step 45999) is the last of stage 0; step 46000 starts stage 1.
  assert [schedules.stage_at(stages, s).index for s in (0, 45_999, 46_000, 149_999)] == [0, 0, 1, 5]
  with pytest.raises(ValueError, match='stage_batch_sizes must be positive multiples of 16'):
    schedules.progressive_stages(config, 10, batch_multiple=16)
  fixed = _lol_v2('fixed')
  assert schedules.progressive_stages(fixed, 300_000) == (schedules.Stage(0, 0, 300_000, 128, 64),)


def _tiny(**train):
  config = ml_collections.ConfigDict({'train': {'batch_size': 4}, 'data': {'crop_size': 32}})
  config.train.stage_steps, config.train.stage_crop_sizes = (), ()
  config.train.stage_batch_sizes = ()
  config.train.update(train)
  return config


def test_stages_truncate_extend_and_default():
  # No stages: one stage of data.crop_size and train.batch_size.
  assert schedules.progressive_stages(_tiny(), 7) == (schedules.Stage(0, 0, 7, 32, 4),)
  config = _tiny(stage_steps=(3, 2, 4), stage_crop_sizes=(16, 24, 32), stage_batch_sizes=(8, 4, 2))
  short = schedules.progressive_stages(config, 4)  # stops inside stage 1; stage 2 never runs
  assert [(s.index, s.start, s.end) for s in short] == [(0, 0, 3), (1, 3, 4)]
  long = schedules.progressive_stages(config, 12)  # the last stage runs on to num_steps
  assert [(s.start, s.end) for s in long] == [(0, 3), (3, 5), (5, 12)]
  assert schedules.stage_at(long, 11).crop_size == 32
  with pytest.raises(ValueError, match='must have the same length; got 3, 3, 2'):
    schedules.progressive_stages(_tiny(stage_steps=(3, 2, 4), stage_crop_sizes=(16, 24, 32),
                                       stage_batch_sizes=(8, 4)), 12)  # fmt: skip
  with pytest.raises(ValueError, match='stage_crop_sizes/stage_batch_sizes need'):
    schedules.progressive_stages(_tiny(stage_crop_sizes=(16,)), 12)
