"""The train state and its step: optimiser, learning-rate schedule, initialisation, train_step.

``train.py`` runs the loop; this module holds what one optimiser step is made of, so that the
step can be built and tested without a workdir.
"""

import ctypes
import functools
import gc
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from flax.training import train_state

from mirnet_jax import checkpoints, distributed, losses, schedules, sharding
from mirnet_jax.models import ops, param_shapes, stream_shapes
from mirnet_jax.models.mirnet import DEFAULT_ARCH

TrainState = train_state.TrainState


class NonFiniteLossError(RuntimeError):
  """The loss, gradient norm or updated parameters became NaN or Inf; that state is not saved."""


class ModelMismatchError(ValueError):
  """A checkpoint's model differs from the configured one."""


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  """Optimiser steps of the run: ``num_epochs`` (when > 0) over the train split, else num_steps."""
  if config.train.num_epochs > 0:
    return max(
      1, int(np.ceil(config.train.num_epochs * num_train_images / config.train.batch_size))
    )
  if config.train.num_steps <= 0:
    raise ValueError('config.train.num_steps must be > 0 when config.train.num_epochs is 0')
  return int(config.train.num_steps)


SCHEDULES = ('warmup_cosine', 'cosine_restart_cyclic')


def create_learning_rate_schedule(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.Schedule:
  """The learning rate per optimiser step, as ``config.optim.schedule`` names it.

  'warmup_cosine' (the default, also for configs without the key): linear warm-up from 0, then
  cosine decay to ``end_learning_rate`` at ``num_steps``, the per-step form of MIRNet's
  GradualWarmupScheduler + CosineAnnealingLR(eta_min=1e-6). 'cosine_restart_cyclic': BasicSR's
  CosineAnnealingRestartCyclicLR over ``restart_*`` (MIRNet-v2, ``schedules.py``).

  Raises:
    ValueError: unknown schedule name (the message names the key).
  """
  name = optim.get('schedule', 'warmup_cosine')
  if name == 'cosine_restart_cyclic':
    return schedules.cosine_restart_cyclic_from_config(optim)
  if name != 'warmup_cosine':
    raise ValueError(f'config.optim.schedule={name!r}: must be one of {", ".join(SCHEDULES)}')
  warmup = min(int(optim.warmup_steps), num_steps - 1)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.learning_rate,
    warmup_steps=max(warmup, 0),
    decay_steps=num_steps,
    end_value=optim.end_learning_rate,
  )


def create_optimizer(
  optim: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """Adam (AdamW when ``weight_decay`` > 0), after optional global-norm clipping."""
  if optim.weight_decay > 0:
    opt = optax.adamw(schedule, optim.beta1, optim.beta2, weight_decay=optim.weight_decay)
  else:
    opt = optax.adam(schedule, optim.beta1, optim.beta2)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
  return opt


def _param_shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{'rrg_0/mrb_0/.../kernel': shape}`` for every leaf of a parameter tree."""
  flat = traverse_util.flatten_dict(dict(tree), sep='/')
  return {key: tuple(x.shape) for key, x in flat.items()}


def check_architecture(stored: Any, wanted: Any, where: str) -> None:
  """Raises naming both architectures when ``stored`` (a model config) is not ``wanted``'s.

  A stored config without ``arch`` (written before MIRNet-v2 existed) means MIRNet.
  """
  stored_arch = stored.get('arch', DEFAULT_ARCH)
  wanted_arch = wanted.get('arch', DEFAULT_ARCH)
  if stored_arch != wanted_arch:
    raise ModelMismatchError(
      f'{where}: holds a {stored_arch!r} model but config.model.arch is {wanted_arch!r}; '
      f'use --config.model.arch={stored_arch} (and its config) or other weights'
    )


def _check_params(params: Any, expected: Any, where: str, max_listed: int = 8) -> None:
  """Raises naming ``where`` and the differing keys unless ``params`` fits ``expected``."""
  got, want = _param_shapes_by_path(params), _param_shapes_by_path(expected)
  if got == want:
    return
  diff = []
  for key in sorted(set(got) | set(want)):
    if key not in want:
      diff.append(f'{key} (only in the weights)')
    elif key not in got:
      diff.append(f'{key} (only in config.model)')
    elif got[key] != want[key]:
      diff.append(f'{key}: weights {got[key]}, config.model {want[key]}')
  listed = '; '.join(diff[:max_listed]) + (
    f'; ... {len(diff) - max_listed} more' if len(diff) > max_listed else ''
  )
  raise ModelMismatchError(
    f'{where}: its parameters do not fit config.model (different architecture): '
    f'{len(diff)} keys differ: {listed}; use the same config.model as the run that wrote them'
  )


def create_train_state(
  config: ml_collections.ConfigDict,
  model: Any,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  rng: jax.Array,
) -> TrainState:
  """A replicated TrainState: random init, or ``config.train.init_from`` when set.

  Initialisation runs eagerly on a tiny input (jitting MIRNet's init takes minutes).
  """
  expected = param_shapes(model)
  if config.train.init_from:
    stored, params, _ = checkpoints.restore_params(config.train.init_from, 'best')
    where = f'config.train.init_from={config.train.init_from!r}'
    check_architecture(stored, config.model, where)
    _check_params(params, expected, where)
    logging.info('Initialised from %s', config.train.init_from)
  else:
    m = model.size_multiple
    params = model.init(rng, jnp.zeros((1, m, m, 3), jnp.float32))['params']
  distributed.barrier('train_state')  # the slow eager init ends at different times
  repl = sharding.replicated(mesh)
  params = jax.device_put(params, repl)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), repl)
  return TrainState(step=step, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state)


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  loss_fn: losses.LossFn,
  clamp_output: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch; pure (jit it with ``make_train_step``).

  With ``clamp_output`` (``config.loss.clamp_output``, MIRNet) the loss is taken on the output
  clamped to [0, 1], as the official MIRNet code does (``torch.clamp(restored, 0, 1)``): pixels
  already saturated get no gradient. Without it (MIRNet-v2's BasicSR loop) the loss sees the
  raw output.
  """

  def compute_loss(params):
    out = state.apply_fn({'params': params}, batch['low']).astype(jnp.float32)
    if clamp_output:
      out = jnp.clip(out, 0.0, 1.0)
    return loss_fn(out, batch['high'])

  loss, grads = jax.value_and_grad(compute_loss)(state.params)
  new_state = state.apply_gradients(grads=grads)
  grad_norm = optax.tree.norm(grads)
  # The loss is computed from the parameters before the update; a finite loss can still come
  # with an infinite gradient or overflowing updated parameters, which must never be saved.
  params_finite = jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_state.params)])
  )
  metrics = {
    'loss': loss,
    'grad_norm': grad_norm,
    'params_finite': params_finite.astype(jnp.float32),
  }
  return new_state, metrics


