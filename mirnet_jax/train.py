"""Training loop: ``train_and_evaluate(config, workdir)``.

One jitted, data-parallel step over a 1-D ``'data'`` mesh (parameters replicated, batches
split), validation at full resolution every ``config.train.eval_every_steps``, asynchronous orbax
checkpoints (latest N + best by validation PSNR, with the data iterator position), TensorBoard
summaries through clu. The workdir may be local or remote (``gs://...``, any ``etils.epath``
scheme). A rerun with the same workdir resumes from the newest readable checkpoint (on any
number of processes); SIGTERM saves and stops (on several processes at orbax's preemption sync
point); a non-finite loss, gradient norm or parameter stops without saving the bad state.

Progressive training (MIRNet-v2's recipe, ``config.train.stage_*``): the crop size and global
batch change at stage boundaries; ``stages.py`` opens one train iterator per stage and jit
compiles the step once per stage shape. The checkpointed iterator state is the global step, so
a rerun resumes inside any stage. The learning rate follows ``config.optim.schedule`` by global
step.

``config.train.remat`` picks what the backward pass recomputes (memory, not architecture: a run
resumes under another value). ``config.train.profile_steps`` > 0 writes a jax.profiler trace of
that many steps, after ``profile_start_step`` steps of this run, to
``WORKDIR/plugins/profile/<time>/`` (``summaries.Trace``), where TensorBoard's profile plugin
finds it.

The state and its step live in ``train_state.py`` and are re-exported here.
"""

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mirnet_jax import (
  baselines,
  checkpoints,
  distributed,
  evaluate,
  losses,
  paths,
  schedules,
  sharding,
  stages,
  summaries,
)
from mirnet_jax.data import pipeline, sources
from mirnet_jax.models import create_model, model_config
from mirnet_jax.train_state import (  # noqa: F401 - the public names of the trainer
  ModelMismatchError,
  NonFiniteLossError,
  TrainState,
  _check_params,
  _param_shapes_by_path,
  allocator_hint,
  check_architecture,
  create_learning_rate_schedule,
  create_optimizer,
  create_train_state,
  host_allocator,
  make_train_step,
  num_train_steps,
  release_host_memory,
  run_kernel_grad,
  train_step,
)


def _split_state(state: TrainState) -> tuple[Any, dict]:
  return state.params, {'step': state.step, 'opt_state': state.opt_state}


def _check_model(manager: Any, step: int, config: ml_collections.ConfigDict) -> None:
  """Raises ModelMismatchError unless checkpoint ``step`` has the configured model."""
  where = f'{manager.directory}/{step}'
  check_architecture(checkpoints.stored_config(manager, step)['model'], config.model, where)
  # Canonical forms: every default filled in, so a config written before a key existed (arch,
  # say) still matches the same model.
  stored = model_config(create_model(checkpoints.stored_config(manager, step)['model']))
  wanted = model_config(create_model(config.model))
  if stored != wanted:
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    details = ', '.join(f'{k}: {stored.get(k)!r} -> {wanted.get(k)!r}' for k in diff)
    raise ModelMismatchError(
      f'{where}: the checkpoint was written with a different config.model '
      f'({details}); use a new --workdir or the original config.model'
    )


def _resume(
  manager: Any, state: TrainState, train_iter: Any, config: ml_collections.ConfigDict
) -> TrainState:
  """Restores the newest readable checkpoint into ``state`` (and ``train_iter``), if any.

  An unreadable checkpoint is moved aside with one warning (``checkpoints.restore_latest``).
  """
  restored = checkpoints.restore_latest(
    manager,
    *_split_state(state),
    train_iter,
    check=lambda step: _check_model(manager, step, config),
  )
  if restored is None:
    return state
  step, params, opt = restored
  logging.info('Resumed from %s/%d', manager.directory, step)
  return state.replace(params=params, step=opt['step'], opt_state=opt['opt_state'])


