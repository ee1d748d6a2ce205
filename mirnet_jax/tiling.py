"""Where predict's tiles go: a low-waste layout of one tile shape, with reflected context.

An image of H x W pixels is first reflect-padded by ``context`` pixels on all four sides (the
canvas), so that its outermost pixels sit as far from the model's zero-padded input border as
any interior pixel of a tile does from the tile's border: the convolutions' zero padding then
only touches pixels that are cropped away, and the borders of the output no longer depend on
whether, or how, the image was tiled.

The canvas is cut along each axis into ``n`` tiles of one length ``L``, where ``n`` is the
smallest count whose tiles, at most ``tile_size`` long and overlapping by at least
``2 * context`` (= ``overlap``), cover it; ``L`` is then the shortest length that does, rounded
up to the model's size multiple. Every tile of an image has the same shape (one compilation),
and the pixels computed exceed the image's only by the overlaps: 4000x3000 with tiles of 1024
and an overlap of 64 gives 4 x 5 tiles of 816x864, 1.18x the photo's pixels (a fixed 1024x1024
tile would need 1.75x). An image whose canvas fits in one tile is one tile, rounded up to the
``bucket`` so that photos of similar sizes share a compiled shape.

The tile outputs are blended back with `ramp`'s weights (`accumulate`, then `blended`). Pure
numpy; `predict.py` runs the model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _round_up(n: int, multiple: int) -> int:
  return math.ceil(n / multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Layout:
  """The tiles of one image.

  Attributes:
    height, width: the image (pixels).
    context: reflected pixels added on every side of the image.
    rows, cols: tile starts along each axis, in canvas coordinates (the image starts at
      (context, context) of the canvas).
    tile_shape: (height, width) of every tile, the model's input shape.
    canvas_shape: (height, width) of the reflect-padded image the tiles are cut from.
  """

  height: int
  width: int
  context: int
  rows: tuple[int, ...]
  cols: tuple[int, ...]
  tile_shape: tuple[int, int]
  canvas_shape: tuple[int, int]

  @property
  def num_tiles(self) -> int:
    return len(self.rows) * len(self.cols)

  @property
  def waste(self) -> float:
    """Pixels the model computes over pixels of the image (1.0 = no overhead)."""
    th, tw = self.tile_shape
    return self.num_tiles * th * tw / (self.height * self.width)

  def tiles(self) -> list[tuple[int, int]]:
    """(top, left) canvas offsets of every tile, row by row."""
    return [(r, c) for r in self.rows for c in self.cols]


def _length(size: int, count: int, context: int, multiple: int) -> int:
  """The shortest tile (a multiple of ``multiple``) of which ``count`` cover ``size`` pixels
  plus ``context`` on both ends, overlapping by at least ``2 * context``.

  ``count`` tiles of length L overlapping by 2c cover size + 2c when
  count * L - (count - 1) * 2c >= size + 2c, i.e. L >= size / count + 2c.
  """
  return _round_up(math.ceil(size / count) + 2 * context, multiple)


def _starts(size: int, count: int, length: int, context: int) -> tuple[int, ...]:
  if count == 1:
    return (0,)
  # The step is at most length - 2 * context (see `_length`): overlaps stay >= 2 * context.
  step = (size + 2 * context - length) / (count - 1)
  return tuple(round(i * step) for i in range(count))


_MAX_EXTRA_TILES = 64  # per axis, beyond the fewest that tile_size allows: the layout search


def plan(
  height: int,
  width: int,
  *,
  tile_size: int,
  overlap: int,
  multiple: int,
  bucket: int,
  max_tile_pixels: int = 0,
) -> Layout:
  """The tile layout of an image (see the module docstring).

  Args:
    height, width: the image (pixels, >= 1).
    tile_size: the longest tile side (pixels); 0 never tiles.
    overlap: pixels neighbouring tiles share; half of it is the context every image gets on
      each side (reflected) and every tile edge gets inside the image.
    multiple: the model's size multiple (tile sides are multiples of it).
    bucket: an untiled image's canvas is rounded up to a multiple of this (pixels).
    max_tile_pixels: the most pixels one tile may have (0 = no limit); it bounds the memory of
      a model call.

  Returns:
    The `Layout`: one tile when the bucketed canvas fits both limits, otherwise the tile
    counts per axis that compute the fewest pixels (then the fewest tiles) within them.
  """
  if height < 1 or width < 1:
    raise ValueError(f'image size {width}x{height} must be positive')
  c = overlap // 2
  bucket = _round_up(max(bucket, multiple), multiple)
  th, tw = _round_up(height + 2 * c, bucket), _round_up(width + 2 * c, bucket)
  fits_side = not tile_size or max(th, tw) <= max(tile_size, bucket)
  if fits_side and (not max_tile_pixels or th * tw <= max_tile_pixels):
    return Layout(height, width, c, (0,), (0,), (th, tw), (th, tw))
  side = tile_size or max(height, width) + 2 * c + multiple

  def counts(size: int) -> list[tuple[int, int]]:
    """(count, length) options along one axis, lengths within the tile size."""
    first = 1 if size + 2 * c <= side else math.ceil(size / max(side - 2 * c, 1))
    options = []
    for count in range(first, first + _MAX_EXTRA_TILES):
      length = _length(size, count, c, multiple)
      if length <= side:
        options.append((count, length))
      if length <= 2 * c + multiple:
        break
    return options

  best = None
  for nr, lr in counts(height):
    for nc, lc in counts(width):
      if max_tile_pixels and lr * lc > max_tile_pixels and best is not None:
        continue
      # Over the pixel limit only while nothing meets it (a limit below the smallest tile).
      over = bool(max_tile_pixels) and lr * lc > max_tile_pixels
      key = (over, nr * nc * lr * lc, nr * nc)
      if best is None or key < best[0]:
        best = (key, nr, lr, nc, lc)
  _, nr, lr, nc, lc = best
  canvas = (max(lr, height + 2 * c), max(lc, width + 2 * c))
  return Layout(
    height, width, c, _starts(height, nr, lr, c), _starts(width, nc, lc, c), (lr, lc), canvas
  )


def reflect_canvas(image: np.ndarray, layout: Layout) -> np.ndarray:
  """The image [H, W, C] reflect-padded to the layout's canvas (context on every side, any
  extra at the bottom/right)."""
  c = layout.context
  ch, cw = layout.canvas_shape
  pads = ((c, ch - layout.height - c), (c, cw - layout.width - c), (0, 0))
  if not any(p for pair in pads for p in pair):
    return image
  # 'reflect' needs two pixels to mirror and repeats itself for pads longer than the image;
  # a one-pixel side can only be repeated.
  mode = 'reflect' if min(image.shape[:2]) > 1 else 'symmetric'
  return np.pad(image, pads, mode=mode)


def ramp(length: int, starts: list[int] | tuple[int, ...]) -> np.ndarray:
  """Blend weights [len(starts), length] of the tiles along one axis.

  Each tile's weight rises as a raised cosine over the part it shares with the previous tile,
  and falls the same way over the part it shares with the next one, so neighbouring weights
  cross over smoothly and sum to one, and the seam-prone tile borders count least. Weights stay
  positive (the cosine is sampled at pixel centres), so the normalisation never divides by zero.
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


