"""Training loop: ``train_and_evaluate(config, workdir)``.

One jitted, data-parallel step over a 1-D ``'data'`` mesh (parameters replicated, batches
split), validation at full resolution every ``config.train.eval_every_steps``, asynchronous orbax
checkpoints (latest N + best by validation PSNR, with the grain iterator position), TensorBoard
summaries through clu. A rerun with the same workdir resumes from the latest checkpoint; SIGTERM
saves and stops; a non-finite loss stops without saving the bad state.
"""

import functools
import json
import pathlib
import signal
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from mirnet_jax import baselines, checkpoints, evaluate, losses, sharding, summaries
from mirnet_jax.data import pipeline, sources
from mirnet_jax.models import create_model, param_shapes

TrainState = train_state.TrainState


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the run stopped without saving that state."""


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


def create_learning_rate_schedule(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to ``end_learning_rate`` at ``num_steps``.

  The per-step form of the official GradualWarmupScheduler + CosineAnnealingLR(eta_min=1e-6).
  """
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
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape) for path, x in leaves}


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
    _, params, _ = checkpoints.restore_params(config.train.init_from, 'best')
    _check_params(params, expected, f'config.train.init_from={config.train.init_from!r}')
    logging.info('Initialised from %s', config.train.init_from)
  else:
    m = model.size_multiple
    params = model.init(rng, jnp.zeros((1, m, m, 3), jnp.float32))['params']
  repl = sharding.replicated(mesh)
  params = jax.device_put(params, repl)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), repl)
  return TrainState(step=step, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state)