def _train_iterator(config: ml_collections.ConfigDict, source: Any, run_stages: Any) -> Any:
  """This process's iterator of training batches (endless, checkpointable, stage by stage)."""
  return stages.create_staged_iterator(
    config,
    source,
    run_stages,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def _run_stages(config: ml_collections.ConfigDict, num_steps: int, mesh: Any) -> tuple:
  """The run's stages; the start-up error names the key when a batch does not fit the mesh."""
  if not tuple(config.train.get('stage_steps', ())):
    sharding.check_batch_size(config.train.batch_size, mesh, 'config.train.batch_size')
  run_stages = schedules.progressive_stages(config, num_steps, batch_multiple=mesh.devices.size)
  if len(run_stages) < len(config.train.get('stage_steps', ())):
    logging.warning(
      'config.train.num_steps=%d ends in stage %d of %d: the later stages do not run',
      num_steps,
      len(run_stages),
      len(config.train.stage_steps),
    )
  return run_stages


def _eval_iterator(batch_size: int, source: Any) -> Any:
  """One full-resolution pass over ``source`` in padded, masked batches."""
  return pipeline.create_eval_iterator(
    source,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def _validate(params: Any, eval_step: Any, config: Any, batch_size: int, mesh: Any, source: Any):
  """Validation means at full resolution and the first (name, low, enhanced, high) images."""
  summary, _, examples = evaluate.evaluate(
    params,
    eval_step,
    _eval_iterator(batch_size, source),
    mesh=mesh,
    num_examples=config.train.num_grid_images,
  )
  return summary, examples


def _nonfinite_message(values: dict, at: int, saved: int | None, directory: Any) -> str | None:
  """The error of a step whose loss, gradient norm or updated parameters are not finite."""
  bad = [f'{k} is {values[k]}' for k in ('loss', 'grad_norm') if not np.isfinite(values[k])]
  if values.get('params_finite', 1.0) != 1.0:
    bad.append('the updated parameters are not finite')
  if not bad:
    return None
  kept = (
    f'The last good checkpoint, step {saved}, is kept in {directory}.'
    if saved is not None
    else f'No checkpoint was written yet (nothing in {directory}).'
  )
  return (
    f'{"; ".join(bad)} at step {at}; stopped without saving this state. {kept} Lower '
    'config.optim.learning_rate or set config.optim.grad_clip_norm.'
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> TrainState:
  """Trains MIRNet per ``config``, writing checkpoints and summaries under ``workdir``.

  Args:
    config: the full config (configs/lol.py schema).
    workdir: run directory (local or ``gs://...``); holds checkpoints/, TensorBoard events,
      history.jsonl, curves.png and final_metrics.json. Reusing it resumes the run.

  Returns:
    The final train state.

  Raises:
    NonFiniteLossError: the loss, gradient norm or parameters became NaN/Inf (the last good
      checkpoint is kept).
    ModelMismatchError: the workdir's checkpoint or ``init_from`` has another architecture.
  """
  try:
    return _train_and_evaluate(config, workdir)
  except jax.errors.JaxRuntimeError as e:
    distributed.check_collective_error(e)  # a lost peer ends the process here, in one line
    distributed.mark_failed()
    raise
  except BaseException:
    distributed.mark_failed()  # the other processes stop too instead of waiting for this one
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> TrainState:
  workdir_path = paths.as_path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = sharding.create_mesh()
  eval_batch = sharding.eval_batch_size(config.data.eval_batch_size, mesh)
  # Remat only changes what the backward pass keeps; validation runs the plain forward.
  model = create_model(
    config.model,
    remat=config.train.get('remat', 'none'),
    conv_kernel_grad=config.train.get('conv_kernel_grad', 'auto'),
  )
  eval_model = create_model(config.model)
  loss_fn = losses.create_loss(config.loss)
  train_source = sources.create_source(config.data, 'train')
  eval_source = sources.create_source(config.data, 'validation')
  num_train = len(train_source)
  num_steps = num_train_steps(config, num_train)
  run_stages = _run_stages(config, num_steps, mesh)
  schedule = create_learning_rate_schedule(config.optim, num_steps)
  tx = create_optimizer(config.optim, schedule)
  root = jax.random.key(config.seed)
  state = create_train_state(config, model, tx, mesh, jax.random.fold_in(root, 0))

  train_iter = _train_iterator(config, train_source, run_stages)
  manager = checkpoints.create_manager(workdir_path, config.train.keep_checkpoints)
  state = _resume(manager, state, train_iter, config)
  step = int(jax.device_get(state.step))
  form = run_kernel_grad(config, manager, step, model, schedules.stage_at(run_stages, step), mesh)
  if form != model.conv_kernel_grad:
    model = model.clone(conv_kernel_grad=form)
    state = state.replace(apply_fn=model.apply)
  saved_config = config.to_dict()  # with the form traced, which a resumed run keeps
  saved_config['train']['conv_kernel_grad'] = form
  saved = step if step > 0 else None  # the newest complete checkpoint
  p_train_step = distributed.SyncedJit(
    make_train_step(mesh, loss_fn, config.loss.get('clamp_output', True)), release_host_memory
  )
  eval_step = distributed.SyncedJit(evaluate.make_eval_step(eval_model), release_host_memory)

  # Only process 0 writes summaries, history and plots (the others get silent writers).
  writer = summaries.create_writer(workdir_path)
  history = summaries.History(workdir_path / 'history.jsonl')
  if step == 0:
    writer.write_hparams(summaries.flatten_config(config.to_dict()))
  logging.info(
    'Training %d steps (from step %d), %s images per step over %d device(s); %d train images',
    num_steps,
    step,
    '/'.join(str(s.batch_size) for s in run_stages),
    mesh.devices.size,
    num_train,
  )
  remat = config.train.get('remat', 'none')
  if hint := allocator_hint(jax.default_backend(), host_allocator(), remat):
    logging.info('%s', hint)
  preemption = distributed.Preemption()
  stage = schedules.stage_at(run_stages, step)
  progress = summaries.Progress(num_steps, step, stage.batch_size)
  pending = None  # (step, device metrics) of the last step, fetched one step late
  interval: list[dict] = []
  last_eval = None
  first_step = step
  trace = summaries.Trace(config, workdir_path, first_step, num_steps)
  started = time.monotonic()

  def fetch(pending):
    """Host copy of a step's metrics; stops the run if anything is not finite."""
    at, device_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    message = _nonfinite_message(values, at, saved, manager.directory)
    if message:
      raise NonFiniteLossError(message)
    values.pop('params_finite', None)
    values['learning_rate'] = float(schedule(at - 1))
    interval.append(values)
    history.add(at, loss=values['loss'])
    if at == first_step + 1:
      # The compile of the step dominates this time; the compilation cache shortens it.
      logging.info(
        'Step %d done %.1f s after the loop started (compile included)',
        at,
        time.monotonic() - started,
      )

  try:
    while step < num_steps:
      stage = schedules.stage_at(run_stages, step)  # of the step about to run
      batch = sharding.global_batch(next(train_iter), mesh)
      trace.before_step(step, state)
      # Names the step in a trace (the profile plugin's step-time breakdown); free otherwise.
      with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
        state, device_metrics = p_train_step(state, batch)
      step += 1
      trace.after_step(step, state)
      if pending is not None:
        fetch(pending)  # overlaps with the step just dispatched
      pending = (step, device_metrics)
      is_last = step == num_steps
      stop = preemption.reached(manager, step)
      if step % config.train.log_every_steps == 0 or is_last or stop:
        fetch(pending)
        pending = None
        scalars = {f'train/{k}': float(np.mean([m[k] for m in interval])) for k in interval[0]}
        # Progress has no setter for the batch of its images/s (request filed for summaries.py).
        progress.set_batch_size(stage.batch_size)
        scalars.update(progress.update(step))
        scalars.update(
          {
            'train/stage': float(stage.index),
            'train/crop_size': float(stage.crop_size),
            'train/batch_size': float(stage.batch_size),
          }
        )
        writer.write_scalars(step, scalars)
        line = progress.line(step, scalars['train/loss'])
        if len(run_stages) > 1:
          line += (
            f'  stage {stage.index + 1}/{len(run_stages)} '
            f'({stage.crop_size}px x {stage.batch_size})'
          )
        logging.info('%s', line)
        interval = []
      eval_every = config.train.eval_every_steps
      do_eval = is_last or (eval_every > 0 and step % eval_every == 0)
      eval_metrics = None
      if do_eval:
        with progress.paused():
          eval_metrics, examples = _validate(
            state.params, eval_step, config, eval_batch, mesh, eval_source
          )
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
          fetch(pending)  # never save a state that was not checked
          pending = None
        best = None if eval_metrics is None else {'psnr': float(eval_metrics['psnr'])}
        checkpoints.save(manager, step, *_split_state(state), train_iter, saved_config, best)
        saved = step
      writer.flush()
      if stop:
        logging.warning('SIGTERM: saved step %d in %s; exiting', step, manager.directory)
        break
  finally:
    trace.close()
    preemption.close()
    train_iter.close()  # stops grain's worker processes now, not at garbage collection
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    history.close()

  if is_main:
    summaries.plot_curves(workdir_path / 'history.jsonl', workdir_path / 'curves.png')
  if last_eval is not None and step == num_steps:
    identity = evaluate.make_baseline_step(baselines.identity)
    dark, _ = _validate(None, identity, config, eval_batch, None, eval_source)
    logging.info(
      'Final validation PSNR %.3f dB, SSIM %.4f; dark input %.3f dB, SSIM %.4f (%+.3f dB)',
      last_eval['psnr'],
      last_eval['ssim'],
      dark['psnr'],
      dark['ssim'],
      last_eval['psnr'] - dark['psnr'],
    )
    summary = {'step': step, 'validation': last_eval, 'dark_input': dark}
    if is_main:
      paths.write_text_atomic(
        workdir_path / 'final_metrics.json', json.dumps(summary, indent=2) + '\n'
      )
  writer.close()
  return state
