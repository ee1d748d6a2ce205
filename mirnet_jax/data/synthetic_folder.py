"""Low-light pairs from your own well-exposed photographs: the `synthetic` command line.

  python -m mirnet_jax.data.synthetic --input PHOTOS --output PAIRS --seed 0 [--overwrite]

writes PAIRS/low/<stem>.png (darkened by `synthetic.darken`, the model of the synthetic source)
and PAIRS/high/<stem>.png (the photograph as read), ready for `config.data.name='folder'`. The
set is written into a hidden sibling folder and moved into place at the end (`staging.py`): one
unreadable photograph ends the run with one line naming it, and leaves no half-written set. An
existing non-empty PAIRS is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from mirnet_jax.data import images, staging
from mirnet_jax.data.synthetic import LowLightModel, darken


def _name_seed(name: str) -> int:
  # From the file name, not the listing position: adding photos leaves the others unchanged.
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big')


def synthesize_folder(
  input_dir: str | os.PathLike[str],
  output_dir: str | os.PathLike[str],
  *,
  seed: int = 0,
  model: LowLightModel | None = None,
  overwrite: bool = False,
) -> list[str]:
  """Writes low-light pairs made from a folder of well-exposed photographs.

  Every image in `input_dir` (not recursive) gives `output_dir/low/<stem>.png` (darkened) and
  `output_dir/high/<stem>.png` (the photograph as read, EXIF orientation applied), at full
  size. Pair noise depends on (seed, file name) only. The pairs are written into a hidden
  sibling folder moved into place at the end: on any error nothing of this run remains.

  Args:
    input_dir: folder of well-exposed photographs.
    output_dir: destination; 'low' and 'high' are created inside it. It must be missing or
      empty unless `overwrite`.
    seed: non-negative integer seed.
    model: low-light parameter ranges (defaults: `LowLightModel()`).
    overwrite: replace an existing `output_dir`.

  Returns:
    The stems written, sorted.

  Raises:
    ValueError: the folder holds no image, or two images share a stem.
    images.ImageError: an image cannot be read or written (the message names it).
    FileExistsError: `output_dir` is not empty and `overwrite` is False.
  """
  paths = images.list_images(input_dir)
  if not paths:
    raise ValueError(f'{input_dir}: no images (suffixes {images.IMAGE_SUFFIXES})')
  stems: dict[str, pathlib.Path] = {}
  for path in paths:
    if path.stem in stems:
      raise ValueError(f'{input_dir}: {stems[path.stem].name} and {path.name} share a stem')
    stems[path.stem] = path
  with staging.staged_folder(output_dir, overwrite=overwrite) as out:
    for sub in ('low', 'high'):
      (out / sub).mkdir()
    for stem, path in sorted(stems.items()):
      high = images.read_image(path)
      low = darken(high, np.random.default_rng([seed, _name_seed(path.name)]), model)
      images.write_image(out / 'low' / f'{stem}.png', low)
      images.write_image(out / 'high' / f'{stem}.png', high)
  return sorted(stems)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: `python -m mirnet_jax.data.synthetic --input DIR --output DIR --seed 0`.

  Returns the exit status: 0, or 1 after one line naming the bad file or folder.
  """
  parser = argparse.ArgumentParser(
    prog='python -m mirnet_jax.data.synthetic',
    description='Make low-light pairs (low/, high/) from well-exposed photographs.',
  )
  parser.add_argument('--input', required=True, help='folder of well-exposed photographs')
  parser.add_argument('--output', required=True, help='destination of low/ and high/')
  parser.add_argument('--seed', type=int, default=0, help='random seed (integer >= 0)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  args = parser.parse_args(argv)
  if args.seed < 0:
    parser.error(f'--seed={args.seed}: must be >= 0')
  output = pathlib.Path(args.output).expanduser().absolute()
  try:
    stems = synthesize_folder(
      pathlib.Path(args.input).expanduser(), output, seed=args.seed, overwrite=args.overwrite
    )
  except (ValueError, OSError) as e:  # images.ImageError is a ValueError
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  print(f'wrote {len(stems)} pairs to {output}/low and {output}/high')
  return 0


if __name__ == '__main__':
  sys.exit(main())
