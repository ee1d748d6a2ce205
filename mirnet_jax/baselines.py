"""Classical low-light enhancers, evaluated on the same protocol as the model.

Each baseline maps one uint8 [H, W, 3] RGB image to a uint8 [H, W, 3] image, as if saved to
PNG; the evaluation divides by 255 and sends it through `metrics.compute_metrics` like a model
output. Their LoL eval15 scores are the reference table of ../shared/docs/protocol.md, which
the tests reproduce. numpy and PIL only: these run on the host.
"""

import functools
import inspect
import types
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

Baseline = Callable[[np.ndarray], np.ndarray]


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'baselines take uint8 [H, W, 3] RGB images, got {image.dtype} {image.shape}')
  return image


def identity(image: np.ndarray) -> np.ndarray:
  """The dark input itself: the floor any enhancer must beat.

  Args:
    image: uint8 [H, W, 3] RGB.

  Returns:
    uint8 [H, W, 3], the same values.
  """
  return _check_image(image).copy()


def autocontrast(image: np.ndarray) -> np.ndarray:
  """PIL `ImageOps.autocontrast` with its defaults: stretches each channel to 0..255.

  Args:
    image: uint8 [H, W, 3] RGB.

  Returns:
    uint8 [H, W, 3].
  """
  return np.asarray(ImageOps.autocontrast(Image.fromarray(_check_image(image))))


def equalize(image: np.ndarray) -> np.ndarray:
  """PIL `ImageOps.equalize`: per-channel histogram equalisation.

  Args:
    image: uint8 [H, W, 3] RGB.

  Returns:
    uint8 [H, W, 3].
  """
  return np.asarray(ImageOps.equalize(Image.fromarray(_check_image(image))))


def gamma(image: np.ndarray, gamma: float = 1 / 2.2) -> np.ndarray:
  """Power-law curve `out = in ** gamma` on [0, 1], quantised back to 8 bits.

  Args:
    image: uint8 [H, W, 3] RGB.
    gamma: exponent; below 1 brightens. The default undoes a display gamma of 2.2.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: if gamma is not positive.
  """
  if not gamma > 0:
    raise ValueError(f'gamma must be positive, got {gamma}')
  x = _check_image(image).astype(np.float64) / 255.0
  # Same rounding as metrics.quantize (half to even), so a saved result scores the same.
  return np.round(np.clip(x**gamma, 0.0, 1.0) * 255.0).astype(np.uint8)


BASELINES: types.MappingProxyType[str, Baseline] = types.MappingProxyType(
  {
    'identity': identity,
    'autocontrast': autocontrast,
    'equalize': equalize,
    'gamma': gamma,
  }
)


def get_baseline(name: str, **kwargs) -> Baseline:
  """Returns the baseline `name` with its parameters bound, e.g. `get_baseline('gamma', gamma=0.4)`.

  Args:
    name: one of `BASELINES`.
    **kwargs: parameters of that baseline (only 'gamma' has one).

  Returns:
    A function uint8 [H, W, 3] -> uint8 [H, W, 3].

  Raises:
    ValueError: for an unknown name or a parameter the baseline does not take; the message
      lists what is available.
  """
  if name not in BASELINES:
    raise ValueError(f'unknown baseline {name!r}; choose one of: {", ".join(BASELINES)}')
  fn = BASELINES[name]
  # Bind now so that a typo in a parameter fails at configuration time, not mid-evaluation.
  params = list(inspect.signature(fn).parameters)[1:]
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(
      f'baseline {name!r} takes no parameter {", ".join(unknown)}; '
      f'its parameters: {", ".join(params) or "none"}'
    )
  return functools.partial(fn, **kwargs) if kwargs else fn
