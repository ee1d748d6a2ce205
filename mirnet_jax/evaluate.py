"""Evaluation under the project protocol: validation during training and ``--mode=eval``.

    python -m mirnet_jax.main --mode=eval --config=configs/lol.py --workdir=W \\
        [--config.eval.checkpoint=best|latest|STEP|EXPORT_DIR] [--config.eval.split=test] \\
        [--config.eval.method=model|identity|autocontrast|equalize|gamma]

Every image is evaluated at full resolution: the model input is reflect-padded at the
bottom/right to the model's size multiple and the output cropped back, then
`metrics.compute_metrics` clamps and quantises it to 8 bits as a saved PNG would be
(../shared/docs/protocol.md). Classical baselines (`baselines.py`) go through the same metrics,
their uint8 outputs divided by 255.

`run` writes to ``config.eval.output_dir``, by default ``WORKDIR/eval/<split>/<what>/`` with
<what> = ``step_<N>`` (a checkpoint of the workdir), ``export_<dir name>`` (converted weights or
another run) or the baseline's name (``gamma_<g>``), so that evaluations of other checkpoints or
methods never overwrite each other; a non-empty output directory is refused unless ``overwrite``
(``--overwrite``). Local or remote (``gs://``) directories. On several processes every image
is gathered to process 0, which writes each row, grid and image once:
  metrics.csv    name, psnr, ssim, mae, mse per image (plus *_gt_mean with config.eval.gt_mean)
  summary.json   dataset means, num_images, method, checkpoint and step, data, protocol
  grids/         low | enhanced | high PNGs of the first config.eval.num_grids images
  images/        the enhanced images as PNG, with config.eval.save_images
  events         the means as clu scalars 'eval/<key>' (TensorBoard), when TensorFlow imports
"""

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from mirnet_jax import baselines, checkpoints, distributed, metrics, paths, sharding, summaries
from mirnet_jax.data import images, pipeline, sources
from mirnet_jax.models import MIRNet, create_model, crop, pad_to_multiple

PROTOCOL = (
  'clamp to [0, 1], round(x * 255), vs 8-bit ground truth; PSNR (peak 255), MAE, MSE over all '
  'pixels and RGB channels; SSIM Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, per channel; '
  'per-image values averaged over images; full resolution (../shared/docs/protocol.md)'
)

# (params, batch) -> per-image metrics [B] and 'enhanced' uint8 [B, H, W, 3].
EvalStep = Callable[[Any, dict[str, Any]], dict[str, Any]]
# Called once per real image with (name, low, enhanced, high), all uint8 [H, W, 3].
ImageCallback = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]


def make_eval_step(model: MIRNet, *, gt_mean: bool = False) -> EvalStep:
  """The jitted model evaluation step; make it once and reuse it (one compile per shape).

  Args:
    model: the network.
    gt_mean: also compute the GT-mean corrected metrics ('psnr_gt_mean', ...).

  Returns:
    ``eval_step(params, batch)``: batch ``{'low', 'high': f32[B, H, W, 3] in [0, 1],
    'mask': bool[B]}`` (any H, W) -> ``metrics.compute_metrics`` output (per-image [B]) plus
    'enhanced': uint8 [B, H, W, 3], the output as a saved PNG would hold it.
  """

  def eval_step(params: Any, batch: dict[str, Any]) -> dict[str, Any]:
    x, size = pad_to_multiple(batch['low'], model.size_multiple)
    pred = crop(model.apply({'params': params}, x), size).astype(jnp.float32)
    out = metrics.compute_metrics(pred, batch['high'], batch['mask'], gt_mean=gt_mean)
    out['enhanced'] = metrics.quantize(pred).astype(jnp.uint8)
    return out

  return jax.jit(eval_step)


def make_baseline_step(method: Callable[[np.ndarray], np.ndarray], *, gt_mean: bool = False):
  """An evaluation step for a classical enhancer (uint8 [H, W, 3] -> uint8), on the host.

  Same contract as `make_eval_step`; ``params`` is ignored.
  """
  compute = jax.jit(lambda p, t, m: metrics.compute_metrics(p, t, m, gt_mean=gt_mean))

  def eval_step(params: Any, batch: dict[str, Any]) -> dict[str, Any]:
    del params
    low = _to_uint8(batch['low'])
    enhanced = np.stack([method(image) for image in low])
    pred = enhanced.astype(np.float32) / np.float32(255)
    out = dict(compute(pred, np.asarray(batch['high'], np.float32), batch['mask']))
    out['enhanced'] = enhanced
    return out

  return eval_step


