"""Read and write image files safely: one policy for every mode, errors that name the file.

Every reader in the project (TFDS builders, folder sources, predict) goes through `read_image`,
so a file means the same pixels everywhere. `read_image` returns uint8 [H, W, 3] RGB:

* EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so pixels are upright as a
  viewer shows them.
* Grayscale ('1', 'L', 'I;16*', 'I', 'F') is replicated to three channels.
* 16-bit samples are scaled to 8 bits by rounding: `round(x * 255 / 65535)`. This covers
  'I;16*' images (16-bit grayscale PNG and TIFF) and 16-bit colour PNGs (Pillow alone keeps only
  the high byte of those; we decode both bytes, see `_load_png16`). Other 16-bit colour files
  (e.g. 48-bit TIFF) and 16-bit gray+alpha PNGs get Pillow's high byte, within 1 of the rounded
  value.
* 'I' (32-bit integer) images are taken as 16-bit data (older Pillow versions open 16-bit
  grayscale PNGs as 'I'): clipped to [0, 65535], then scaled as above.
* 'F' (32-bit float) images are taken as intensities in [0, 1]: clipped, times 255, rounded
  (ties to even).
* Palette ('P', 'PA') images go through their palette.
* Alpha ('RGBA', 'LA', 'PA', transparent palettes) is DROPPED: colour values are kept as stored
  and not composited over any background, which is lossless for the opaque images datasets hold.
* CMYK, YCbCr, LAB and HSV go through Pillow's conversion to RGB (no ICC colour management;
  embedded ICC profiles are ignored everywhere).
* Multi-frame files (GIF, multi-page TIFF) give their first frame.
* A missing, unreadable, unsupported, truncated or oversized (Pillow's decompression-bomb
  limit) file raises `ImageError` naming the file. Files are fully decoded; truncated data is an
  error as long as `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` keeps its default (False): this module
  never sets it.

`decode_image` applies the same policy to encoded bytes (e.g. a member of a zip archive);
`image_info` reads the header (size after orientation, mode, bit depth), and with `verify=True`
also decodes every pixel without converting them; `list_images` lists a folder's images.

`write_image` writes PNG or JPEG (by suffix) atomically: a temporary file in the target directory
renamed over the target with `os.replace`, so a crash never leaves a half-written image. The file
gets the mode of any new file (0644 under umask 022), not mkstemp's private 0600, so a web
server or a colleague can read the outputs. `encode_image` gives the same bytes in memory.

Remote paths (`gs://...`, any `etils.epath` scheme) can be read, written and listed: a remote
object appears only once its upload is complete, the atomicity a rename gives on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import secrets
from collections.abc import Iterator

import numpy as np
from etils import epath
from PIL import Image, ImageOps

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
# A file path, or the encoded contents of an image file.
Source = str | os.PathLike[str] | bytes

_WRITE_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG'}
# EXIF orientations 5-8 rotate by 90 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(ValueError):
  """An image file cannot be read or written; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What a file header says, before decoding any pixel.

  Attributes:
    width: width in pixels after EXIF orientation.
    height: height in pixels after EXIF orientation.
    mode: the Pillow mode as stored ('RGB', 'L', 'I;16', 'P', ...).
    format: the Pillow format name ('PNG', 'JPEG', ...).
    bits: bits per sample (16 for 16-bit PNGs and 'I;16*' images, else 8; 32 for 'I'/'F').
    orientation: the EXIF orientation tag (1 = upright, as stored).
  """

  width: int
  height: int
  mode: str
  format: str
  bits: int
  orientation: int = 1

  @property
  def is_plain_rgb8(self) -> bool:
    """Whether Pillow decodes the file, as is, to exactly what `read_image` returns."""
    return self.mode == 'RGB' and self.bits == 8 and self.orientation == 1


def _exif_orientation(img: Image.Image) -> int:
  try:
    return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
  except Exception:  # A broken EXIF block must not hide the pixels; exif_transpose agrees.
    return 1


def _rawmode(img: Image.Image) -> str:
  """The raw mode of the first tile when it is a plain string (PNG), else ''."""
  tile = getattr(img, 'tile', None)
  if tile and isinstance(tile[0].args, str):
    return tile[0].args
  return ''


def _bits(img: Image.Image) -> int:
  if img.mode.startswith('I;16') or _rawmode(img).endswith(';16B'):
    return 16
  if img.mode in ('I', 'F'):
    return 32
  return 8


def is_remote(path: str | os.PathLike[str]) -> bool:
  """Whether a path names a remote object (`gs://...`) rather than a local file."""
  return '://' in os.fspath(path)


def _open(source: Source) -> Image.Image:
  if isinstance(source, bytes):
    return Image.open(io.BytesIO(source))
  if is_remote(source):
    return Image.open(io.BytesIO(epath.Path(source).read_bytes()))
  return Image.open(source)


def _describe(source: Source, name: str | None) -> str:
  if name is not None:
    return name
  return '<bytes>' if isinstance(source, bytes) else str(source)


@contextlib.contextmanager
def _errors_named(name: str) -> Iterator[None]:
  """Turns whatever opening or decoding raises into an ImageError naming the file."""
  try:
    yield
  except FileNotFoundError as e:
    raise ImageError(f'{name}: no such file') from e
  except IsADirectoryError as e:
    raise ImageError(f'{name}: is a directory') from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(f'{name}: not an image Pillow can read') from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # Pillow signals corrupt data with OSError, ValueError and (for some formats) SyntaxError.
    raise ImageError(f'{name}: cannot decode image: {e}') from e


def image_info(source: Source, *, name: str | None = None, verify: bool = False) -> ImageInfo:
  """Reads what an image's header says, optionally checking that all its pixels decode.

  Args:
    source: the image file, or its encoded bytes.
    name: how error messages name the image (default: the path).
    verify: also decode every pixel (without converting or keeping them), so that truncated or
      corrupt data raises here. Cheaper than `read_image`, which also converts.

  Returns:
    Its `ImageInfo`. (Finding the EXIF block of a PNG may decode it anyway: PNG allows that
    block after the pixel data.)

  Raises:
    ImageError: the file is missing or not a recognised image; with `verify`, also when its
      data is truncated or corrupt.
  """
  name = _describe(source, name)
  with _errors_named(name):
    with _open(source) as img:
      width, height = img.size
      # Before anything loads the pixels: loading clears the tile that tells the bit depth.
      bits = _bits(img)
      orientation = _exif_orientation(img)
      if verify:
        img.load()
      if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
      return ImageInfo(width, height, img.mode, img.format or '', bits, orientation)


def _load_png16(source: Source, img: Image.Image) -> np.ndarray:
  """Decodes a 16-bit colour PNG to uint16 [H, W, C] with both bytes of every sample.

  Pillow unpacks 'RGB;16B' / 'RGBA;16B' into 8-bit modes keeping the high byte. Decoding the
  same data a second time with the little-endian raw mode makes Pillow keep the other (low)
  byte instead; PNG filtering works on bytes, so it is unaffected by that swap.
  """
  img.load()
  high = np.asarray(img).astype(np.uint16)
  with _open(source) as again:
    tile = again.tile[0]
    again.tile = [tile._replace(args=tile.args.replace(';16B', ';16L'))]
    again.load()
    low = np.asarray(again).astype(np.uint16)
  return (high << 8) | low


def _scale16(x: np.ndarray) -> np.ndarray:
  x = np.clip(x.astype(np.float64), 0, 65535)
  return np.rint(x * (255.0 / 65535.0)).astype(np.uint8)


def _to_rgb_array(source: Source, img: Image.Image) -> np.ndarray:
  """Applies the module's mode policy to a loaded (not yet transposed) image."""
  # Before getexif, which may load the pixels (PNG) and so clear the tile holding the raw mode.
  rawmode = _rawmode(img)
  orientation = _exif_orientation(img)
  if img.format == 'PNG' and rawmode in ('RGB;16B', 'RGBA;16B'):
    # exif_transpose has no 16-bit colour mode to work on: orient the array instead.
    return _orient_array(_scale16(_load_png16(source, img))[..., :3], orientation)
  img.load()
  img = ImageOps.exif_transpose(img)
  mode = img.mode
  if mode.startswith('I;16') or mode == 'I':
    x = _scale16(np.asarray(img))
  elif mode == 'F':
    x = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
  elif mode in ('1', 'L'):
    x = np.asarray(img.convert('L'))
  elif mode == 'LA':
    x = np.asarray(img)[..., 0]
  elif mode in ('RGB', 'RGBA', 'RGBX', 'RGBa'):
    x = np.asarray(img)[..., :3]
  else:  # P, PA, CMYK, YCbCr, LAB, HSV, ...
    x = np.asarray(img.convert('RGB'))
  if x.ndim == 2:
    x = np.repeat(x[..., None], 3, axis=-1)
  return np.ascontiguousarray(x, dtype=np.uint8)


