"""Throughput, compile time and memory of training, the forward pass, the input pipeline and
predict; JSON lines.

  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=train_step --batch=4 --size=128
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=forward --batch=1 --size=400,600
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=train_step --batch=8 --size=128 \\
      --compile_only --remat=mrb --dtype=bfloat16
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=kernel_grad --batch=4 --size=128
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=ops --batch=4 --size=128
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=data --steps=300 \\
      --config.data.name=folder --config.data.folder=PAIRS --config.data.validation_percent=0
  python -m mirnet_jax.benchmark --config=configs/lol.py --mode=predict --batch=1 --size=3000,4000

Modes:
* ``train_step`` / ``forward``: random inputs and a random initialisation (the timings do not
  depend on the values). Lines: ``compile`` (seconds to lower and compile), one ``step`` per timed
  step (``step_s``), then ``summary`` with the median step, images/s, XLA's FLOPs per step and
  the achieved TFLOP/s against a peak (``--peak_tflops``, else a measured float32 GEMM), XLA's
  memory plan of the compiled step, the device's peak memory where the backend keeps one, peak
  RSS and the devices (keys: ``bench_model.bench_model``, meanings: ``bench_xla``).
  ``--dtype`` and ``--remat`` override ``config.model.dtype`` and ``config.train.remat``;
  ``--compile_only`` stops after the compile (step figures null): the memory plan of a step too
  big to run here.
  ``--config.train.conv_kernel_grad`` picks the kernel gradients' form; ``summary`` says which.
* ``kernel_grad``: one 3x3 kernel gradient per stream of the config's model at ``--batch`` x
  ``--size``, in both forms of ``config.train.conv_kernel_grad`` (models/ops.py). Lines: one
  ``kernel_grad`` per stream (``taps_ms``, ``xla_ms``), then ``summary`` with the sums, the
  ``faster`` form and what ``auto`` picks here (``bench_model.bench_kernel_grad``).
* ``ops``: where one step's time goes (``--ops_of=train_step|forward``, with ``--batch``,
  ``--size``, ``--dtype``, ``--remat``): one traced step after a warm-up, its XLA operations
  summed by pass (forward, backward, other), layer, jax primitive and XLA kind. Lines: the
  ``--ops_top`` largest ``op`` rows (``thunk_s``, ``share``, ``calls``), then ``summary`` with
  the totals by pass, kind and primitive (``bench_ops``).
* ``data``: the training input pipeline of the config (its source, ``config.data.cache``,
  ``num_workers``, crops, MixUp, ``config.train.batch_size``) on this process, no model. Lines:
  ``ready`` (seconds to open the source and fill the cache), then ``summary`` with
  ``images_per_s`` (training crops per second over ``--steps`` batches after a warm-up).
* ``predict``: `predict.Enhancer` (the code path of ``--mode=predict``: tile layout, reflected
  context, blending, devices) on ``--batch`` random images of ``--size``, with random parameters;
  file decoding and encoding are left out. Lines: ``compile``, then ``summary`` with
  ``megapixels_per_s``, the tile layout, the tiles each device computed and the peak RSS; with
  ``--reference=1024``, also one plain forward of a 1024x1024 image and predict's slowdown
  against it (seconds per megapixel, predict over the plain forward).

Peak RSS is that of this process (GiB, from ``getrusage``: host memory, which on CPU includes
the device buffers).
"""

import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mirnet_jax import bench_model, bench_ops, predict
from mirnet_jax.bench_model import emit
from mirnet_jax.data import pipeline, sources
from mirnet_jax.models import count_params, create_model

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lol.py', 'Config file.')
_MODE = flags.DEFINE_enum(
  'mode',
  'train_step',
  ['train_step', 'forward', 'kernel_grad', 'ops', 'data', 'predict'],
  'What to time.',
)
_BATCH = flags.DEFINE_integer(
  'batch', 4, 'Global batch size (images); predict: number of images; data: unused '
  '(config.train.batch_size).'
)  # fmt: skip
_SIZE = flags.DEFINE_string('size', '128', 'Image side, or HEIGHT,WIDTH (pixels).')
_STEPS = flags.DEFINE_integer(
  'steps', 3, 'Timed steps after the compiling one; data: timed batches after the warm-up.'
)