def _metric_keys(out: dict[str, Any]) -> list[str]:
  """psnr, ssim, mae, mse, then their GT-mean versions, as present in ``out``."""
  keys = list(metrics.METRIC_KEYS)
  keys += [k + metrics.GT_MEAN_SUFFIX for k in metrics.METRIC_KEYS]
  return [k for k in keys if k in out]


def _to_uint8(x: Any) -> np.ndarray:
  """Pipeline floats (uint8 / 255) back to the exact uint8 values."""
  x = np.asarray(x)
  return x if x.dtype == np.uint8 else np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _gather(tree: Any) -> Any:
  """Every process's rows of global arrays, on the host (multi-host only)."""
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(
  params: Any,
  eval_step: EvalStep,
  batches: Iterable[dict[str, Any]],
  *,
  mesh: jax.sharding.Mesh | None = None,
  num_examples: int = 0,
  on_image: ImageCallback | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], list[tuple[str, np.ndarray, ...]]]:
  """Evaluates one pass over ``batches``; exact on any batch size or device count.

  Args:
    params: model parameters (ignored by baseline steps). With ``mesh``, pass them replicated
      (`sharding.replicate`) to avoid a transfer per batch.
    eval_step: from `make_eval_step` (jitted once per model) or `make_baseline_step`.
    batches: host-local batches as `pipeline.create_eval_iterator` yields them:
      {'low', 'high': f32[b, H, W, 3], 'mask': bool[b], 'name': str[b]}.
    mesh: when given, batches are split over its 'data' axis (`sharding.global_batch`); the
      global batch must then be a multiple of the device count. None: default device.
    num_examples: how many (name, low, enhanced, high) uint8 triplets to return, for grids.
    on_image: called with (name, low, enhanced, high) for every real image (e.g. to save it).

  Returns:
    (summary, rows, examples): summary holds the dataset means 'psnr', 'ssim', 'mae', 'mse'
    (and '*_gt_mean' when the step computes them) and 'num_images'; rows holds one dict per
    image {'name', 'psnr', ...} in data order; examples the first ``num_examples`` triplets.
    On several processes every process gets every image's row and example (gathered).
  """
  per_batch, rows, examples = [], [], []
  for batch in batches:
    if mesh is not None:
      device_batch = sharding.global_batch(batch, mesh)
    else:
      device_batch = {k: np.asarray(batch[k]) for k in ('low', 'high', 'mask')}
    out = eval_step(params, device_batch)
    # The same decision on every process: the gathers below are collectives.
    want_images = on_image is not None or len(examples) < num_examples
    host = _host_batch(out, batch, want_images)
    per_batch.append({k: host[k] for k in out if k != 'enhanced'})
    keys = _metric_keys(host)
    for i, real in enumerate(host['mask']):
      if not real:
        continue
      name = host['name'][i]
      rows.append({'name': name, **{k: float(host[k][i]) for k in keys}})
      if not want_images or (on_image is None and len(examples) >= num_examples):
        continue
      triplet = (name, _to_uint8(host['low'][i]), host['enhanced'][i], _to_uint8(host['high'][i]))
      if len(examples) < num_examples:
        examples.append(triplet)
      if on_image is not None:
        on_image(*triplet)
  summary = metrics.summarize(per_batch)
  summary['num_images'] = summary.pop('count')
  return summary, rows, examples


_NAME_BYTES = 1024  # image names travel between processes as fixed-size UTF-8 rows


def _host_batch(out: dict[str, Any], batch: dict[str, Any], want_images: bool) -> dict[str, Any]:
  """A batch's metrics (and images) for every image of the global batch, on the host.

  One process: its own rows. Several: every process's rows, in global batch order (process 0's
  rows first, as the eval pipeline lays them out), gathered with ``process_allgather``.
  """
  names = [str(n) for n in batch['name']]
  tree = {k: v for k, v in out.items() if want_images or k != 'enhanced'}
  tree['mask'] = np.asarray(batch['mask'])
  if want_images:
    tree['low'], tree['high'] = np.asarray(batch['low']), np.asarray(batch['high'])
  if jax.process_count() == 1:
    host = {k: _local_rows(v) for k, v in tree.items()}
    host['name'] = names
    return host
  encoded = np.zeros((len(names), _NAME_BYTES), np.uint8)
  for i, name in enumerate(names):
    raw = name.encode()[:_NAME_BYTES]
    encoded[i, : len(raw)] = np.frombuffer(raw, np.uint8)
  tree['name'] = encoded
  host = {k: np.asarray(v) for k, v in _gather(tree).items()}
  host['name'] = [bytes(row).rstrip(b'\0').decode(errors='replace') for row in host['name']]
  return host


