"""Enhance image files of any size with MIRNet: ``--mode=predict``.

    python -m mirnet_jax.main --mode=predict --config=configs/lol.py --workdir=W \\
        --input=PHOTOS --output=OUT [--overwrite]

``--input`` is a file, a folder (its images, not recursive) or a glob (``'shots/**/*.jpg'``,
suffixes matched in any case), listed by `input_files.list_inputs`. Each input becomes an image
of exactly its size under ``OUT``, at its path below the input folder or the fixed part of the glob
(``trip/a/b/x.JPG`` -> ``OUT/a/b/x.png``, or ``.jpg`` with ``--config.predict.format=jpeg``).
For a single input, ``--output`` may name the output file itself (``out.png``, ``out.jpg``).

How an image goes through the model:
* Files are read by `images.read_image`: EXIF orientation applied; grayscale, palette, RGBA
  (alpha dropped) and 16-bit files become 8-bit RGB.
* Context: every image is reflect-padded by ``config.predict.tile_overlap // 2`` pixels on all
  four sides, so the convolutions' zero padding only reaches pixels that are cropped away, and
  every border pixel sees the same context whatever the tile layout (`tiling`).
* Tiles (`tiling.plan`): an image whose padded size exceeds ``config.predict.tile_size`` is cut
  into the fewest tiles of one shape (one compilation) that overlap by ``tile_overlap``; the
  tile outputs are blended with a raised-cosine ramp across each overlap. Memory is then bounded
  by the tile, not the photo. A smaller image is one tile, padded further (reflect) up to a
  multiple of ``config.predict.bucket`` so that photos of similar sizes share one compilation.
* Devices: tiles (of one image, or of consecutive images of one tile shape) are computed one
  per device per call, each device on its own tile; outputs keep the input order.
* Output policy: an existing output file is never replaced unless ``--overwrite``; files are
  written atomically; a file that fails is named and the others are still processed; the exit
  code is non-zero when any file failed.
"""

import collections
import dataclasses
import functools
import pathlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mirnet_jax import checkpoints, tiling
from mirnet_jax.data import images, input_files
from mirnet_jax.models import MIRNet, create_model

_SUFFIX = {'png': '.png', 'jpeg': '.jpg'}
_WRITABLE = ('.png', '.jpg', '.jpeg')


@functools.lru_cache(maxsize=4)
def _compiled_forward(model: MIRNet, devices: tuple[jax.Device, ...]) -> tuple[Any, Any, dict]:
  """One jitted forward per (model, devices), shared by every `Enhancer` of it (and every `run`).

  Batches of tiles are split over the devices along their first axis (one tile per device per
  call) and the parameters are replicated, so each device computes its own tiles. The dict
  holds one compiled executable per tile shape, filled by `Enhancer._executable`.
  """
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def forward(params: Any, x: jax.Array) -> jax.Array:
    return model.apply({'params': params}, x).astype(jnp.float32)

  fn = jax.jit(forward, in_shardings=(replicated, split), out_shardings=split)
  return fn, (replicated, split), {}


@dataclasses.dataclass
class _Job:
  """One image on its way through the tiles: its canvas in, the blended output out."""

  key: Any
  layout: tiling.Layout
  canvas: np.ndarray | None  # uint8, reflect-padded; dropped once every tile is computed
  pending: int  # tiles not computed yet
  output: np.ndarray | None = None  # float32 accumulator over the canvas (several tiles)
  error: BaseException | None = None
  start: float = dataclasses.field(default_factory=time.time)


