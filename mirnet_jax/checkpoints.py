"""Checkpoints with orbax: training checkpoints and parameter-only exports.

Training checkpoints live in ``WORKDIR/checkpoints/<step>/`` with one orbax item each for the
parameters, the rest of the train state, the data iterator position ``{'step': k}`` (JSON,
written once: it does not depend on the number of processes, so a run resumes on another
process count), the config (JSON) and the validation metrics; the latest N and the best by
validation PSNR are kept (a non-finite PSNR never ranks). Checkpoints of earlier versions hold
grain's per-process iterator files instead; they restore on the same process count.

Every path is an ``etils.epath`` path: local, or remote (``gs://...``) for TPU pods.
A checkpoint that cannot be read is moved to ``WORKDIR/checkpoints_unreadable/`` (never
deleted) and the run resumes from the newest readable one (``restore_latest``).

An export directory (converted official weights) holds ``params/`` (an orbax
StandardCheckpointer tree) and ``model.json`` (the ``config.model`` fields needed to rebuild
the network). ``restore_params`` reads either kind.
"""

import json
import math
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mirnet_jax import paths

MODEL_JSON = 'model.json'
PathLike = paths.PathLike
as_path = paths.as_path  # the names train/evaluate/predict call through this module
write_text_atomic = paths.write_text_atomic


def export_params(directory: PathLike, params: Any, model_config: dict) -> None:
  """Writes ``params`` and the model's config to a new directory (never overwrites)."""
  directory = as_path(directory)
  if directory.exists():
    raise FileExistsError(f'{directory}: already exists; choose a new --output directory')
  directory.mkdir(parents=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / 'params', params)
    ckptr.wait_until_finished()
  write_text_atomic(directory / MODEL_JSON, json.dumps(dict(model_config), indent=2) + '\n')


def is_export(directory: PathLike) -> bool:
  """Whether ``directory`` is a parameter export written by ``export_params``."""
  directory = as_path(directory)
  return (directory / MODEL_JSON).is_file() and (directory / 'params').is_dir()


def _replicated_target(shapes: Any) -> Any:
  """A restore template replicated over this run's devices.

  Without a sharding, orbax reuses the one stored with the checkpoint and fails when the
  device topology differs (trained on 4 devices, evaluated on 1); weights for eval/predict
  are wanted on whatever devices are here.
  """
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def load_export(directory: PathLike) -> tuple[dict, Any]:
  """Reads an export: returns (model_config fields, params as host arrays)."""
  directory = as_path(directory)
  if not is_export(directory):
    raise FileNotFoundError(
      f'{directory}: not a converted-weights directory (needs {MODEL_JSON} and params/)'
    )
  model_config = json.loads((directory / MODEL_JSON).read_text())
  from mirnet_jax.models import create_model, param_shapes

  target = param_shapes(create_model(model_config))
  target = _replicated_target(target)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(directory / 'params', target)
  except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many kinds; name the file
    raise UnreadableCheckpointError(f'{directory}/params: cannot be read ({_reason(e)})') from e
  return model_config, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints: WORKDIR/checkpoints/<step>/{params, opt, data, config, metrics}.
#
# The state is split into items so that readers of a model (eval, predict, init_from) restore
# ``params`` alone, without the optimiser moments (twice the parameters' memory).
CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'
# DATA: grain's per-process iterator files (earlier checkpoints); ITERATOR: {'step': k} as JSON.
PARAMS, OPT, DATA, ITERATOR, CONFIG = 'params', 'opt', 'data', 'iterator', 'config'
BEST_METRIC = 'psnr'  # validation PSNR (dB) ranks checkpoints; higher is better


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint matches the request; the message says what exists."""


class UnreadableCheckpointError(CheckpointNotFoundError):
  """A checkpoint exists but its files cannot be read (truncated, half-copied)."""


def _reason(error: BaseException) -> str:
  """The first line of a (often multi-line tensorstore) error, shortened."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def _rank(metrics: dict) -> float:
  """The best policy's score: validation PSNR, or -inf when it is not finite (NaN model)."""
  value = float(metrics[BEST_METRIC])
  return value if math.isfinite(value) else -math.inf


def checkpoint_dir(workdir: PathLike) -> epath.Path:
  """Where a run keeps its checkpoints."""
  return as_path(workdir) / CHECKPOINT_DIR


