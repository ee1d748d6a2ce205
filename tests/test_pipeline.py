"""Tests of the grain pipelines (mirnet_jax/data/pipeline.py)."""

import itertools
import json

import numpy as np
import pytest

from mirnet_jax.data import augment, pipeline, sources, synthetic


class CoordSource:
  """Record i: low[y, x] = (y, x, i) and high = 255 - low, so a crop tells where it came from."""

  def __init__(self, n, height=40, width=48, sizes=None):
    self.sizes = sizes or [(height, width)] * n

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, i):
    h, w = self.sizes[i]
    y, x = np.mgrid[:h, :w]
    low = np.stack([y, x, np.full_like(y, i)], axis=-1).astype(np.uint8)
    return {'low': low, 'high': 255 - low, 'name': f'r{i}'}


def _train(source, **kwargs):
  args = dict(crop_size=16, global_batch_size=4, seed=0, mixup=False, num_workers=0)
  return pipeline.create_train_iterator(source, **{**args, **kwargs})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _locate(low, high, crop, height, width):
  """Checks a crop against its record; returns (record index, 2x2 matrix, top, left).

  The crop must be a dihedral image of one contiguous window: source coordinates are an affine
  function of crop coordinates whose matrix is a signed permutation (rotation or flip).
  """
  u = np.rint(low * 255).astype(int)
  np.testing.assert_array_equal(np.rint(high * 255).astype(int), 255 - u)  # same window
  assert (u[..., 2] == u[0, 0, 2]).all()
  rows, cols = u[..., 0], u[..., 1]
  matrix = np.array(
    [[rows[1, 0] - rows[0, 0], rows[0, 1] - rows[0, 0]],
     [cols[1, 0] - cols[0, 0], cols[0, 1] - cols[0, 0]]]
  )  # fmt: skip
  assert sorted(np.abs(matrix).ravel().tolist()) == [0, 0, 1, 1], matrix
  i, j = np.mgrid[:crop, :crop]
  np.testing.assert_array_equal(rows, rows[0, 0] + matrix[0, 0] * i + matrix[0, 1] * j)
  np.testing.assert_array_equal(cols, cols[0, 0] + matrix[1, 0] * i + matrix[1, 1] * j)
  top, left = rows.min(), cols.min()
  assert 0 <= top <= height - crop and 0 <= left <= width - crop
  return int(u[0, 0, 2]), tuple(matrix.ravel()), top, left


def test_shapes_dtype_range():
  source = synthetic.create_synthetic_source('train', num_pairs=8, size=48, seed=0)
  batch = next(_train(source, crop_size=32))
  assert set(batch) == {'low', 'high', 'mask'}
  for key in ('low', 'high'):
    assert batch[key].shape == (4, 32, 32, 3) and batch[key].dtype == np.float32
    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
  assert batch['mask'].dtype == bool and batch['mask'].all()
  assert batch['low'].mean() < batch['high'].mean()


def test_crops_aligned_and_all_dihedral_transforms():
  source = CoordSource(8)
  transforms, corners = set(), set()
  for batch in _take(_train(source), 40):
    for low, high in zip(batch['low'], batch['high'], strict=True):
      _, matrix, top, left = _locate(low, high, 16, 40, 48)
      transforms.add(matrix)
      corners.add((top, left))
  assert len(transforms) == 8  # 4 rotations x flip, all distinct and all present
  assert len(corners) > 100  # windows are spread over the image


def test_dihedral_function():
  x = np.arange(12).reshape(3, 4)
  outputs = [augment.dihedral(x, k) for k in range(8)]
  assert len({o.tobytes() + bytes(o.shape) for o in outputs}) == 8
  np.testing.assert_array_equal(outputs[1], np.rot90(x))
  np.testing.assert_array_equal(outputs[4], x[:, ::-1])
  with pytest.raises(ValueError):
    augment.dihedral(x, 8)


def test_small_images_are_reflect_padded():
  source = CoordSource(2, height=10, width=12)
  low = next(_train(source, global_batch_size=2))['low']
  assert low.shape == (2, 16, 16, 3)
  u = np.rint(low * 255).astype(int)
  assert u[..., 0].max() == 9 and u[..., 1].max() == 11  # only real pixels, mirrored


