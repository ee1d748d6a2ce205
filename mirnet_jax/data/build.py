"""Builds the project's TFDS datasets without TensorFlow, and holds what their builders share.

Usage:
  python -m mirnet_jax.data.build lol --manual_dir=PATH [--data_dir=DIR]
  python -m mirnet_jax.data.build sice --manual_dir=PATH [--data_dir=DIR]

The `tfds build` command line needs TensorFlow and Apache Beam; this one calls
`builder.download_and_prepare` directly. Bad input (a missing folder, missing, corrupt or
mismatched images) ends with one error message naming every bad file, and exit status 1.

Both folders may be local (`~` is expanded: the shell leaves it alone after `--data_dir=`;
relative paths are made absolute) or remote (`gs://bucket/tfds`: any scheme `etils.epath`
reads; TFDS writes a remote data_dir itself).

The helpers below are used by `mirnet_jax.data.lol` and `mirnet_jax.data.sice`: locating the
dataset inside a manual download (a folder or a zip archive), checking every image pair before
anything is written, deterministic name-hash splits, and the bytes stored for each image.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import logging
import os
import pathlib
import sys
import zipfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from etils import epath

from mirnet_jax.data import images

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

# A file or folder, local, remote (gs://...) or inside a zip archive: all offer name, iterdir,
# is_dir, is_file, read_bytes and `/`, so the builders read any of them the same way.
Node = epath.Path | zipfile.Path


def resolve(path: str | os.PathLike[str]) -> epath.Path:
  """A user-given folder as an epath: '~' expanded and made absolute when local.

  Remote paths (`gs://...`) are returned as they are: nothing to expand, no current directory.
  """
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _open_zip(path: epath.Path) -> zipfile.ZipFile:
  if '://' not in os.fspath(path):
    return zipfile.ZipFile(os.fspath(path))
  # A remote archive: zipfile seeks in the file object epath opens (gcsfs reads ranges).
  archive = zipfile.ZipFile(path.open('rb'))
  archive.filename = os.fspath(path)  # for describe()
  return archive


DATASETS = ('lol', 'sice')


def find_root(
  manual_dir: str | os.PathLike[str],
  *,
  markers: Sequence[str],
  folders: Sequence[str] = (),
  archives: Sequence[str] = (),
) -> Node:
  """Finds the dataset inside a manual download directory.

  The candidates, in order: `manual_dir` itself, `manual_dir/<folder>` for each of `folders`,
  then for each archive `manual_dir/<archive>` that exists, the archive's top level and its
  `<folder>/` entries. The first candidate that holds every marker is the root.

  Args:
    manual_dir: the directory given by the user.
    markers: relative folder paths that identify the dataset root (e.g. 'our485/low').
    folders: sub-folder names the dataset may be wrapped in (e.g. 'LOLdataset').
    archives: zip file names the dataset may be left in (e.g. 'LOLdataset.zip').

  Returns:
    The root, an `epath.Path` or a `zipfile.Path`.

  Raises:
    ValueError: no candidate holds the markers; the message says what was looked for.
  """
  base = epath.Path(manual_dir)
  candidates: list[Node] = [base] + [base / f for f in folders]
  for archive in archives:
    path = base / archive
    if path.is_file():
      try:
        top = zipfile.Path(_open_zip(path))
      except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path}: cannot open zip archive: {e}') from e
      candidates += [top] + [top / f for f in folders]
  for candidate in candidates:
    if all(_join(candidate, m).is_dir() for m in markers):
      return candidate
  looked = ', '.join(markers)
  inside = ' or '.join([f'{f}/' for f in folders] + list(archives))
  raise ValueError(
    f'{base}: no dataset found: expected folders {looked} directly inside it'
    + (f' or inside {inside}' if inside else '')
  )


def _join(node: Node, relative: str) -> Node:
  for part in relative.strip('/').split('/'):
    node = node / part
  return node


def describe(root: Node) -> str:
  """A readable location for messages: the folder, or 'archive.zip:inner/'."""
  if isinstance(root, zipfile.Path):
    return f'{root.root.filename}:{root.at}'
  return str(root)


def list_image_names(folder: Node) -> list[str]:
  """Names of the image files directly inside a folder (see `images.IMAGE_SUFFIXES`), sorted."""
  names = (
    child.name
    for child in folder.iterdir()
    if child.is_file()
    and not child.name.startswith('.')
    and pathlib.PurePosixPath(child.name).suffix.lower() in images.IMAGE_SUFFIXES
  )
  return sorted(names)


def hash_order(names: Iterable[str]) -> list[str]:
  """Orders names by the sha256 of the name string (UTF-8), ties by name.

  The order depends only on the names, never on file contents or file-system listing order, so
  splits drawn from it are the same on every machine.
  """
  return sorted(names, key=lambda n: (hashlib.sha256(n.encode('utf-8')).hexdigest(), n))


@dataclasses.dataclass(frozen=True)
class Pair:
  """One input/target example before checking.

  Attributes:
    key: the example key, unique within its split (also stored as the `name` feature).
    low: the low-light input file.
    high: the reference file.
    low_name: `low`'s path relative to the dataset root, used in messages.
    high_name: `high`'s path relative to the dataset root, used in messages.
  """

  key: str
  low: Node
  high: Node
  low_name: str
  high_name: str


@dataclasses.dataclass(frozen=True)
class Checked:
  """Result of `check_pairs`.

  Attributes:
    infos: header information of every checked file, by its relative name.
    skipped: keys of the pairs left out because their sizes differ (only when allowed).
    notes: one line per converted file or skipped pair, for a warning.
  """

  infos: dict[str, images.ImageInfo]
  skipped: frozenset[str]
  notes: list[str]


def _check_file(node: Node, name: str) -> tuple[images.ImageInfo | None, str]:
  """Fully decodes one file: (info, '') or (None, problem)."""
  if not node.is_file():
    return None, f'{name}: missing'
  try:
    data = node.read_bytes()
  except OSError as e:
    return None, f'{name}: cannot read: {e}'
  try:
    # Decoding every pixel is the only way to find truncated or corrupt image data.
    return images.image_info(data, name=name, verify=True), ''
  except images.ImageError as e:
    return None, str(e)


def check_pairs(
  pairs: Sequence[Pair],
  *,
  where: str,
  allow_size_mismatch: bool = False,
) -> Checked:
  """Decodes every image of every pair and reports all problems at once.

  Args:
    pairs: the pairs to check.
    where: the dataset root, for the error message.
    allow_size_mismatch: leave out (and note) pairs whose two images differ in size, instead of
      failing.

  Returns:
    A `Checked` with every file's `ImageInfo`.

  Raises:
    ValueError: any file is missing, unreadable or not decodable, or (unless allowed) a pair's
      sizes differ. The message lists every problem, one line per file, sorted.
  """
  files = {p.low_name: p.low for p in pairs} | {p.high_name: p.high for p in pairs}
  # One file at a time: Pillow holds the GIL while decoding PNG and JPEG, so threads measured no
  # faster (LOL: ~12 ms per 600x400 PNG, ~13 s for the 1000 files).
  results = {name: _check_file(node, name) for name, node in files.items()}
  problems = [problem for _, problem in results.values() if problem]
  notes, skipped = [], set()
  for pair in pairs:
    low, high = results[pair.low_name][0], results[pair.high_name][0]
    if low is None or high is None:
      continue
    low_size, high_size = (low.width, low.height), (high.width, high.height)
    if low_size == high_size:
      continue
    message = f'{pair.low_name}: size {low_size[0]}x{low_size[1]} != high {high_size[0]}x'
    message += f'{high_size[1]} ({pair.high_name})'
    if allow_size_mismatch:
      skipped.add(pair.key)
      notes.append(f'skipped {message}')
    else:
      problems.append(message)
  if problems:
    problems = sorted(set(problems))
    raise ValueError(
      f'{len(problems)} problem(s) in {where}:\n' + '\n'.join(f'  {p}' for p in problems)
    )
  infos = {name: info for name, (info, _) in results.items() if info is not None}
  for name, info in sorted(infos.items()):
    if not info.is_plain_rgb8:
      notes.append(
        f'converted {name} ({info.format} mode {info.mode}, {info.bits}-bit, '
        f'EXIF orientation {info.orientation}) to 8-bit RGB'
      )
  return Checked(infos, frozenset(skipped), notes)


def stored_bytes(node: Node, info: images.ImageInfo, keep_formats: Sequence[str]) -> bytes:
  """The encoded image to store for one checked file.

  Files whose plain decode already equals `images.read_image` (8-bit RGB, upright) and whose
  format is in `keep_formats` are stored byte for byte: no re-encoding, no generation loss.
  Anything else is converted by the `images` policy and stored as PNG (lossless).

  Args:
    node: the file.
    info: its `ImageInfo` from `check_pairs`.
    keep_formats: Pillow format names stored as they are (e.g. ('PNG',)).

  Returns:
    PNG or JPEG bytes that decode to exactly `images.read_image` of the file.
  """
  data = node.read_bytes()
  if info.is_plain_rgb8 and info.format in keep_formats:
    return data
  return images.encode_image(images.decode_image(data, name=str(node)), 'PNG')


def log_notes(dataset: str, notes: Sequence[str], limit: int = 20) -> None:
  """Logs conversion / skip notes as one warning (at most `limit` lines)."""
  if not notes:
    return
  counts = collections.Counter(n.split(' ', 1)[0] for n in notes)
  lines = list(notes[:limit]) + (
    [f'... and {len(notes) - limit} more'] if len(notes) > limit else []
  )
  summary = ', '.join(f'{k} {v}' for k, v in sorted(counts.items()))
  logging.getLogger(__name__).warning('%s: %s:\n  %s', dataset, summary, '\n  '.join(lines))


def build(name: str, manual_dir: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds one dataset from its manual download.

  Args:
    name: 'lol' or 'sice'.
    manual_dir: the folder holding the manual download (see the builder's README); local
      ('~' expanded) or remote.
    data_dir: where TFDS writes the dataset (default: TFDS's default data dir); local ('~'
      expanded, made absolute) or remote (`gs://...`).

  Returns:
    The prepared `tfds.core.DatasetBuilder`.

  Raises:
    ValueError: unknown name or bad input.
  """
  # Imported here so that `images` users never pay for (or need) tensorflow_datasets.
  import tensorflow_datasets as tfds

  if name == 'lol':
    from mirnet_jax.data.lol import lol_dataset_builder as module
  elif name == 'sice':
    from mirnet_jax.data.sice import sice_dataset_builder as module
  else:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')
  path = resolve(manual_dir)
  if not path.is_dir():
    raise ValueError(f'--manual_dir={manual_dir}: not a directory (pass the folder holding it)')
  builder = module.Builder(data_dir=os.fspath(resolve(data_dir)) if data_dir else None)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(path))
  )
  return builder


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(
    prog='python -m mirnet_jax.data.build', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('name', choices=DATASETS)
  parser.add_argument('--manual_dir', required=True, help='folder holding the manual download')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
  try:
    builder = build(args.name, args.manual_dir, args.data_dir)
  except (ValueError, AssertionError, OSError) as e:
    # tfds reports a missing or empty manual dir with AssertionError; no traceback either way.
    print(f'error: {args.name}: {e}', file=sys.stderr)
    return 1
  splits = ', '.join(f'{k} {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'{args.name}: built in {builder.data_dir} ({splits})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