# XLA:CPU's default scheduler orders the step for concurrency: it runs work off the critical
# path (the kernel gradients, remat's recomputations) as early as it can, which keeps their
# inputs and results alive together. On the paper configuration at 4 x 128x128 it plans 16.6
# GiB of temporaries against 9.5 GiB with the memory-optimised scheduler, and the step is
# faster with the latter (47-50 s against 55 s on the README's 2-core machine): the copies
# cost more than the concurrency gains. Other backends schedule for memory already.
#
# XLA:CPU also runs a CSE pass after it has removed the optimisation barriers by which
# jax.checkpoint keeps a recomputation apart from the forward pass; that pass merges the start
# of every rematerialised block back into the forward, whose values are then kept for the
# whole step (0.34 GB of the paper plan with 'mrb'; in a toy, all of the recomputation).
# No pass named 'cse' runs: without remat it had next to nothing to merge (+0.2% FLOPs).
CPU_COMPILER_OPTIONS = {
  'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
  'xla_disable_hlo_passes': 'cse',
}


def measured_kernel_grad(
  form: str, model: Any, batch: int, height: int, width: int, stored: str | None = None
) -> tuple[str, dict[str, float] | None]:
  """The kernel-gradient form (``config.train.conv_kernel_grad``) a training run traces with,
  and the timings it was chosen by (None when nothing was measured).

  'taps' and 'xla' are taken as given, and 'auto' is XLA's rule off the CPU. On the CPU it is
  ``stored`` when resuming (the form the checkpoint was trained with, so that the resumed run
  computes what the uninterrupted one would; 'auto' in a checkpoint of an earlier version meant
  the taps), else the form ``ops.resolve_kernel_grad`` picks from ``ops.time_kernel_grads`` on
  one kernel gradient per stream at this batch and crop (a few seconds). Process 0's choice
  is every process's: they must all trace the same program.
  """
  if form != 'auto' or jax.default_backend() != 'cpu':
    return ops.resolve_kernel_grad(form), None
  if stored in ('taps', 'xla'):
    return stored, None
  if stored == 'auto':
    return 'taps', None
  # The times grow with the batch, their ratio hardly: at most 4 images keep the measurement
  # to a few seconds.
  times = ops.time_kernel_grads(stream_shapes(model, min(batch, 4), height, width))
  chosen = ops.resolve_kernel_grad('auto', 'cpu', times)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    index = multihost_utils.broadcast_one_to_all(np.int32(ops.KERNEL_GRADS.index(chosen)))
    chosen = ops.KERNEL_GRADS[int(index)]
  return chosen, times