def test_epochs_reshuffle_and_cover_every_record():
  # 6 records, batches of 4: epochs straddle batches, as in training.
  source = CoordSource(6)
  stream = [
    int(round(x[0, 0, 2] * 255))
    for batch in _take(_train(source, global_batch_size=4), 6)
    for x in batch['low']
  ]
  epochs = [stream[i : i + 6] for i in range(0, 24, 6)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(6)), epochs  # every record exactly once per epoch
  orders = {tuple(e) for e in epochs}
  assert len(orders) == 4, epochs  # every epoch in its own order
  assert epochs[0] != list(range(6))  # shuffled from the start


def test_cached_batches_identical_and_resume_exact(eval15_dir):
  from configs import lol

  config = lol.get_config()
  config.data.name, config.data.folder = 'folder', str(eval15_dir)
  config.data.validation_percent = 0.0
  plain = sources.create_source(config.data, 'train')
  config.data.cache = True
  cached = sources.create_source(config.data, 'train')
  kwargs = dict(crop_size=64, seed=5, mixup=True, mixup_start_step=2)
  reference = _take(_train(plain, **kwargs), 6)
  # Workers asked for: a cache is read in-process, with the same batches.
  it = _train(cached, num_workers=2, **kwargs)
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  assert state == {'step': 3}
  resumed = _train(cached, **kwargs)
  resumed.set_state(state)
  for x, y in zip(first + _take(resumed, 3), reference, strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
    np.testing.assert_array_equal(x['high'], y['high'])
  np.testing.assert_array_equal(cached[0]['low'], plain[0]['low'])  # the cache is untouched


def test_deterministic_for_a_seed():
  source = CoordSource(8)
  a, b = _take(_train(source, seed=3), 5), _take(_train(source, seed=3), 5)
  c = _take(_train(source, seed=4), 5)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
    np.testing.assert_array_equal(x['high'], y['high'])
  assert any(not np.array_equal(x['low'], z['low']) for x, z in zip(a, c, strict=True))


def test_processes_get_disjoint_shards_of_the_global_batch():
  source = CoordSource(8)
  whole = _take(_train(source), 4)
  shards = [_take(_train(source, process_index=p, process_count=2), 4) for p in (0, 1)]
  for step in range(4):
    assert shards[0][step]['low'].shape[0] == 2
    ids = [{int(round(x[0, 0, 2] * 255)) for x in s[step]['low']} for s in shards]
    assert ids[0].isdisjoint(ids[1])
    # Element g of the global stream goes to process g % 2: the shards interleave the batch.
    np.testing.assert_array_equal(shards[0][step]['low'], whole[step]['low'][0::2])
    np.testing.assert_array_equal(shards[1][step]['low'], whole[step]['low'][1::2])
  with pytest.raises(ValueError, match='multiple of the process count'):
    _train(source, global_batch_size=5, process_count=2, process_index=0)


def test_resume_from_state_is_exact():
  source = synthetic.create_synthetic_source('train', num_pairs=5, size=32, seed=0)
  kwargs = dict(crop_size=32, seed=1, mixup=True, mixup_start_step=5)
  reference = _take(_train(source, **kwargs), 8)
  it = _train(source, **kwargs)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  resumed = _train(source, **kwargs)
  resumed.set_state(state)
  for x, y in zip(_take(resumed, 5), reference[3:], strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
    np.testing.assert_array_equal(x['high'], y['high'])


def _solve_mix(mixed, rows):
  """Finds (j, lam) with mixed == lam * rows[i] + (1 - lam) * rows[j] best, for each row i."""
  found = []
  for i, m in enumerate(mixed):
    best = (np.inf, i, 1.0)
    for j, other in enumerate(rows):
      d = rows[i] - other
      lam = 1.0 if j == i else float(np.vdot(m - other, d) / np.vdot(d, d))
      err = float(np.abs(m - (lam * rows[i] + (1 - lam) * other)).max())
      best = min(best, (err, j, lam))
    found.append(best)
  return found


def test_mixup_convex_same_lambda_and_start_step():
  source = synthetic.create_synthetic_source('train', num_pairs=8, size=32, seed=0)
  kwargs = dict(crop_size=32, global_batch_size=8, seed=2, mixup_alpha=1.2)
  plain = _take(_train(source, mixup=False, **kwargs), 4)
  mixed = _take(_train(source, mixup=True, mixup_start_step=2, **kwargs), 4)
  for step in (0, 1):  # before the start step: untouched
    np.testing.assert_array_equal(mixed[step]['low'], plain[step]['low'])
  lams = []
  for step in (2, 3):
    low, high = mixed[step]['low'], mixed[step]['high']
    assert not np.array_equal(low, plain[step]['low'])
    for i, (err, j, lam) in enumerate(_solve_mix(low, plain[step]['low'])):
      assert err < 1e-5 and 0.0 <= lam <= 1.0
      # The same partner and weight explain the target.
      expected = lam * plain[step]['high'][i] + (1 - lam) * plain[step]['high'][j]
      np.testing.assert_allclose(high[i], expected, atol=1e-5)
      if j != i:
        lams.append(lam)
  assert len(lams) >= 8 and np.std(lams) > 0.05  # real mixing, one lambda per row


def _eval(source, **kwargs):
  return list(pipeline.create_eval_iterator(source, **kwargs))


def test_eval_padding_and_mask_per_process():
  source = CoordSource(10, height=8, width=8)
  per_process = [
    _eval(source, global_batch_size=4, process_index=p, process_count=2) for p in (0, 1)
  ]
  assert [len(b) for b in per_process] == [3, 3]
  expected_names = [
    [['r0', 'r1'], ['r4', 'r5'], ['r8', 'r9']],
    [['r2', 'r3'], ['r6', 'r7'], ['', '']],
  ]
  expected_masks = [[[1, 1], [1, 1], [1, 1]], [[1, 1], [1, 1], [0, 0]]]
  for p in (0, 1):
    for batch, names, mask in zip(
      per_process[p], expected_names[p], expected_masks[p], strict=True
    ):
      assert batch['name'].tolist() == names
      assert batch['mask'].tolist() == [bool(m) for m in mask]
      assert batch['low'].shape == (2, 8, 8, 3) and batch['low'].dtype == np.float32
      for row, name, valid in zip(batch['low'], names, mask, strict=True):
        index = int(name[1:]) if valid else 9  # padding repeats the last real record
        np.testing.assert_array_equal(row, source[index]['low'] / np.float32(255))
      np.testing.assert_array_equal(batch['high'], 1 - batch['low'])


def test_eval_batches_never_mix_sizes():
  sizes = [(8, 8)] * 3 + [(6, 8)] + [(8, 8)] * 6
  batches = _eval(CoordSource(10, sizes=sizes), global_batch_size=4)
  assert [b['name'].tolist() for b in batches] == [
    ['r0', 'r1', 'r2', ''],
    ['r3', '', '', ''],
    ['r4', 'r5', 'r6', 'r7'],
    ['r8', 'r9', '', ''],
  ]
  assert [b['mask'].tolist() for b in batches] == [
    [True, True, True, False],
    [True, False, False, False],
    [True] * 4,
    [True, True, False, False],
  ]
  assert batches[1]['low'].shape == (4, 6, 8, 3)


def test_eval_real_pairs(eval15_dir):
  source = sources.create_folder_source(str(eval15_dir), 'train', validation_percent=0.0)
  batches = _eval(source, global_batch_size=4)
  assert len(batches) == 4
  assert batches[0]['low'].shape == (4, 400, 600, 3)
  assert batches[-1]['mask'].tolist() == [True, True, True, False]
  names = list(itertools.chain.from_iterable(b['name'].tolist() for b in batches))
  assert names[:15] == source.names and names[15] == ''


def test_orbax_checkpoint_of_the_iterator_state(tmp_path):
  grain = pytest.importorskip('grain')
  ocp = pytest.importorskip('orbax.checkpoint')
  source = CoordSource(8)
  reference = _take(_train(source), 5)
  it = _train(source)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    restored = _train(source)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert restored.get_state() == {'step': 2}
  for x, y in zip(_take(restored, 3), reference[2:], strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
  restored.close()


def test_workers_match_in_process_and_resume_with_another_worker_count():
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  source = CoordSource(8)
  kwargs = dict(mixup=True, mixup_start_step=1)
  reference = _take(_train(source, **kwargs), 6)
  it = _train(source, num_workers=2, **kwargs)
  try:
    first = _take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  assert state == {'step': 3}
  resumed = _train(source, num_workers=0, **kwargs)
  resumed.set_state(state)
  for x, y in zip(first + _take(resumed, 3), reference, strict=True):
    np.testing.assert_array_equal(x['low'], y['low'])
    np.testing.assert_array_equal(x['high'], y['high'])
