"""Command line: ``python -m mirnet_jax.main --config=configs/lol.py --workdir=W --mode=train``.

Modes: ``train`` (``train.train_and_evaluate``), ``eval`` (``evaluate.run``) and ``predict``
(``predict.run`` on ``--input``/``--output``). Every hyper-parameter is a config key,
overridable as ``--config.optim.learning_rate=1e-4``.

Errors caused by the input (a bad config key or value, a missing dataset or checkpoint, a model
mismatch, a non-finite loss) print one line and exit with status 1; ``--traceback`` shows the
traceback instead. Every config value is checked (mirnet_jax/config_checks.py) before anything
is compiled, and ``~`` is expanded in every path flag and path key (``_PATH_KEYS``).

``config.jax_compilation_cache_dir`` (or, when it is '', the standard
``JAX_COMPILATION_CACHE_DIR`` environment variable) turns on jax's persistent compilation cache
before anything compiles; the end of the run logs how many programs it loaded.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/lol.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, summaries, outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')
_INPUT = flags.DEFINE_string('input', None, 'predict: an image, a folder or a glob.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict: output file or folder.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'predict and eval: replace existing output files.'
)
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of input errors.')


# Config keys holding paths (or a checkpoint name that may be a path): '~' is expanded in all.
_PATH_KEYS = (
  'data.data_dir',
  'data.folder',
  'data.validation_folder',
  'train.init_from',
  'eval.checkpoint',
  'eval.output_dir',
  'predict.checkpoint',
)


# Every program that took this long to compile is cached: the MIRNet train and eval steps (tens
# of seconds) always, the small helpers (optimiser init, metrics) mostly not, which keeps the
# cache small and, on gs://, the reads few. jax's default is 1 s; tiny test models compile faster.
_CACHE_MIN_COMPILE_SECS = 0.5


class _CacheStats:
  """Counts jax's persistent-cache lookups and hits (jax.monitoring events) for the log."""

  def __init__(self):
    self.requests = self.hits = 0
    self.saved_secs = 0.0

  def event(self, name: str, **_) -> None:
    if name == '/jax/compilation_cache/compile_requests_use_cache':
      self.requests += 1
    elif name == '/jax/compilation_cache/cache_hits':
      self.hits += 1

  def duration(self, name: str, secs: float, **_) -> None:
    if name == '/jax/compilation_cache/compile_time_saved_sec':
      self.saved_secs += secs


_CACHE_STATS: _CacheStats | None = None