def run_kernel_grad(
  config: ml_collections.ConfigDict, manager: Any, step: int, model: Any, stage: Any, mesh: Any
) -> str:
  """The kernel-gradient form this run traces with (``measured_kernel_grad``): on a resume
  the one its checkpoint was trained with, unless the config names one."""
  stored = None
  if step > 0:
    stored = checkpoints.stored_config(manager, step).get('train', {})
    stored = stored.get('conv_kernel_grad', 'auto')
  batch = stage.batch_size // mesh.devices.size
  size = stage.crop_size
  wanted = config.train.get('conv_kernel_grad', 'auto')
  form, times = measured_kernel_grad(wanted, model, batch, size, size, stored)
  if times is not None:
    logging.info(
      'config.train.conv_kernel_grad=auto: %s on this CPU (one 3x3 kernel gradient per stream '
      'at %dx%d: taps %.1f ms, xla %.1f ms); the checkpoints keep it for a resume',
      form,
      size,
      size,
      times['taps'],
      times['xla'],
    )
  elif wanted == 'auto' and stored is not None and jax.default_backend() == 'cpu':
    logging.info('config.train.conv_kernel_grad=auto: %s, as the run so far', form)
  return form


def allocator_of(address: int, maps: str) -> str:
  """The malloc that the function at ``address`` belongs to, from ``/proc/self/maps`` text.

  ``tcmalloc``, ``jemalloc`` or ``mimalloc`` when the mapping holding ``address`` is that
  library's, ``glibc`` when it is libc's, else ``unknown``. The address of ``malloc`` as the
  dynamic linker resolves it names the allocator that the process really runs on: a library
  merely loaded (without ``LD_PRELOAD``) maps its file but does not interpose ``malloc``.
  """
  for line in maps.splitlines():
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or '-' not in fields[0]:
      continue
    start, end = (int(x, 16) for x in fields[0].split('-'))
    if start <= address < end:
      name = fields[5].rsplit('/', 1)[-1]
      for lib in ('tcmalloc', 'jemalloc', 'mimalloc'):
        if lib in name:
          return lib
      return 'glibc' if name.startswith('libc.so') or name.startswith('libc-') else 'unknown'
  return 'unknown'


def host_allocator() -> str:
  """This process's malloc (``allocator_of``); ``unknown`` where /proc is not there."""
  try:
    address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    with open('/proc/self/maps') as f:
      return allocator_of(address, f.read())
  except (OSError, AttributeError, ValueError, TypeError):
    return 'unknown'


def allocator_hint(backend: str, allocator: str, remat: str) -> str | None:
  """A line for the log when a CPU run without remat is on glibc's malloc, whose fresh
  mappings of the step's buffers cost page faults every step; else None. With remat the
  step's buffers are few and small: tcmalloc saved nothing there (README "Performance")."""
  if backend != 'cpu' or allocator != 'glibc' or remat != 'none':
    return None
  return (
    'host malloc is glibc: on CPU without remat the train step ran about 1.17x faster under '
    'tcmalloc, LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4, and about 1.1x '
    'with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where nothing can be installed '
    '(README "Performance")'
  )


def release_host_memory() -> None:
  """Hands the host memory that the process has freed back to the operating system.

  glibc keeps freed heap pages resident for reuse. XLA's compile of the paper train step
  frees ~1.5 GiB that way, which the step cannot reuse (its buffers are fresh mappings), so
  it stays on top of the step's own memory: peak RSS 9.6 GiB for a 7.9 GiB plan.
  ``malloc_trim(0)`` returns it; no library does this for us. Under tcmalloc
  (``LD_PRELOAD``, README "Performance") its ``MallocExtension_ReleaseFreeMemory`` does the
  same; with another allocator nothing is released here.
  First jax's tracing and lowering caches are dropped (``jax.clear_caches``; ~0.09 GiB of
  jaxprs for the paper step): the callers keep their compiled programs (``SyncedJit``), and a
  small jitted function used again is traced again.
  """
  jax.clear_caches()
  gc.collect()
  allocator = host_allocator()
  try:
    if allocator == 'tcmalloc':
      ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
    else:
      ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
    pass


def compiler_options() -> dict[str, str]:
  """XLA options for compiling the train step on this process's backend."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == 'cpu' else {}


def make_train_step(
  mesh: jax.sharding.Mesh, loss_fn: losses.LossFn, clamp_output: bool = True
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """``train_step`` jitted with explicit shardings; the incoming state is donated.

  jit compiles once per batch shape: once per progressive stage, never per step.
  """
  repl = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(train_step, loss_fn=loss_fn, clamp_output=clamp_output),
    in_shardings=(repl, sharding.batch_sharding(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=0,
    compiler_options=compiler_options(),
  )
