"""What a training run reports: TensorBoard writer, console progress, history, curves, traces.

Only process 0 writes anything: `create_writer` gives other processes a silent writer, `History`
and `plot_curves` do nothing there. Every path is an `etils.epath` path, so a `gs://` workdir
holds the events, `history.jsonl` and `curves.png` like a local one.

TensorFlow (clu's only TensorBoard backend) is imported lazily, here only, and kept off
accelerators; without it the writer falls back to plain logging with one warning. clu 0.0.12's
`clu.metric_writers` package imports TensorFlow in its `__init__` (for its SummaryWriter), and so
does `clu.periodic_actions` through it: neither clu's `LoggingWriter` nor its `ReportProgress`
can be imported where TensorFlow is missing (pyproject installs tensorflow-cpu on x86_64 only).
So the two fallbacks below stay hand-made, and `Progress` uses `ReportProgress` when it imports.
"""

import contextlib
import datetime
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

# A remote history (no appends on object stores) is rewritten at most this often, and at close.
_REMOTE_HISTORY_SECS = 60.0


def _is_remote(path: epath.Path) -> bool:
  return '://' in os.fspath(path)


class LoggingWriter:
  """The clu ``MetricWriter`` methods the trainer uses, as log lines, without TensorFlow.

  Hand-made because clu's own LoggingWriter cannot be imported without TensorFlow (see the module
  docstring). With ``enabled=False`` it is the silent writer of processes other than 0, which
  therefore never import TensorFlow at all.
  """

  def __init__(self, enabled: bool = True):
    self._enabled = enabled

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._enabled:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in sorted(scalars.items())))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._enabled:
      logging.info('hparams: %s', json.dumps(dict(hparams), sort_keys=True))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_writer(workdir: str | os.PathLike[str]) -> Any:
  """A clu metric writer into ``workdir`` (TensorBoard + log lines) on process 0.

  Args:
    workdir: the events' folder, local or remote (``gs://...``: TensorFlow writes it itself).

  Returns:
    clu's default writer on process 0; a silent ``LoggingWriter`` on other processes; a logging
    one (with a warning) where TensorFlow is missing.
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
  return metric_writers.create_default_writer(os.fspath(epath.Path(workdir)), asynchronous=True)


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


def _report_progress(num_steps: int, writer: Any) -> Any:
  """clu's ReportProgress, reporting its rate to ``writer``; None where clu needs a missing TF.

  Also None on processes other than 0: importing clu.periodic_actions imports TensorFlow, which
  they never load otherwise, and only process 0 reports (work-unit notes are per run).
  """
  if jax.process_index() != 0:
    return None
  try:
    from clu import periodic_actions
  except ImportError:
    return None
  # every_secs=0: it reports whenever called with a later step (the trainer calls it at each
  # log step); the caller's clock (t=) leaves validation time out of the rate.
  return periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=None, every_secs=0.0
  )


class Progress:
  """Steps/s, images/s and ETA over the steps since the last report, validation time excluded.

  The rate comes from clu's ``periodic_actions.ReportProgress`` (which also sets the work-unit
  notes where a platform shows them, with the share of time spent validating); where clu cannot
  be imported (no TensorFlow) the same division is done here. The console line is ours:
  ReportProgress reports neither the loss nor images/s.

  Args:
    num_steps: the run's last step.
    step: the step the run starts (or resumes) from.
    batch_size: global images per step.
  """

  def __init__(self, num_steps: int, step: int, batch_size: int):
    self._num_steps = num_steps
    self._batch_size = batch_size
    self._paused_secs = 0.0
    self._rate = None
    self._last = (step, self._clock())
    self._clu = _report_progress(num_steps, self)
    if self._clu is not None:
      self._clu(step, t=self._last[1])  # its first call only starts its clock

  def set_batch_size(self, batch_size: int) -> None:
    """Images per step from now on (progressive training changes it at stage boundaries)."""
    self._batch_size = int(batch_size)

  def _clock(self) -> float:
    """Seconds of training: monotonic time minus the time spent in ``paused`` blocks."""
    return time.monotonic() - self._paused_secs

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """ReportProgress's writer hook: receives its steps/s (and uptime) at each report."""
    del step
    if 'steps_per_sec' in scalars:
      self._rate = float(scalars['steps_per_sec'])

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count as training time."""
    start = time.monotonic()
    part = (
      contextlib.nullcontext()
      if self._clu is None
      else self._clu.timed('validation', wait_jax_async_dispatch=False)
    )
    try:
      with part:
        yield
    finally:
      self._paused_secs += time.monotonic() - start

  def update(self, step: int) -> dict[str, float]:
    """Reports ``step``; returns ``train/steps_per_sec`` and ``train/images_per_sec``."""
    now = self._clock()
    if self._clu is not None:
      self._clu(step, t=now)
    elif step != self._last[0]:
      self._rate = (step - self._last[0]) / max(now - self._last[1], 1e-9)
    self._last = (step, now)
    rate = self._rate or 0.0
    return {'train/steps_per_sec': rate, 'train/images_per_sec': rate * self._batch_size}

  def line(self, step: int, loss: float) -> str:
    """``step 25/100  loss 0.12346  5 steps/s  40 images/s  ETA 0:00:15``."""
    rate = self._rate or 0.0
    eta = (self._num_steps - step) / rate if rate > 0 else 0.0
    return (
      f'step {step}/{self._num_steps}  loss {loss:.5f}  {rate:.3g} steps/s  '
      f'{rate * self._batch_size:.3g} images/s  ETA {datetime.timedelta(seconds=round(eta))}'
    )


class History:
  """Per-step loss and validation PSNR appended to a JSON-lines file (process 0 only).

  A resumed run truncates nothing: ``plot_curves`` keeps the last record of each step, so the
  steps replayed after a crash overwrite the ones written before it. Object stores (``gs://``)
  have no appends: there the file is rewritten whole, at most every 60 s and at ``close``.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self._path = epath.Path(path)
    self._file = None
    self._lines: list[str] | None = None  # a remote file's whole content
    if jax.process_index() != 0:
      return
    if _is_remote(self._path):
      self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []
      self._written = time.monotonic()
    else:
      self._file = self._path.open('a')

  def add(self, step: int, **values: float) -> None:
    line = json.dumps({'step': step, **values}) + '\n'
    if self._file is not None:
      self._file.write(line)
    elif self._lines is not None:
      self._lines.append(line)
      if time.monotonic() - self._written > _REMOTE_HISTORY_SECS:
        self._rewrite()

  def _rewrite(self) -> None:
    self._path.write_text(''.join(self._lines))
    self._written = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._lines is not None:
      self._rewrite()
      self._lines = None


def read_history(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{'loss': (steps, values), 'psnr': (steps, values)}``; the last record of a step wins."""
  path = epath.Path(path)
  series: dict[str, dict[int, float]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      step = record.pop('step')
      for key, value in record.items():
        series.setdefault(key, {})[step] = value
  return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def plot_curves(history_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
  """Training loss and validation PSNR against steps, as a PNG (matplotlib, Agg); process 0."""
  if jax.process_index() != 0:
    return
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
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  epath.Path(png_path).write_bytes(png.getvalue())  # through epath: gs:// workdirs too


class Trace:
  """A jax.profiler trace of ``config.train.profile_steps`` steps of this run.

  It starts once ``profile_start_step`` steps of this run are done (compile and warm-up stay
  out; a resumed run counts from where it resumed) and both ends wait for the device, so the
  trace holds exactly those steps. jax writes ``WORKDIR/plugins/profile/<time>/<host>.xplane.pb``,
  where TensorBoard's profile plugin looks under ``--logdir=WORKDIR`` (the events' directory).
  On several processes only process 0 traces (its own devices; all run the same program).
  """

  def __init__(self, config: Any, workdir: epath.Path, first: int, last: int):
    steps = config.train.get('profile_steps', 0)
    self.start = first + config.train.get('profile_start_step', 0)
    self.stop = min(self.start + steps, last)
    self.enabled = steps > 0 and self.start < last and jax.process_index() == 0
    self.folder, self.workdir, self.running = workdir / 'plugins' / 'profile', workdir, False

  def before_step(self, done: int, state: Any) -> None:
    """Starts the trace when ``done`` steps are done (called before the next one runs)."""
    if self.enabled and not self.running and done == self.start:
      jax.block_until_ready(state)
      logging.info('Tracing steps %d-%d into %s', self.start + 1, self.stop, self.folder)
      jax.profiler.start_trace(str(self.workdir))
      self.running = True

  def after_step(self, done: int, state: Any) -> None:
    """Stops the trace once its last step is done."""
    if self.running and done >= self.stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Stops a running trace (also on errors and SIGTERM: what was traced is kept)."""
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      run = max(self.folder.iterdir(), default=self.folder)  # folders are named by start time
      logging.info(
        'Wrote the trace to %s (tensorboard --logdir=%s, Profile tab)', run, self.workdir
      )
