"""Checkpoints with orbax: training checkpoints and parameter-only exports.

Training checkpoints live in ``WORKDIR/checkpoints/<step>/`` with one orbax item each for the
parameters, the rest of the train state, the grain iterator position, the config (JSON) and
the validation metrics; the latest N and the best by validation PSNR are kept.

An export directory (converted official weights) holds ``params/`` (an orbax
StandardCheckpointer tree) and ``model.json`` (the ``config.model`` fields needed to rebuild
the network). ``restore_params`` reads either kind.
"""

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

MODEL_JSON = 'model.json'


def export_params(directory: str | pathlib.Path, params: Any, model_config: dict) -> None:
  """Writes ``params`` and the model's config to a new directory (never overwrites)."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f'{directory}: already exists; choose a new --output directory')
  directory.mkdir(parents=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / 'params', params)
    ckptr.wait_until_finished()
  (directory / MODEL_JSON).write_text(json.dumps(dict(model_config), indent=2) + '\n')


def is_export(directory: str | pathlib.Path) -> bool:
  """Whether ``directory`` is a parameter export written by ``export_params``."""
  directory = pathlib.Path(directory)
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


def load_export(directory: str | pathlib.Path) -> tuple[dict, Any]:
  """Reads an export: returns (model_config fields, params as host arrays)."""
  directory = pathlib.Path(directory).absolute()
  if not is_export(directory):
    raise FileNotFoundError(
      f'{directory}: not a converted-weights directory (needs {MODEL_JSON} and params/)'
    )
  model_config = json.loads((directory / MODEL_JSON).read_text())
  from mirnet_jax.models import create_model, param_shapes

  target = param_shapes(create_model(model_config))
  target = _replicated_target(target)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / 'params', target)
  return model_config, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints: WORKDIR/checkpoints/<step>/{params, opt, data, config, metrics}.
#
# The state is split into items so that readers of a model (eval, predict, init_from) restore
# ``params`` alone, without the optimiser moments (twice the parameters' memory).
CHECKPOINT_DIR = 'checkpoints'
PARAMS, OPT, DATA, CONFIG = 'params', 'opt', 'data', 'config'
BEST_METRIC = 'psnr'  # validation PSNR (dB) ranks checkpoints; higher is better


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint matches the request; the message says what exists."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Where a run keeps its checkpoints."""
  return pathlib.Path(workdir).absolute() / CHECKPOINT_DIR


def create_manager(
  workdir: str | pathlib.Path, keep: int = 2, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """An asynchronous manager keeping the latest ``keep`` steps and the best by ``psnr``.

  Checkpoints saved without metrics (between validations) only live while they are among the
  latest ``keep``; the best validated one is kept whatever its age.
  """
  policy = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda m: m[BEST_METRIC],
    best_mode='max',
    preservation_policy=policy.AnyPreservationPolicy(
      [
        policy.LatestN(n=keep),
        policy.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC],
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
    data_iterator: a grain iterator; its position is saved so a resume sees the same data.
    config: the run's config as plain data (``config.to_dict()``).
    metrics: validation metrics of this state (``{'psnr': ...}``) or None.
  """
  import grain.checkpoint  # lazily: readers of params alone never need grain

  args = ocp.args.Composite(
    **{
      PARAMS: ocp.args.StandardSave(params),
      OPT: ocp.args.StandardSave(opt),
      DATA: grain.checkpoint.CheckpointSave(data_iterator),
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

  The data iterator is restored in place. Returns ``(params, opt)``.
  """
  import grain.checkpoint  # lazily: readers of params alone never need grain

  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  out = manager.restore(
    step,
    args=ocp.args.Composite(
      **{
        PARAMS: ocp.args.StandardRestore(abstract(params)),
        OPT: ocp.args.StandardRestore(abstract(opt)),
        DATA: grain.checkpoint.CheckpointRestore(data_iterator),
      }
    ),
  )
  return out[PARAMS], out[OPT]


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
    if best is None or manager.metrics(best) is None:
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


def restore_params(
  workdir_or_export: str | pathlib.Path, which: str | int = 'best'
) -> tuple[dict, Any, int]:
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
  """
  path = pathlib.Path(workdir_or_export).absolute()
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
    model_config = stored_config(manager, step)['model']
    from mirnet_jax.models import create_model, param_shapes

    target = param_shapes(create_model(model_config))
    target = _replicated_target(target)
    restored = manager.restore(
      step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
    )
  return dict(model_config), restored[PARAMS], step


def load_weights(
  spec: str | int, workdir: str | pathlib.Path | None, *, key: str = 'checkpoint'
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
    return restore_params(pathlib.Path(workdir), int(spec) if spec.isdigit() else spec)
  source = pathlib.Path(spec).expanduser()
  if not source.is_dir():
    raise FileNotFoundError(f'{key}={spec!r}: not best|latest|a step, and no such directory')
  return restore_params(source, 'best')
