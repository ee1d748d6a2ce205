"""Prediction's input listing: a file, a folder or a glob, suffixes in any case."""

import pathlib

import numpy as np
import pytest

from mirnet_jax.data import images, input_files


def test_inputs_file_folder_glob(tmp_path):
  folder = tmp_path / 'in'
  folder.mkdir()
  for name in ('10.png', '2.jpg', 'notes.txt'):
    path = folder / name
    if name.endswith('.txt'):
      path.write_text('not an image')
    else:
      images.write_image(path, np.zeros((5, 7, 3), np.uint8))
  assert [p.name for p in input_files.list_inputs(folder)] == ['10.png', '2.jpg']
  assert [p.name for p in input_files.list_inputs(str(folder / '*'))] == ['2.jpg', '10.png']
  assert input_files.list_inputs(folder / '2.jpg') == [folder / '2.jpg']
  source = input_files.InputsSource(str(folder / '*.png'))
  assert len(source) == 1
  record = source[0]
  assert record['low'].shape == (5, 7, 3) and record['name'] == '10.png'
  assert record['path'] == str(folder / '10.png')
  with pytest.raises(FileNotFoundError, match='missing.png'):
    input_files.list_inputs(tmp_path / 'missing.png')
  with pytest.raises(ValueError, match='matches no image'):
    input_files.list_inputs(str(folder / '*.tif'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty: no images'):
    input_files.InputsSource(tmp_path / 'empty')


def test_globs_match_suffixes_in_any_case_and_know_their_root(tmp_path):
  for rel in ('a/x.JPG', 'a/b/y.jpg', 'a/b/z.Jpeg', 'a/[k].jpg'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    images.write_image(tmp_path / rel, np.zeros((4, 4, 3), np.uint8))
  found = input_files.list_inputs(str(tmp_path / 'a' / '**' / '*.jpg'))
  assert sorted(str(p.relative_to(tmp_path)) for p in found) == [
    'a/[k].jpg',
    'a/b/y.jpg',
    'a/x.JPG',
  ]
  found = input_files.list_inputs(str(tmp_path / 'a' / '**' / '*.[jJ]*'))  # classes left alone
  assert len(found) == 4
  assert input_files._any_case('*.jpg') == '*.[jJ][pP][gG]'
  assert input_files._any_case('[a-c]x?.png') == '[a-c][xX]?.[pP][nN][gG]'
  assert input_files.input_root(str(tmp_path / 'a' / '**' / '*.jpg')) == tmp_path / 'a'
  assert input_files.input_root(tmp_path / 'a') == tmp_path / 'a'
  assert input_files.input_root(tmp_path / 'a' / 'x.JPG') == tmp_path / 'a'
  assert input_files.input_root('*.png') == pathlib.Path('.')