class Enhancer:
  """Applies MIRNet to uint8 images of any size: reflected context, tiles, devices, blending.

  Every image is reflect-padded by ``tile_overlap // 2`` pixels on all four sides and cut into
  tiles of one shape (`tiling.plan`); the tiles of all images are computed in order, one per
  device per call, and blended back with raised-cosine weights across their overlaps.

  Args:
    model: the network (its ``size_multiple`` constrains the tile shapes).
    params: its parameters.
    tile_size: longest tile side in pixels; 0 never tiles.
    tile_overlap: pixels shared by neighbouring tiles; half of it is the reflected context of
      every image border.
    bucket: an untiled image's padded shape is a multiple of this (pixels).
    max_tile_megapixels: the largest tile (megapixels; 0 = no limit but tile_size). A model
      call's memory grows with its pixels: the paper model in float32 takes about 4.5 GiB of
      XLA temporaries per megapixel (measured on CPU with the compiled program's
      memory_analysis), so 0.6 keeps predict's peak near 4 GiB.
    devices: the devices to spread tiles over (default: all of them).
  """

  def __init__(
    self,
    model: MIRNet,
    params: Any,
    *,
    tile_size: int,
    tile_overlap: int,
    bucket: int,
    max_tile_megapixels: float = 0.0,
    devices: Sequence[jax.Device] | None = None,
  ):
    if tile_size < 0 or tile_overlap < 0:
      raise ValueError('config.predict.tile_size and tile_overlap must be >= 0')
    if tile_size and tile_overlap >= tile_size:
      raise ValueError(
        f'config.predict.tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})'
      )
    if bucket < 1:
      raise ValueError(f'config.predict.bucket must be >= 1, got {bucket}')
    if max_tile_megapixels < 0:
      raise ValueError(
        f'config.predict.max_tile_megapixels must be >= 0, got {max_tile_megapixels}'
      )
    self.max_tile_pixels = round(max_tile_megapixels * 1e6)
    self.multiple = model.size_multiple
    self.tile_size = tile_size
    self.tile_overlap = tile_overlap
    self.bucket = bucket
    self.devices = tuple(devices or jax.devices())
    self._forward, (replicated, self._split), self._executables = _compiled_forward(
      model, self.devices
    )
    self.params = jax.device_put(params, replicated)
    self._counts = [0] * len(self.devices)

  def layout(self, height: int, width: int) -> tiling.Layout:
    """The tiles of an image of this size."""
    return tiling.plan(
      height,
      width,
      tile_size=self.tile_size,
      overlap=self.tile_overlap,
      multiple=self.multiple,
      bucket=self.bucket,
      max_tile_pixels=self.max_tile_pixels,
    )

  def num_tiles(self, height: int, width: int) -> int:
    """How many tiles (model inputs) an image of this size takes."""
    return self.layout(height, width).num_tiles

  def compile(self, height: int, width: int) -> None:
    """Compiles now the tile shape of an image of this size (otherwise done at first use)."""
    self._executable(self.layout(height, width).tile_shape)

  def _executable(self, shape: tuple[int, int]) -> Any:
    if shape not in self._executables:
      logging.info(
        'Compiling the model for %dx%d tiles (%d per call, one per device)',
        shape[1], shape[0], len(self.devices),
      )  # fmt: skip
      spec = jax.ShapeDtypeStruct((len(self.devices), *shape, 3), jnp.float32)
      self._executables[shape] = self._forward.lower(self.params, spec).compile()
    return self._executables[shape]

  def tiles_per_device(self) -> list[int]:
    """Tiles each device computed since the last `reset_counts` (padding excluded)."""
    return list(self._counts)

  def reset_counts(self) -> None:
    self._counts = [0] * len(self.devices)

  def _run_batch(self, batch: list[tuple[_Job, int, int, np.ndarray]]) -> None:
    """Computes up to one tile per device and adds each output to its image."""
    jobs = [job for job, *_ in batch]
    tiles = [tile for *_, tile in batch]
    n = len(self.devices)
    x = np.stack(tiles + tiles[-1:] * (n - len(tiles))).astype(np.float32) / np.float32(255)
    try:
      forward = self._executable(tiles[0].shape[:2])
      y = np.asarray(jax.device_get(forward(self.params, jax.device_put(x, self._split))))
    except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: a smaller tile_size helps
      for job in jobs:
        job.error = job.error or e
    else:
      for i, (job, top, left, _) in enumerate(batch):
        self._counts[i] += 1  # row i of the batch is device i's shard
        if job.error is None:
          job.output = tiling.accumulate(job.output, job.layout, top, left, y[i])
    for job in jobs:
      job.pending -= 1
      if job.layout.num_tiles > 1:
        done = job.layout.num_tiles - job.pending
        logging.info('  tile %d/%d, ETA %s', done, job.layout.num_tiles,
                     _eta(done, job.layout.num_tiles, time.time() - job.start))  # fmt: skip

  def enhance_many(self, images: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, Any]]:
    """Enhances a stream of images, spreading their tiles over the devices.

    Args:
      images: (key, uint8 [H, W, 3]) pairs; read lazily, a few images ahead at most.

    Yields:
      (key, float32 [H, W, 3] model output, unclamped), or (key, the exception) when the
      device failed on one of its tiles; in the order of ``images``.
    """
    batch: list[tuple[_Job, int, int, np.ndarray]] = []
    jobs: collections.deque[_Job] = collections.deque()
    n = len(self.devices)
    for key, image in images:
      h, w = image.shape[:2]
      layout = self.layout(h, w)
      job = _Job(key, layout, tiling.reflect_canvas(np.asarray(image), layout), layout.num_tiles)
      jobs.append(job)
      th, tw = layout.tile_shape
      for top, left in layout.tiles():
        if batch and batch[0][3].shape[:2] != (th, tw):
          self._run_batch(batch)  # one compiled shape per call
          batch = []
        batch.append((job, top, left, job.canvas[top : top + th, left : left + tw]))
        if len(batch) == n:
          self._run_batch(batch)
          batch = []
      while jobs and not jobs[0].pending:
        yield _finish(jobs.popleft())
    if batch:
      self._run_batch(batch)
    while jobs:
      yield _finish(jobs.popleft())

  def enhance_float(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3] model output, unclamped."""
    ((_, out),) = list(self.enhance_many([(None, image)]))
    if isinstance(out, BaseException):
      raise out
    return out

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> enhanced uint8 [H, W, 3], clamped and rounded as a saved PNG."""
    return to_uint8(self.enhance_float(image))


