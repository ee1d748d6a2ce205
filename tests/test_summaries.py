"""Progress, history and curves by hand-computed values; only process 0 writes anything."""

import json
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from mirnet_jax import summaries


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def monotonic(self) -> float:
    return self.now


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(summaries, 'time', types.SimpleNamespace(monotonic=fake.monotonic))
  return fake


@pytest.mark.parametrize('with_clu', [True, False])
def test_progress_rate_and_eta_leave_validation_out(clock, monkeypatch, with_clu):
  if not with_clu:  # as where clu cannot be imported (no TensorFlow)
    monkeypatch.setattr(summaries, '_report_progress', lambda num_steps, writer: None)
  progress = summaries.Progress(num_steps=100, step=10, batch_size=8)
  assert (progress._clu is not None) == with_clu
  clock.now += 2.0  # 10 steps in 2 s
  assert progress.update(20) == {'train/steps_per_sec': 5.0, 'train/images_per_sec': 40.0}
  assert progress.line(20, 0.123456) == (
    'step 20/100  loss 0.12346  5 steps/s  40 images/s  ETA 0:00:16'
  )
  with progress.paused():
    clock.now += 30.0  # validation: not training time
  clock.now += 2.5  # 5 steps in 2.5 s of training
  assert progress.update(25) == {'train/steps_per_sec': 2.0, 'train/images_per_sec': 16.0}
  assert progress.line(25, 0.5).endswith('2 steps/s  16 images/s  ETA 0:00:38')
  clock.now += 1.0
  assert progress.update(25)['train/steps_per_sec'] == 2.0  # same step again: rate kept


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  writer = summaries.create_writer(tmp_path / 'events')
  writer.write_scalars(1, {'train/loss': 1.0})
  writer.write_hparams({'a': 1})
  writer.flush()
  writer.close()
  assert summaries.Progress(10, 0, 8)._clu is None  # no clu, so no TensorFlow import, here
  history = summaries.History(tmp_path / 'history.jsonl')
  history.add(1, loss=0.5)
  history.close()
  (tmp_path / 'h.jsonl').write_text('{"step": 1, "loss": 0.5}\n')
  summaries.plot_curves(tmp_path / 'h.jsonl', tmp_path / 'curves.png')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['h.jsonl']


def test_history_keeps_the_last_record_of_a_step_and_curves_are_drawn(tmp_path):
  path = tmp_path / 'history.jsonl'
  history = summaries.History(path)
  history.add(1, loss=0.5)
  history.add(2, loss=0.25)
  history.close()
  resumed = summaries.History(str(path))  # a rerun after a crash replays step 2
  resumed.add(2, loss=0.2)
  resumed.add(2, psnr=20.5)
  resumed.close()
  series = summaries.read_history(path)
  np.testing.assert_array_equal(series['loss'][0], [1, 2])
  np.testing.assert_array_equal(series['loss'][1], [0.5, 0.2])
  np.testing.assert_array_equal(series['psnr'][1], [20.5])
  summaries.plot_curves(path, tmp_path / 'curves.png')
  with Image.open(tmp_path / 'curves.png') as png:
    assert png.format == 'PNG' and png.size == (1000, 400)


def test_remote_history_is_rewritten_whole(tmp_path, monkeypatch):
  """Object stores have no appends: the whole file is rewritten (checked on a local stand-in)."""
  monkeypatch.setattr(summaries, '_is_remote', lambda path: True)
  path = tmp_path / 'history.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n')
  history = summaries.History(path)
  history.add(2, loss=0.25)
  assert path.read_text() == '{"step": 1, "loss": 0.5}\n'  # not yet: at most every 60 s
  monkeypatch.setattr(summaries, '_REMOTE_HISTORY_SECS', -1.0)
  history.add(3, loss=0.125)
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r['step'] for r in lines] == [1, 2, 3]
  history.add(4, psnr=21.0)
  history.close()
  assert json.loads(path.read_text().splitlines()[-1]) == {'step': 4, 'psnr': 21.0}


def test_writer_without_tensorflow_logs(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` now fails
  writer = summaries.create_writer(tmp_path)
  assert isinstance(writer, summaries.LoggingWriter)
  with caplog.at_level('INFO'):
    writer.write_scalars(7, {'train/loss': 0.25, 'eval/psnr': 20.0})
  assert '[7] eval/psnr=20, train/loss=0.25' in caplog.text
  assert list(tmp_path.iterdir()) == []
