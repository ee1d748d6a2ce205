"""Tile layouts of predict (mirnet_jax/tiling.py): coverage, one shape, low waste, context."""

import numpy as np
import pytest

from mirnet_jax import tiling


def _check(layout: tiling.Layout, *, tile_size: int, overlap: int, multiple: int, max_pixels=0):
  c, h, w = layout.context, layout.height, layout.width
  assert c == overlap // 2
  th, tw = layout.tile_shape
  assert th % multiple == 0 and tw % multiple == 0
  ch, cw = layout.canvas_shape
  assert ch >= h + 2 * c and cw >= w + 2 * c  # context on all four sides
  for starts, length, canvas in ((layout.rows, th, ch), (layout.cols, tw, cw)):
    assert starts[0] == 0 and starts[-1] + length == canvas  # first and last tile at the edges
    assert list(starts) == sorted(set(starts))
    covered = np.zeros(canvas, int)
    for s in starts:
      covered[s : s + length] += 1
    assert covered.min() >= 1  # every canvas pixel, so every image pixel, is computed
    for a, b in zip(starts, starts[1:], strict=False):
      assert a + length - b >= 2 * c  # interior tile edges keep `c` real pixels of context
  if layout.num_tiles > 1:
    assert th <= tile_size and tw <= tile_size
    if max_pixels:
      assert th * tw <= max_pixels


@pytest.mark.parametrize('max_pixels', [0, 600_000, 40_000])
def test_layout_covers_every_pixel_with_one_shape(max_pixels):
  rng = np.random.default_rng(0)
  sizes = [(1, 1), (1, 5000), (3000, 4000), (960, 960), (961, 1024), (400, 600), (4000, 31)]
  sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(40)]
  for h, w in sizes:
    for tile, overlap, multiple in ((1024, 64, 4), (256, 31, 8), (97, 16, 2)):
      layout = tiling.plan(
        h, w, tile_size=tile, overlap=overlap, multiple=multiple, bucket=64,
        max_tile_pixels=max_pixels,
      )  # fmt: skip
      _check(layout, tile_size=tile, overlap=overlap, multiple=multiple, max_pixels=max_pixels)


def test_low_waste_on_a_12_megapixel_photo():
  kw = dict(tile_size=1024, overlap=64, multiple=4, bucket=128)
  layout = tiling.plan(3000, 4000, **kw)
  # 4 x 5 tiles of 816x864 (1.18x the pixels) where fixed 1024x1024 tiles need 20 (1.75x).
  assert (len(layout.rows), len(layout.cols), layout.tile_shape) == (4, 5, (816, 864))
  assert layout.waste == pytest.approx(20 * 816 * 864 / 12e6)
  capped = tiling.plan(3000, 4000, max_tile_pixels=600_000, **kw)
  assert (len(capped.rows), len(capped.cols), capped.tile_shape) == (4, 6, (816, 732))
  assert capped.waste < 1.2
  # Small images are one tile, rounded up to the bucket; no tile_size means never tiled.
  assert tiling.plan(400, 600, **kw).tile_shape == (512, 768)
  assert tiling.plan(3000, 4000, **{**kw, 'tile_size': 0}).num_tiles == 1


def test_blend_weights_sum_to_one_and_canvas_reflects():
  layout = tiling.plan(300, 500, tile_size=128, overlap=32, multiple=4, bucket=64)
  for starts, length, canvas in (
    (layout.rows, layout.tile_shape[0], layout.canvas_shape[0]),
    (layout.cols, layout.tile_shape[1], layout.canvas_shape[1]),
  ):
    total = np.zeros(canvas)
    for s, w in zip(starts, tiling.ramp(length, starts), strict=True):
      total[s : s + length] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
  image = np.arange(300 * 500 * 3, dtype=np.int64).reshape(300, 500, 3)
  canvas = tiling.reflect_canvas(image, layout)
  c = layout.context
  assert canvas.shape[:2] == layout.canvas_shape
  np.testing.assert_array_equal(canvas[c : c + 300, c : c + 500], image)
  np.testing.assert_array_equal(canvas[c - 3, c : c + 500], image[3])  # mirrored, not repeated
  np.testing.assert_array_equal(canvas[c : c + 300, c + 500 + 2], image[:, 500 - 4])


@pytest.mark.parametrize('size', [(300, 500), (40, 60)])
def test_blending_identical_tiles_gives_back_the_image(size):
  # Tiles cut from one canvas agree on their overlaps, so the blend must return the image;
  # a wrong weight, offset or normalisation shows as an error far above float32 rounding.
  h, w = size
  layout = tiling.plan(h, w, tile_size=128, overlap=32, multiple=4, bucket=64)
  assert (layout.num_tiles > 1) == (size == (300, 500))
  image = np.random.default_rng(1).random((h, w, 3), dtype=np.float32)
  canvas = tiling.reflect_canvas(image, layout)
  th, tw = layout.tile_shape
  output = None
  for top in layout.rows:
    for left in layout.cols:
      tile = np.pad(canvas, ((0, th), (0, tw), (0, 0)))[top : top + th, left : left + tw]
      output = tiling.accumulate(output, layout, top, left, tile.copy())
  out = tiling.blended(output, layout)
  assert out.shape == (h, w, 3) and out.flags.c_contiguous
  np.testing.assert_allclose(out, image, atol=2e-6)