def to_uint8(y: np.ndarray) -> np.ndarray:
  """Model output -> uint8, clamped to [0, 1] and rounded as a saved PNG (in place)."""
  np.clip(y, 0.0, 1.0, out=y)
  y *= 255.0
  return np.round(y, out=y).astype(np.uint8)


def _finish(job: _Job) -> tuple[Any, Any]:
  """(key, output cropped to the image) or (key, error); frees the job's buffers."""
  job.canvas = None
  output, job.output = job.output, None
  if job.error is not None:
    return job.key, job.error
  return job.key, tiling.blended(output, job.layout)


def _plan_outputs(
  inputs: Sequence[pathlib.Path], root: pathlib.Path, output: pathlib.Path, suffix: str
) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[str]]:
  """Pairs each input with its output file; names clashes as errors.

  ``output`` is a folder, or the output file itself when it has an image suffix (.png, .jpg,
  .jpeg) and is not an existing folder; a file takes exactly one input. In a folder, each
  input keeps its path below ``root`` (the input folder, or the fixed part of a glob), so
  ``trip/a/x.jpg`` and ``trip/a/b/x.jpg`` become ``OUT/a/x.png`` and ``OUT/a/b/x.png``.
  """
  if output.suffix.lower() in _WRITABLE and not output.is_dir():
    if len(inputs) != 1:
      raise ValueError(f'--output={output} is one file but --input names {len(inputs)} images')
    output.parent.mkdir(parents=True, exist_ok=True)
    return [(inputs[0], output)], []
  output.mkdir(parents=True, exist_ok=True)
  seen: dict[pathlib.Path, pathlib.Path] = {}
  pairs, errors = [], []
  for path in inputs:
    try:
      relative = path.relative_to(root)
    except ValueError:
      relative = pathlib.Path(path.name)
    target = output / relative.with_name(path.stem + suffix)
    if target in seen:
      errors.append(f'{path}: output {target} would also be written from {seen[target]}')
      continue
    seen[target] = path
    pairs.append((path, target))
  return pairs, errors


def _eta(done: int, total: int, elapsed: float) -> str:
  if not done:
    return '?'
  left = elapsed / done * (total - done)
  return time.strftime('%H:%M:%S', time.gmtime(left))


