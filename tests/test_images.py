"""Tests for mirnet_jax.data.images: one read policy for every mode, atomic writes, clear errors."""

import os
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mirnet_jax.data import images

RNG = np.random.default_rng(0)
# A non-symmetric image, so that every flip and rotation gives a different array.
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _png16(path: pathlib.Path, x: np.ndarray) -> None:
  """Writes a 16-bit PNG by hand (Pillow cannot write 16-bit colour), every filter type used."""
  h, w = x.shape[:2]
  channels = 1 if x.ndim == 2 else x.shape[2]
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  bpp = 2 * channels
  rows = [np.frombuffer(x[i].astype('>u2').tobytes(), np.uint8).astype(np.int32) for i in range(h)]
  raw = b''
  for i, row in enumerate(rows):
    prev = rows[i - 1] if i else np.zeros_like(row)
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    up_left = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
    kind = i % 5  # None, Sub, Up, Average, Paeth: decoding must undo each on bytes.
    if kind == 0:
      pred = np.zeros_like(row)
    elif kind == 1:
      pred = left
    elif kind == 2:
      pred = prev
    elif kind == 3:
      pred = (left + prev) // 2
    else:
      p = left + prev - up_left
      pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
      pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
    raw += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  ihdr = struct.pack('>IIBBBBB', w, h, 16, color_type, 0, 0, 0)
  path.write_bytes(
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', ihdr)
    + chunk(b'IDAT', zlib.compress(raw))
    + chunk(b'IEND', b'')
  )


