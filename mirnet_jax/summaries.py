"""What a training run reports: TensorBoard writer, console progress, history and curves.

TensorFlow (clu's only TensorBoard backend) is imported lazily, here only, and kept off
accelerators; without it the writer falls back to plain logging with one warning. Only
process 0 writes anything.
"""

import contextlib
import datetime
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging


class LoggingWriter:
  """The clu ``MetricWriter`` methods the trainer uses, as log lines (no TensorFlow needed)."""

  def __init__(self, enabled: bool = True):
    self._enabled = enabled

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._enabled:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._enabled:
      logging.info('hparams: %s', json.dumps(dict(hparams), sort_keys=True))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_writer(workdir: str | pathlib.Path) -> Any:
  """A clu metric writer into ``workdir`` (TensorBoard + log lines) on process 0.

  Other processes get a silent writer. Without TensorFlow, a ``LoggingWriter``.
  """
  if jax.process_index() != 0:
    return LoggingWriter(enabled=False)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # no oneDNN banner
  try:
    import tensorflow as tf  # lazily: only the trainer pays for it

    # TensorFlow must not grab the accelerator JAX trains on.
    tf.config.set_visible_devices([], 'GPU')
    from clu import metric_writers
  except ImportError as e:
    logging.warning('No TensorBoard summaries (%s); logging scalars only', e)
    return LoggingWriter()
  return metric_writers.create_default_writer(str(workdir), asynchronous=True)


def flatten_config(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` with values TensorBoard's hparams accept."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, name + '.'))
    elif isinstance(value, bool | int | float | str):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


def image_grids(examples: Sequence[tuple]) -> dict[str, np.ndarray]:
  """``(name, low, enhanced, high)`` uint8 images -> ``{'eval/images/<i>_<name>': [1, H, 3W, 3]}``.

  One grid per image: validation images may differ in size.
  """
  grids = {}
  for i, (name, *parts) in enumerate(examples):
    grids[f'eval/images/{i}_{name}'] = np.concatenate([np.asarray(p) for p in parts], axis=1)[None]
  return grids


class Progress:
  """Throughput and ETA over the steps since the last report, validation time excluded."""

  def __init__(self, num_steps: int, step: int, batch_size: int):
    self._num_steps = num_steps
    self._batch_size = batch_size
    self._step = step
    self._time = time.perf_counter()
    self._rate = None

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count as training time."""
    start = time.perf_counter()
    yield
    self._time += time.perf_counter() - start

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    self._rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return {
      'train/steps_per_sec': self._rate,
      'train/images_per_sec': self._rate * self._batch_size,
    }

  def line(self, step: int, loss: float) -> str:
    rate = self._rate or 0.0
    eta = (self._num_steps - step) / rate if rate > 0 else 0.0
    return (
      f'step {step}/{self._num_steps}  loss {loss:.5f}  {rate:.3g} steps/s  '
      f'{rate * self._batch_size:.3g} images/s  ETA {datetime.timedelta(seconds=round(eta))}'
    )


class History:
  """Per-step loss and validation PSNR appended to a JSON-lines file (process 0).

  A resumed run truncates nothing: ``plot_curves`` keeps the last record of each step, so the
  steps replayed after a crash overwrite the ones written before it.
  """

  def __init__(self, path: pathlib.Path):
    self._file = open(path, 'a') if jax.process_index() == 0 else None  # noqa: SIM115

  def add(self, step: int, **values: float) -> None:
    if self._file is not None:
      self._file.write(json.dumps({'step': step, **values}) + '\n')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def read_history(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{'loss': (steps, values), 'psnr': (steps, values)}``; the last record of a step wins."""
  series: dict[str, dict[int, float]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      step = record.pop('step')
      for key, value in record.items():
        series.setdefault(key, {})[step] = value
  return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def plot_curves(history_path: pathlib.Path, png_path: pathlib.Path) -> None:
  """Training loss and validation PSNR against steps, as a PNG (matplotlib, Agg)."""
  import matplotlib  # lazily: only the end of a run needs it

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  series = read_history(history_path)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in [
    (axes[0], 'loss', 'train loss'),
    (axes[1], 'psnr', 'validation PSNR (dB)'),
  ]:
    if key in series:
      steps, values = series[key]
      ax.plot(steps, values, marker='o' if len(steps) < 30 else None)
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_yscale('log')
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