def _readable(
  pairs: Sequence[tuple[pathlib.Path, pathlib.Path]], overwrite: bool, counts: dict, failed: list
) -> Iterator[tuple[tuple[int, pathlib.Path, pathlib.Path], np.ndarray]]:
  """The images to enhance, read one at a time; skips and read failures are logged here."""
  for n, (src, dst) in enumerate(pairs, 1):
    prefix = f'[{n}/{len(pairs)}] {src.name}'
    if dst.exists() and not overwrite:
      counts['skipped'] += 1
      logging.info('%s: skipped, %s exists (use --overwrite to replace it)', prefix, dst)
      continue
    if dst.resolve() == src.resolve():
      failed.append(f'{src}: refusing to write over the input file itself')
      logging.error('%s', failed[-1])
      continue
    try:
      image = images.read_image(src)
    except (images.ImageError, ValueError, OSError) as e:
      failed.append(str(e) if str(src) in str(e) else f'{src}: {e}')
      logging.error('%s: FAILED: %s', prefix, failed[-1])
      continue
    yield (n, src, dst), image


def run(
  config: Any,
  workdir: str | None,
  inputs: str,
  output: str,
  overwrite: bool = False,
) -> int:
  """Enhances the images ``inputs`` names into the folder ``output``.

  Args:
    config: the experiment config; reads ``config.predict`` (checkpoint, tile_size,
      tile_overlap, bucket, format, jpeg_quality).
    workdir: the training run whose checkpoint ``config.predict.checkpoint`` names.
    inputs: a file, a folder or a glob.
    output: the folder to write to (created if missing), or the output file for one input.
    overwrite: replace existing output files (otherwise they are skipped).

  Returns:
    The process exit code: 0 when every image was written or skipped, 1 when any failed, 2 when
    the inputs or the weights cannot be found.
  """
  cfg = config.predict
  if cfg.format not in _SUFFIX:
    raise ValueError(f'config.predict.format={cfg.format!r}; choose png or jpeg')
  out_dir = pathlib.Path(output).expanduser()
  try:
    files = input_files.list_inputs(inputs)
    root = input_files.input_root(inputs)
    pairs, failed = _plan_outputs(files, root, out_dir, _SUFFIX[cfg.format])
    model_config, params, step = checkpoints.load_weights(
      cfg.checkpoint, workdir, key='config.predict.checkpoint'
    )
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    print(f'error: {e}')
    return 2
  model = create_model(model_config)
  enhancer = Enhancer(
    model,
    params,
    tile_size=cfg.tile_size,
    tile_overlap=cfg.tile_overlap,
    bucket=cfg.bucket,
    max_tile_megapixels=cfg.max_tile_megapixels,
  )
  for message in failed:
    logging.error('%s', message)
  logging.info(
    'Enhancing %d image(s) into %s with %s (step %d), tiles %d px / overlap %d px, %d device(s)',
    len(pairs), out_dir, cfg.checkpoint, step, cfg.tile_size, cfg.tile_overlap,
    len(enhancer.devices),
  )  # fmt: skip
  counts = {'written': 0, 'skipped': 0}
  start = time.time()
  for (n, src, dst), out in enhancer.enhance_many(_readable(pairs, overwrite, counts, failed)):
    prefix = f'[{n}/{len(pairs)}] {src.name}'
    try:
      if isinstance(out, BaseException):
        raise out
      h, w = out.shape[:2]
      dst.parent.mkdir(parents=True, exist_ok=True)
      images.write_image(dst, to_uint8(out), quality=cfg.jpeg_quality)
    except (images.ImageError, ValueError, OSError, jax.errors.JaxRuntimeError) as e:
      # JaxRuntimeError: e.g. out of memory on one huge image; a smaller tile_size helps.
      failed.append(str(e) if str(src) in str(e) else f'{src}: {e}')
      logging.error('%s: FAILED: %s', prefix, failed[-1])
      continue
    counts['written'] += 1
    logging.info(
      '%s: %dx%d, %d tile(s) -> %s; ETA %s',
      prefix, w, h, enhancer.num_tiles(h, w), dst, _eta(n, len(pairs), time.time() - start),
    )  # fmt: skip
  summary = (
    f'predict: {counts["written"]} written, {counts["skipped"]} skipped (existing), '
    f'{len(failed)} failed, in {time.time() - start:.1f} s -> {out_dir}'
  )
  print(summary)
  for message in failed:
    print(f'  failed: {message}')
  logging.info('%s', summary)
  return 1 if failed else 0