def _to8(x: np.ndarray) -> np.ndarray:
  """The documented 16 -> 8 bit rule, by hand."""
  return np.floor(x.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


# EXIF orientation -> the array transform that shows the image upright (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
  1: lambda a: a,
  2: lambda a: a[:, ::-1],
  3: lambda a: a[::-1, ::-1],
  4: lambda a: a[::-1],
  5: lambda a: a.transpose(1, 0, 2),
  6: lambda a: np.rot90(a, k=-1),  # Rotate 90 degrees clockwise.
  7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
  8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize('orientation', sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
  img = Image.fromarray(RGB)
  exif = img.getexif()
  exif[0x0112] = orientation
  path = tmp_path / 'o.png'
  img.save(path, exif=exif.tobytes())
  expected = ORIENTATIONS[orientation](RGB)
  np.testing.assert_array_equal(images.read_image(path), expected)
  info = images.image_info(path)
  assert (info.height, info.width, info.orientation) == (*expected.shape[:2], orientation)
  assert info.is_plain_rgb8 == (orientation == 1)


def test_exif_orientation_of_16_bit_colour_png(tmp_path):
  x = RNG.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
  _png16(tmp_path / 'a.png', x)
  # Add an eXIf chunk (orientation 6) before IEND by re-saving the chunk list by hand.
  exif = Image.Exif()
  exif[0x0112] = 6
  data = (tmp_path / 'a.png').read_bytes()
  body = exif.tobytes()[6:]  # Drop the 'Exif\0\0' header: the PNG chunk holds the TIFF block.
  chunk = struct.pack('>I', len(body)) + b'eXIf' + body
  chunk += struct.pack('>I', zlib.crc32(b'eXIf' + body))
  (tmp_path / 'b.png').write_bytes(data[:-12] + chunk + data[-12:])
  np.testing.assert_array_equal(images.read_image(tmp_path / 'b.png'), np.rot90(_to8(x), k=-1))


def test_grayscale_is_replicated(tmp_path):
  gray = RGB[..., 0]
  Image.fromarray(gray).save(tmp_path / 'l.png')
  out = images.read_image(tmp_path / 'l.png')
  assert out.shape == (5, 7, 3) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  Image.fromarray(gray > 127).save(tmp_path / 'bw.png')  # Mode '1'.
  np.testing.assert_array_equal(images.read_image(tmp_path / 'bw.png')[..., 1], (gray > 127) * 255)


def test_16_bit_grayscale_png_rounds_to_8_bits(tmp_path):
  x = np.array([[0, 128, 129, 257, 32767, 32896, 65534, 65535]], np.uint16)
  Image.fromarray(x).save(tmp_path / 'g.png')  # Pillow writes 'I;16' as a 16-bit gray PNG.
  assert images.image_info(tmp_path / 'g.png').bits == 16
  out = images.read_image(tmp_path / 'g.png')
  np.testing.assert_array_equal(out[..., 2], [[0, 0, 1, 1, 127, 128, 255, 255]])
  np.testing.assert_array_equal(out[..., 0], _to8(x))


@pytest.mark.parametrize('channels', [3, 4])
def test_16_bit_colour_png_uses_both_bytes(tmp_path, channels):
  x = RNG.integers(0, 65536, (6, 5, channels)).astype(np.uint16)
  x[0, 0, :3] = [60000, 32767, 128]  # Rounding and Pillow's high byte disagree on these.
  _png16(tmp_path / 'c.png', x)
  info = images.image_info(tmp_path / 'c.png')
  assert info.bits == 16 and not info.is_plain_rgb8
  out = images.read_image(tmp_path / 'c.png')
  np.testing.assert_array_equal(out, _to8(x[..., :3]))
  np.testing.assert_array_equal(out[0, 0], [233, 127, 0])


def test_integer_and_float_tiff(tmp_path):
  x = np.array([[-5, 0, 257, 65535, 70000]], np.int32)
  Image.fromarray(x, mode='I').save(tmp_path / 'i.tif')
  assert Image.open(tmp_path / 'i.tif').mode == 'I'
  np.testing.assert_array_equal(
    images.read_image(tmp_path / 'i.tif')[..., 0], [[0, 0, 1, 255, 255]]
  )
  f = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
  Image.fromarray(f, mode='F').save(tmp_path / 'f.tif')
  np.testing.assert_array_equal(
    images.read_image(tmp_path / 'f.tif')[..., 1], [[0, 0, 128, 255, 255]]
  )


def test_palette_goes_through_its_palette(tmp_path):
  index = RNG.integers(0, 4, (5, 7), dtype=np.uint8)
  colours = np.array([[255, 0, 0], [0, 128, 0], [1, 2, 3], [250, 251, 252]], np.uint8)
  img = Image.fromarray(index, mode='P')
  img.putpalette(colours.flatten().tolist())
  img.save(tmp_path / 'p.png', transparency=2)  # A transparent entry keeps its colour.
  assert images.image_info(tmp_path / 'p.png').mode == 'P'
  np.testing.assert_array_equal(images.read_image(tmp_path / 'p.png'), colours[index])


def test_alpha_is_dropped(tmp_path):
  alpha = np.zeros((5, 7), np.uint8)
  alpha[0] = 255
  Image.fromarray(np.dstack([RGB, alpha])).save(tmp_path / 'rgba.png')
  # Colour values stay as stored, even where fully transparent: no compositing.
  np.testing.assert_array_equal(images.read_image(tmp_path / 'rgba.png'), RGB)
  Image.fromarray(np.dstack([RGB[..., 1], alpha]), mode='LA').save(tmp_path / 'la.png')
  np.testing.assert_array_equal(
    images.read_image(tmp_path / 'la.png'), np.repeat(RGB[..., 1:2], 3, axis=-1)
  )


def test_cmyk_becomes_rgb(tmp_path):
  cmyk = Image.fromarray(RGB).convert('CMYK')
  cmyk.save(tmp_path / 'c.tif')
  np.testing.assert_array_equal(
    images.read_image(tmp_path / 'c.tif'), np.asarray(cmyk.convert('RGB'))
  )


@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_truncated_file_names_the_file(tmp_path, suffix):
  big = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  path = tmp_path / f'whole{suffix}'
  images.write_image(path, big)
  data = path.read_bytes()
  cut = tmp_path / f'cut{suffix}'
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageError, match=f'cut{suffix}.*truncated'):
    images.read_image(cut)
  with pytest.raises(images.ImageError, match='cut'):
    images.image_info(cut, verify=True)
  with pytest.raises(images.ImageError, match='in-archive/cut'):
    images.decode_image(cut.read_bytes(), name='in-archive/cut')


def test_missing_and_unreadable_files_name_the_file(tmp_path):
  with pytest.raises(images.ImageError, match='nothing.png: no such file'):
    images.read_image(tmp_path / 'nothing.png')
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(images.ImageError, match='text.png: not an image'):
    images.read_image(tmp_path / 'text.png')
  with pytest.raises(images.ImageError, match='text.png'):
    images.image_info(tmp_path / 'text.png')
  assert issubclass(images.ImageError, ValueError)


def test_write_read_roundtrip(tmp_path):
  images.write_image(tmp_path / 'a.png', RGB)
  np.testing.assert_array_equal(images.read_image(tmp_path / 'a.png'), RGB)
  x = np.array([[[-0.1, 0.0, 0.5], [1.0, 1.5, 0.25]]], np.float32)
  images.write_image(tmp_path / 'f.PNG', x)
  np.testing.assert_array_equal(
    images.read_image(tmp_path / 'f.PNG'), [[[0, 0, 128], [255, 255, 64]]]
  )
  smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 32, 3))
  images.write_image(tmp_path / 'b.jpeg', smooth, quality=95)
  assert images.image_info(tmp_path / 'b.jpeg').format == 'JPEG'
  back = images.read_image(tmp_path / 'b.jpeg').astype(int)
  assert np.abs(back - smooth).max() <= 4
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # No temp files left.


