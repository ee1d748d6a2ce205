"""Throughput, compile time and memory of the train step or the forward pass; JSON lines.

  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=train_step --batch=4 --size=128
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=forward --batch=1 --size=400,600

Random inputs and a random initialisation (the timings do not depend on the values). Each line
is one JSON object: ``compile`` (seconds to lower and compile), then one per timed step
(``step_s``), then ``summary`` with the median step, images/s, peak RSS of this process (GiB,
from ``getrusage``: host memory, which on CPU includes the device buffers) and the device.
"""

import json
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mirnet_jax import losses, sharding, train
from mirnet_jax.models import count_params, create_model

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lol.py', 'Config file.')
_MODE = flags.DEFINE_enum('mode', 'train_step', ['train_step', 'forward'], 'What to time.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Global batch size (images).')
_SIZE = flags.DEFINE_string('size', '128', 'Image side, or HEIGHT,WIDTH (pixels).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after the compiling one.')


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  h, w = (int(s) for s in (_SIZE.value.split(',') * 2)[:2])
  batch = _BATCH.value
  mesh = sharding.create_mesh()
  model = create_model(config.model)
  rng = np.random.default_rng(0)
  images = {
    'low': rng.random((batch, h, w, 3), np.float32) * 0.2,
    'high': rng.random((batch, h, w, 3), np.float32),
  }
  global_images = sharding.global_batch(images, mesh)
  schedule = train.create_learning_rate_schedule(config.optim, 1000)
  state = train.create_train_state(
    config, model, train.create_optimizer(config.optim, schedule), mesh, jax.random.key(0)
  )
  if _MODE.value == 'train_step':
    fn = train.make_train_step(mesh, losses.create_loss(config.loss))
    args = (state, global_images)
  else:
    repl = sharding.replicated(mesh)
    fn = jax.jit(
      lambda p, x: model.apply({'params': p}, x),
      in_shardings=(repl, sharding.batch_sharding(mesh)),
      out_shardings=sharding.batch_sharding(mesh),
    )
    args = (state.params, global_images['low'])

  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  _emit({'event': 'compile', 'mode': _MODE.value, 'compile_s': round(compile_s, 3)})
  step_times = []
  for i in range(_STEPS.value + 1):
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    if _MODE.value == 'train_step':
      args = (out[0], global_images)  # the state was donated
    if i > 0:  # the first call also allocates and warms caches
      step_times.append(elapsed)
      _emit({'event': 'step', 'step': i, 'step_s': round(elapsed, 4)})
  median = float(np.median(step_times)) if step_times else float('nan')
  _emit(
    {
      'event': 'summary',
      'mode': _MODE.value,
      'batch': batch,
      'height': h,
      'width': w,
      'dtype': config.model.dtype,
      'params': count_params(state.params),
      'compile_s': round(compile_s, 3),
      'step_s_median': round(median, 4),
      'steps_per_s': round(1 / median, 5),
      'images_per_s': round(batch / median, 4),
      'peak_rss_gib': round(_peak_rss_gib(), 3),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
    }
  )
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
