"""Enhance image files of any size with MIRNet: ``--mode=predict``.

    python -m mirnet_jax.main --mode=predict --config=configs/lol.py --workdir=W \\
        --input=PHOTOS --output=OUT [--overwrite]

``--input`` is a file, a folder (its images, not recursive) or a glob (``'shots/**/*.jpg'``),
listed by `sources.list_inputs`.
Each input ``NAME.EXT`` becomes ``OUT/NAME.png`` (or ``.jpg`` with
``--config.predict.format=jpeg``), at exactly the input's size. For a single input, ``--output``
may name the output file itself (``out.png``, ``out.jpg``).

How an image goes through the model:
* Files are read by `images.read_image`: EXIF orientation applied; grayscale, palette, RGBA
  (alpha dropped) and 16-bit files become 8-bit RGB.
* Shape buckets: every model input is reflect-padded at the bottom/right up to multiples of
  ``config.predict.bucket`` pixels, so photos of similar sizes share one compilation (XLA compiles
  once per input shape); the output is cropped back.
* Tiles: an image larger than ``config.predict.tile_size`` on a side is cut into overlapping
  tiles of that size, all of one shape (one compilation), and the tile outputs are blended with
  a raised-cosine ramp across each overlap, normalised by the summed weights. Memory is then
  bounded by the tile, not the photo. An image that fits in one tile takes exactly the same path
  as a single tile, so tiling with a tile at least the image size changes nothing.
* Output policy: an existing output file is never replaced unless ``--overwrite``; files are
  written atomically; a file that fails is named and the others are still processed; the exit
  code is non-zero when any file failed.
"""

import functools
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mirnet_jax import checkpoints
from mirnet_jax.data import images, sources
from mirnet_jax.models import MIRNet, create_model

_SUFFIX = {'png': '.png', 'jpeg': '.jpg'}
_WRITABLE = ('.png', '.jpg', '.jpeg')


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap``.

  The last tile ends at ``size`` exactly, so every tile has the same length (one compiled
  shape) and the overlaps are spread as evenly as the stride allows.
  """
  if size <= tile:
    return [0]
  count = math.ceil((size - overlap) / (tile - overlap))
  step = (size - tile) / (count - 1)
  return [round(i * step) for i in range(count)]


def ramp(length: int, starts: Sequence[int]) -> np.ndarray:
  """Blend weights [len(starts), length] of the tiles along one axis.

  Each tile's weight rises as a raised cosine over the part it shares with the previous tile,
  and falls the same way over the part it shares with the next one, so neighbouring weights
  cross over smoothly and the seam-prone tile borders count least. Weights stay positive (the
  cosine is sampled at pixel centres), so the normalisation never divides by zero.
  """
  out = np.ones((len(starts), length), np.float64)
  for i, start in enumerate(starts):
    if i > 0:
      shared = starts[i - 1] + length - start
      if shared > 0:
        t = (np.arange(shared) + 0.5) / shared
        out[i, :shared] = 0.5 - 0.5 * np.cos(np.pi * t)
    if i + 1 < len(starts):
      shared = start + length - starts[i + 1]
      if shared > 0:
        t = (np.arange(shared) + 0.5) / shared
        falling = 0.5 + 0.5 * np.cos(np.pi * t)
        out[i, length - shared :] = np.minimum(out[i, length - shared :], falling)
  return out.astype(np.float32)


def _pad_to(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Reflect-pads [H, W, 3] at the bottom/right to (height, width); repeats reflections."""
  ph, pw = height - x.shape[0], width - x.shape[1]
  if not ph and not pw:
    return x
  # 'reflect' needs two pixels to mirror; a one-pixel side can only be repeated.
  mode = 'reflect' if min(x.shape[:2]) > 1 else 'symmetric'
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode=mode)


@functools.lru_cache(maxsize=4)
def _compiled_forward(model: MIRNet) -> tuple[Callable[[Any, jax.Array], jax.Array], set]:
  """One jitted forward per model, shared by every `Enhancer` of it (and every `run`).

  XLA keeps one executable per padded (bucket) shape under it; the set records the shapes
  seen, to log compilations.
  """

  def forward(params: Any, x: jax.Array) -> jax.Array:
    return model.apply({'params': params}, x).astype(jnp.float32)

  return jax.jit(forward), set()