def train_step(
  state: TrainState, batch: Mapping[str, jax.Array], loss_fn: losses.LossFn
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch; pure (jit it with ``make_train_step``).

  The loss is taken on the output clamped to [0, 1], as the official code does
  (``torch.clamp(restored, 0, 1)``): pixels already saturated get no gradient.
  """

  def compute_loss(params):
    out = state.apply_fn({'params': params}, batch['low'])
    return loss_fn(jnp.clip(out.astype(jnp.float32), 0.0, 1.0), batch['high'])

  loss, grads = jax.value_and_grad(compute_loss)(state.params)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def make_train_step(
  mesh: jax.sharding.Mesh, loss_fn: losses.LossFn
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """``train_step`` jitted with explicit shardings; the incoming state is donated."""
  repl = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(train_step, loss_fn=loss_fn),
    in_shardings=(repl, sharding.batch_sharding(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def _split_state(state: TrainState) -> tuple[Any, dict]:
  return state.params, {'step': state.step, 'opt_state': state.opt_state}


def _resume(
  manager: Any, state: TrainState, train_iter: Any, config: ml_collections.ConfigDict
) -> TrainState:
  """Restores the latest checkpoint into ``state`` (and ``train_iter``) if there is one."""
  step = manager.latest_step()
  if step is None:
    return state
  stored = checkpoints.stored_config(manager, step)['model']
  wanted = config.model.to_dict()
  if stored != wanted:
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    details = ', '.join(f'{k}: {stored.get(k)!r} -> {wanted.get(k)!r}' for k in diff)
    raise ModelMismatchError(
      f'{manager.directory}/{step}: the checkpoint was written with a different config.model '
      f'({details}); use a new --workdir or the original config.model'
    )
  params, opt = checkpoints.restore(manager, step, *_split_state(state), train_iter)
  logging.info('Resumed from %s/%d', manager.directory, step)
  return state.replace(params=params, step=opt['step'], opt_state=opt['opt_state'])


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (multi-host: orbax's sync point)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, manager: Any, step: int) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.requested

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def _train_iterator(config: ml_collections.ConfigDict, source: Any) -> Any:
  """This process's grain iterator of training batches (endless, checkpointable)."""
  d = config.data
  return pipeline.create_train_iterator(
    source,
    crop_size=d.crop_size,
    global_batch_size=config.train.batch_size,
    seed=config.seed,
    mixup=d.mixup,
    mixup_alpha=d.mixup_alpha,
    mixup_start_step=d.mixup_start_step,
    num_workers=d.num_workers,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def _eval_iterator(config: ml_collections.ConfigDict, source: Any) -> Any:
  """One full-resolution pass over ``source`` in padded, masked batches."""
  return pipeline.create_eval_iterator(
    source,
    global_batch_size=config.data.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def _validate(
  params: Any, eval_step: Any, config: ml_collections.ConfigDict, mesh: Any, source: Any
) -> tuple[dict, list]:
  """Validation means at full resolution and the first (name, low, enhanced, high) images."""
  summary, _, examples = evaluate.evaluate(
    params,
    eval_step,
    _eval_iterator(config, source),
    mesh=mesh,
    num_examples=config.train.num_grid_images,
  )
  return summary, examples


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains MIRNet per ``config``, writing checkpoints and summaries under ``workdir``.

  Args:
    config: the full config (configs/lol.py schema).
    workdir: run directory; holds checkpoints/, TensorBoard events, history.jsonl and
      curves.png. Reusing it resumes the run.

  Returns:
    The final train state.

  Raises:
    NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
    ModelMismatchError: the workdir's checkpoint or ``init_from`` has another architecture.
  """
  workdir_path = pathlib.Path(workdir).absolute()
  workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh, 'config.train.batch_size')
  sharding.check_batch_size(config.data.eval_batch_size, mesh, 'config.data.eval_batch_size')
  model = create_model(config.model)
  loss_fn = losses.create_loss(config.loss)
  train_source = sources.create_source(config.data, 'train')
  eval_source = sources.create_source(config.data, 'validation')
  num_train = len(train_source)
  num_steps = num_train_steps(config, num_train)
  schedule = create_learning_rate_schedule(config.optim, num_steps)
  tx = create_optimizer(config.optim, schedule)
  root = jax.random.key(config.seed)
  state = create_train_state(config, model, tx, mesh, jax.random.fold_in(root, 0))

  train_iter = _train_iterator(config, train_source)
  manager = checkpoints.create_manager(workdir_path, config.train.keep_checkpoints)
  state = _resume(manager, state, train_iter, config)
  step = int(jax.device_get(state.step))
  p_train_step = make_train_step(mesh, loss_fn)
  eval_step = evaluate.make_eval_step(model)

  writer = summaries.create_writer(workdir_path)
  history = summaries.History(workdir_path / 'history.jsonl')
  if step == 0:
    writer.write_hparams(summaries.flatten_config(config.to_dict()))
  logging.info(
    'Training %d steps (from step %d), %d images per step over %d device(s); %d train images',
    num_steps,
    step,
    config.train.batch_size,
    mesh.devices.size,
    num_train,
  )
  preemption = _Preemption()
  progress = summaries.Progress(num_steps, step, config.train.batch_size)
  pending = None  # (step, device metrics) of the last step, fetched one step late
  interval: list[dict] = []
  last_eval = None

  def fetch(pending):
    """Host copy of a step's metrics; stops the run if its loss is not finite."""
    at, device_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not np.isfinite(values['loss']):
      raise NonFiniteLossError(
        f'loss is {values["loss"]} at step {at}; stopped without saving this state. The last '
        f'good checkpoint is kept in {manager.directory}. Lower config.optim.learning_rate or '
        'set config.optim.grad_clip_norm.'
      )
    values['learning_rate'] = float(schedule(at - 1))
    interval.append(values)
    history.add(at, loss=values['loss'])

  try:
    while step < num_steps:
      batch = sharding.global_batch(next(train_iter), mesh)
      state, device_metrics = p_train_step(state, batch)
      step += 1
      if pending is not None:
        fetch(pending)  # overlaps with the step just dispatched
      pending = (step, device_metrics)
      is_last = step == num_steps
      stop = preemption.reached(manager, step)
      if step % config.train.log_every_steps == 0 or is_last or stop:
        fetch(pending)
        pending = None
        scalars = {f'train/{k}': float(np.mean([m[k] for m in interval])) for k in interval[0]}
        scalars.update(progress.update(step))
        writer.write_scalars(step, scalars)
        logging.info('%s', progress.line(step, scalars['train/loss']))
        interval = []
      eval_every = config.train.eval_every_steps
      do_eval = is_last or (eval_every > 0 and step % eval_every == 0)
      eval_metrics = None
      if do_eval:
        with progress.paused():
          eval_metrics, examples = _validate(state.params, eval_step, config, mesh, eval_source)
        writer.write_scalars(
          step, {f'eval/{k}': v for k, v in eval_metrics.items() if k != 'num_images'}
        )
        writer.write_images(step, summaries.image_grids(examples))
        history.add(step, psnr=eval_metrics['psnr'])
        last_eval = eval_metrics
        logging.info(
          'step %d: validation PSNR %.3f dB, SSIM %.4f',
          step,
          eval_metrics['psnr'],
          eval_metrics['ssim'],
        )
      if step % config.train.checkpoint_every_steps == 0 or is_last or do_eval or stop:
        if pending is not None:
          fetch(pending)  # never save a state whose loss was not checked
          pending = None
        best = None if eval_metrics is None else {'psnr': float(eval_metrics['psnr'])}
        checkpoints.save(manager, step, *_split_state(state), train_iter, config.to_dict(), best)
      writer.flush()
      if stop:
        logging.warning('SIGTERM: saved step %d in %s; exiting', step, manager.directory)
        break
  finally:
    preemption.close()
    train_iter.close()  # stops grain's worker processes now, not at garbage collection
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    history.close()

  if jax.process_index() == 0:
    summaries.plot_curves(workdir_path / 'history.jsonl', workdir_path / 'curves.png')
  if last_eval is not None and step == num_steps:
    identity = evaluate.make_baseline_step(baselines.identity)
    dark, _ = _validate(None, identity, config, None, eval_source)
    logging.info(
      'Final validation PSNR %.3f dB, SSIM %.4f; dark input %.3f dB, SSIM %.4f (%+.3f dB)',
      last_eval['psnr'],
      last_eval['ssim'],
      dark['psnr'],
      dark['ssim'],
      last_eval['psnr'] - dark['psnr'],
    )
    summary = {'step': step, 'validation': last_eval, 'dark_input': dark}
    if jax.process_index() == 0:
      (workdir_path / 'final_metrics.json').write_text(json.dumps(summary, indent=2) + '\n')
  writer.close()
  return state
