"""Synthetic low-light pairs: well-exposed photographs darkened by a simple camera model.

The synthetic source lets the whole project (tests, `make demo`, a first training run) work
without downloading a dataset. Its targets ('high') are real photographs shipped inside the
scikit-image wheel (no pooch download); its inputs ('low') are those photographs darkened.

Low-light model, applied to one well-exposed uint8 sRGB image `x` with parameters drawn per
pair from a seeded `numpy.random.Generator` (ranges are `LowLightModel`'s defaults):

1. Linearise: `L = (x / 255) ** 2.2` (the sRGB curve as a plain 2.2 gamma).
2. Exposure: `L *= e`, `e ~ LogUniform[0.01, 0.1]` (3.3 to 6.6 stops under-exposed).
3. Colour cast: `L[..., c] *= g_c` with `g_g = 1` and `g_r, g_b ~ Uniform[0.8, 1.2]` (the white
   balance of a dark capture is off).
4. Poisson-Gaussian sensor noise in linear units: `L = Poisson(L / a) * a + Normal(0, s**2)`,
   shot-noise scale `a ~ LogUniform[1e-5, 1e-4]` (1e4 to 1e5 photons at full scale) and read
   noise `s ~ LogUniform[1e-4, 1e-3]`; then `L` is clipped to [0, 1].
5. Tone curve: `y = L ** (1 / gamma)`, `gamma ~ Uniform[1.8, 2.4]` (the camera's curve differs
   from the one we linearised with, so mid-tones shift as well as the exposure).
6. 8-bit quantisation: `low = round(255 * y)` as uint8 (dark images keep few levels, as real
   ones do).

With these ranges the mean of `low` is about 0.07 to 0.45 times the mean of `high`, and the noise
is visible but moderate, as in LoL's low-light images.

Photographs used (permissive licences, as stated in `skimage/data/_fetchers.py`):
astronaut.png (Eileen Collins, NASA; public domain), coffee.png (Rachel Michetti; CC0),
retina.jpg (Mikael Häggström; CC0 1.0), ihc.png (immunohistochemistry, Center for Microscopy
And Molecular Imaging; no known copyright restrictions), rocket.jpg (SpaceX; public domain),
chelsea.png (Stefan van der Walt; CC0).

Splits are disjoint regions of every photograph, not disjoint photographs. Each photograph is
cut across its longer side into three bands: validation (the first `b` pixels), train (the
middle) and test (the last `b` pixels), with `b = max(round(0.2 * longer side), size)`. Why: with
six sample photographs, holding whole photographs out made validation one photograph whose
brightness (rocket: mean 0.26) lay outside the training photographs' (0.35-0.63); a model learns
the brightness of its targets, since a dark input does not say how bright the scene was, so
that split measured one photograph's exposure rather than enhancement. Bands give every split
the same scenes, tones and colours (validation is in-distribution) while no pixel is shared.
Exposure relative to each photograph's brightness was not chosen: it makes the target's
brightness inferable only by tying it to the input's, a narrower task than real low light, where
one dark input can come from scenes of different brightness.

Each split also draws from its own random stream. Pair `i` of a split comes from photograph
`i % len(photos)`: a random square window inside that photograph's band of the split (its side
between `size` and the band's shorter side, at most 4x `size`) resized to `size` x `size`
(bicubic), flipped left-right with probability 1/2, then darkened. A pair depends only on
(seed, split, i), so the source is random-access and identical in every worker process. The
largest `size` is 150 (chelsea.png, 451x300, must hold three bands of at least `size`).

Users can make pairs from their own well-exposed photographs (full size, no crop):

  python -m mirnet_jax.data.synthetic --input PHOTOS --output PAIRS --seed 0 [--overwrite]

writes PAIRS/low/<stem>.png and PAIRS/high/<stem>.png, ready for `config.data.name='folder'`
(see synthetic_folder.py: the set appears whole or not at all; an existing PAIRS needs
--overwrite).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mirnet_jax.data import images

PHOTOS = ('astronaut.png', 'coffee.png', 'retina.jpg', 'ihc.png', 'rocket.jpg', 'chelsea.png')
# Separate random streams per split, so no two splits share a draw.
_SPLIT_STREAM = {'train': 0, 'validation': 1, 'test': 2}
_HELD_OUT_FRACTION = 0.2  # of a photograph's longer side, for each of validation and test
_MAX_ZOOM_OUT = 4.0  # a window is at most this many times `size` on a side


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@dataclasses.dataclass(frozen=True)
class LowLightModel:
  """Parameter ranges of the low-light model (see the module docstring for the equations)."""

  exposure: tuple[float, float] = (0.01, 0.1)  # log-uniform linear-intensity scale
  cast: tuple[float, float] = (0.8, 1.2)  # uniform red and blue gains (green is 1)
  shot_noise: tuple[float, float] = (1e-5, 1e-4)  # log-uniform: linear units per photon
  read_noise: tuple[float, float] = (1e-4, 1e-3)  # log-uniform std, linear units
  gamma: tuple[float, float] = (1.8, 2.4)  # uniform exponent of the output tone curve

  def sample(self, rng: np.random.Generator) -> dict[str, float]:
    """Draws one set of parameters; the keys are the arguments of `darken_with`."""
    return {
      'exposure': _log_uniform(rng, *self.exposure),
      'gain_r': float(rng.uniform(*self.cast)),
      'gain_b': float(rng.uniform(*self.cast)),
      'shot_noise': _log_uniform(rng, *self.shot_noise),
      'read_noise': _log_uniform(rng, *self.read_noise),
      'gamma': float(rng.uniform(*self.gamma)),
    }


def darken_with(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  exposure: float,
  gain_r: float,
  gain_b: float,
  shot_noise: float,
  read_noise: float,
  gamma: float,
) -> np.ndarray:
  """Applies the low-light model with given parameters (the noise still comes from `rng`).

  Args:
    image: well-exposed uint8 [H, W, 3] sRGB.
    rng: source of the sensor noise.
    exposure: linear-intensity scale (< 1 darkens).
    gain_r: red gain of the colour cast (linear).
    gain_b: blue gain of the colour cast (linear).
    shot_noise: linear intensity of one photon (Poisson noise scale); 0 disables it.
    read_noise: standard deviation of the Gaussian read noise (linear units).
    gamma: exponent of the output tone curve, `y = L ** (1 / gamma)`.

  Returns:
    The low-light uint8 [H, W, 3] image.
  """
  linear = (np.asarray(image, np.float64) / 255.0) ** 2.2
  linear = linear * (exposure * np.array([gain_r, 1.0, gain_b]))
  if shot_noise > 0:
    linear = rng.poisson(np.clip(linear, 0.0, None) / shot_noise) * shot_noise
  linear = linear + rng.normal(0.0, read_noise, linear.shape)
  encoded = np.clip(linear, 0.0, 1.0) ** (1.0 / gamma)
  return np.rint(encoded * 255.0).astype(np.uint8)


def darken(
  image: np.ndarray, rng: np.random.Generator, model: LowLightModel | None = None
) -> np.ndarray:
  """Darkens a well-exposed uint8 [H, W, 3] image with parameters drawn from `model`."""
  params = (model or LowLightModel()).sample(rng)
  return darken_with(image, rng, **params)


def skimage_data_dir() -> pathlib.Path:
  """The folder of sample images inside the installed scikit-image wheel."""
  import skimage.data  # Lazy: skimage imports scipy, slow to load, needed only here.

  return pathlib.Path(os.path.dirname(skimage.data.__file__))


@functools.lru_cache(maxsize=16)
def _load_photo(path: str) -> np.ndarray:
  # Cached per process: every worker decodes each photograph once.
  return images.read_image(path)


def _random_window(photo: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
  """Draws a square window (top, left, side) with size <= side <= min(H, W, 4 * size)."""
  h, w = photo.shape[:2]
  max_side = min(h, w, int(_MAX_ZOOM_OUT * size))
  # Log-uniform side: zoom levels are spread evenly, not biased to the largest windows.
  side = int(round(_log_uniform(rng, size, max_side))) if max_side > size else size
  top = int(rng.integers(0, h - side + 1))
  left = int(rng.integers(0, w - side + 1))
  return top, left, side


def split_region(height: int, width: int, size: int, split: str) -> tuple[int, int, int, int]:
  """The band (top, left, height, width) of a `height` x `width` photograph given to `split`.

  See the module docstring: validation | train | test across the longer side (columns when the
  photograph is square), each held-out band `max(round(0.2 * longer side), size)` wide.

  Raises:
    ValueError: the split is unknown, or its band is smaller than `size` on a side.
  """
  if split not in _SPLIT_STREAM:
    raise ValueError(f'synthetic: unknown split {split!r}; known: {sorted(_SPLIT_STREAM)}')
  longer = max(height, width)
  band = max(int(round(_HELD_OUT_FRACTION * longer)), size)
  # All three bands must fit, whichever split is asked for: the layout is one partition.
  narrowest = min(band, longer - 2 * band, height, width)
  if narrowest < size:
    raise ValueError(
      f'its bands (validation | train | test) need a longer side of at least {3 * size} and a '
      f'shorter side of at least {size} for size={size}'
    )
  start, stop = {
    'validation': (0, band),
    'train': (band, longer - band),
    'test': (longer - band, longer),
  }[split]
  if width >= height:
    return 0, start, height, stop - start
  return start, 0, stop - start, width


def make_pair(
  photo: np.ndarray, size: int, rng: np.random.Generator, model: LowLightModel | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Makes one (low, high) uint8 [size, size, 3] pair from a well-exposed photograph."""
  h, w = photo.shape[:2]
  if min(h, w) < size:
    raise ValueError(f'synthetic: a {h}x{w} photograph is smaller than size={size}')
  top, left, side = _random_window(photo, size, rng)
  window = photo[top : top + side, left : left + side]
  if side != size:
    window = np.asarray(Image.fromarray(window).resize((size, size), Image.Resampling.BICUBIC))
  if rng.random() < 0.5:
    window = window[:, ::-1]
  high = np.ascontiguousarray(window)
  return darken(high, rng, model), high


