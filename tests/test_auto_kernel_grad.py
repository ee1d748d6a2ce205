"""config.train.conv_kernel_grad='auto' in training: measured on a fresh CPU run, kept by the
checkpoints, and taken from them on a resume (train_state.measured_kernel_grad). Two training
runs that go through it end to end: tests/test_profile.py (remat and resume)."""

import numpy as np
import pytest
import tiny

from mirnet_jax import train_state
from mirnet_jax.models import ops

FASTER_XLA = {'taps': 3.0, 'xla': 1.0}


def _no_measuring(*args, **kwargs):
  pytest.fail('time_kernel_grads ran where the form was already decided')


def test_explicit_forms_and_stored_choices_are_not_measured(monkeypatch):
  monkeypatch.setattr(ops, 'time_kernel_grads', _no_measuring)
  model = tiny.model(tiny.config())
  for form in ('taps', 'xla'):
    assert train_state.measured_kernel_grad(form, model, 2, 32, 32) == (form, None)
    assert train_state.measured_kernel_grad(form, model, 2, 32, 32, stored='taps')[0] == form
  assert train_state.measured_kernel_grad('auto', model, 2, 32, 32, 'xla') == ('xla', None)
  # A checkpoint of an earlier version says 'auto': on CPU that version traced the taps.
  assert train_state.measured_kernel_grad('auto', model, 2, 32, 32, 'auto') == ('taps', None)


def test_fresh_auto_measures_each_stream_and_takes_process_0s_choice(monkeypatch):
  shapes = []
  monkeypatch.setattr(ops, 'time_kernel_grads', lambda s: shapes.append(s) or FASTER_XLA)
  model = tiny.model(tiny.config())  # two streams: 8 and 16 channels
  assert train_state.measured_kernel_grad('auto', model, 2, 32, 32) == ('xla', FASTER_XLA)
  assert shapes == [[(2, 32, 32, 8), (2, 16, 16, 16)]]
  train_state.measured_kernel_grad('auto', model, 16, 32, 32)  # timed on 4 of the 16 images
  assert shapes[-1] == [(4, 32, 32, 8), (4, 16, 16, 16)]
  # With several processes every one traces process 0's form, whatever it measured itself.
  from jax.experimental import multihost_utils

  sent = []
  monkeypatch.setattr(train_state.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(
    multihost_utils, 'broadcast_one_to_all', lambda x: sent.append(int(x)) or np.int32(1)
  )
  assert train_state.measured_kernel_grad('auto', model, 2, 32, 32)[0] == 'taps'
  assert sent == [ops.KERNEL_GRADS.index('xla')] and ops.KERNEL_GRADS[1] == 'taps'
