"""TFDS builder for SICE Part 1 (Cai et al., TIP 2018): multi-exposure sequences and references.

Assumed layout of the manual download (Part 1, extracted; see README.md):

  Dataset_Part1/
    1/1.JPG 2.JPG ... N.JPG     one scene, exposures numbered from darkest to brightest
    2/...
    Label/1.JPG 2.JPG ...       the reference image of each sequence, named by sequence id

Each example pairs the darkest exposure of a sequence (the smallest number; the low-light input
used by the seed paper) with the sequence's label.

Splits (deterministic, independent of file-system order; see README.md): sequence ids ordered
by sha256 of the id string; the first round(10%) are test, the next round(10%) validation, the
rest train: 288 / 36 / 36 for the 360 sequences of Part 1.

Every image is decoded before anything is written; missing or undecodable files are reported
together in one `ValueError`. A sequence whose input and label sizes differ is skipped with a
warning (third-party SICE loaders guard against such pairs), not fatal. Images are stored as
published (JPEG bytes, full resolution); files that are not plain 8-bit RGB or carry an EXIF
rotation are converted by the `mirnet_jax.data.images` policy and stored as PNG.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from mirnet_jax.data import build, paired_builder

_HOMEPAGE = 'https://github.com/csjcai/SICE'
_TEST_FRACTION = 0.1
_VALIDATION_FRACTION = 0.1


def split_ids(ids: list[str]) -> dict[str, set[str]]:
  """Assigns sequence ids to splits.

  Args:
    ids: every sequence id found (e.g. '12'), in any order.

  Returns:
    {'train', 'validation', 'test'} -> ids. Ids are ordered by sha256 of the id string; the
    first round(10%) go to test, the next round(10%) to validation, the rest to train.
  """
  ordered = build.hash_order(ids)
  n_test = round(len(ordered) * _TEST_FRACTION)
  n_val = round(len(ordered) * _VALIDATION_FRACTION)
  return {
    'test': set(ordered[:n_test]),
    'validation': set(ordered[n_test : n_test + n_val]),
    'train': set(ordered[n_test + n_val :]),
  }


def _stem_number(name: str) -> int | None:
  stem = pathlib.PurePosixPath(name).stem
  return int(stem) if stem.isdigit() else None


def _sequence(pair: build.Pair) -> str:
  # Keys are label file names, '<sequence id>.<suffix>'.
  return pathlib.PurePosixPath(pair.key).stem


class Builder(paired_builder.PairedImageBuilder):
  """SICE Part 1: darkest exposure -> reference, from the manual download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: darkest exposure of each Part 1 sequence.'}
  IMAGE_ENCODING = 'jpeg'
  HOMEPAGE = _HOMEPAGE
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download "Part1: 360 Image Sequences" of SICE from the links in the README of
  https://github.com/csjcai/SICE (Google Drive https://goo.gl/gTGfLk or BaiduYun
  https://pan.baidu.com/s/1kXotehL). The archive is a .rar: extract it (e.g.
  `unrar x Dataset_Part1.rar` or `7z x Dataset_Part1.rar`) into the manual directory, so that
  `manual_dir/Dataset_Part1/Label/` exists (`manual_dir/Label/` next to the numbered sequence
  folders, or a `manual_dir/Dataset_Part1.zip` repacked from it, work too). Then run
  `python -m mirnet_jax.data.build sice --manual_dir=manual_dir`.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = build.find_root(
      dl_manager.manual_dir,
      markers=('Label',),
      folders=('Dataset_Part1',),
      archives=('Dataset_Part1.zip',),
    )
    where = f'the SICE Part 1 download at {build.describe(root)}'
    pairs, problems = self._find_pairs(root)
    if problems:
      problems = sorted(problems)
      raise ValueError(
        f'{len(problems)} problem(s) in {where}:\n' + '\n'.join(f'  {p}' for p in problems)
      )
    checked = build.check_pairs(pairs, where=where, allow_size_mismatch=True)
    build.log_notes('sice', checked.notes)
    # Splits are drawn over every sequence found, so skipping one never moves another.
    splits = split_ids([_sequence(p) for p in pairs])
    return {
      split: self._generate_examples(
        [p for p in pairs if _sequence(p) in ids and p.key not in checked.skipped], checked
      )
      for split, ids in splits.items()
    }

  def _find_pairs(self, root: build.Node) -> tuple[list[build.Pair], list[str]]:
    """Pairs each numbered sequence's darkest exposure with its label; collects problems."""
    problems = []
    labels: dict[str, str] = {}
    for name in build.list_image_names(root / 'Label'):
      seq = pathlib.PurePosixPath(name).stem
      if not seq.isdigit():
        continue  # Not a sequence label (a stray picture, a thumbnail).
      if seq in labels:
        problems.append(f'Label/{name}: second label for sequence {seq} (Label/{labels[seq]})')
      labels[seq] = name
    sequences = sorted((c.name for c in root.iterdir() if c.is_dir() and c.name.isdigit()), key=int)
    if not sequences:
      problems.append('no numbered sequence folders (1/, 2/, ...) next to Label/')
    pairs = []
    for seq in sequences:
      numbered = [n for n in build.list_image_names(root / seq) if _stem_number(n) is not None]
      if not numbered:
        problems.append(f'{seq}/: no numbered exposures (1.JPG, 2.JPG, ...)')
        continue
      if seq not in labels:
        problems.append(f'Label/{seq}.JPG: missing (label of sequence {seq}/)')
        continue
      darkest = min(numbered, key=lambda n: (_stem_number(n), n))
      pairs.append(
        build.Pair(
          key=labels[seq],
          low=root / seq / darkest,
          high=root / 'Label' / labels[seq],
          low_name=f'{seq}/{darkest}',
          high_name=f'Label/{labels[seq]}',
        )
      )
    for seq in sorted(set(labels) - set(sequences), key=lambda s: (len(s), s)):
      problems.append(f'Label/{labels[seq]}: no sequence folder {seq}/')
    return pairs, problems

  def _generate_examples(self, pairs: list[build.Pair], checked: build.Checked):
    keep = ('JPEG', 'PNG')
    for pair in pairs:
      yield (
        pair.key,
        {
          'low': build.stored_bytes(pair.low, checked.infos[pair.low_name], keep),
          'high': build.stored_bytes(pair.high, checked.infos[pair.high_name], keep),
          'name': pair.key,
        },
      )
