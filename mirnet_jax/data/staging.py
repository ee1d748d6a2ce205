"""A folder of outputs that appears whole or not at all.

`staged_folder` hands out a hidden sibling of the target (`.NAME.<random>.partial`), and moves it
into place only when the block that fills it ends without an error; on an error it is removed,
so a failed run never leaves half an output set, and an earlier set stays as it was. An existing
non-empty target is replaced only with ``overwrite``. Local folders only (a rename is what makes
this atomic).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterator


def _fresh_name(parent: pathlib.Path, stem: str, suffix: str) -> pathlib.Path:
  return parent / f'.{stem}.{secrets.token_hex(6)}.{suffix}'


def _is_empty_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def staged_folder(
  target: str | os.PathLike[str], *, overwrite: bool = False
) -> Iterator[pathlib.Path]:
  """Yields an empty folder that becomes ``target`` when the block succeeds.

  Args:
    target: the output folder. It may be missing or empty; anything else needs ``overwrite``.
    overwrite: replace an existing ``target`` (its old contents are removed after the new set is
      in place).

  Yields:
    The staging folder, beside ``target`` (same file system, so the final move is a rename).

  Raises:
    FileExistsError: ``target`` exists, is not an empty folder, and ``overwrite`` is False.
  """
  target = pathlib.Path(target).absolute()
  if target.exists() and not _is_empty_dir(target) and not overwrite:
    raise FileExistsError(f'{target}: exists and is not empty; pass --overwrite to replace it')
  target.parent.mkdir(parents=True, exist_ok=True)
  while True:
    staging = _fresh_name(target.parent, target.name, 'partial')
    try:
      os.mkdir(staging, 0o777)  # the umask's mode, unlike tempfile.mkdtemp's private 0700
      break
    except FileExistsError:
      continue
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if not target.exists() or _is_empty_dir(target):
    os.replace(staging, target)  # onto a missing or empty folder: one rename
    return
  # A crash between these renames leaves the old set in `.NAME.<random>.old`, never lost.
  old = _fresh_name(target.parent, target.name, 'old')
  os.rename(target, old)
  os.rename(staging, target)
  if old.is_dir() and not old.is_symlink():
    shutil.rmtree(old)
  else:
    old.unlink()