def create_manager(
  workdir: PathLike, keep: int = 2, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """An asynchronous manager keeping the latest ``keep`` steps and the best by ``psnr``.

  Checkpoints saved without metrics (between validations) only live while they are among the
  latest ``keep``; the best validated one is kept whatever its age.
  """
  policy = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
    best_fn=_rank,
    best_mode='max',
    preservation_policy=policy.AnyPreservationPolicy(
      [
        policy.LatestN(n=keep),
        policy.BestN(
          get_metric_fn=_rank,
          reverse=False,
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    ),
    enable_async_checkpointing=not read_only,
    read_only=read_only,
    save_interval_steps=0 if read_only else 1,
    create=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
  manager: ocp.CheckpointManager,
  step: int,
  params: Any,
  opt: Any,
  data_iterator: Any,
  config: dict,
  metrics: dict | None = None,
) -> None:
  """Starts an asynchronous save of one training step (returns before the write ends).

  Args:
    manager: from ``create_manager``.
    step: the optimiser step the state is at.
    params: parameter pytree.
    opt: the rest of the train state (step counter, optimiser state).
    data_iterator: a grain iterator; its state (``get_state()``, ``{'step': k}`` for the
      training iterator) is saved once, as JSON, so a resume sees the same data.
    config: the run's config as plain data (``config.to_dict()``).
    metrics: validation metrics of this state (``{'psnr': ...}``) or None.
  """
  args = ocp.args.Composite(
    **{
      PARAMS: ocp.args.StandardSave(params),
      OPT: ocp.args.StandardSave(opt),
      ITERATOR: ocp.args.JsonSave(data_iterator.get_state()),
      CONFIG: ocp.args.JsonSave(config),
    }
  )
  manager.save(step, args=args, metrics=metrics, force=True)


def stored_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config a checkpoint was written with."""
  args = ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
  return manager.restore(step, args=args)[CONFIG]


def restore(
  manager: ocp.CheckpointManager, step: int, params: Any, opt: Any, data_iterator: Any
) -> tuple[Any, Any]:
  """Restores ``step`` into the structure, shardings and dtypes of the live ``params``/``opt``.

  The data iterator is restored in place: from the JSON state, or from grain's per-process
  files in checkpoints of earlier versions (same process count only). Returns ``(params, opt)``.
  """
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  items = {
    PARAMS: ocp.args.StandardRestore(abstract(params)),
    OPT: ocp.args.StandardRestore(abstract(opt)),
  }
  if (epath.Path(manager.directory) / str(step) / ITERATOR).exists():
    items[ITERATOR] = ocp.args.JsonRestore()
  else:
    import grain.checkpoint  # lazily: only checkpoints of earlier versions need it

    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  out = manager.restore(step, args=ocp.args.Composite(**items))
  if ITERATOR in items:
    data_iterator.set_state(out[ITERATOR])
  return out[PARAMS], out[OPT]


def _everyone(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (one answer for all, so none goes its own way)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def set_aside(manager: ocp.CheckpointManager, step: int, error: BaseException) -> epath.Path:
  """Moves unreadable checkpoint ``step`` to ``WORKDIR/checkpoints_unreadable/`` (one warning).

  Never deletes: the files may still be worth inspecting or repairing. Process 0 moves it,
  every process then sees the manager without it. The run goes on from an older one.
  """
  bad = epath.Path(manager.directory) / str(step)
  aside_dir = epath.Path(manager.directory).parent / UNREADABLE_DIR
  aside = aside_dir / str(step)
  if jax.process_index() == 0:
    aside_dir.mkdir(parents=True, exist_ok=True)
    n = 1
    while aside.exists():
      aside, n = aside_dir / f'{step}.{n}', n + 1
    bad.rename(aside)
  logging.warning(
    '%s: checkpoint cannot be read (%s); moved to %s; resuming from an older one',
    bad,
    _reason(error),
    aside,
  )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'mirnet_jax set aside {step}')
  manager.reload()
  return aside


def restore_latest(
  manager: ocp.CheckpointManager,
  params: Any,
  opt: Any,
  data_iterator: Any,
  check: Any = None,
) -> tuple[int, Any, Any] | None:
  """Restores the newest readable checkpoint; newer unreadable ones are set aside.

  A checkpoint counts as unreadable only when an older one restores with the same template:
  an error that every checkpoint gives (a template that does not fit) is raised, and nothing
  is moved.

  Args:
    manager: from ``create_manager``.
    params, opt, data_iterator: as for ``restore``.
    check: called with a step whose config could be read, before its arrays are; raises to
      refuse it (a model mismatch is an error, not an unreadable checkpoint).

  Returns:
    ``(step, params, opt)``, or None when there is no checkpoint.

  Raises:
    UnreadableCheckpointError: no checkpoint can be read; names the newest.
  """
  failed: list[tuple[int, BaseException]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    error = None
    try:
      stored_config(manager, step)
    except Exception as e:  # noqa: BLE001 - a truncated JSON or a missing item
      error = e
    if _everyone(error is None):
      if check is not None:
        check(step)
      try:
        restored = restore(manager, step, params, opt, data_iterator)
      except Exception as e:  # noqa: BLE001 - tensorstore raises many kinds for bad files
        error = e
    if _everyone(error is None):
      for bad, bad_error in failed:
        set_aside(manager, bad, bad_error)
      return (step, *restored)
    failed.append((step, error or RuntimeError('unreadable on another process')))
  if not failed:
    return None
  step, error = failed[0]
  raise UnreadableCheckpointError(
    f'{manager.directory}/{step}: checkpoint cannot be read ({_reason(error)}), nor any older '
    f'one; move {manager.directory} aside to start afresh'
  ) from error


def resolve_step(manager: ocp.CheckpointManager, which: str | int, where: str) -> int:
  """Turns ``'best'`` | ``'latest'`` | a step number into a saved step, or explains why not."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointNotFoundError(f'{where}: no checkpoint in {manager.directory}')
  which = str(which).strip()
  if which == 'latest':
    return steps[-1]
  if which == 'best':
    best = manager.best_step()
    if best is None or manager.metrics(best) is None or _rank(manager.metrics(best)) == -math.inf:
      logging.warning('%s: no validated checkpoint; using the latest (%d)', where, steps[-1])
      return steps[-1]
    return best
  if not which.isdigit():
    raise ValueError(f"{where}: checkpoint must be 'best', 'latest' or a step; got {which!r}")
  if int(which) not in steps:
    raise CheckpointNotFoundError(
      f'{where}: step {which} not found in {manager.directory}; available steps: '
      + ', '.join(map(str, steps))
    )
  return int(which)


def restore_params(workdir_or_export: PathLike, which: str | int = 'best') -> tuple[dict, Any, int]:
  """Loads a model from a training workdir or a converted-weights export.

  Args:
    workdir_or_export: a run's WORKDIR (holding ``checkpoints/``) or a directory written by
      ``export_params`` (``convert.py``).
    which: ``'best'`` (highest validation PSNR; the latest when none was validated),
      ``'latest'`` or a step number. Ignored for exports.

  Returns:
    ``(model_config fields, params as host arrays, step)``; the step of an export is 0.

  Raises:
    CheckpointNotFoundError: nothing to load, or the step does not exist (lists the steps).
    UnreadableCheckpointError: the chosen checkpoint's files cannot be read (names it).
  """
  path = as_path(workdir_or_export)
  if is_export(path):
    model_config, params = load_export(path)
    return model_config, params, 0
  if not path.is_dir():
    raise CheckpointNotFoundError(f'{path}: no such directory')
  if not checkpoint_dir(path).is_dir():
    raise CheckpointNotFoundError(
      f'{path}: neither a training workdir (no {CHECKPOINT_DIR}/) nor converted weights '
      f'(no {MODEL_JSON})'
    )
  with create_manager(path, read_only=True) as manager:
    step = resolve_step(manager, which, str(path))
    try:
      model_config = stored_config(manager, step)['model']
      from mirnet_jax.models import create_model, param_shapes

      target = param_shapes(create_model(model_config))
      target = _replicated_target(target)
      restored = manager.restore(
        step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
      )
    except Exception as e:  # noqa: BLE001 - tensorstore raises many kinds for bad files
      others = [str(s) for s in sorted(manager.all_steps()) if s != step]
      raise UnreadableCheckpointError(
        f'{manager.directory}/{step}: checkpoint cannot be read ({_reason(e)}); choose another '
        f'step ({", ".join(others) or "none other saved"})'
      ) from e
  return dict(model_config), restored[PARAMS], step


def load_weights(
  spec: str | int, workdir: PathLike | None, *, key: str = 'checkpoint'
) -> tuple[dict, Any, int]:
  """Resolves a checkpoint setting (``config.eval.checkpoint`` and the like) to weights.

  Args:
    spec: 'best' | 'latest' | a step number (checkpoints of ``workdir``), or a directory: a
      converted-weights export or another run's workdir (its best checkpoint).
    workdir: the run directory that 'best', 'latest' and steps refer to (may be an export).
    key: the config key ``spec`` came from, for error messages.

  Returns:
    (model config fields, parameters as host arrays, training step; 0 for an export).

  Raises:
    FileNotFoundError: nothing to restore; the message names ``key`` and what was looked for.
  """
  spec = str(spec).strip()
  if spec in ('best', 'latest') or spec.isdigit():
    if not workdir:
      raise FileNotFoundError(f'{key}={spec!r} needs --workdir (the training run)')
    return restore_params(workdir, int(spec) if spec.isdigit() else spec)
  source = as_path(spec)
  if not source.is_dir():
    raise FileNotFoundError(f'{key}={spec!r}: not best|latest|a step, and no such directory')
  return restore_params(source, 'best')