def accumulate(
  output: np.ndarray | None, layout: Layout, top: int, left: int, y: np.ndarray
) -> np.ndarray:
  """Adds tile output ``y`` (float32 [tile_h, tile_w, C], from canvas row ``top`` and column
  ``left``) to ``output``, the weighted sum over the canvas so far (None before the first
  tile), and returns it. A one-tile layout returns ``y`` itself: there is nothing to blend."""
  if layout.num_tiles == 1:
    return y
  if output is None:
    output = np.zeros((*layout.canvas_shape, y.shape[-1]), np.float32)
  th, tw = layout.tile_shape
  wr = ramp(th, layout.rows)[layout.rows.index(top)]
  wc = ramp(tw, layout.cols)[layout.cols.index(left)]
  output[top : top + th, left : left + tw] += (wr[:, None] * wc[None, :])[..., None] * y
  return output


def blended(output: np.ndarray, layout: Layout) -> np.ndarray:
  """The image [H, W, C] from ``accumulate``'s sum over every tile: cropped out of the canvas
  and divided by the sum of the weights (in place)."""
  c, h, w = layout.context, layout.height, layout.width
  out = output[c : c + h, c : c + w]
  if layout.num_tiles > 1:
    # The weights are products of one ramp per axis, so their sum over the tiles is the
    # product of the per-axis sums: two vectors rather than a canvas-sized array.
    th, tw = layout.tile_shape
    norm_r = _axis_norm(layout.canvas_shape[0], th, layout.rows)[c : c + h]
    norm_c = _axis_norm(layout.canvas_shape[1], tw, layout.cols)[c : c + w]
    out /= (norm_r[:, None] * norm_c[None, :])[..., None]
  return np.ascontiguousarray(out)


def _axis_norm(length: int, tile: int, starts: tuple[int, ...]) -> np.ndarray:
  total = np.zeros(length, np.float32)
  for start, weight in zip(starts, ramp(tile, starts), strict=True):
    total[start : start + tile] += weight
  return total