class SyntheticSource:
  """Random-access source of synthetic pairs `{'low', 'high', 'name'}` (uint8, str).

  Pair `i` is made on demand from (seed, split, i), so it is the same in every process and
  the source pickles small (paths, not pixels).
  """

  def __init__(
    self,
    photos: Sequence[str | os.PathLike[str]],
    *,
    num_pairs: int,
    size: int,
    seed: int,
    stream: int = 0,
    model: LowLightModel | None = None,
    split: str | None = None,
  ):
    """Initialises the source.

    Args:
      photos: well-exposed photographs to crop from (each at least `size` on its shorter side).
      num_pairs: number of pairs (the source's length).
      size: side of every pair (pixels).
      seed: non-negative integer seed.
      stream: separates the random streams of sources sharing a seed (e.g. one per split).
      model: low-light parameter ranges (defaults: `LowLightModel()`).
      split: crop only from this split's band of each photograph (see `split_region`);
        None uses whole photographs.
    """
    if not photos:
      raise ValueError('synthetic: no photographs given')
    if num_pairs < 1 or size < 1:
      raise ValueError(f'synthetic: need num_pairs >= 1 and size >= 1, got {num_pairs}, {size}')
    regions = []
    for path in photos:
      info = images.image_info(path)  # Header only: fail now, not later in a worker.
      where = f'synthetic: {path} is {info.width}x{info.height}'
      try:
        if split is None:
          if min(info.width, info.height) < size:
            raise ValueError(f'smaller than size={size}')
          regions.append((0, 0, info.height, info.width))
        else:
          regions.append(split_region(info.height, info.width, size, split))
      except ValueError as e:
        raise ValueError(f'{where}: {e}; lower config.data.synthetic_size') from None
    self._regions = regions
    self._split = split
    self._photos = [str(p) for p in photos]
    self._num_pairs = int(num_pairs)
    self._size = int(size)
    self._seed = int(seed)
    self._stream = int(stream)
    self._model = model or LowLightModel()

  def __len__(self) -> int:
    return self._num_pairs

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    index = int(index)
    if not 0 <= index < self._num_pairs:
      raise IndexError(f'synthetic: index {index} out of range [0, {self._num_pairs})')
    k = index % len(self._photos)
    top, left, height, width = self._regions[k]
    photo = _load_photo(self._photos[k])[top : top + height, left : left + width]
    rng = np.random.default_rng([self._seed, self._stream, index])
    low, high = make_pair(photo, self._size, rng, self._model)
    name = f'{index:05d}_{pathlib.Path(self._photos[k]).stem}'
    # The split in the name: the same index and photograph recur in every split.
    return {
      'low': low,
      'high': high,
      'name': name if self._split is None else f'{name}_{self._split}',
    }

  def __repr__(self) -> str:
    names = [pathlib.Path(p).name for p in self._photos]
    return (
      f'SyntheticSource(pairs={self._num_pairs}, size={self._size}, split={self._split}, '
      f'photos={names})'
    )


def create_synthetic_source(split: str, *, num_pairs: int, size: int, seed: int) -> SyntheticSource:
  """The synthetic source of one split, from its band of each photograph in `PHOTOS`.

  Args:
    split: 'train', 'validation' or 'test' (disjoint regions and random streams).
    num_pairs: number of pairs in the split.
    size: side of every pair (pixels, at most 150: see the module docstring).
    seed: non-negative integer seed.

  Returns:
    A `SyntheticSource`.
  """
  if split not in _SPLIT_STREAM:
    raise ValueError(f'synthetic: unknown split {split!r}; known: {sorted(_SPLIT_STREAM)}')
  data_dir = skimage_data_dir()
  paths = [data_dir / name for name in PHOTOS]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(
      f'synthetic: scikit-image sample photographs not found: {missing}; reinstall '
      'scikit-image (the wheel ships them)'
    )
  return SyntheticSource(
    paths, num_pairs=num_pairs, size=size, seed=seed, stream=_SPLIT_STREAM[split], split=split
  )


if __name__ == '__main__':
  # The command line lives in synthetic_folder.py; this keeps the documented command working.
  from mirnet_jax.data import synthetic_folder

  sys.exit(synthetic_folder.main())