# Strings, not enums: a bad value is reported in one line naming the flag (absl's enum error
# adds a second line), and '' means "the config's value".
_DTYPE = flags.DEFINE_string(
  'dtype', '', 'train_step/forward: compute dtype, float32 or bfloat16 (overrides '
  "config.model.dtype; '' = the config's)."
)  # fmt: skip
_REMAT = flags.DEFINE_string(
  'remat', '', 'train_step/forward: none, mrb or rrg (overrides config.train.remat; '
  "'' = the config's, else none)."
)  # fmt: skip
_COMPILE_ONLY = flags.DEFINE_bool(
  'compile_only', False, 'train_step/forward: lower and compile only; the summary has the '
  "compile time, XLA's FLOPs and memory plan, and null step figures."
)  # fmt: skip
_PEAK_TFLOPS = flags.DEFINE_float(
  'peak_tflops', 0.0, 'train_step/forward: one device\'s peak TFLOP/s for fraction_of_peak '
  '(0 = measure a float32 2048x2048 GEMM on the first device).'
)  # fmt: skip
_OPS_OF = flags.DEFINE_string(
  'ops_of', 'train_step', 'ops: the step to trace, train_step or forward.'
)
_OPS_TOP = flags.DEFINE_integer('ops_top', 40, 'ops: how many of the largest rows to print.')
_REFERENCE = flags.DEFINE_integer(
  'reference', 0, 'predict: also time one forward of a REFERENCExREFERENCE image (0 = none).'
)

_DATA_WARMUP_BATCHES = 10  # batches before timing: threads and workers reach steady state


def _size() -> tuple[int, int]:
  h, w = (int(s) for s in (_SIZE.value.split(',') * 2)[:2])
  return h, w


def bench_data(config: Any) -> None:
  """``data``: training crops per second of the config's input pipeline (no model)."""
  d = config.data
  start = time.perf_counter()
  source = sources.create_source(d, 'train')  # fills config.data.cache, if set
  iterator = pipeline.create_train_iterator(
    source,
    crop_size=d.crop_size,
    global_batch_size=config.train.batch_size,
    seed=config.seed,
    mixup=d.mixup,
    mixup_alpha=d.mixup_alpha,
    mixup_start_step=d.mixup_start_step,
    num_workers=d.num_workers,
  )
  ready_s = time.perf_counter() - start
  emit({'event': 'ready', 'mode': 'data', 'ready_s': round(ready_s, 3), 'records': len(source)})
  try:
    for _ in range(_DATA_WARMUP_BATCHES):
      batch = next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(_STEPS.value):
      batch = next(iterator)
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start  # all threads of this process, not its workers
  finally:
    iterator.close()
  rows = batch['low'].shape[0]
  emit(
    {
      'event': 'summary',
      'mode': 'data',
      'source': d.name,
      'records': len(source),
      'cache': bool(d.cache),
      'num_workers': d.num_workers,
      'batch': rows,
      'crop_size': d.crop_size,
      'mixup': bool(d.mixup),
      'batches': _STEPS.value,
      'ready_s': round(ready_s, 3),
      'batches_per_s': round(_STEPS.value / elapsed, 3),
      'images_per_s': round(_STEPS.value * rows / elapsed, 1),
      # Crops per CPU-second of this process: what the pipeline costs, whatever else runs on
      # the machine (meaningful in-process, num_workers=0 or a cache).
      'images_per_cpu_s': round(_STEPS.value * rows / max(cpu_s, 1e-9), 1),
      'load_average_1min': round(os.getloadavg()[0], 2),
      'peak_rss_gib': round(bench_model.peak_rss_gib(), 3),
      'cpus': _cpu_count(),
    }
  )


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
  except (AttributeError, OSError):
    return os.cpu_count() or 0


