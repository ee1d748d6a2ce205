"""Paths of runs, checkpoints and outputs: ``etils.epath``, local or remote (``gs://...``).

On a TPU pod slice there is no shared disk: the workdir, checkpoints, exports and eval outputs
live on GCS. ``as_path`` turns a setting into an ``epath.Path``; ``write_text_atomic`` writes the
small JSON/CSV files so that a reader never sees half of one.
"""

import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
  """An ``epath.Path``: ``~`` expanded and made absolute when local; remote ones unchanged."""
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: PathLike) -> bool:
  return '://' not in os.fspath(path)


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes a small text file so that readers see the old or the new content, never half.

  Local: a temporary sibling then ``os.replace`` (created with ``open``, so the umask's mode).
  Remote: one object upload, which object stores make atomic themselves.
  """
  path = as_path(path)
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(path))
  finally:
    if tmp.exists():
      tmp.unlink()
