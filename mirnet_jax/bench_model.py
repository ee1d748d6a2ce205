"""benchmark.py's ``train_step``, ``forward`` and ``kernel_grad`` modes, and the helpers every
mode shares.

The step is lowered and compiled from abstract arguments (shapes only), so ``compile_only``
reports XLA's FLOPs and memory plan of a paper-size step without allocating its buffers; the
timed run then feeds random parameters and images (the timings do not depend on the values).
"""

import json
import resource
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mirnet_jax import bench_xla, config_checks, losses, sharding, train, train_state
from mirnet_jax.models import count_params, create_model, ops, param_shapes, stream_shapes
from mirnet_jax.models.mirnet import REMAT


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def rss_gib() -> float | None:
  """This process's resident memory now (None off Linux): with ``peak_rss_gib`` in each event,
  it shows which phase (compile, buffers, steps) sets the peak."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * resource.getpagesize() / 2**30
  except (OSError, ValueError, IndexError):
    return None


def memory_now() -> dict:
  """``rss_gib`` and ``peak_rss_gib`` so far, rounded, for a progress event."""
  now = rss_gib()
  return {
    'rss_gib': None if now is None else round(now, 3),
    'peak_rss_gib': round(peak_rss_gib(), 3),
  }


def devices() -> str:
  return f'{jax.device_count()} x {jax.devices()[0].device_kind}'


def random_params(model: Any, seed: int = 0) -> Any:
  """Random parameters from the shapes alone (an eager init of MIRNet takes minutes on CPU).

  Kernels are scaled by 1/sqrt(fan-in), so activations stay finite and normal through the
  network (infinities or subnormal floats could change the speed); the rest is zero.
  """
  rng = np.random.default_rng(seed)

  def init(s: jax.ShapeDtypeStruct) -> np.ndarray:
    if len(s.shape) < 2:
      return np.zeros(s.shape, np.float32)
    return (rng.normal(0, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

  return jax.tree.map(init, param_shapes(model))


def resolve_options(config: Any, dtype: str = '', remat: str = '') -> str:
  """Applies ``--dtype`` to ``config.model.dtype``; returns the remat policy of the run.

  ``remat`` ('' = ``config.train.remat`` when the config has it, else 'none') is one of
  ``models.mirnet.REMAT``.

  Raises:
    ValueError: a bad value, in one line naming the flag or the config key.
  """
  if dtype:
    if dtype not in config_checks.SUPPORTED_DTYPES:
      raise ValueError(
        f'--dtype={dtype!r}: must be one of {", ".join(config_checks.SUPPORTED_DTYPES)} '
        '(overrides config.model.dtype)'
      )
    config.model.dtype = dtype
  where = '--remat'
  if not remat:
    remat, where = config.train.get('remat', 'none'), 'config.train.remat'
  if remat not in REMAT:
    raise ValueError(
      f'{where}={remat!r}: must be one of {", ".join(REMAT)}'
      + (' (overrides config.train.remat)' if where == '--remat' else '')
    )
  return remat


def _step_function(config: Any, model: Any, mode: str, mesh: Any, batch: int, h: int, w: int):
  """The jitted step and its abstract arguments (shapes, no buffers: compiling allocates none).

  Returns:
    ``(fn, abstract_args, tx)``; ``tx`` is the optimiser (train_step) or None (forward).
  """
  sharding.check_batch_size(batch, mesh, '--batch')
  image = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  params = param_shapes(model)
  if mode == 'forward':
    repl = sharding.replicated(mesh)
    fn = jax.jit(
      lambda p, x: model.apply({'params': p}, x),
      in_shardings=(repl, sharding.batch_sharding(mesh)),
      out_shardings=sharding.batch_sharding(mesh),
    )
    return fn, (params, image), None
  schedule = train.create_learning_rate_schedule(config.optim, 1000)
  tx = train.create_optimizer(config.optim, schedule)
  state = train.TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    apply_fn=model.apply,
    params=params,
    tx=tx,
    opt_state=jax.eval_shape(tx.init, params),
  )
  clamp = config.loss.get('clamp_output', True)
  fn = train.make_train_step(mesh, losses.create_loss(config.loss), clamp_output=clamp)
  return fn, (state, {'low': image, 'high': image}), tx


def concrete_args(abstract: tuple, model: Any, tx: Any, mesh: Any) -> tuple:
  """Random buffers for ``abstract`` (random parameters, images, a fresh optimiser state)."""
  repl = sharding.replicated(mesh)
  params = jax.device_put(random_params(model), repl)
  batch, h, w, _ = (abstract[1] if tx is None else abstract[1]['low']).shape
  rng = np.random.default_rng(0)
  images = sharding.global_batch(
    {
      'low': rng.random((batch, h, w, 3), np.float32) * 0.2,
      'high': rng.random((batch, h, w, 3), np.float32),
    },
    mesh,
  )
  if tx is None:
    return params, images['low']
  state = abstract[0].replace(
    step=jax.device_put(jnp.zeros((), jnp.int32), repl),
    params=params,
    opt_state=jax.jit(tx.init, out_shardings=repl)(params),
  )
  return state, images


class CompiledStep(NamedTuple):
  """A compiled ``train_step`` or ``forward`` of the config's model, from shapes alone."""

  model: Any
  compiled: Any
  abstract: tuple  # the abstract arguments it was compiled for
  tx: Any  # the optimiser (train_step) or None (forward)
  mesh: Any
  compile_s: float

  def args(self) -> tuple:
    """Random buffers for the step's arguments (``concrete_args``)."""
    return concrete_args(self.abstract, self.model, self.tx, self.mesh)

  def fields(self, config: Any, batch: int, height: int, width: int, remat: str) -> dict:
    """The summary keys every mode that runs a step reports, in this order."""
    return {
      'batch': batch,
      'height': height,
      'width': width,
      'dtype': config.model.dtype,
      'remat': remat,
      'conv_kernel_grad': self.model.conv_kernel_grad,
    }


