"""The converter against the official PyTorch MIRNet's own outputs (fixtures/mirnet_official)."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from mirnet_jax import checkpoints, convert
from mirnet_jax.models import MIRNet, count_params, create_model, param_shapes

CASES = ['tiny', 'mesh', 'four_streams', 'lol_medium']


def _case(fixtures_dir, name):
  d = fixtures_dir / name
  config = json.loads((d / 'config.json').read_text())
  with np.load(d / 'state_dict.npz') as f:
    state_dict = {k: f[k] for k in f.files}
  return config, state_dict, d


@pytest.mark.parametrize('name', CASES)
def test_fixture_outputs_match_official(fixtures_dir, name):
  config, state_dict, d = _case(fixtures_dir, name)
  c = config['constructor']
  model_config = convert.infer_model_config(state_dict)
  assert model_config == dict(
    arch='mirnet',
    num_features=c['n_feat'],
    num_rrg=c['n_RRG'],
    num_mrb=c['n_MSRB'],
    height=c['height'],
    width=c['width'],
  )
  model = create_model(model_config)
  params = convert.params_from_torch(state_dict, model)
  assert count_params(params) == config['unique_parameters']
  x = np.load(d / 'input.npy').transpose(0, 2, 3, 1)  # NCHW -> NHWC
  want = np.load(d / 'output.npy').transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(model.apply)({'params': params}, x))
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= 1e-4


def test_every_default_key_maps(fixtures_dir):
  default = json.loads((fixtures_dir / 'default_keys.json').read_text())
  model = MIRNet()
  mapping = convert.key_map(model)
  mapped = {k for keys, _ in mapping.values() for k in keys}
  shapes = default['state_dict_shapes']
  assert mapped == {k for k in shapes if not k.endswith('.filt')}
  # Shapes: every official tensor has the shape its Flax parameter implies.
  flat = traverse_util.flatten_dict(param_shapes(model), sep='/')
  for path, (keys, kind) in mapping.items():
    for k in keys:
      assert list(convert._TO_TORCH_SHAPE[kind](flat[path].shape)) == shapes[k], k
  assert sum(int(np.prod(s.shape)) for s in flat.values()) == default['unique_parameters']


def test_prefixes_and_wrappers_are_accepted(fixtures_dir):
  _, sd, _ = _case(fixtures_dir, 'tiny')
  model = create_model(convert.infer_model_config(sd))
  plain = convert.params_from_torch(sd, model)
  wrapped = convert.params_from_torch(
    {'state_dict': {f'module.{k}': v for k, v in sd.items()}}, model
  )
  jax.tree.map(np.testing.assert_array_equal, plain, wrapped)


def test_errors_name_every_problem(fixtures_dir):
  _, sd, _ = _case(fixtures_dir, 'tiny')
  model = create_model(convert.infer_model_config(sd))
  bad = dict(sd)
  del bad['conv_in.weight']
  bad['conv_out.weight'] = np.zeros((3, 8, 5, 5), np.float32)
  shared = 'body.0.body.0.blocks.1.1.conv1x1.weight'  # the second column of stream 1's DAU
  bad[shared] = bad[shared] + 1.0
  bad['body.0.extra.weight'] = np.zeros(1, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.params_from_torch(bad, model)
  msg = str(e.value)
  assert 'missing key: conv_in.weight' in msg
  assert 'shape mismatch: conv_out.weight is [3, 8, 5, 5], expected [3, 8, 3, 3]' in msg
  assert f'inconsistent shared tensor: {shared}' in msg
  assert 'unexpected key: body.0.extra.weight' in msg
  assert '4 problem(s)' in msg


def test_inconsistent_network_wide_prelu_is_rejected(fixtures_dir):
  _, sd, _ = _case(fixtures_dir, 'mesh')
  model = create_model(convert.infer_model_config(sd))
  bad = dict(sd)
  key = 'body.1.body.1.blocks.1.2.body.1.weight'
  bad[key] = bad[key] * 2
  with pytest.raises(convert.ConversionError, match=f'inconsistent shared tensor: {key}'):
    convert.params_from_torch(bad, model)


def test_cli_writes_an_export_that_loads(fixtures_dir, tmp_path, capsys):
  src = fixtures_dir / 'tiny' / 'state_dict.npz'
  out = tmp_path / 'tiny'
  assert convert.main(['--source', str(src), '--output', str(out)]) == 0
  model_config, params = checkpoints.load_export(out)
  assert model_config['arch'] == 'mirnet'
  _, sd, d = _case(fixtures_dir, 'tiny')
  model = create_model(model_config)
  x = np.load(d / 'input.npy').transpose(0, 2, 3, 1)
  got = np.asarray(model.apply({'params': params}, x))
  assert np.max(np.abs(got - np.load(d / 'output.npy').transpose(0, 2, 3, 1))) <= 1e-4
  # A second run never overwrites; a bad source names the file.
  assert convert.main(['--source', str(src), '--output', str(out)]) == 1
  assert 'already exists' in capsys.readouterr().err
  assert (
    convert.main(['--source', str(tmp_path / 'nope.npz'), '--output', str(tmp_path / 'x')]) == 1
  )
  assert 'nope.npz: no such file' in capsys.readouterr().err


def test_cli_reads_pytorch_checkpoints(fixtures_dir, tmp_path):
  torch = pytest.importorskip('torch', reason='the .pth path needs the convert extra (torch)')
  _, sd, _ = _case(fixtures_dir, 'tiny')
  pth = tmp_path / 'model_best.pth'
  torch.save({'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()}}, pth)
  loaded = convert.load_state_dict(pth)
  assert set(loaded) == {f'module.{k}' for k in sd}
  assert convert.main(['--source', str(pth), '--output', str(tmp_path / 'out')]) == 0
