"""The tiny training setup shared by the training tests (compile time dominates on CPU)."""

import importlib.util
import pathlib

import jax

from mirnet_jax.models import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'demo.py'

# Overrides of configs/demo.py, as --config.KEY=VALUE flags for subprocesses.
OVERRIDES = {
  'model.num_features': 8,
  'model.num_rrg': 1,
  'model.num_mrb': 1,
  'model.height': 2,
  'data.synthetic_pairs': 16,
  'data.synthetic_eval_pairs': 4,
  'data.synthetic_size': 48,
  'data.crop_size': 32,
  'data.num_workers': 0,
  'data.eval_batch_size': 4,
  'train.batch_size': 8,
  'train.num_steps': 6,
  'train.log_every_steps': 1,
  'train.eval_every_steps': 0,
  'train.checkpoint_every_steps': 2,
  'train.num_grid_images': 2,
  'optim.warmup_steps': 0,
  'optim.learning_rate': 2e-3,
  # Pinned: the training tests compare runs bit for bit, and 'auto' measures which form is
  # faster on the machine at each fresh start (tests/test_train.py tests 'auto').
  'train.conv_kernel_grad': 'taps',
}


def config(**extra):
  """configs/demo.py with the tiny overrides (and ``extra``, keys with '__' for '.')."""
  spec = importlib.util.spec_from_file_location('demo_config', DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key, value in {**OVERRIDES, **{k.replace('__', '.'): v for k, v in extra.items()}}.items():
    section, name = key.split('.')
    setattr(cfg[section], name, value)
  return cfg


def flags(**extra) -> list[str]:
  """The same config as command-line flags for ``python -m mirnet_jax.main``."""
  values = {**OVERRIDES, **{k.replace('__', '.'): v for k, v in extra.items()}}
  return [f'--config={DEMO}'] + [f'--config.{k}={v}' for k, v in values.items()]


def model(cfg):
  return create_model(cfg.model)


def compilation_cache_dir(tmp_path_factory) -> pathlib.Path:
  """One persistent compilation cache per test session, shared with subprocesses (env var).

  The same tiny train step is compiled by several tests and subprocesses; the cache turns the
  recompiles (~15 s each on 2 cores) into loads.
  """
  path = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  path.mkdir(exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return path
