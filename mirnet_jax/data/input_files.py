"""The inputs of prediction: low-light images named by a file, a folder or a glob.

`list_inputs` lists them (a pattern's file-name part matches in any case), `input_root` is the
folder their output paths are relative to, and `InputsSource` serves them as records
`{'low': uint8[H, W, 3], 'name': str, 'path': str}` in a grain-compatible random-access sequence.
"""

from __future__ import annotations

import glob
import os
import pathlib

from mirnet_jax.data import images
from mirnet_jax.data.sources import Record, natural_key


def _any_case(pattern: str) -> str:
  """A glob pattern whose letters match either case ('*.jpg' -> '*.[jJ][pP][gG]').

  Python 3.11's glob has no case-insensitive mode; letters inside [...] are left alone.
  """
  out, in_class = [], False
  for ch in pattern:
    if in_class:
      in_class = ch != ']'
      out.append(ch)
    elif ch == '[':
      in_class = True
      out.append(ch)
    elif ch.isalpha() and ch.lower() != ch.upper():
      out.append(f'[{ch.lower()}{ch.upper()}]')
    else:
      out.append(ch)
  return ''.join(out)


def list_inputs(path: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The input images named by a file, a folder (not recursive) or a glob pattern.

  Args:
    path: an image file (taken whatever its suffix), a directory, or a glob such as
      'photos/*.jpg' or 'photos/**/*.png' (recursive). The file-name part of a pattern matches
      in any case ('*.jpg' also finds 'IMG_1.JPG'); folders match as written.

  Returns:
    Image paths, sorted (a single file is returned as is).

  Raises:
    FileNotFoundError: nothing exists at `path` and no file matches it as a pattern.
    ValueError: the folder or pattern names no image file.
  """
  text = os.path.expanduser(os.fspath(path))
  p = pathlib.Path(text)
  if p.is_file():
    return [p]
  if p.is_dir():
    found = images.list_images(p)
    if not found:
      raise ValueError(f'{p}: no images (suffixes {images.IMAGE_SUFFIXES})')
    return found
  if not glob.has_magic(text):
    raise FileNotFoundError(f'{text}: no such file or directory')
  folder, name = os.path.split(text)
  matches = {
    pathlib.Path(m) for m in glob.glob(os.path.join(folder, _any_case(name)), recursive=True)
  }
  found = sorted(
    (m for m in matches if m.is_file() and m.suffix.lower() in images.IMAGE_SUFFIXES),
    key=lambda m: natural_key(str(m)),
  )
  if not found:
    raise ValueError(f'{text}: the pattern matches no image (suffixes {images.IMAGE_SUFFIXES})')
  return found


def input_root(path: str | os.PathLike[str]) -> pathlib.Path:
  """The folder that input paths are relative to: the folder itself, a file's folder, or the
  part of a glob before its first wildcard ('trip/**/*.jpg' -> 'trip')."""
  text = os.path.expanduser(os.fspath(path))
  p = pathlib.Path(text)
  if p.is_dir():
    return p
  if p.is_file() or not glob.has_magic(text):
    return p.parent
  fixed = []
  for part in p.parts:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed) if fixed else pathlib.Path('.')


class InputsSource:
  """Low-light inputs for prediction: records `{'low': uint8[H, W, 3], 'name', 'path'}`."""

  def __init__(self, path: str | os.PathLike[str]):
    """Lists the inputs named by `path` (see `list_inputs`); images are read on demand."""
    self._paths = list_inputs(path)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> Record:
    path = self._paths[int(index)]
    return {'low': images.read_image(path), 'name': path.name, 'path': str(path)}

  @property
  def paths(self) -> list[pathlib.Path]:
    """The input files in source order."""
    return list(self._paths)

  def __repr__(self) -> str:
    return f'InputsSource(files={len(self)})'