def _orient_array(x: np.ndarray, orientation: int) -> np.ndarray:
  """Applies an EXIF orientation (1-8) to an [H, W, C] array, as exif_transpose does."""
  ops = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
  }
  op = ops.get(orientation)
  return np.ascontiguousarray(x if op is None else op(x))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB, following the module's policy.

  Args:
    path: the image file (any format Pillow reads).

  Returns:
    uint8 array [H, W, 3], upright (EXIF orientation applied).

  Raises:
    ImageError: the file is missing, unreadable, truncated or in an unsupported mode; the
      message names the file.
  """
  return _read(path, str(path))


def decode_image(data: bytes, *, name: str = '<bytes>') -> np.ndarray:
  """Decodes an encoded image (file contents) like `read_image` reads a file.

  Args:
    data: the encoded image (PNG, JPEG, ...).
    name: how error messages name the image (e.g. its path inside an archive).

  Returns:
    uint8 array [H, W, 3], upright.

  Raises:
    ImageError: the data is not a complete, supported image; the message names `name`.
  """
  return _read(bytes(data), name)


def _read(source: Source, name: str) -> np.ndarray:
  with _errors_named(name):
    with _open(source) as img:
      return _to_rgb_array(source, img)


def _as_uint8(array: np.ndarray, path: pathlib.Path) -> np.ndarray:
  x = np.asarray(array)
  if x.ndim == 2:
    x = np.repeat(x[..., None], 3, axis=-1)
  if x.ndim != 3 or x.shape[-1] != 3 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ImageError(f'{path}: expected an array [H, W, 3], got shape {x.shape}')
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)):
      raise ImageError(f'{path}: refusing to write non-finite pixel values')
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise ImageError(f'{path}: expected uint8 or float [0, 1] pixels, got {x.dtype}')


def encode_image(array: np.ndarray, fmt: str = 'PNG', *, quality: int = 95) -> bytes:
  """Encodes uint8 or float [0, 1] pixels [H, W, 3] as PNG or JPEG bytes.

  Args:
    array: uint8, or float clipped to [0, 1] and rounded to 8 bits; [H, W] is taken as gray.
    fmt: 'PNG' or 'JPEG'.
    quality: JPEG quality (ignored for PNG).

  Returns:
    The encoded file contents.
  """
  x = _as_uint8(array, pathlib.Path(f'<{fmt} bytes>'))
  buf = io.BytesIO()
  if fmt == 'JPEG':
    Image.fromarray(x).save(buf, format='JPEG', quality=quality)
  else:
    Image.fromarray(x).save(buf, format=fmt)
  return buf.getvalue()


def _create_temporary(path: pathlib.Path) -> tuple[int, str]:
  """A new hidden file beside ``path``, (fd, name); its mode is the umask's, unlike mkstemp's 0600.

  `os.open` with 0666 lets the kernel apply the umask (and any default ACL); O_EXCL keeps it ours.
  """
  while True:
    tmp = os.fspath(path.parent / f'.{path.name}.{secrets.token_hex(6)}.tmp')
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except FileExistsError:
      continue


def write_image(path: str | os.PathLike[str], array: np.ndarray, *, quality: int = 95) -> None:
  """Writes pixels to a PNG or JPEG file (by suffix), atomically.

  Args:
    path: target file, local or remote (`gs://...`); its suffix (.png, .jpg, .jpeg, any case)
      picks the format. A local file's directory must exist. The file's mode is that of any new
      file under the umask (0644 under umask 022).
    array: uint8 [H, W, 3], or float [H, W, 3] clipped to [0, 1] and rounded to 8 bits.
    quality: JPEG quality, 1-95.

  Raises:
    ImageError: unknown suffix, bad array, or the file could not be written (no partial file is
      left behind).
  """
  remote = is_remote(path)
  path = epath.Path(path) if remote else pathlib.Path(path)
  fmt = _WRITE_FORMATS.get(path.suffix.lower())
  if fmt is None:
    raise ImageError(f'{path}: cannot write suffix {path.suffix!r}; use one of {_WRITE_FORMATS}')
  data = encode_image(_as_uint8(array, path), fmt, quality=quality)
  if remote:
    try:
      path.write_bytes(data)  # an object store publishes the object only once it is complete
    except OSError as e:
      raise ImageError(f'{path}: cannot write image: {e}') from e
    return
  tmp = None
  try:
    fd, tmp = _create_temporary(path)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    raise ImageError(f'{path}: cannot write image: {e}') from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def list_images(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Lists the image files directly inside a directory, sorted by name.

  Args:
    directory: the folder to list (not recursive), local or remote.

  Returns:
    Paths whose suffix is one of `IMAGE_SUFFIXES` (any case), sorted by file name. Hidden files
    (leading '.') are skipped. `pathlib.Path`s for a local folder, `epath.Path`s for a remote one.

  Raises:
    ImageError: the directory does not exist.
  """
  directory = epath.Path(directory) if is_remote(directory) else pathlib.Path(directory)
  if not directory.is_dir():
    raise ImageError(f'{directory}: no such directory')
  return sorted(
    (
      p
      for p in directory.iterdir()
      if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.') and p.is_file()
    ),
    key=lambda p: p.name,
  )