def test_write_is_atomic(tmp_path, monkeypatch):
  target = tmp_path / 'keep.png'
  images.write_image(target, RGB)
  before = target.read_bytes()

  def failing_fsync(fd):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'fsync', failing_fsync)
  with pytest.raises(images.ImageError, match='keep.png: cannot write image: disk full'):
    images.write_image(target, RGB[::-1])
  assert target.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.png']


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_images_get_the_umask_mode(tmp_path, umask, mode):
  """mkstemp made every output 0600, unreadable by a web server or a colleague."""
  previous = os.umask(umask)
  try:
    (tmp_path / 'y.txt').write_text('')
    images.write_image(tmp_path / 'x.png', RGB)
    images.write_image(tmp_path / 'x.png', RGB[::-1])  # replacing keeps the new file's mode too
    images.write_image(tmp_path / 'z.jpg', RGB)
  finally:
    os.umask(previous)
  modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
  assert modes == {'y.txt': mode, 'x.png': mode, 'z.jpg': mode}


def test_write_rejects_bad_input(tmp_path):
  with pytest.raises(images.ImageError, match=r'x.gif: cannot write suffix'):
    images.write_image(tmp_path / 'x.gif', RGB)
  with pytest.raises(images.ImageError, match=r'x.png: expected an array \[H, W, 3\]'):
    images.write_image(tmp_path / 'x.png', np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(images.ImageError, match='non-finite'):
    images.write_image(tmp_path / 'x.png', np.full((2, 2, 3), np.nan, np.float32))
  with pytest.raises(images.ImageError, match='int64'):
    images.write_image(tmp_path / 'x.png', np.zeros((2, 2, 3), np.int64))
  assert list(tmp_path.iterdir()) == []


def test_list_images(tmp_path):
  for name in [
    'b.PNG',
    'a.jpg',
    'c.JPEG',
    'd.webp',
    'e.tif',
    'f.Tiff',
    'g.bmp',
    'notes.txt',
    '.h.png',
  ]:
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'dir.png').mkdir()
  names = [p.name for p in images.list_images(tmp_path)]
  assert names == ['a.jpg', 'b.PNG', 'c.JPEG', 'd.webp', 'e.tif', 'f.Tiff', 'g.bmp']
  with pytest.raises(images.ImageError, match='missing: no such directory'):
    images.list_images(tmp_path / 'missing')
