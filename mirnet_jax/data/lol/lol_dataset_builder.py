"""TFDS builder for LOL (Wei et al., BMVC 2018): 500 low/normal-light pairs of 600x400 PNGs.

Input: the official manual download (`LOLdataset.zip`, or its extracted folder) holding
`our485/{low,high}/<n>.png` and `eval15/{low,high}/<n>.png`.

Splits (deterministic, independent of file-system order; see README.md):
  * test: all of eval15 (15 pairs).
  * validation: the our485 pairs whose file names have the smallest sha256 of the name string
    (UTF-8), round(100/485 of our485) of them: exactly 100 on the official data.
  * train: the rest of our485 (385 pairs).

Every image is decoded before anything is written; all problems (missing partner, size mismatch,
undecodable file) are reported together in one `ValueError`. Files that are not plain 8-bit RGB
are converted by the `mirnet_jax.data.images` policy and stored as PNG; the official files are
8-bit RGB PNGs and are stored byte for byte.

Stored with `file_format='array_record'`; read it with `builder.as_data_source()` (no
TensorFlow needed).
"""

from __future__ import annotations

import logging

import tensorflow_datasets as tfds

from mirnet_jax.data import build, paired_builder

_HOMEPAGE = 'https://daooshee.github.io/BMVC2018website/'
_MARKERS = ('our485/low', 'our485/high', 'eval15/low', 'eval15/high')
# our485 pairs held out for validation, out of the 485 published ones.
_VALIDATION_PER_485 = 100


def validation_names(names: list[str]) -> set[str]:
  """The our485 file names held out for validation.

  Args:
    names: the our485 pair names (e.g. '2.png'), in any order.

  Returns:
    The round(len(names) * 100 / 485) names with the smallest sha256 of the name string: 100 of
    the 485 official pairs.
  """
  count = round(len(names) * _VALIDATION_PER_485 / 485)
  return set(build.hash_order(names)[:count])


class Builder(paired_builder.PairedImageBuilder):
  """LOL low-light enhancement pairs, from the manual download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: train 385 / validation 100 / test 15.'}
  IMAGE_ENCODING = 'png'
  HOMEPAGE = _HOMEPAGE
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download LOLdataset.zip from the LOL project page,
  https://daooshee.github.io/BMVC2018website/ (links to Google Drive and Baidu Pan there), and
  place it in the manual directory: `manual_dir/LOLdataset.zip`. The extracted folder works too:
  `manual_dir/our485/...` and `manual_dir/eval15/...`, or the same inside
  `manual_dir/LOLdataset/`. Then run
  `python -m mirnet_jax.data.build lol --manual_dir=manual_dir`.
  """

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = build.find_root(
      dl_manager.manual_dir,
      markers=_MARKERS,
      folders=('LOLdataset',),
      archives=('LOLdataset.zip',),
    )
    where = f'the LOL download at {build.describe(root)}'
    problems = []
    pairs = {}
    for part in ('our485', 'eval15'):
      names = sorted(
        set(build.list_image_names(root / part / 'low'))
        | set(build.list_image_names(root / part / 'high'))
      )
      if not names:
        problems.append(f'{part}: no images in {part}/low or {part}/high')
      pairs[part] = [
        build.Pair(
          key=n,
          low=root / part / 'low' / n,
          high=root / part / 'high' / n,
          low_name=f'{part}/low/{n}',
          high_name=f'{part}/high/{n}',
        )
        for n in names
      ]
    if problems:
      raise ValueError(f'{where}: ' + '; '.join(problems))
    checked = build.check_pairs(pairs['our485'] + pairs['eval15'], where=where)
    build.log_notes('lol', checked.notes)
    for part, expected in (('our485', 485), ('eval15', 15)):
      if len(pairs[part]) != expected:
        # Not an error: dummy data and subsets are legitimate; a short official copy is not.
        logging.getLogger(__name__).warning(
          'lol: %s has %d pairs; the official dataset has %d', part, len(pairs[part]), expected
        )
    held_out = validation_names([p.key for p in pairs['our485']])
    return {
      'train': self._generate_examples(
        [p for p in pairs['our485'] if p.key not in held_out], checked
      ),
      'validation': self._generate_examples(
        [p for p in pairs['our485'] if p.key in held_out], checked
      ),
      'test': self._generate_examples(pairs['eval15'], checked),
    }

  def _generate_examples(self, pairs: list[build.Pair], checked: build.Checked):
    for pair in pairs:
      yield (
        pair.key,
        {
          'low': build.stored_bytes(pair.low, checked.infos[pair.low_name], ('PNG',)),
          'high': build.stored_bytes(pair.high, checked.infos[pair.high_name], ('PNG',)),
          'name': pair.key,
        },
      )