def bench_predict(config: Any) -> None:
  """``predict``: megapixels per second and peak RSS of `predict.Enhancer` on random images."""
  h, w = _size()
  count = _BATCH.value
  cfg = config.predict
  model = create_model(config.model)
  enhancer = predict.Enhancer(
    model,
    bench_model.random_params(model),
    tile_size=cfg.tile_size,
    tile_overlap=cfg.tile_overlap,
    bucket=cfg.bucket,
    max_tile_megapixels=cfg.max_tile_megapixels,
  )
  layout = enhancer.layout(h, w)
  start = time.perf_counter()
  enhancer.compile(h, w)
  compile_s = time.perf_counter() - start
  emit({'event': 'compile', 'mode': 'predict', 'compile_s': round(compile_s, 3)})
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)  # the values do not change the time
  enhancer.reset_counts()
  start = time.perf_counter()
  for _, out in enhancer.enhance_many((i, photo) for i in range(count)):
    assert out.shape == photo.shape
  elapsed = time.perf_counter() - start
  megapixels = count * h * w / 1e6
  peak_rss = bench_model.peak_rss_gib()  # before the reference forward, which may take more
  reference = _reference_forward(model, enhancer.params, _REFERENCE.value)
  if reference:
    reference['predict_slowdown'] = round(reference['megapixels_per_s'] * elapsed / megapixels, 3)
  emit(
    {
      'event': 'summary',
      'mode': 'predict',
      'images': count,
      'height': h,
      'width': w,
      'dtype': config.model.dtype,
      'params': count_params(enhancer.params),
      'tile_shape': list(layout.tile_shape),
      'tiles_per_image': layout.num_tiles,
      'processed_over_image_pixels': round(layout.waste, 4),
      'tiles_per_device': enhancer.tiles_per_device(),
      'compile_s': round(compile_s, 3),
      'seconds': round(elapsed, 3),
      'megapixels_per_s': round(megapixels / elapsed, 5),
      'peak_rss_gib': round(peak_rss, 3),
      'reference_forward': reference,
      'devices': bench_model.devices(),
      'jax': jax.__version__,
    }
  )


def _reference_forward(model: Any, params: Any, side: int) -> dict | None:
  """One plain jitted forward of a side x side image: the speed predict is compared with."""
  if not side:
    return None
  x = np.random.default_rng(1).random((1, side, side, 3), np.float32) * 0.3
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
  compiled = fn.lower(params, x).compile()
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, x))
  seconds = time.perf_counter() - start
  return {
    'size': side,
    'seconds': round(seconds, 3),
    'megapixels_per_s': round(side * side / 1e6 / seconds, 5),
  }


def _run(config: Any, mode: str) -> None:
  if mode in ('train_step', 'forward'):
    h, w = _size()
    bench_model.bench_model(
      config,
      mode,
      batch=_BATCH.value,
      height=h,
      width=w,
      steps=_STEPS.value,
      remat=bench_model.resolve_options(config, _DTYPE.value, _REMAT.value),
      compile_only=_COMPILE_ONLY.value,
      peak_tflops=_PEAK_TFLOPS.value,
    )
  elif mode == 'kernel_grad':
    h, w = _size()
    bench_model.bench_kernel_grad(config, batch=_BATCH.value, height=h, width=w, steps=_STEPS.value)
  elif mode == 'ops':
    h, w = _size()
    bench_ops.bench_ops(
      config,
      of=_OPS_OF.value,
      batch=_BATCH.value,
      height=h,
      width=w,
      remat=bench_model.resolve_options(config, _DTYPE.value, _REMAT.value),
      top=_OPS_TOP.value,
    )
  elif mode == 'data':
    bench_data(config)
  else:
    bench_predict(config)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    _run(_CONFIG.value, _MODE.value)
  except ValueError as e:  # bad flags and config values: one line, no traceback
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