def _local_rows(x: Any) -> np.ndarray:
  """This process's rows of a (possibly global, sharded) array, on the host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return np.asarray(x)


def load_weights(checkpoint: str, workdir: str | os.PathLike | None) -> tuple[dict, Any, int]:
  """``checkpoints.load_weights`` for ``config.eval.checkpoint``, with advice when none exists."""
  try:
    return checkpoints.load_weights(checkpoint, workdir, key='config.eval.checkpoint')
  except checkpoints.CheckpointNotFoundError as e:
    raise checkpoints.CheckpointNotFoundError(
      f'{e}. Nothing to evaluate: train first, point --config.eval.checkpoint at a '
      'converted-weights directory (python -m mirnet_jax.convert), or evaluate a baseline with '
      '--config.eval.method=identity|autocontrast|equalize|gamma'
    ) from e


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
  """A plain-text table of the per-image rows and their mean."""
  keys = [k for k in rows[0] if k != 'name'] if rows else list(metrics.METRIC_KEYS)
  width = max([len('name'), len('mean')] + [len(r['name']) for r in rows])
  lines = ['  '.join(['name'.ljust(width)] + [k.rjust(12) for k in keys])]
  for r in rows + [{'name': 'mean', **summary}]:
    lines.append('  '.join([r['name'].ljust(width)] + [f'{r[k]:12.4f}' for k in keys]))
  return '\n'.join(lines)


def _write_csv(path: epath.Path, rows: list[dict[str, Any]]) -> None:
  keys = ['name'] + [k for k in rows[0] if k != 'name']
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=keys)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: r[k] if k == 'name' else f'{r[k]:.6f}' for k in keys})
  paths.write_text_atomic(path, text.getvalue())


def _image_writer(out_dir: epath.Path, num_grids: int, save_images: bool) -> ImageCallback:
  """Writes comparison grids (low | enhanced | high) and, optionally, the enhanced images.

  Only process 0 writes; the others count along (every process sees every image).
  """
  count = [0]
  is_main = jax.process_index() == 0

  def write(name: str, low: np.ndarray, enhanced: np.ndarray, high: np.ndarray) -> None:
    stem = os.path.splitext(os.path.basename(name))[0] or f'image_{count[0]}'
    if not is_main:
      count[0] += 1
      return
    if num_grids < 0 or count[0] < num_grids:
      images.write_image(
        out_dir / 'grids' / f'{stem}.png', np.concatenate([low, enhanced, high], 1)
      )
    if save_images:
      images.write_image(out_dir / 'images' / f'{stem}.png', enhanced)
    count[0] += 1

  return write


def run(config: Any, workdir: str | None, overwrite: bool = False) -> int:
  """``--mode=eval`` (main.py): `write_evaluation`, then exit code 0; errors raise."""
  write_evaluation(config, workdir, overwrite=overwrite)
  return 0


def default_output_dir(workdir: Any, split: str, method: str, checkpoint: str, step: int, gamma):
  """``WORKDIR/eval/<split>/<what>``: one directory per split, method and checkpoint."""
  if method == 'model':
    spec = str(checkpoint).strip()
    if spec in ('best', 'latest') or spec.isdigit():
      what = f'step_{step}'
    else:
      what = f'export_{paths.as_path(spec).name}'
  elif method == 'gamma':
    what = f'gamma_{gamma:g}'
  else:
    what = method
  return paths.as_path(workdir) / 'eval' / split / what


def _refuse_nonempty(out_dir: epath.Path, overwrite: bool) -> None:
  """Raises unless ``out_dir`` is new or empty (or ``overwrite``); one answer for all processes."""
  taken = 0
  if jax.process_index() == 0 and not overwrite:
    taken = int(out_dir.exists() and any(out_dir.iterdir()))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    taken = int(multihost_utils.broadcast_one_to_all(np.int32(taken)))
  if taken:
    raise FileExistsError(
      f'{out_dir}: already holds an evaluation; pass --overwrite to replace its files or set '
      '--config.eval.output_dir'
    )


def write_evaluation(
  config: Any, workdir: str | None, *, overwrite: bool = False
) -> dict[str, Any]:
  """Evaluates a checkpoint or a baseline on a split and writes every output (module doc).

  Args:
    config: the experiment config; reads ``config.eval`` and ``config.data``.
    workdir: the training run ('best'/'latest'/step checkpoints, default output_dir); may be
      None with a directory in config.eval.checkpoint and config.eval.output_dir set.
    overwrite: write into a non-empty output directory (replacing files of the same name).

  Returns:
    The summary written to summary.json.

  Raises:
    FileNotFoundError: no checkpoint to evaluate, or the data is missing.
    FileExistsError: the output directory is not empty and ``overwrite`` is False.
    ValueError: an unknown method or split.
  """
  ec = config.eval
  start = time.time()
  model_config, step = None, 0
  if ec.method == 'model':
    model_config, params, step = load_weights(ec.checkpoint, workdir)
    eval_step = distributed.SyncedJit(
      make_eval_step(create_model(model_config), gt_mean=ec.gt_mean)
    )
    what = f'checkpoint {ec.checkpoint} (step {step})'
  else:
    kwargs = {'gamma': ec.gamma} if ec.method == 'gamma' else {}
    eval_step = make_baseline_step(baselines.get_baseline(ec.method, **kwargs), gt_mean=ec.gt_mean)
    params, what = None, f'baseline {ec.method}'
  distributed.barrier('eval')  # before the first collective: loading took different times
  if ec.output_dir:
    out_dir = paths.as_path(ec.output_dir)
  elif workdir:
    out_dir = default_output_dir(workdir, ec.split, ec.method, ec.checkpoint, step, ec.gamma)
  else:
    raise ValueError('set --workdir or --config.eval.output_dir')
  _refuse_nonempty(out_dir, overwrite)
  source = sources.create_source(config.data, ec.split)
  mesh = sharding.create_mesh()
  if ec.method == 'model':
    params = sharding.replicate(params, mesh)
  # Baselines run on the host: no reason to split their batches over devices.
  use_mesh = mesh if ec.method == 'model' else None
  batch_size = config.data.eval_batch_size
  if use_mesh is not None:
    batch_size = sharding.eval_batch_size(batch_size, mesh)
  elif batch_size % jax.process_count():
    batch_size = -(-batch_size // jax.process_count()) * jax.process_count()
  batches = pipeline.create_eval_iterator(
    source,
    global_batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  is_main = jax.process_index() == 0
  if is_main:
    for sub in ['grids'] + (['images'] if ec.save_images else []):
      (out_dir / sub).mkdir(parents=True, exist_ok=True)
  on_image = _image_writer(out_dir, ec.num_grids, ec.save_images)
  logging.info('Evaluating %s on %s/%s (%d images)', what, config.data.name, ec.split, len(source))
  summary, rows, examples = evaluate(
    params,
    eval_step,
    batches,
    mesh=use_mesh,
    num_examples=max(ec.num_grids, 0),
    on_image=on_image,
  )
  summary.update(
    method=ec.method,
    checkpoint=str(ec.checkpoint) if ec.method == 'model' else '',
    step=int(step),
    model=dict(model_config) if model_config is not None else None,
    data=config.data.name,
    split=ec.split,
    gt_mean=bool(ec.gt_mean),
    protocol=PROTOCOL,
    seconds=round(time.time() - start, 1),
  )
  if not is_main:
    return summary
  _write_csv(out_dir / 'metrics.csv', rows)
  paths.write_text_atomic(out_dir / 'summary.json', json.dumps(summary, indent=2) + '\n')
  table = format_table(rows, summary)
  print(f'{what} on {config.data.name}/{ec.split}:\n{table}')
  scalars = {f'eval/{k}': summary[k] for k in rows[0] if k != 'name'}
  scalars['eval/num_images'] = summary['num_images']
  writer = summaries.create_writer(out_dir)
  writer.write_scalars(step, scalars)
  if examples:
    writer.write_images(step, summaries.image_grids(examples))
  writer.flush()
  writer.close()
  logging.info('Wrote %s (%.1f s)', out_dir, time.time() - start)
  return summary