def compile_step(
  config: Any, mode: str, batch: int, height: int, width: int, remat: str
) -> CompiledStep:
  """Builds the model (``config.train.conv_kernel_grad``, ``remat``) and lowers and compiles
  its ``mode`` step, then hands the compiler's freed memory back as the trainer does."""
  mesh = sharding.create_mesh()
  kernel_grad = config.train.get('conv_kernel_grad', 'auto')
  model = create_model(config.model, remat=remat, conv_kernel_grad=kernel_grad)
  if mode == 'train_step':  # the form training would pick for this step ('auto': measured)
    per_device = max(batch // mesh.devices.size, 1)
    form, _ = train_state.measured_kernel_grad(kernel_grad, model, per_device, height, width)
    model = model.clone(conv_kernel_grad=form)
  fn, abstract, tx = _step_function(config, model, mode, mesh, batch, height, width)
  start = time.perf_counter()
  compiled = fn.lower(*abstract).compile()
  compile_s = time.perf_counter() - start
  train_state.release_host_memory()  # as the trainer does after each compile
  return CompiledStep(model, compiled, abstract, tx, mesh, compile_s)


def bench_model(
  config: Any,
  mode: str,
  *,
  batch: int,
  height: int,
  width: int,
  steps: int,
  remat: str = 'none',
  compile_only: bool = False,
  peak_tflops: float = 0.0,
  emit: Callable[[dict], None] = emit,
) -> dict:
  """``train_step`` or ``forward``: compile time, XLA's FLOPs and memory plan, step times.

  Emits ``compile``, then (unless ``compile_only``) ``buffers`` once the arguments exist and one
  ``step`` per timed step, each of these with ``rss_gib`` and ``peak_rss_gib``; then ``summary``
  (returned too). ``peak_tflops`` 0 measures an f32 GEMM (``bench_xla.gemm_tflops``), except
  with ``compile_only``, where nothing is timed and the peak stays None unless given.
  """
  step = compile_step(config, mode, batch, height, width, remat)
  compiled, abstract, tx, compile_s = step.compiled, step.abstract, step.tx, step.compile_s
  emit({'event': 'compile', 'mode': mode, 'compile_s': round(compile_s, 3), **memory_now()})
  step_times = []
  if not compile_only:
    args = step.args()
    emit({'event': 'buffers', **memory_now()})
    for i in range(steps + 1):
      start = time.perf_counter()
      out = compiled(*args)
      jax.block_until_ready(out)
      elapsed = time.perf_counter() - start
      if mode == 'train_step':
        args = (out[0], args[1])  # the state was donated
      if i > 0:  # the first call also allocates and warms caches
        step_times.append(elapsed)
        emit({'event': 'step', 'step': i, 'step_s': round(elapsed, 4), **memory_now()})
  median = float(np.median(step_times)) if step_times else None
  # Read before the GEMM below, whose compile would count otherwise (0.25 GiB under tcmalloc,
  # which keeps what the compiler frees): the peak is that of the compile and the steps.
  step_peak_rss_gib = round(peak_rss_gib(), 3)
  peak_source = 'flag' if peak_tflops > 0 else None
  if peak_tflops <= 0:
    peak_tflops = None if compile_only else bench_xla.gemm_tflops()
    peak_source = None if compile_only else 'measured_f32_gemm'
  flops_per_step = bench_xla.flops(compiled)
  summary = {
    'event': 'summary',
    'mode': mode,
    'compile_only': compile_only,
    **step.fields(config, batch, height, width, remat),
    'params': count_params(abstract[0] if tx is None else abstract[0].params),
    'compile_s': round(compile_s, 3),
    'step_s_median': None if median is None else round(median, 4),
    'steps_per_s': None if median is None else round(1 / median, 5),
    'images_per_s': None if median is None else round(batch / median, 4),
    'flops_per_step': flops_per_step,
    **bench_xla.throughput(flops_per_step, median, peak_tflops),
    'peak_tflops': bench_xla.significant(peak_tflops),
    'peak_source': peak_source,
    **bench_xla.memory(compiled),
    'peak_bytes_in_use': bench_xla.device_peak_bytes(),
    'peak_rss_gib': step_peak_rss_gib,
    'host_allocator': train_state.host_allocator(),  # malloc decides page faults on CPU
    'devices': devices(),
    'jax': jax.__version__,
  }
  emit(summary)
  return summary


def bench_kernel_grad(
  config: Any, *, batch: int, height: int, width: int, steps: int, emit: Callable = emit
) -> dict:
  """Times the two forms of ``config.train.conv_kernel_grad`` ('taps', 'xla', models/ops.py)
  on one 3x3 kernel gradient per stream of the config's model at this batch and crop.

  One ``kernel_grad`` line per stream (milliseconds, medians of ``steps`` calls), then a
  ``summary`` with the sums, the faster form and what 'auto' resolves to here. The whole train
  step with each form (``--config.train.conv_kernel_grad=taps`` / ``=xla``) settles it.
  """
  model = create_model(config.model)
  totals = {'taps': 0.0, 'xla': 0.0}
  for shape in stream_shapes(model, batch, height, width):
    ms = ops.time_kernel_grads([shape], repeats=steps)
    for form, value in ms.items():
      totals[form] += value
    emit(
      {
        'event': 'kernel_grad',
        'shape': list(shape),
        **{f'{k}_ms': round(v, 3) for k, v in ms.items()},
      }
    )
  summary = {
    'event': 'summary',
    'mode': 'kernel_grad',
    'batch': batch,
    'height': height,
    'width': width,
    'taps_ms': round(totals['taps'], 3),
    'xla_ms': round(totals['xla'], 3),
    'faster': min(totals, key=totals.get),
    'auto': ops.resolve_kernel_grad('auto', times_ms=totals),
    'devices': devices(),
    'jax': jax.__version__,
  }
  emit(summary)
  return summary