def _enable_compilation_cache(config) -> str | None:
  """Points jax's persistent compilation cache at the configured directory; returns it.

  ``config.jax_compilation_cache_dir`` wins; when it is '' the ``JAX_COMPILATION_CACHE_DIR``
  environment variable (read by jax itself) is kept. Local or remote (jax opens ``gs://...``
  through etils.epath). Only process 0 writes entries (jax's rule); every process reads.
  """
  global _CACHE_STATS
  import jax

  configured = _expand(config.get('jax_compilation_cache_dir', ''))
  if configured:
    jax.config.update('jax_compilation_cache_dir', configured)
  cache_dir = jax.config.jax_compilation_cache_dir
  if not cache_dir:
    return None
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', _CACHE_MIN_COMPILE_SECS)
  # min_entry_size_bytes stays at jax's 0: no size limit, but jax may raise it to suit the
  # file system of the cache.
  if _CACHE_STATS is None:  # one listener per process, however often main() runs
    _CACHE_STATS = _CacheStats()
    jax.monitoring.register_event_listener(_CACHE_STATS.event)
    jax.monitoring.register_event_duration_secs_listener(_CACHE_STATS.duration)
  logging.info(
    'Compilation cache: %s (programs compiling in >= %g s are kept)',
    cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  return cache_dir


def _log_cache_use(cache_dir: str | None, before: tuple[int, int, float]) -> None:
  if cache_dir is None or _CACHE_STATS is None:
    return
  requests, hits, saved = (
    _CACHE_STATS.requests - before[0],
    _CACHE_STATS.hits - before[1],
    _CACHE_STATS.saved_secs - before[2],
  )
  logging.info(
    'Compilation cache %s: %d of %d programs loaded (persistent compilation cache hits, '
    '%.1f s of compiling saved), %d compiled',
    cache_dir,
    hits,
    requests,
    saved,
    requests - hits,
  )


def _expand(path: str | None) -> str | None:
  """``~/x`` -> ``/home/u/x``: the shell leaves ``~`` alone after ``--flag=``.

  Remote paths (``gs://...``) and names like 'best' do not start with '~' and pass unchanged.
  """
  return os.path.expanduser(path) if path else path


def _prepare_config(config):
  """Expands '~' in the path keys and checks every value; returns the config."""
  from mirnet_jax import config_checks

  for key in _PATH_KEYS:
    section, name = key.split('.')
    if section in config and name in config[section]:
      config[section][name] = _expand(config[section][name])
  config_checks.check(config)
  unchecked = config_checks.unchecked_keys(config)
  if unchecked:
    logging.warning('config keys without a range check: %s', ', '.join(unchecked))
  return config


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and grain (dozens of lines per checkpoint).

  Also clu's local work-unit notes: ReportProgress (summaries.Progress) sets them at every log
  step, and locally they are a second copy of the progress line.
  """

  _PATHS = (
    f'{os.sep}orbax{os.sep}',
    f'{os.sep}grain{os.sep}',
    f'{os.sep}clu{os.sep}platform{os.sep}',
  )
  # Checkpoints between validations carry no metric by design.
  _EXPECTED = 'Requested `tracked_metric`'

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not any(p in record.pathname for p in self._PATHS):
      return True
    return record.levelno >= std_logging.WARNING and not str(record.msg).startswith(self._EXPECTED)


def _input_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean 'fix your input', shown as one line."""
  from mirnet_jax import checkpoints, train

  return (
    OSError,  # missing files and directories; also a config file that failed to load
    ValueError,  # also config_checks.ConfigError
    KeyError,
    checkpoints.CheckpointNotFoundError,
    train.NonFiniteLossError,
  )


def _report(e: BaseException) -> int:
  """Prints an input error as one line on stderr; returns the exit status."""
  message = e.args[0] if isinstance(e, KeyError) and e.args else e
  message = ' '.join(str(message).split())  # one line, whatever the exception holds
  print(f'error: {type(e).__name__}: {message}', file=sys.stderr)
  return 1


def _run(config, workdir: str) -> int:
  mode = _MODE.value
  if mode == 'train':
    from mirnet_jax import train

    train.train_and_evaluate(config, workdir)
    return 0
  if mode == 'eval':
    from mirnet_jax import evaluate

    return evaluate.run(config, workdir, overwrite=_OVERWRITE.value) or 0
  from mirnet_jax import predict

  if not _INPUT.value or not _OUTPUT.value:
    raise ValueError('--mode=predict needs --input and --output')
  return predict.run(
    config, workdir, _expand(_INPUT.value), _expand(_OUTPUT.value), _OVERWRITE.value
  )


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/lol.py')
  if _WORKDIR.value is None and _MODE.value != 'predict':
    raise app.UsageError('--workdir is required')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    # Before jax.distributed and any compile: every process refuses a bad value at once.
    config = _prepare_config(_CONFIG.value)  # also raises what loading the config file raised
  except (OSError, ValueError, KeyError) as e:
    if _TRACEBACK.value:
      raise
    return _report(e)
  import jax

  from mirnet_jax import distributed

  cache_dir = _enable_compilation_cache(config)  # before anything compiles
  stats = _CACHE_STATS
  before = (stats.requests, stats.hits, stats.saved_secs) if stats else (0, 0, 0.0)
  distributed.initialize()  # joins a multi-process run (and watches its peers) if any
  logging.info(
    'JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    return _run(config, _expand(_WORKDIR.value) or '')
  except _input_errors() as e:
    if _TRACEBACK.value:
      raise
    return _report(e)
  finally:
    _log_cache_use(cache_dir, before)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with bad flags and config overrides reported as one line, exit 1.

  A config override of a key that does not exist raises AttributeError inside ml_collections,
  which absl would print as a traceback.
  """
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip('"\'')
    used = [a.split('=')[0][2:] for a in argv if a.startswith('--config.') and key in a]
    message = f'{used[0] if used else key}: no such config key'
  except (flags.Error, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its traceback is in the message; its last line says why.
    message = lines[-1] if 'Traceback' in str(e) else ' '.join(lines)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _help_as_main_module() -> None:
  """Makes ``--help`` of the console script show this module's flags and docstring.

  absl's ``--help`` lists the flags of the ``__main__`` module, named by ``sys.argv[0]``, and
  prints its docstring. Under ``python -m mirnet_jax.main`` that is this file; under the
  ``mirnet-jax`` console script it is the generated wrapper, which defines no flag and has no
  docstring, so only 'Try --helpfull' appeared.
  """
  if __name__ == '__main__':
    return
  for flag in FLAGS.get_key_flags_for_module(__name__):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  wrapper = sys.modules.get('__main__')
  if wrapper is not None and not wrapper.__doc__:
    wrapper.__doc__ = __doc__


def run_main() -> None:
  """Console-script entry point (``mirnet-jax``)."""
  _help_as_main_module()
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_main()