class Enhancer:
  """Applies MIRNet to uint8 images of any size: shape buckets, tiles and blending.

  Args:
    model: the network (its ``size_multiple`` constrains the padded shapes).
    params: its parameters.
    tile_size: tile side in pixels; 0 never tiles.
    tile_overlap: pixels shared by neighbouring tiles.
    bucket: padded shapes are multiples of this (pixels); rounded up to the model's multiple.
  """

  def __init__(self, model: MIRNet, params: Any, *, tile_size: int, tile_overlap: int, bucket: int):
    m = model.size_multiple
    self.bucket = max(m, math.ceil(max(bucket, 1) / m) * m)
    if tile_size < 0 or tile_overlap < 0:
      raise ValueError('config.predict.tile_size and tile_overlap must be >= 0')
    if tile_size and tile_overlap >= tile_size:
      raise ValueError(
        f'config.predict.tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})'
      )
    self.tile_size = tile_size
    self.tile_overlap = tile_overlap
    self.params = jax.device_put(params)
    self._forward, self._shapes = _compiled_forward(model)

  def _padded(self, n: int) -> int:
    return math.ceil(n / self.bucket) * self.bucket

  def _run(self, x: np.ndarray) -> np.ndarray:
    """float32 [h, w, 3] -> model output [h, w, 3] (unclamped), through the bucket shape."""
    h, w = x.shape[:2]
    hp, wp = self._padded(h), self._padded(w)
    if (hp, wp) not in self._shapes:
      self._shapes.add((hp, wp))
      logging.info('Compiling the model for %dx%d inputs (bucket %d px)', wp, hp, self.bucket)
    y = self._forward(self.params, _pad_to(x, hp, wp)[None])
    return np.asarray(jax.device_get(y))[0, :h, :w]

  def num_tiles(self, height: int, width: int) -> int:
    """How many model calls an image of this size takes."""
    t, o = self.tile_size or max(height, width), self.tile_overlap
    return len(tile_starts(height, t, o)) * len(tile_starts(width, t, o))

  def enhance_float(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3] model output, unclamped."""
    x = np.asarray(image, np.float32) / 255.0
    h, w = x.shape[:2]
    t = self.tile_size or max(h, w)
    th, tw = min(t, h), min(t, w)
    rows = tile_starts(h, th, self.tile_overlap)
    cols = tile_starts(w, tw, self.tile_overlap)
    if len(rows) == 1 and len(cols) == 1:
      return self._run(x)
    wr, wc = ramp(th, rows), ramp(tw, cols)
    acc = np.zeros((h, w, 3), np.float32)
    norm = np.zeros((h, w, 1), np.float32)
    start, count = time.time(), len(rows) * len(cols)
    for i, r in enumerate(rows):
      for j, c in enumerate(cols):
        weight = (wr[i][:, None] * wc[j][None, :])[..., None]
        acc[r : r + th, c : c + tw] += weight * self._run(x[r : r + th, c : c + tw])
        norm[r : r + th, c : c + tw] += weight
        done = i * len(cols) + j + 1
        logging.info('  tile %d/%d, ETA %s', done, count, _eta(done, count, time.time() - start))
    return acc / norm

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> enhanced uint8 [H, W, 3], clamped and rounded as a saved PNG."""
    y = self.enhance_float(image)
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def _plan_outputs(
  inputs: Sequence[pathlib.Path], output: pathlib.Path, suffix: str
) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[str]]:
  """Pairs each input with its output file; names clashes (same stem) as errors.

  ``output`` is a folder, or the output file itself when it has an image suffix (.png, .jpg,
  .jpeg) and is not an existing folder; a file takes exactly one input.
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
    target = output / (path.stem + suffix)
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
    files = sources.list_inputs(inputs)
    pairs, failed = _plan_outputs(files, out_dir, _SUFFIX[cfg.format])
    model_config, params, step = checkpoints.load_weights(
      cfg.checkpoint, workdir, key='config.predict.checkpoint'
    )
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    print(f'error: {e}')
    return 2
  model = create_model(model_config)
  enhancer = Enhancer(
    model, params, tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap, bucket=cfg.bucket
  )
  for message in failed:
    logging.error('%s', message)
  logging.info(
    'Enhancing %d image(s) into %s with %s (step %d), tiles %d px / overlap %d px',
    len(pairs), out_dir, cfg.checkpoint, step, cfg.tile_size, cfg.tile_overlap,
  )  # fmt: skip
  written, skipped = 0, 0
  start = time.time()
  for n, (src, dst) in enumerate(pairs, 1):
    prefix = f'[{n}/{len(pairs)}] {src.name}'
    if dst.exists() and not overwrite:
      skipped += 1
      logging.info('%s: skipped, %s exists (use --overwrite to replace it)', prefix, dst)
      continue
    if dst.resolve() == src.resolve():
      failed.append(f'{src}: refusing to write over the input file itself')
      logging.error('%s', failed[-1])
      continue
    t0 = time.time()
    try:
      image = images.read_image(src)
      h, w = image.shape[:2]
      images.write_image(dst, enhancer(image), quality=cfg.jpeg_quality)
    except (images.ImageError, ValueError, OSError, jax.errors.JaxRuntimeError) as e:
      # JaxRuntimeError: e.g. out of memory on one huge image; a smaller tile_size helps.
      failed.append(str(e) if str(src) in str(e) else f'{src}: {e}')
      logging.error('%s: FAILED: %s', prefix, failed[-1])
      continue
    written += 1
    logging.info(
      '%s: %dx%d, %d tile(s), %.1f s -> %s; ETA %s',
      prefix, w, h, enhancer.num_tiles(h, w), time.time() - t0, dst,
      _eta(n, len(pairs), time.time() - start),
    )  # fmt: skip
  summary = (
    f'predict: {written} written, {skipped} skipped (existing), {len(failed)} failed, '
    f'in {time.time() - start:.1f} s -> {out_dir}'
  )
  print(summary)
  for message in failed:
    print(f'  failed: {message}')
  logging.info('%s', summary)
  return 1 if failed else 0
